"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests: FastAPI on uvicorn in a
thread. It answers from `reply(request_json)`, records each request and its Authorization
header, and can fail the first `fail_first` requests with a 500 (the client's retries must
absorb them), asking for the retry 10 ms later (`retry-after-ms`, which the openai client
honours) instead of its default backoff from half a second."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


@dataclass
class FakeChat:
    reply: Callable[[dict], str]
    fail_first: int = 0
    fail_message: str = "try again"  # the error message of those failures
    requests: list[dict] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)  # each request's Authorization header
    failures: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    release: threading.Event | None = None  # when set: each request waits for it (to observe concurrency)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        def complete(body: dict, request: Request):
            with self._lock:
                if self.failures < self.fail_first:
                    self.failures += 1
                    return JSONResponse({"error": {"message": self.fail_message, "type": "server_error"}},
                                        status_code=500, headers={"retry-after-ms": "10"})
                self.requests.append(body)
                self.authorizations.append(request.headers.get("authorization"))
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                if self.release is not None:
                    self.release.wait(30)
                text = self.reply(body)
            finally:
                with self._lock:
                    self.in_flight -= 1
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        return app


@contextlib.contextmanager
def serving(chat: FakeChat) -> Iterator[str]:
    """Runs the app; yields its base URL (http://127.0.0.1:PORT/v1)."""
    config = uvicorn.Config(chat.app(), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fake OpenAI server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
