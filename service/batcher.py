"""Cross-request batching: images from concurrent requests share one encoder call.

Requests put their preprocessed pixels on a bounded queue and await their features. One
collector task takes the first waiting job, waits up to `max_wait` for more (never past
`max_batch` images), and runs the encoder on a single worker thread, so the event loop
stays free and the device sees one batch at a time. The encoder normalises each row on
its own, so a request's features do not depend on its batch-mates beyond floating-point
kernel choice (tests/integration/test_service_batching.py checks results agree).

The same worker thread runs `run_on_device` calls (per-request blends), which keeps all
device work on one thread and ordered with the batches.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from kvclip.service.metrics import Metrics

log = logging.getLogger("kvclip.batcher")
T = TypeVar("T")


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


class Stopped(Exception):
    """The batcher is shutting down."""


@dataclass
class _Job:
    pixels: torch.Tensor  # k x 3 x H x W
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return self.pixels.shape[0]


class Batcher:
    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.encode = encode
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images in self._jobs
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvclip-device")

    @property
    def queued_images(self) -> int:
        return self._queued

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._collect(), name="kvclip-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        _fail(self._jobs, Stopped("the server is shutting down"))
        self._jobs.clear()
        self._queued = 0
        self._executor.shutdown(wait=True)

    async def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features (k x D, on the encoder's device) for one request's k images.

        A request larger than max_batch is split; its parts queue together, so the
        request is admitted whole or refused whole.
        """
        if self._task is None:
            raise Stopped("the batcher is not running")
        size = pixels.shape[0]
        if self._queued + size > self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc()
            raise Overloaded(f"server overloaded: {self._queued} images are waiting for the encoder "
                             f"(limit {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        jobs = [_Job(part, loop.create_future()) for part in pixels.split(self.max_batch)]
        for job in jobs:
            self._jobs.append(job)
        self._queued += size
        self._report_queue()
        self._wakeup.set()
        parts = await asyncio.gather(*(job.future for job in jobs))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    async def run_on_device(self, fn: Callable[..., T], *args) -> T:
        """Run fn on the device thread (after the batch in progress)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _collect(self) -> None:
        batch: list[_Job] = []  # taken off the queue, not yet answered
        try:
            while True:
                await self._gather_batch(batch)
                await self._run_batch([job for job in batch if not job.future.cancelled()])
                batch.clear()
        except asyncio.CancelledError:
            # Jobs already taken off the queue would otherwise wait forever.
            _fail(batch, Stopped("the server is shutting down"))
            raise

    async def _gather_batch(self, batch: list[_Job]) -> None:
        """Fill `batch`: the first waiting job, then others until full or max_wait passes."""
        loop = asyncio.get_running_loop()
        while not self._jobs:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch.append(self._take())
        size = batch[0].size
        deadline = loop.time() + self.max_wait_s
        while size < self.max_batch:
            if self._jobs:
                if size + self._jobs[0].size > self.max_batch:
                    break
                job = self._take()
                batch.append(job)
                size += job.size
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break

    async def _run_batch(self, batch: list[_Job]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            features = await loop.run_in_executor(self._executor, self._encode_batch, batch)
        except Exception as exc:  # a failed batch fails its requests, never the collector
            log.exception("encoder batch of %d images failed", sum(job.size for job in batch))
            _fail(batch, exc)
            return
        for job, part in zip(batch, features):
            if not job.future.done():
                job.future.set_result(part)

    def _take(self) -> _Job:
        job = self._jobs.popleft()
        self._queued -= job.size
        self._report_queue()
        return job

    def _encode_batch(self, batch: list[_Job]) -> list[torch.Tensor]:
        start = time.perf_counter()
        pixels = batch[0].pixels if len(batch) == 1 else torch.cat([job.pixels for job in batch])
        features = self.encode(pixels)
        if features.is_cuda:
            torch.cuda.synchronize(features.device)
        if self.metrics:
            self.metrics.batch_images.observe(pixels.shape[0])
            self.metrics.batch_seconds.observe(time.perf_counter() - start)
        return list(features.split([job.size for job in batch]))

    def _report_queue(self) -> None:
        if self.metrics:
            self.metrics.queue_images.set(self._queued)


def _fail(jobs, exc: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
