"""The app under uvicorn in a thread of the test process, on 127.0.0.1: real sockets and HTTP,
while the test can still reach into the app (unlike tests/server_process.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time

import httpx
import uvicorn

from kvclip.service.http_server import uvicorn_config
from tests.server_process import START_TIMEOUT_S, free_port


@contextlib.contextmanager
def live_server(app, header_timeout_s: float = 10.0):
    """Yields the base URL once /readyz answers 200; stops the server on exit."""
    port = free_port()
    config = dataclasses.replace(app.state.kv.config, host="127.0.0.1", port=port, header_timeout_s=header_timeout_s)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert thread.is_alive() and time.monotonic() < deadline, "the live server never became ready"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
