"""The Ray Serve replica's @serve.batch function, called directly (no cluster): it runs the
plain server's BatchJob, so concurrent requests on the same cache snapshot and options are
blended in one call inside the batch, and one group's failure fails only its requests."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]'")

from kvclip.deploy.ray import app as ray_app
from kvclip.service.batcher import BatchJob, Scoring
from tests.unit.test_batcher_batch_job import pixels

pytestmark = pytest.mark.anyio
WAIT_S = 30


class Recording:
    """A Scoring's score: each call's rows (first pixel value of each), recorded."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[float]] = []
        self.fail = fail

    def __call__(self, features: torch.Tensor) -> list[float]:
        self.calls.append(features[:, 0].tolist())
        if self.fail:
            raise RuntimeError("a broken cache")
        return features[:, 0].tolist()


def replica(encoded: list[int]):
    """A KvclipClassifier with only what its batch function needs (its __init__ loads a model)."""
    cls = ray_app.KvclipClassifier.func_or_class
    instance = cls.__new__(cls)

    def encode(batch: torch.Tensor) -> torch.Tensor:
        encoded.append(batch.shape[0])
        return batch.flatten(1)

    instance._device = ThreadPoolExecutor(max_workers=1)
    instance._batch_job = BatchJob(encode)
    return instance


async def test_a_batch_blends_each_snapshots_requests_in_one_call(monkeypatch):
    # serve.batch reads the replica's max_ongoing_requests when its queue starts (a warning).
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(ray_app.serve, "get_replica_context", lambda: context)
    encoded: list[int] = []
    classifier = replica(encoded)
    same, other, broken = Recording(), Recording(), Recording(fail=True)
    jobs = [(0, 2, Scoring(same, "a")), (1, 3, Scoring(same, "a")), (2, 1, Scoring(other, "b")),
            (3, 2, Scoring(broken, "c"))]
    # The batch is due when its 8 images are in, not on a timer: no dependence on speed.
    classifier._run_batch.set_max_batch_size(8)
    classifier._run_batch.set_batch_wait_timeout_s(WAIT_S)
    encodings = [ray_app.ReplicaEncoding(classifier._run_batch, max_batch=32) for _ in jobs]
    results = await asyncio.wait_for(asyncio.gather(
        *(encoding.score_images(pixels(r, k), scoring) for encoding, (r, k, scoring) in zip(encodings, jobs)),
        return_exceptions=True), WAIT_S)
    assert encoded == [8]  # one encoder batch
    assert results[0] == [0.0, 1.0] and results[1] == [1000.0, 1001.0, 1002.0] and results[2] == [2000.0]
    assert isinstance(results[3], RuntimeError)  # only the broken cache's request fails
    assert same.calls == [[0.0, 1.0, 1000.0, 1001.0, 1002.0]]  # both requests, one blend call
    assert other.calls == [[2000.0]]
    assert all(encoding.batch_images == 8 for encoding in encodings)
    classifier._device.shutdown()
