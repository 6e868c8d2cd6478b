"""Admission before decoding: a request is refused (503, Retry-After) before any of its images
is decoded when the decode backlog or the encoder queue cannot take it, and a client that
hangs up cancels the decoding it was waiting for."""
from __future__ import annotations

import asyncio
import base64
import json
import threading

import pytest

from tests.bad_inputs import corpus
from tests.service_helpers import make_config, running_app

pytestmark = pytest.mark.anyio

CLASSIFY = "/v1/classify"
GOOD = dict((kind, data) for kind, data, _ in corpus())["one-pixel"]
WAIT_S = 60.0


class GatedPreprocess:
    """Wraps a preprocess: counts calls and holds every call until `release` is set."""

    def __init__(self, preprocess) -> None:
        self.preprocess = preprocess
        self.calls = 0
        self.release = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, image):
        with self._lock:
            self.calls += 1
        assert self.release.wait(WAIT_S), "never released"
        return self.preprocess(image)


async def until(condition, what: str) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def body(count: int) -> dict:
    return {"cache": "fashion", "images": [{"data": base64.b64encode(GOOD).decode()}] * count}


@pytest.fixture
def gate(tiny_encoder, monkeypatch) -> GatedPreprocess:
    gate = GatedPreprocess(tiny_encoder.preprocess)
    monkeypatch.setattr(tiny_encoder, "preprocess", gate)
    yield gate
    gate.release.set()


async def test_a_full_decode_backlog_refuses_before_decoding(served_caches, tiny_encoder, gate):
    config = make_config(served_caches, decode_workers=1, max_decode_backlog=4, max_images=4, retry_after_s=2)
    async with running_app(config, tiny_encoder) as (app, client):
        first = asyncio.create_task(client.post(CLASSIFY, json=body(4)))
        await until(lambda: gate.calls == 1, "the first image to be decoding")
        assert app.state.kv.decoder.pending == 4
        refused = await client.post(CLASSIFY, json=body(1))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded" and refused.headers["retry-after"] == "2"
        assert gate.calls == 1  # nothing of the refused request was decoded
        gate.release.set()
        assert (await first).status_code == 200
        await until(lambda: app.state.kv.decoder.pending == 0, "the backlog to empty")
        assert (await client.post(CLASSIFY, json=body(1))).status_code == 200


async def test_a_full_encoder_queue_refuses_before_decoding(served_caches, tiny_encoder, monkeypatch):
    config = make_config(served_caches, max_queue=4, max_images=4, max_batch=4, max_wait_ms=0)
    async with running_app(config, tiny_encoder) as (app, client):
        batcher = app.state.kv.batcher
        encode, encoding, release = batcher.encode, threading.Event(), threading.Event()

        def slow_encode(pixels):
            encoding.set()
            assert release.wait(WAIT_S)
            return encode(pixels)

        monkeypatch.setattr(batcher, "encode", slow_encode)
        first = asyncio.create_task(client.post(CLASSIFY, json=body(4)))
        await until(encoding.is_set, "the first batch to be encoding")
        second = asyncio.create_task(client.post(CLASSIFY, json=body(4)))
        await until(lambda: batcher.queued_images == 4, "the second request to queue")
        gate = GatedPreprocess(tiny_encoder.preprocess)
        gate.release.set()
        monkeypatch.setattr(tiny_encoder, "preprocess", gate)
        refused = await client.post(CLASSIFY, json=body(1))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded", refused.text
        assert gate.calls == 0  # refused before decoding
        release.set()
        assert (await first).status_code == 200 and (await second).status_code == 200


async def test_a_client_that_hangs_up_cancels_its_pending_decodes(served_caches, tiny_encoder, gate):
    config = make_config(served_caches, decode_workers=1, max_images=4)
    async with running_app(config, tiny_encoder) as (app, _client):
        payload = json.dumps(body(4)).encode()
        gone = asyncio.Event()
        sent: list[dict] = []
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": CLASSIFY, "raw_path": CLASSIFY.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(payload)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        call = asyncio.create_task(app(scope, receive, send))
        await until(lambda: gate.calls == 1, "the first image to be decoding")
        gone.set()  # the client hangs up while three images still wait for the decoder
        await asyncio.wait_for(call, WAIT_S)  # answered without waiting for the decoder
        gate.release.set()
        await until(lambda: app.state.kv.decoder.pending == 0, "the backlog to empty")
        assert gate.calls == 1  # the three waiting images were never decoded
        assert sent[0]["status"] == 499
