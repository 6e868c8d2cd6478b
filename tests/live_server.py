"""The app under uvicorn in a thread of the test process, on 127.0.0.1: real sockets and HTTP,
while the test can still reach into the app (unlike tests/server_process.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from kvclip.service.app import create_app
from kvclip.service.http_server import uvicorn_config
from tests.server_process import START_TIMEOUT_S, free_port
from tests.service_helpers import make_config


@contextlib.contextmanager
def live_server(app, header_timeout_s: float = 10.0):
    """Yields the base URL once /readyz answers 200; stops the server on exit."""
    config = dataclasses.replace(app.state.kv.config, host="127.0.0.1", port=free_port(), header_timeout_s=header_timeout_s)
    with serving(uvicorn_config(app, config)) as url:
        yield url


@contextlib.contextmanager
def serving(config: uvicorn.Config) -> Iterator[str]:
    """uvicorn serving `config` in a thread: the base URL once /readyz answers 200."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    url = f"http://{config.host}:{config.port}"
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


@dataclasses.dataclass
class LiveServer:
    url: str
    caches: Path
    app: FastAPI


@contextlib.contextmanager
def serve_in_thread(caches: Path, workdir: Path, keys: dict[str, str] | None = None, encoder=None,
                    **overrides) -> Iterator[LiveServer]:
    """`kvclip serve`'s app on a real socket, in a thread of the test process: for tests about
    what goes over HTTP (clients, the page, timeouts), not about the server's process.

    `keys` maps API keys to their scopes (written to an --api-keys-file); `overrides` are
    ServerConfig fields (tests/service_helpers.make_config: builds run on a thread).
    """
    config = make_config(caches, **overrides)
    if keys:
        workdir.mkdir(parents=True, exist_ok=True)
        keys_file = workdir / "api-keys"
        keys_file.write_text("".join(f"{key} {scopes}\n" for key, scopes in keys.items()))
        config = dataclasses.replace(config, api_keys_file=keys_file)
    app = create_app(config, encoder)
    with live_server(app, header_timeout_s=config.header_timeout_s) as url:
        yield LiveServer(url, Path(caches), app)
