"""The batcher's edges: cancelled and stale requests, shutdown, a dead collector. A fake encoder
that blocks on an event holds a batch "in flight" for as long as a test needs."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from kvclip.service.batcher import Batcher, Overloaded, Scoring, Stopped
from kvclip.service.config import ServerConfig

pytestmark = pytest.mark.anyio
WAIT = 60  # generous: every wait below is on a condition


class BlockingEncoder:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(pixels.shape[0])
        self.entered.set()
        if not self.release.wait(WAIT):
            raise TimeoutError("the test never released the encoder")
        return pixels.flatten(1)[:, :4].clone()


def pixels(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 2, 2)


async def until(condition, what: str) -> None:
    for _ in range(WAIT * 100):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def started(encoder: BlockingEncoder, **kwargs) -> Batcher:
    batcher = Batcher(encoder, max_batch=8, max_queue=kwargs.pop("max_queue", 4), **kwargs)
    await batcher.start()
    return batcher


async def hold_a_batch(batcher: Batcher, encoder: BlockingEncoder) -> asyncio.Task:
    first = asyncio.create_task(batcher.encode_images(pixels(1)))
    await until(encoder.entered.is_set, "the first batch to reach the encoder")
    return first


async def test_a_cancelled_request_gives_its_queue_space_back():
    encoder = BlockingEncoder()
    batcher = await started(encoder)
    first = await hold_a_batch(batcher, encoder)
    waiting = asyncio.create_task(batcher.encode_images(pixels(3)))
    await until(lambda: batcher.queued_images == 3, "the request to queue")
    waiting.cancel()  # the client hung up
    await until(lambda: batcher.queued_images == 0, "the cancelled request to leave the queue")
    full = asyncio.create_task(batcher.encode_images(pixels(4)))  # the whole queue is free again
    await until(lambda: batcher.queued_images == 4, "a full-queue request to be admitted")
    encoder.release.set()
    assert (await full).shape == (4, 4) and (await first).shape == (1, 4)
    assert encoder.calls == [1, 4]  # the cancelled images were never encoded
    await batcher.stop()


async def test_a_request_that_waited_too_long_is_refused_not_encoded():
    encoder = BlockingEncoder()
    batcher = await started(encoder, max_queue_wait_s=30)
    first = await hold_a_batch(batcher, encoder)
    stale = asyncio.create_task(batcher.encode_images(pixels(2)))
    await until(lambda: batcher.queued_images == 2, "the request to queue")
    batcher._jobs[0].enqueued -= 31  # as if it had waited 31 s behind a slow batch
    encoder.release.set()
    with pytest.raises(Overloaded, match="waited"):
        await stale
    await first
    assert encoder.calls == [1]
    await batcher.stop()


async def test_stop_does_not_block_the_event_loop_for_the_batch_in_flight():
    encoder = BlockingEncoder()
    batcher = await started(encoder)
    first = await hold_a_batch(batcher, encoder)
    stopping = asyncio.create_task(batcher.stop())
    loop_ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(loop_ran.set)
    await asyncio.wait_for(loop_ran.wait(), WAIT)
    assert not encoder.release.is_set()  # the loop answered while the batch was still running
    encoder.release.set()
    await asyncio.wait_for(stopping, WAIT)
    with pytest.raises(Stopped):
        await first


async def test_work_after_shutdown_is_stopped_not_an_internal_error():
    encoder = BlockingEncoder()
    encoder.release.set()
    batcher = await started(encoder)
    await batcher.stop()
    with pytest.raises(Stopped):
        await batcher.encode_images(pixels(1))
    with pytest.raises(Stopped):
        await batcher.score_images(pixels(1), Scoring(lambda features: features.tolist(), key=0))


async def test_a_dead_collector_is_reported_and_fails_what_waits():
    encoder = BlockingEncoder()
    failures: list[BaseException] = []
    batcher = Batcher(encoder, max_batch=8, max_queue=4, on_failure=failures.append)
    gate = asyncio.Event()

    async def broken(batch):
        await gate.wait()
        raise RuntimeError("collector bug")

    batcher._gather_batch = broken  # the collector's own code fails, not the encoder
    await batcher.start()
    waiting = asyncio.create_task(batcher.encode_images(pixels(1)))
    await until(lambda: batcher.queued_images == 1, "the request to queue")
    gate.set()
    with pytest.raises(Stopped, match="collector bug"):
        await asyncio.wait_for(waiting, WAIT)
    assert not batcher.running and [str(e) for e in failures] == ["collector bug"]
    with pytest.raises(Stopped):
        await batcher.encode_images(pixels(1))
    await batcher.stop()


def test_a_request_limit_above_the_queue_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="max_images .* cannot exceed max_queue"):
        ServerConfig(caches=tmp_path, model="tiny-random", max_images=100, max_queue=50)
