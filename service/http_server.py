"""The uvicorn settings of `kvclip serve` (tests/live_server.py starts the same)."""
from __future__ import annotations

import uvicorn

from kvclip.service.config import ServerConfig
from kvclip.service.timeouts import header_timeout_protocol


def uvicorn_config(app, config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, access_log=False,
        http=header_timeout_protocol(config.header_timeout_s),  # --header-timeout-s (service/timeouts.py)
        # Longer than clients' pool expiry: the client must be the side that drops an idle
        # connection, else its next request may cross the server's close and meet a reset.
        timeout_keep_alive=config.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        timeout_graceful_shutdown=30,  # --max-concurrency is the app's (middleware.ConcurrencyLimitMiddleware)
    )
