"""--max-concurrency refusals are the documented JSON 503 with Retry-After, never uvicorn's text."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from kvclip.service.metrics import Metrics
from kvclip.service.middleware import ConcurrencyLimitMiddleware, RequestContextMiddleware

pytestmark = pytest.mark.anyio


def held_app(release: asyncio.Event, entered: asyncio.Event):
    async def slow(request):
        entered.set()
        await release.wait()
        return PlainTextResponse("done")

    async def probe(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/classify", slow, methods=["POST"]), Route("/healthz", probe)])
    limited = ConcurrencyLimitMiddleware(app, limit=1, retry_after_s=3)
    return limited, RequestContextMiddleware(limited, Metrics())


async def test_the_request_over_the_limit_gets_json_503_with_retry_after():
    release, entered = asyncio.Event(), asyncio.Event()
    limited, app = held_app(release, entered)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kv") as client:
        first = asyncio.create_task(client.post("/v1/classify", content=b"x"))
        await asyncio.wait_for(entered.wait(), 30)
        refused = await client.post("/v1/classify", content=b"x")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "3" and refused.headers["x-request-id"]
        assert refused.json()["error"]["code"] == "overloaded"
        assert "max-concurrency" in refused.json()["error"]["message"]
        assert (await client.get("/healthz")).status_code == 200  # probes are never refused
        release.set()
        assert (await asyncio.wait_for(first, 30)).text == "done"
        assert limited.in_flight == 0
        assert (await client.post("/v1/classify", content=b"x")).status_code == 200  # the slot is free again
