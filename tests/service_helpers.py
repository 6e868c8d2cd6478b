"""Helpers for server tests: run the app in-process (httpx over ASGI) with its lifespan."""
from __future__ import annotations

import contextlib
import multiprocessing
import shutil
from dataclasses import replace
from pathlib import Path

import httpx
import torch

from kvclip.service.app import create_app
from kvclip.service.config import ServerConfig
from kvclip.service.metrics import metric_value  # noqa: F401  (re-exported for tests)
from tests.waiting import until

READY_TIMEOUT_S = 120  # the model loads in a thread; a loaded machine takes many times longer


# What a test's forkserver imports once, before it forks build workers (forkserver_context).
WORKER_PRELOAD = ["kvclip.service.build_worker", "kvclip.models"]


def forkserver_context() -> multiprocessing.context.BaseContext:
    """Build workers forked from a forkserver that imported torch, open_clip and the builder
    once: a test's warm worker, its replacement and each process-per-job worker then start in
    well under a second, not after ~5 s of imports each. The server's own start method (spawn,
    service/jobs.py) runs in the real servers of tests/e2e."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # no effect once this process's forkserver runs
    return context


def make_config(caches: Path, **overrides) -> ServerConfig:
    """An in-process server's config. Builds run on a thread of the test process (no worker
    process to spawn), so they keep this process's nice and torch threads."""
    config = ServerConfig(caches=Path(caches), model="tiny-random", device="cpu", build_worker="thread",
                          build_nice=0, build_threads=torch.get_num_threads())
    return replace(config, **overrides)


@contextlib.asynccontextmanager
async def running_app(config: ServerConfig, encoder=None, wait_ready: bool = True):
    """Yields (app, client) with the lifespan running; waits for /readyz unless told not to."""
    app = create_app(config, encoder)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kvclip.test", timeout=60) as client:
            if wait_ready:
                async def ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                await until(ready, READY_TIMEOUT_S, "GET /readyz answering 200", interval=0.05)
            yield app, client


def copy_caches(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def image_files(folder: Path, count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `files=` for the first `count` PNGs under folder (sorted by name)."""
    paths = sorted(Path(folder).rglob("*.png"), key=lambda p: p.name)[:count]
    return [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]


def run_serve(monkeypatch, capsys, *argv: str, env: dict[str, str] | None = None):
    """`kvclip serve ARGV` in-process, up to where it would listen: (exit code, stderr, the
    uvicorn.Config it would have served with, or None when it never got there).

    Environment: no KVCLIP_* variable but `env`. uvicorn's Server is a recorder; the root
    logger, the signal handlers and the frozen heap (gc.freeze) that `serve` sets are restored
    afterwards.
    """
    import gc
    import logging
    import os
    import signal

    import uvicorn

    from kvclip.cli import main

    for name in [n for n in os.environ if n.startswith("KVCLIP_")]:
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    served: list[uvicorn.Config] = []

    class NotListening:
        def __init__(self, config: uvicorn.Config) -> None:
            served.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setattr(uvicorn, "Server", NotListening)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = main(["serve", *argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        gc.unfreeze()
    return code, capsys.readouterr().err, served[0] if served else None
