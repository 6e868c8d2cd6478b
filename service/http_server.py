"""The uvicorn settings of `kvclip serve` (tests/live_server.py starts the same).

uvloop and httptools (both in the server extra) take less CPU per request than asyncio's
pure-Python loop parts and h11, CPU that decoding and the device thread's Python need. The
protocol is httptools' (service/timeouts.py adds the header timeout to it); uvloop does not
exist for Windows, where the server runs on asyncio's loop.
"""
from __future__ import annotations

import sys

import uvicorn

from kvclip.service.config import ServerConfig
from kvclip.service.timeouts import header_timeout_protocol

LOOP = "asyncio" if sys.platform == "win32" else "uvloop"


def uvicorn_config(app, config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, access_log=False,
        loop=LOOP,
        http=header_timeout_protocol(config.header_timeout_s),  # --header-timeout-s (service/timeouts.py)
        # Longer than clients' pool expiry: the client must be the side that drops an idle
        # connection, else its next request may cross the server's close and meet a reset.
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=30,  # --max-concurrency is the app's (middleware.ConcurrencyLimitMiddleware)
    )
