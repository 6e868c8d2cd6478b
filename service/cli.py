"""`kvclip serve`: load the model, print the configuration, run uvicorn."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from kvclip.extras import SERVER
from kvclip.service import config as server_config
from kvclip.threads import cpu_thread_defaults

log = logging.getLogger("kvclip.service")


def add_commands(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="serve caches over HTTP",
        description="Serve the caches in --caches over HTTP. Every flag can also be set by its "
        "KVCLIP_* environment variable; API keys come from KVCLIP_API_KEYS or --api-keys-file.",
    )
    server_config.add_arguments(parser)
    parser.set_defaults(run=serve, extra=SERVER)


def serve(args: argparse.Namespace) -> int:
    from kvclip.errors import InvalidModelName
    from kvclip.model_names import check_model_name

    # Checked before torch, open_clip and fastapi are imported (seconds): a typo fails at once.
    try:
        config = server_config.from_namespace(args)
        check_model_name(config.model)
    except (ValueError, InvalidModelName) as exc:
        print(f"kvclip serve: error: {exc}", file=sys.stderr)
        return 2
    if not config.caches.is_dir():
        print(f"kvclip serve: error: --caches {config.caches}: no such folder. Create it (mkdir -p "
              f"{config.caches}) to start empty and build caches over HTTP, or point it at the folder "
              "whose subfolders 'kvclip build --out FOLDER/NAME' wrote", file=sys.stderr)
        return 2
    # Before torch loads: its OpenMP runtime reads these once (kvclip/threads.py says why).
    applied = cpu_thread_defaults() if "torch" not in sys.modules else {}
    import uvicorn

    from kvclip.heap import freeze_start_up_objects
    from kvclip.models import load_encoder
    from kvclip.service import logs
    from kvclip.service.app import create_app
    from kvclip.service.http_server import uvicorn_config
    from kvclip.service.state import open_digests

    logs.configure(config.log_format, config.log_level)
    log.info("configuration %s", json.dumps(config.describe()))
    if applied:
        log.info("CPU thread defaults: %s (set either variable to override)", applied)
    # Load before listening: a model that cannot be had fails the command with its reason.
    digests = open_digests(config)
    encoder = load_encoder(config.model, config.device, config.model_cache_dir, digests)
    digests.save()  # the app's own record reads it back, checkpoint digest included
    app = create_app(config, encoder)
    keys = app.state.kv.api_keys
    if keys.enabled:
        log.info("API keys: %d configured", len(keys.digests))
    else:
        log.warning("no API keys configured: every client may classify and change caches")
    log.info("start-up objects frozen (out of the collector's scans): %d", freeze_start_up_objects())
    server = uvicorn.Server(uvicorn_config(app, config))
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the
    # handler that was installed before it; a no-op one makes a clean shutdown exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    log.info("server stopped")
    return 0
