"""--decode-processes: decode and preprocess images in worker processes, off the server's GIL.

On a fast GPU the device thread needs the GIL to launch kernels; Pillow and the Python around
it on decode threads contend for it. Here each image's `prepare` (service/pixels.py: bytes ->
PIL image -> uint8 3 x S x S pixels) runs in one of N spawned processes, and the pixels come
back as a uint8 numpy array, made a tensor here (`from_worker`).

- Spawned, never forked: the server process has threads (and maybe CUDA).
- The workers import Pillow and numpy only (service/decode_worker.py): the preprocess they
  get is `BoundedPreprocess.portable()`, which pickles without torch or open_clip, and
  service/pixels.py imports no torch, FastAPI, model or FAISS.
- A worker that dies (killed, out of memory) breaks its executor (BrokenProcessPool): the
  requests it held get DecodeWorkerLost (503, service/admission.py) and the next submit
  starts a new pool, so the server keeps serving.
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from kvclip.preprocess import BoundedPreprocess
from kvclip.service.decode_worker import start_worker, warm
from kvclip.service.pixels import Prepared

log = logging.getLogger("kvclip.service")


def from_worker(result: tuple[Prepared, np.ndarray | None]) -> Prepared:
    """prepare_in_worker's answer as `prepare`'s: the same pixels, as a tensor."""
    prepared, pixels = result
    if pixels is not None:
        prepared.pixels = torch.from_numpy(pixels)
    return prepared


class ProcessDecodePool(Executor):
    """A ProcessPoolExecutor of `workers` spawned processes that replaces itself when broken."""

    def __init__(self, workers: int, preprocess: BoundedPreprocess) -> None:
        self.workers = workers
        self.replaced = 0  # pools started after a worker died
        self._context = multiprocessing.get_context("spawn")
        self._preprocess = preprocess.portable()
        self._lock = threading.Lock()
        self._closed = False
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        started = self._context.Barrier(self.workers)
        return ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=start_worker,
                                   initargs=(self._preprocess, started))

    @property
    def pids(self) -> list[int]:
        """The current pool's worker processes (started ones)."""
        return list(getattr(self._pool, "_processes", None) or {})

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            pool = self._pool
        try:
            return pool.submit(fn, *args, **kwargs)
        except BrokenProcessPool:
            return self._replace(pool).submit(fn, *args, **kwargs)

    def _replace(self, broken: ProcessPoolExecutor) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._pool is broken:  # not yet replaced by another request's submit
                log.error("a decode worker process died (killed, or out of memory?); starting %d new ones",
                          self.workers)
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                self.replaced += 1
            return self._pool

    def warm(self) -> list[int]:
        """Start every worker and wait until each has imported what it needs (the first requests
        then pay no Python start); their pids."""
        futures = [self.submit(warm) for _ in range(self.workers)]
        return [f.result() for f in futures]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            pool = self._pool
        pool.shutdown(wait=wait, cancel_futures=cancel_futures)
