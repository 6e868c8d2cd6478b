"""The batch job: when batches start (never waiting on an idle device) and scoring inside the
batch (one call per group of jobs sharing a key, each request answered with its own batch).

The encoder blocks each call on its own gate, so a test decides exactly which batch is on the
device and which requests are queued; nothing waits on the clock.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from kvclip.service.batcher import Batcher, Scoring
from tests.waiting import until

pytestmark = pytest.mark.anyio
WAIT = 60.0  # generous: every wait is on a condition


class GatedEncoder:
    """Call i blocks until gates[i] is set; returns each image's first 4 values."""

    def __init__(self, calls: int, open_: bool = False) -> None:
        self.gates = [threading.Event() for _ in range(calls)]
        if open_:
            for gate in self.gates:
                gate.set()
        self.sizes: list[int] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        call = len(self.sizes)
        self.sizes.append(int(pixels.shape[0]))
        if not self.gates[call].wait(WAIT):
            raise TimeoutError(f"the test never opened gate {call}")
        return pixels.flatten(1)[:, :4].clone()

    async def entered(self, calls: int) -> None:
        await until(lambda: len(self.sizes) >= calls, timeout=WAIT, what=f"{calls} encoder calls")

    def open_all(self) -> None:
        for gate in self.gates:
            gate.set()


class RecordingScore:
    """A scoring function that tags each row with its name and records the rows per call."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.calls = name, fail, []

    def __call__(self, features: torch.Tensor) -> list[tuple[str, list[float]]]:
        self.calls.append(int(features.shape[0]))
        if self.fail:
            raise RuntimeError(f"scoring {self.name} failed")
        return [(self.name, row) for row in features.tolist()]


def pixels(request: int, k: int) -> torch.Tensor:
    """k fake images; image i of request r holds the value 1000 r + i."""
    values = 1000.0 * request + torch.arange(k, dtype=torch.float32)
    return values.view(k, 1, 1, 1).expand(k, 3, 2, 2).contiguous()


def rows(request: int, k: int, name: str) -> list[tuple[str, list[float]]]:
    return [(name, row) for row in pixels(request, k).flatten(1)[:, :4].tolist()]


async def started(encoder: GatedEncoder, max_batch: int = 8) -> Batcher:
    batcher = Batcher(encoder, max_batch=max_batch, max_queue=100)
    await batcher.start()
    return batcher


async def stopped(batcher: Batcher, encoder: GatedEncoder) -> None:
    encoder.open_all()
    await batcher.stop()


async def test_a_lone_request_starts_at_once_on_an_idle_device():
    # The old collector waited max_wait for company; nothing else ever arrives here.
    encoder = GatedEncoder(1, open_=True)
    batcher = await started(encoder)
    try:
        assert torch.equal(await asyncio.wait_for(batcher.encode_images(pixels(1, 2)), WAIT),
                           pixels(1, 2).flatten(1)[:, :4])
        assert encoder.sizes == [2]
    finally:
        await stopped(batcher, encoder)


async def test_requests_queued_during_a_batch_form_the_next_batch_at_once():
    encoder = GatedEncoder(3)
    batcher = await started(encoder)
    try:
        first = asyncio.create_task(batcher.encode_images(pixels(0, 1)))
        await encoder.entered(1)
        queued = [asyncio.create_task(batcher.encode_images(pixels(r, k))) for r, k in ((1, 3), (2, 3), (3, 3), (4, 1))]
        await until(lambda: batcher.queued_images == 10, timeout=WAIT, what="10 images queued")
        encoder.gates[0].set()
        # The device is free: the next batch starts with what is queued (FIFO, up to max_batch=8)
        # without waiting to fill up, and the rest forms the batch after it.
        await encoder.entered(2)
        assert encoder.sizes == [1, 6]
        encoder.gates[1].set()
        await encoder.entered(3)
        encoder.gates[2].set()
        results = await asyncio.wait_for(asyncio.gather(first, *queued), WAIT)
        assert encoder.sizes == [1, 6, 4]
        for (r, k), result in zip(((0, 1), (1, 3), (2, 3), (3, 3), (4, 1)), results):
            assert torch.equal(result, pixels(r, k).flatten(1)[:, :4])
    finally:
        await stopped(batcher, encoder)


async def test_a_request_is_answered_with_its_own_batch_not_after_the_next():
    encoder = GatedEncoder(2)
    score = RecordingScore("s")
    batcher = await started(encoder)
    try:
        first = asyncio.create_task(batcher.score_images(pixels(0, 2), Scoring(score, key="s")))
        await encoder.entered(1)
        second = asyncio.create_task(batcher.score_images(pixels(1, 1), Scoring(score, key="s")))
        await until(lambda: batcher.queued_images == 1, timeout=WAIT, what="the second request to queue")
        encoder.gates[0].set()
        await encoder.entered(2)  # the second batch is on the device and stays there
        # A blend queued behind that batch would hang here until it is released.
        assert await asyncio.wait_for(first, WAIT) == rows(0, 2, "s")
        assert not second.done() and not encoder.gates[1].is_set()
        encoder.gates[1].set()
        assert await asyncio.wait_for(second, WAIT) == rows(1, 1, "s")
        assert score.calls == [2, 1]
    finally:
        await stopped(batcher, encoder)


async def test_a_batch_scores_once_per_key_and_each_request_gets_its_own_rows():
    encoder = GatedEncoder(2)
    old, new, broken = RecordingScore("old"), RecordingScore("new"), RecordingScore("broken", fail=True)
    batcher = await started(encoder, max_batch=16)
    try:
        holder = asyncio.create_task(batcher.encode_images(pixels(9, 1)))
        await encoder.entered(1)
        # One batch mixing two snapshots ("old" before a hot swap, "new" after) and a failing one.
        plan = [(1, 2, old), (2, 3, new), (3, 1, old), (4, 2, broken), (5, 4, new)]
        tasks = [asyncio.create_task(batcher.score_images(pixels(r, k), Scoring(s, key=s.name))) for r, k, s in plan]
        plain = asyncio.create_task(batcher.encode_images(pixels(6, 2)))  # features only, no scoring
        await until(lambda: batcher.queued_images == 14, timeout=WAIT, what="14 images queued")
        encoder.open_all()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
        assert encoder.sizes == [1, 14]  # all in one encoder batch
        assert old.calls == [3] and new.calls == [7] and broken.calls == [2]  # one call per key
        for (r, k, s), outcome in zip(plan, outcomes):
            if s is broken:
                assert isinstance(outcome, RuntimeError) and "broken" in str(outcome)
            else:
                assert outcome == rows(r, k, s.name), f"request {r}"
        assert torch.equal(await plain, pixels(6, 2).flatten(1)[:, :4])
        await holder
    finally:
        await stopped(batcher, encoder)


async def test_a_split_request_is_scored_per_part_and_reassembled_in_order():
    encoder = GatedEncoder(3, open_=True)
    score = RecordingScore("s")
    batcher = await started(encoder, max_batch=4)
    try:
        result = await asyncio.wait_for(batcher.score_images(pixels(7, 10), Scoring(score, key="s")), WAIT)
        assert result == rows(7, 10, "s")
        assert encoder.sizes == [4, 4, 2] and score.calls == [4, 4, 2]
    finally:
        await stopped(batcher, encoder)
