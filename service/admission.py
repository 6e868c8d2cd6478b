"""Admission around decoding: a bounded decode backlog, and no work for clients that left.

Decoding runs on a small thread pool (or worker processes: service/decode_pool.py). Without
a bound, a burst of large requests queues unbounded work on it (and memory: every image's bytes); with one, a request whose images do
not fit is refused at once (Overloaded: 503 with Retry-After) before any of them is decoded.
A client that hangs up cancels its request: images not yet started are never decoded.
"""
from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future
from typing import TypeVar

from starlette.requests import Request

from kvclip.service.batcher import Overloaded, Stopped

T = TypeVar("T")
R = TypeVar("R")


class DecodeWorkerLost(Exception):
    """A decode worker process died under the request (service/errors.py: 503 with Retry-After).

    503, not 500: it is no fault of the request's and not a server bug to report; the pool is
    replaced at once, so the retry that clients make after a 503 (kvclip's client does) is
    served. An image that kills its decoder every time fails each retry the same way.
    """


class BoundedDecoder:
    """Runs one task per image (or one per request's batch) on `pool`, with at most `limit`
    images being or waiting to be decoded across all requests; a request is admitted whole or
    refused whole. `batch_pool`, when given, runs the batch tasks (a device decode must stay
    in the server process while `pool` is worker processes)."""

    def __init__(self, pool: Executor, limit: int, batch_pool: Executor | None = None) -> None:
        self.pool = pool
        self.batch_pool = batch_pool or pool
        self.limit = limit
        self._pending = 0
        self._lock = threading.Lock()  # released from pool threads (future callbacks)

    @property
    def pending(self) -> int:
        return self._pending

    async def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """[fn(item) for item in items], one pool task per item."""
        return await self._run(self.pool, [(functools.partial(fn, item), 1) for item in items])

    async def map_batch(self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
        """fn(items) as one pool task (a batched decode), counted as len(items) images."""
        if not items:
            return []
        (results,) = await self._run(self.batch_pool, [(functools.partial(fn, items), len(items))])
        return results

    async def _run(self, pool: Executor, tasks: list[tuple[Callable[[], R], int]]) -> list[R]:
        """Admit the tasks' images (the int of each) whole or refuse them, then run the tasks."""
        total = sum(images for _, images in tasks)
        with self._lock:
            if self._pending + total > self.limit:
                raise Overloaded(f"server overloaded: {self._pending} images are being decoded or waiting "
                                 f"for it (limit {self.limit}); retry later")
            self._pending += total
        futures: list[Future] = []
        try:
            for task, images in tasks:
                future = pool.submit(task)
                # Released also when cancelled before it ran.
                future.add_done_callback(functools.partial(self._release, images))
                futures.append(future)
                total -= images
        except RuntimeError as exc:  # the pool shut down: the server is stopping
            self._release_many(total)
            _cancel(futures)
            raise Stopped("the server is shutting down") from exc
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except BrokenExecutor as exc:  # a worker process died: the pool replaces itself
            _cancel(futures)
            raise DecodeWorkerLost("a decode worker process died while decoding this request's images "
                                   "(killed, or out of memory); retry") from exc
        except BaseException:
            _cancel(futures)  # the client left, or the request failed: drop what has not started
            raise

    def _release(self, images: int, _future: Future) -> None:
        self._release_many(images)

    def _release_many(self, count: int) -> None:
        with self._lock:
            self._pending -= count


def _cancel(futures: list[Future]) -> None:
    for future in futures:
        future.cancel()


class ClientDisconnected(Exception):
    """The client hung up before its answer (service/errors.py: 499, which nobody reads but the log)."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (ClientDisconnected then).

    Call once the body has been read: from then on the only message the server sends the app
    is http.disconnect.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected("the client closed the connection before the answer")
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
