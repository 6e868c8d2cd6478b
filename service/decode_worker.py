"""What runs inside a decode worker process (service/decode_pool.py starts them).

It imports Pillow, numpy and service/pixels.py, and the preprocess arrives as a
kvclip/portable_preprocess.PortablePreprocess: no torch, open_clip, FastAPI or FAISS, so a
worker starts in a fraction of a second and holds tens of MB.
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from kvclip.service.pixels import Prepared, RequestImage, prepare

WARM_TIMEOUT_S = 600.0  # a worker's start on a loaded machine (more when a step imports torchvision)

# Set once per process by start_worker.
_preprocess: Callable[[Image.Image], np.ndarray] | None = None
_started: Any = None  # the pool's multiprocessing Barrier: every worker up before warm() returns


def start_worker(preprocess: Callable[[Image.Image], np.ndarray], started: Any) -> None:
    """The pool's initializer."""
    global _preprocess, _started
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the server stops us
    if "torch" in sys.modules:  # a kept torchvision step imported it: one image at a time here
        sys.modules["torch"].set_num_threads(1)
    _preprocess, _started = preprocess, started


def warm() -> int:
    """Blocks until every worker of the pool runs it, so that N calls reach N workers."""
    _started.wait(WARM_TIMEOUT_S)
    return os.getpid()


def prepare_in_worker(item: RequestImage, max_pixels: int, min_size: int | None) -> tuple[Prepared, np.ndarray | None]:
    """`prepare` with the worker's preprocess; the pixels apart, as numpy (150 KB pickled for
    224 x 224; a torch tensor would travel through shared-memory file descriptors)."""
    assert _preprocess is not None, "not in a decode worker process"
    prepared = prepare(item, _preprocess, max_pixels, min_size)
    pixels, prepared.pixels = prepared.pixels, None
    assert pixels is None or isinstance(pixels, np.ndarray)
    return prepared, pixels
