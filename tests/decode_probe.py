"""Functions tests submit to decode worker processes (service/decode_pool.py): this module
imports nothing heavy, so a worker that runs them imports no more than it did."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "open_clip", "fastapi", "starlette", "pydantic", "faiss", "timm", "kvclip.models",
         "kvclip.service.classify")


def heavy_modules() -> list[str]:
    """The heavy modules loaded in this process."""
    return sorted(name for name in HEAVY if name in sys.modules)


def die(_item: object = None) -> None:
    """A worker killed mid-task (out of memory, a crashing codec)."""
    os._exit(9)


def wait_for(gate: str) -> str:
    """Holds a worker until the file `gate` exists (a test opens it), noting that it started
    (GATE.started) and then that it ran (GATE.ran)."""
    path = Path(gate)
    with open(path.with_suffix(".started"), "a") as started:
        started.write("started\n")
    while not path.exists():
        time.sleep(0.01)
    with open(path.with_suffix(".ran"), "a") as ran:
        ran.write("ran\n")
    return gate
