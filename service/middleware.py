"""ASGI middleware: request id, access log and metrics; a limit on requests in flight; request
body size limit."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from kvclip.service.logs import request_id
from kvclip.service.metrics import Metrics

access_log = logging.getLogger("kvclip.access")
log = logging.getLogger("kvclip.service")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_BUILDS_PATH = re.compile(r"^/v1/caches/[^/]+/builds/?$")
# The 500 body: no internals, just where to look. (Here, not in service/errors.py, whose
# error table lists BodyTooLarge from this module.)
_INTERNAL_ERROR = {"error": {"code": "internal",
                             "message": "internal server error; see the server log (request id in X-Request-ID)"}}


class RequestContextMiddleware:
    """Tags the request with an id (X-Request-ID in, or a new one; always echoed back),
    counts it by route template and status, and writes one access log line."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex[:16]
        token = request_id.set(rid)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # Answered here rather than by Starlette's outer error middleware, so the 500
            # carries the request id that the log line below is tagged with.
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                await send_json(send_wrapper, 500, _INTERNAL_ERROR)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.latency.labels(scope["method"], template).observe(elapsed)
            if template not in ("/healthz", "/readyz", "/metrics"):
                access_log.info(
                    "%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1000,
                    extra={"method": scope["method"], "path": scope["path"], "status": status,
                           "duration_ms": round(elapsed * 1000, 2)},
                )
            request_id.reset(token)


class ConcurrencyLimitMiddleware:
    """Answers the JSON 503 with Retry-After once `limit` requests are in flight.

    uvicorn's own limit_concurrency answers plain text without Retry-After or request id, and
    counts idle keep-alive connections too, so it refused clients that were only connected.
    Probes and /metrics are never refused: an overloaded server is still alive, and an
    orchestrator restarting it would make the overload worse.
    """

    _EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app, limit: int, retry_after_s: int) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = str(retry_after_s).encode()
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self._EXEMPT:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            return await send_json(send, 503, {"error": {
                "code": "overloaded",
                "message": f"server overloaded: {self.limit} requests in flight (--max-concurrency); retry later",
            }}, headers=[(b"retry-after", self.retry_after)])
        self.in_flight += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes with 413: by Content-Length before reading, and by
    counting while reading for chunked uploads, so a huge body is never buffered."""

    def __init__(self, app, limit: int, build_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.build_limit = build_limit or limit  # build uploads (archives of images) are larger

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.build_limit if _BUILDS_PATH.match(scope["path"]) else self.limit
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await send_json(send, 413, {"error": {
                "code": "too_large",
                "message": f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
            }})
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def send_json(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer a raw ASGI request with a JSON body (for middleware, below FastAPI's handlers)."""
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
