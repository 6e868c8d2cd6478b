"""Cross-request batching: images from concurrent requests share one encoder call.

Requests put their preprocessed pixels on a bounded queue and await their results. One
collector task runs one batch at a time on a single worker thread, so the event loop stays
free and the device sees one batch at a time. It never waits on an idle device: as soon as
the previous batch is done it takes everything queued (up to `max_batch` images), so a lone
request starts at once and requests that arrive while a batch runs form the next one. The
encoder normalises each row on its own, so a request's features do not depend on its
batch-mates beyond floating-point kernel choice (tests/integration/test_service_batching.py
checks results agree).

A job may carry a `Scoring` (the blend against its cache snapshot). The batch job
(`BatchJob`, also the Ray Serve app's) scores its jobs on the device thread right after the
encoder, one call per group of jobs with the same `Scoring.key` (snapshot, method, options),
so a request is answered with its own batch, blends run batched, and each group is copied to
the host once. Its pixels are collated by the encoder's `pixel_batch` (uint8, pinned on CUDA).

A request whose client went away leaves the queue at once (its coroutine is cancelled), and
one that waited longer than `max_queue_wait` is answered Overloaded instead of being encoded
for nobody. If the collector task ever dies, `on_failure` is told, so readiness can fail.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvclip.service.metrics import Metrics

log = logging.getLogger("kvclip.batcher")


class Overloaded(Exception):
    """The queue is full; the caller should answer 503 with Retry-After."""


class Stopped(Exception):
    """The batcher is shutting down."""


class RequestTooLarge(ValueError):
    """More images than the whole queue holds: waiting would never help (413, not 503)."""


@dataclass(frozen=True)
class Scoring:
    """How a job's features become its results, on the device thread."""

    score: Callable[[torch.Tensor], list[Any]]  # features (k x D) -> one host-side result per row
    key: Hashable  # jobs with equal keys are scored in one call; it must pin the cache snapshot


@dataclass(eq=False)  # jobs are compared by identity (withdrawal from the queue)
class _Job:
    pixels: torch.Tensor  # k x 3 x H x W
    future: asyncio.Future
    scoring: Scoring | None = None  # None: the result is the features themselves
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return self.pixels.shape[0]


@dataclass(frozen=True)
class Failed:
    """A job's outcome when its group's scoring raised."""

    error: Exception


@dataclass(frozen=True)
class BatchJob:
    """One encoder batch on the device thread: collate the jobs' pixels, encode them once,
    then score each group of jobs that share a Scoring.key in one call."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    # Parts (k x 3 x H x W) -> one batch; Encoder.pixel_batch puts it in pinned memory on CUDA.
    collate: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat
    metrics: Metrics | None = None

    def __call__(self, jobs: Sequence[tuple[torch.Tensor, Scoring | None]]) -> list[Any]:
        """One outcome per (pixels, scoring) job: its features (no scoring), its results, or Failed."""
        outcomes: list[Any] = self._encode([pixels for pixels, _ in jobs])
        groups: dict[Hashable, tuple[Scoring, list[int]]] = {}
        for i, (_, scoring) in enumerate(jobs):
            if scoring is not None:
                groups.setdefault(scoring.key, (scoring, []))[1].append(i)
        for scoring, members in groups.values():
            parts = [outcomes[i] for i in members]
            features = parts[0] if len(parts) == 1 else torch.cat(parts)
            try:
                results = scoring.score(features)
            except Exception as exc:  # one group's failure (a bad cache) fails only that group
                log.exception("scoring %d images failed", features.shape[0])
                for i in members:
                    outcomes[i] = Failed(exc)
                continue
            start = 0
            for i, part in zip(members, parts):
                outcomes[i] = results[start:start + part.shape[0]]
                start += part.shape[0]
        return outcomes

    def _encode(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        start = time.perf_counter()
        pixels = self.collate(parts)
        features = self.encode(pixels)
        if features.is_cuda:
            torch.cuda.synchronize(features.device)
        if self.metrics:
            self.metrics.batch_images.observe(pixels.shape[0])
            self.metrics.batch_seconds.observe(time.perf_counter() - start)
        return list(features.split([part.shape[0] for part in parts]))


class Batcher:
    def __init__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        max_batch: int,
        max_queue: int,
        metrics: Metrics | None = None,
        max_queue_wait_s: float | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        collate: Callable[[list[torch.Tensor]], torch.Tensor] = torch.cat,
    ) -> None:
        self.encode = encode
        self.collate = collate
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.max_queue_wait_s = max_queue_wait_s
        self.on_failure = on_failure
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images in self._jobs
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvclip-device")

    @property
    def queued_images(self) -> int:
        return self._queued

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._collect(), name="kvclip-batcher")
        self._task.add_done_callback(self._collector_done)

    async def stop(self) -> None:
        task, self._task = self._task, None  # no new work from here on
        if task is not None:
            task.remove_done_callback(self._collector_done)
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        _fail(self._jobs, Stopped("the server is shutting down"))
        self._jobs.clear()
        self._queued = 0
        self._report_queue()
        # The batch in flight finishes on the device thread; waiting for it must not block the loop.
        await asyncio.to_thread(self._executor.shutdown, True)

    def _collector_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception() or RuntimeError("the batcher's collector task ended")
        log.error("the batcher's collector task died: %r; no request can be encoded", exc)
        _fail(self._jobs, Stopped(f"the encoder queue stopped ({exc!r})"))
        if self.on_failure is not None:
            self.on_failure(exc)

    async def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features (k x D, on the encoder's device) for one request's k images."""
        parts = await self._submit(pixels, None)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    async def score_images(self, pixels: torch.Tensor, scoring: Scoring) -> list[Any]:
        """`scoring.score` of the features of one request's k images: k results, in order,
        computed in the batch job that encoded them."""
        parts = await self._submit(pixels, scoring)
        return [result for part in parts for result in part]

    async def _submit(self, pixels: torch.Tensor, scoring: Scoring | None) -> list[Any]:
        """Each part's result. A request larger than max_batch is split; its parts queue
        together, so the request is admitted whole or refused whole."""
        size = pixels.shape[0]
        self.check_room(size)
        loop = asyncio.get_running_loop()
        jobs = [_Job(part, loop.create_future(), scoring) for part in pixels.split(self.max_batch)]
        for job in jobs:
            self._jobs.append(job)
        self._queued += size
        self._report_queue()
        self._wakeup.set()
        try:
            parts = await asyncio.gather(*(job.future for job in jobs))
        except BaseException:
            # The client went away (cancelled), or one part was refused: the request's other
            # parts must not hold queue space or be encoded for nobody.
            self._withdraw(jobs)
            raise
        return parts

    def check_room(self, size: int) -> None:
        """Stopped, RequestTooLarge or Overloaded unless `size` images fit the queue now; the
        server asks before decoding a request too, so a full queue costs no decoding."""
        if not self.running:
            raise Stopped("the batcher is not running")
        if size > self.max_queue:  # could never be admitted; config.py keeps max_images <= max_queue
            raise RequestTooLarge(f"{size} images exceed the encoder queue of {self.max_queue}")
        if self._queued + size > self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc()
            raise Overloaded(f"server overloaded: {self._queued} images are waiting for the encoder "
                             f"(limit {self.max_queue}); retry later")

    def _withdraw(self, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                self._jobs.remove(job)
            except ValueError:
                continue  # already taken into a batch; its result is dropped there
            self._queued -= job.size
            job.future.cancel()
        self._report_queue()

    async def _collect(self) -> None:
        batch: list[_Job] = []  # taken off the queue, not yet answered
        try:
            while True:
                await self._gather_batch(batch)
                await self._run_batch([job for job in batch if not job.future.done()])
                batch.clear()
        except asyncio.CancelledError:
            # Jobs already taken off the queue would otherwise wait forever.
            _fail(batch, Stopped("the server is shutting down"))
            raise

    async def _gather_batch(self, batch: list[_Job]) -> None:
        """Fill `batch` with what is queued now, up to max_batch images; wait only for the first.

        The device is idle here, so waiting for more would only add latency: whatever arrives
        while this batch runs queues up and becomes the next batch.
        """
        while not self._jobs:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch.append(self._take())
        size = batch[0].size
        while self._jobs and size + self._jobs[0].size <= self.max_batch:
            job = self._take()
            batch.append(job)
            size += job.size

    async def _run_batch(self, batch: list[_Job]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._run_on_device, batch)
        except Exception as exc:  # a failed batch fails its requests, never the collector
            log.exception("encoder batch of %d images failed", sum(job.size for job in batch))
            _fail(batch, exc)
            return
        for job, outcome in zip(batch, outcomes):
            if job.future.done():
                continue
            if isinstance(outcome, Failed):
                job.future.set_exception(outcome.error)
            else:
                job.future.set_result(outcome)

    def _take(self) -> _Job:
        job = self._jobs.popleft()
        self._queued -= job.size
        self._report_queue()
        waited = time.perf_counter() - job.enqueued
        if self.max_queue_wait_s is not None and waited > self.max_queue_wait_s and not job.future.done():
            if self.metrics:
                self.metrics.rejected.inc()
            job.future.set_exception(Overloaded(
                f"the request waited {waited:.1f} s for the encoder (limit {self.max_queue_wait_s:g} s)"))
        return job

    def _run_on_device(self, batch: list[_Job]) -> list[Any]:
        return BatchJob(self.encode, self.collate, self.metrics)([(job.pixels, job.scoring) for job in batch])

    def _report_queue(self) -> None:
        if self.metrics:
            self.metrics.queue_images.set(self._queued)


def _fail(jobs, exc: Exception) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)
