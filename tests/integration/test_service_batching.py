"""Cross-request batching, the Batcher itself, hot swaps under load and the cache registry.

The central claim: a request's results do not depend on which other requests shared its
encoder batch, nor on cache swaps that happen while it runs. Reference results are each
image classified alone (batches of one image, no waiting) on each version of `fashion`.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest
import torch

from kvclip import artifact as store
from kvclip.errors import ModelLoadError
from kvclip.service.batcher import Batcher, Overloaded, RequestTooLarge, Stopped
from kvclip.service.metrics import Metrics
from kvclip.service.registry import CacheNotFound, CacheRegistry, VersionNotLoadable
from tests.service_helpers import copy_caches, image_files, make_config, metric_value, running_app
from tests.waiting import until

N_IMAGES = 40
TOP_K = 10  # every Fashion-MNIST class, so results compare label by label
VERSIONS = ("v0001", "v0002")
POOL = 12  # images the hot-swap load generators cycle through
HANG_S = 120  # a wait this long means a hang: generous, so a loaded machine never trips it

# Batching is checked on zero-shot logits (100 f·W): they show the query features alone, and
# agree with the image classified alone to the documented 1e-5 in scores. The cache methods
# amplify the encoder's last-digit differences between batch sizes (~2e-7 in the features):
# these tiny-random caches are tuned to alpha ~1500, beta ~16, so tip scores move by up to
# ~3e-5 and logits by ~5e-5 relative (the blend itself adds < 1e-5: tests/unit/test_blend_reference.py).
# Hot-swap checks use tip, whose two versions differ by far more than that, with a tolerance
# sized to it.
STRICT = dict(score_abs=1e-5, logit_rel=1e-3)
CACHE_METHOD = dict(score_abs=1e-4, logit_rel=5e-4)
SWAP_METHOD = "tip"


@pytest.fixture(scope="module")
def images(fashion_test):
    return image_files(fashion_test, N_IMAGES)


def name_of(item) -> str:
    return item[1][0]


async def classify(client, files, cache: str = "fashion", method: str = "zeroshot", **params) -> dict:
    response = await client.post("/v1/classify", files=files,
                                 params={"cache": cache, "top_k": TOP_K, "method": method, **params})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
async def reference(served_caches, tiny_encoder, images, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Each image classified alone (batches of one, no waiting): "zeroshot" -> name -> result
    for all images, and VERSION -> name -> result with SWAP_METHOD for the first POOL."""
    caches = copy_caches(served_caches, tmp_path_factory.mktemp("reference") / "caches")
    refs: dict[str, dict[str, dict]] = {"zeroshot": {}}
    async with running_app(make_config(caches, max_batch=1, max_wait_ms=0), tiny_encoder) as (_, client):
        for item in images:
            body = await classify(client, [item])
            assert body["method"] == "zeroshot" and body["version"] == "v0001"
            refs["zeroshot"][name_of(item)] = body["results"][0]
        for version in VERSIONS:
            if version != "v0001":
                response = await client.post("/v1/caches/fashion/activate", json={"version": version})
                assert response.status_code == 200, response.text
            refs[version] = {}
            for item in images[:POOL]:
                body = await classify(client, [item], method=SWAP_METHOD)
                assert body["version"] == version and body["method"] == SWAP_METHOD
                refs[version][name_of(item)] = body["results"][0]
        text = (await client.get("/metrics")).text
    count = N_IMAGES + 2 * POOL
    assert metric_value(text, "kvclip_batch_images_count") == count
    assert metric_value(text, "kvclip_batch_images_sum") == count
    # Each image must classify beyond tolerance apart on the two versions, or the hot-swap
    # tests could not tell a result of one version from a result of the other.
    for name in refs["v0001"]:
        for a, b in (("v0001", "v0002"), ("v0002", "v0001")):
            with pytest.raises(AssertionError):
                assert_same_result(refs[a][name], refs[b][name], name, **CACHE_METHOD)
    return refs


def assert_same_result(got: dict, ref: dict, where: str = "", score_abs: float = 1e-5,
                       logit_rel: float = 1e-3) -> None:
    """Same labels with scores within `score_abs` and logits within `logit_rel` (relative);
    the same ranking except between labels whose scores tie within the tolerance."""
    assert got["error"] is None, where
    assert got["name"] == ref["name"], where
    g = {entry["label"]: entry for entry in got["labels"]}
    r = {entry["label"]: entry for entry in ref["labels"]}
    assert g.keys() == r.keys(), where
    for label, expected in r.items():
        assert g[label]["score"] == pytest.approx(expected["score"], abs=score_abs), f"{where} {label}"
        assert g[label]["logit"] == pytest.approx(expected["logit"], rel=logit_rel, abs=1e-5), f"{where} {label}"
    for got_label, ref_label in zip([e["label"] for e in got["labels"]], [e["label"] for e in ref["labels"]]):
        if got_label != ref_label:
            gap = abs(r[got_label]["score"] - r[ref_label]["score"])
            assert gap <= 2 * score_abs, f"{where}: ranking differs ({got_label} vs {ref_label}, score gap {gap})"


def batch_histogram(text: str) -> dict[str, float]:
    hist = {"count": metric_value(text, "kvclip_batch_images_count"),
            "sum": metric_value(text, "kvclip_batch_images_sum")}
    for le in ("1.0", "8.0", "16.0"):
        hist[le] = metric_value(text, "kvclip_batch_images_bucket", {"le": le})
    return hist


# --- 1. batching through the app ------------------------------------------------------------

@pytest.mark.anyio
async def test_concurrent_singles_share_batches_and_match_alone(served_caches, tiny_encoder, images, reference):
    singles = images[:24]
    async with running_app(make_config(served_caches, max_batch=16, max_wait_ms=50), tiny_encoder) as (_, client):
        bodies = await asyncio.gather(*(classify(client, [item]) for item in singles))
        hist = batch_histogram((await client.get("/metrics")).text)
    assert hist["sum"] == len(singles)
    assert hist["sum"] / hist["count"] > 1, f"no batch held more than one image: {hist}"
    assert hist["1.0"] < hist["count"]
    assert hist["16.0"] == hist["count"], f"a batch exceeded max_batch=16: {hist}"
    for item, body in zip(singles, bodies):
        assert body["version"] == "v0001" and len(body["results"]) == 1
        assert_same_result(body["results"][0], reference["zeroshot"][name_of(item)], name_of(item), **STRICT)


@pytest.mark.anyio
async def test_mixed_multi_and_single_requests_keep_order(served_caches, tiny_encoder, images, reference):
    sizes = [3, 1, 5, 1, 2, 1, 7, 1, 4, 1, 6, 1]
    requests, start = [], 0
    for size in sizes:
        requests.append([images[(start + j) % N_IMAGES] for j in range(size)])
        start += size
    async with running_app(make_config(served_caches, max_batch=16, max_wait_ms=50), tiny_encoder) as (_, client):
        bodies = await asyncio.gather(*(classify(client, files) for files in requests))
        hist = batch_histogram((await client.get("/metrics")).text)
    assert hist["sum"] == sum(sizes)
    assert hist["count"] < len(sizes), f"requests never shared a batch: {hist}"
    assert hist["16.0"] == hist["count"], f"a batch exceeded max_batch=16: {hist}"
    for files, body in zip(requests, bodies):
        assert [r["index"] for r in body["results"]] == list(range(len(files)))
        assert [r["name"] for r in body["results"]] == [name_of(item) for item in files]
        for item, result in zip(files, body["results"]):
            assert_same_result(result, reference["zeroshot"][name_of(item)], name_of(item), **STRICT)


@pytest.mark.anyio
async def test_request_larger_than_max_batch_is_split_and_reassembled(served_caches, tiny_encoder, images,
                                                                        reference):
    async with running_app(make_config(served_caches, max_batch=16, max_wait_ms=20), tiny_encoder) as (_, client):
        big, *smalls = await asyncio.gather(
            classify(client, images),  # 40 images: parts of 16, 16 and 8
            *(classify(client, [item]) for item in images[:3]),
        )
        hist = batch_histogram((await client.get("/metrics")).text)
    assert [r["index"] for r in big["results"]] == list(range(N_IMAGES))
    assert [r["name"] for r in big["results"]] == [name_of(item) for item in images]
    for item, result in zip(images, big["results"]):
        assert_same_result(result, reference["zeroshot"][name_of(item)], name_of(item), **STRICT)
    for item, body in zip(images, smalls):
        assert_same_result(body["results"][0], reference["zeroshot"][name_of(item)], name_of(item), **STRICT)
    assert hist["sum"] == N_IMAGES + 3
    assert hist["count"] >= 3
    assert hist["16.0"] == hist["count"], f"a batch exceeded max_batch=16: {hist}"


class FirstCallHeld:
    """The tiny encoder, whose first call blocks until released: later requests queue behind it."""

    def __init__(self, inner) -> None:
        self.inner, self.release, self.sizes = inner, threading.Event(), []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(pixels.shape[0]))
        if len(self.sizes) == 1:
            assert self.release.wait(120), "the test never released the encoder"
        return self.inner.encode_images(pixels)


@pytest.mark.anyio
async def test_one_batch_of_two_versions_and_two_methods_scores_each_request_with_its_own(
        served_caches, tiny_encoder, images, reference, tmp_path):
    """Scoring inside the batch groups requests by snapshot and method: requests admitted
    before and after a swap, with zeroshot and tip, share one encoder batch and still each
    match the image classified alone on its own version and method."""
    caches = copy_caches(served_caches, tmp_path / "caches")
    encoder = FirstCallHeld(tiny_encoder)
    pool = images[:POOL]
    async with running_app(make_config(caches, max_batch=32, max_wait_ms=0), encoder) as (app, client):
        batcher = app.state.kv.batcher
        held = asyncio.create_task(classify(client, [images[-1]]))
        await until(lambda: encoder.sizes, what="the first request to reach the encoder")
        before = [asyncio.create_task(classify(client, [item], method=SWAP_METHOD)) for item in pool[:4]]
        plain = [asyncio.create_task(classify(client, [item])) for item in pool[8:12]]
        await until(lambda: batcher.queued_images == 8, what="8 requests queued on v0001")
        response = await client.post("/v1/caches/fashion/activate", json={"version": "v0002"})
        assert response.status_code == 200, response.text
        after = [asyncio.create_task(classify(client, [item], method=SWAP_METHOD)) for item in pool[4:8]]
        await until(lambda: batcher.queued_images == 12, what="12 requests queued")
        encoder.release.set()
        await held
        bodies = await asyncio.gather(*before, *after, *plain)
    assert encoder.sizes == [1, 12]  # every queued request rode in one batch
    for body, item in zip(bodies[:4], pool[:4]):
        assert body["version"] == "v0001" and body["method"] == SWAP_METHOD
        assert_same_result(body["results"][0], reference["v0001"][name_of(item)], name_of(item), **CACHE_METHOD)
    for body, item in zip(bodies[4:8], pool[4:8]):
        assert body["version"] == "v0002" and body["method"] == SWAP_METHOD
        assert_same_result(body["results"][0], reference["v0002"][name_of(item)], name_of(item), **CACHE_METHOD)
    for body, item in zip(bodies[8:], pool[8:12]):
        assert body["version"] == "v0001" and body["method"] == "zeroshot"
        assert_same_result(body["results"][0], reference["zeroshot"][name_of(item)], name_of(item), **STRICT)


# --- 2. the Batcher, with a fake encoder ------------------------------------------------------

class FakeEncoder:
    """Records batch sizes; returns each image's first 4 values; can block and fail."""

    def __init__(self, blocked: bool = False) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not blocked:
            self.release.set()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(pixels.shape[0]))
        self.entered.set()
        assert self.release.wait(10), "the test never released the encoder"
        if (pixels < 0).any():
            raise RuntimeError("poisoned batch")
        return pixels.flatten(1)[:, :4].clone()

    async def wait_entered(self, calls: int = 1) -> None:
        await until(lambda: len(self.sizes) >= calls, what=f"{calls} encoder calls")


def pixels(request: int, k: int, poison: bool = False) -> torch.Tensor:
    """k fake images; image i of request r holds the value 1000 r + i (negated when poisoned)."""
    values = 1000.0 * request + torch.arange(k, dtype=torch.float32)
    if poison:
        values = -values - 1
    return values.view(k, 1, 1, 1).expand(k, 3, 2, 2).contiguous()


def expected(request: int, k: int) -> torch.Tensor:
    return pixels(request, k).flatten(1)[:, :4]


async def wait_queued(batcher: Batcher, images: int) -> None:
    await until(lambda: batcher.queued_images == images, what=f"{images} images queued")


def rendered(metrics: Metrics) -> str:
    return metrics.render().decode()


@contextlib.asynccontextmanager
async def running_batcher(encoder: FakeEncoder, **options):
    """A started Batcher over `encoder`; on exit the encoder is released and the batcher stopped."""
    batcher = Batcher(encoder, **options)
    await batcher.start()
    try:
        yield batcher
    finally:
        encoder.release.set()
        await batcher.stop()


@pytest.mark.anyio
async def test_batcher_respects_max_batch_and_returns_each_request_whole():
    encoder, metrics = FakeEncoder(), Metrics()
    batcher = Batcher(encoder, max_batch=8, max_queue=1000, metrics=metrics)
    await batcher.start()
    try:
        sizes = [1, 3, 8, 5, 20, 2, 7, 1, 13, 4]
        results = await asyncio.gather(*(batcher.encode_images(pixels(r, k)) for r, k in enumerate(sizes)))
    finally:
        await batcher.stop()
    for r, (k, result) in enumerate(zip(sizes, results)):
        assert torch.equal(result, expected(r, k)), f"request {r}"
    assert max(encoder.sizes) <= 8, encoder.sizes
    assert sum(encoder.sizes) == sum(sizes)
    parts = sum(-(-k // 8) for k in sizes)
    assert len(encoder.sizes) < parts, f"no two parts shared a batch: {encoder.sizes}"
    text = rendered(metrics)
    assert metric_value(text, "kvclip_batch_images_count") == len(encoder.sizes)
    assert metric_value(text, "kvclip_batch_images_sum") == sum(sizes)
    assert metric_value(text, "kvclip_queue_images") == 0


@pytest.mark.anyio
async def test_batcher_splits_a_large_request_and_concatenates_in_order():
    encoder = FakeEncoder()
    async with running_batcher(encoder, max_batch=4, max_queue=100) as batcher:
        result = await batcher.encode_images(pixels(7, 11))
        single = await batcher.encode_images(pixels(8, 1))
    assert encoder.sizes == [4, 4, 3, 1]
    assert torch.equal(result, expected(7, 11))
    assert torch.equal(single, expected(8, 1))


@pytest.mark.anyio
async def test_batcher_refuses_past_max_queue_whole():
    encoder, metrics = FakeEncoder(blocked=True), Metrics()
    tasks = []
    async with running_batcher(encoder, max_batch=4, max_queue=8, metrics=metrics) as batcher:
        tasks.append(asyncio.create_task(batcher.encode_images(pixels(0, 4))))
        await encoder.wait_entered()  # that batch is on the encoder; the queue is empty again
        assert batcher.queued_images == 0
        tasks += [asyncio.create_task(batcher.encode_images(pixels(r, 4))) for r in (1, 2)]
        await wait_queued(batcher, 8)  # exactly at the limit: admitted
        assert metric_value(rendered(metrics), "kvclip_queue_images") == 8

        with pytest.raises(Overloaded):
            await batcher.encode_images(pixels(3, 1))
        assert metric_value(rendered(metrics), "kvclip_rejected_requests_total") == 1
        with pytest.raises(Overloaded):  # refused whole, never half-queued
            await batcher.encode_images(pixels(4, 5))
        assert batcher.queued_images == 8
        assert metric_value(rendered(metrics), "kvclip_rejected_requests_total") == 2
        with pytest.raises(RequestTooLarge):  # more than the whole queue: waiting would never help
            await batcher.encode_images(pixels(4, 9))

        encoder.release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_S)
        for r, result in enumerate(results):
            assert torch.equal(result, expected(r, 4))
        assert batcher.queued_images == 0
        assert torch.equal(await batcher.encode_images(pixels(5, 8)), expected(5, 8))  # room again
    assert encoder.sizes == [4, 4, 4, 4, 4]


@pytest.mark.anyio
async def test_batcher_encoder_error_fails_only_its_batch(caplog):
    encoder = FakeEncoder(blocked=True)
    async with running_batcher(encoder, max_batch=4, max_queue=100) as batcher:
        first = asyncio.create_task(batcher.encode_images(pixels(0, 4)))
        await encoder.wait_entered()
        bad = asyncio.create_task(batcher.encode_images(pixels(1, 4, poison=True)))  # a full batch of its own
        good = asyncio.create_task(batcher.encode_images(pixels(2, 4)))
        await wait_queued(batcher, 8)
        encoder.release.set()
        assert torch.equal(await asyncio.wait_for(first, HANG_S), expected(0, 4))
        with pytest.raises(RuntimeError, match="poisoned"):
            await asyncio.wait_for(bad, HANG_S)
        assert torch.equal(await asyncio.wait_for(good, HANG_S), expected(2, 4))

        # A split request with one poisoned part fails as a whole; the collector keeps going.
        mixed = torch.cat([pixels(3, 4), pixels(3, 2, poison=True)])
        with pytest.raises(RuntimeError, match="poisoned"):
            await asyncio.wait_for(batcher.encode_images(mixed), HANG_S)
        later = await asyncio.wait_for(batcher.encode_images(pixels(4, 3)), HANG_S)
        assert torch.equal(later, expected(4, 3))
    assert "encoder batch of 4 images failed" in caplog.text


@pytest.mark.anyio
async def test_batcher_stop_fails_queued_jobs_with_stopped():
    encoder = FakeEncoder(blocked=True)
    batcher = Batcher(encoder, max_batch=4, max_queue=100)
    await batcher.start()
    in_flight = asyncio.create_task(batcher.encode_images(pixels(0, 4)))
    try:
        await encoder.wait_entered()
        queued = [asyncio.create_task(batcher.encode_images(pixels(r, 3))) for r in (1, 2)]
        await wait_queued(batcher, 6)
        # stop() waits for the device thread, so release the encoder from another thread.
        threading.Timer(0.2, encoder.release.set).start()
        await batcher.stop()
        for task in queued:
            with pytest.raises(Stopped):
                await asyncio.wait_for(task, HANG_S)
        assert batcher.queued_images == 0
        with pytest.raises(Stopped):
            await batcher.encode_images(pixels(3, 1))
    finally:
        encoder.release.set()
        in_flight.cancel()  # its fate is test_batcher_stop_resolves_the_batch_in_flight's subject
        await asyncio.gather(in_flight, return_exceptions=True)
    assert encoder.sizes == [4]  # queued jobs never reached the encoder


@pytest.mark.anyio
async def test_batcher_stop_resolves_the_batch_in_flight():
    """A request whose batch is on the encoder when stop() is called must not hang:
    it gets its features (the encoder finished) or Stopped."""
    encoder = FakeEncoder(blocked=True)
    batcher = Batcher(encoder, max_batch=4, max_queue=100)
    await batcher.start()
    in_flight = asyncio.create_task(batcher.encode_images(pixels(0, 4)))
    try:
        await encoder.wait_entered()
        threading.Timer(0.2, encoder.release.set).start()
        await batcher.stop()
        done, _ = await asyncio.wait({in_flight}, timeout=HANG_S)
        assert done, ("the request whose batch was on the encoder when Batcher.stop() ran never "
                      "completed: stop() cancels the collector without resolving that batch's futures")
        if in_flight.exception() is None:
            assert torch.equal(in_flight.result(), expected(0, 4))
        else:
            assert isinstance(in_flight.exception(), Stopped)
    finally:
        encoder.release.set()
        in_flight.cancel()
        await asyncio.gather(in_flight, return_exceptions=True)


@pytest.mark.anyio
async def test_batcher_survives_cancelled_requests():
    encoder = FakeEncoder(blocked=True)
    async with running_batcher(encoder, max_batch=8, max_queue=100) as batcher:
        running = asyncio.create_task(batcher.encode_images(pixels(0, 2)))
        await encoder.wait_entered()
        given_up = asyncio.create_task(batcher.encode_images(pixels(1, 2)))
        wanted = asyncio.create_task(batcher.encode_images(pixels(2, 2)))
        await wait_queued(batcher, 4)
        given_up.cancel()  # cancelled while queued
        running.cancel()  # cancelled while its batch is on the encoder
        for task in (given_up, running):
            with pytest.raises(asyncio.CancelledError):
                await task
        encoder.release.set()
        assert torch.equal(await asyncio.wait_for(wanted, HANG_S), expected(2, 2))
        # A batch made only of cancelled requests is dropped without calling the encoder.
        encoder.release.clear()
        blocker = asyncio.create_task(batcher.encode_images(pixels(3, 8)))
        await encoder.wait_entered(3)
        lost = asyncio.create_task(batcher.encode_images(pixels(4, 1)))
        await wait_queued(batcher, 1)
        lost.cancel()
        await asyncio.gather(lost, return_exceptions=True)
        encoder.release.set()
        assert torch.equal(await asyncio.wait_for(blocker, HANG_S), expected(3, 8))
        assert torch.equal(await asyncio.wait_for(batcher.encode_images(pixels(5, 3)), HANG_S), expected(5, 3))
    assert encoder.sizes == [2, 2, 8, 3]  # the cancelled queued requests never reached the encoder


# --- 3. hot swap under load -------------------------------------------------------------------

async def _load(client, images, stop: asyncio.Event, worker: int, records: list) -> None:
    i = worker
    while not stop.is_set():
        k = 1 + i % 3
        files = [images[(i + j) % POOL] for j in range(k)]
        response = await client.post("/v1/classify", files=files,
                                     params={"cache": "fashion", "top_k": TOP_K, "method": SWAP_METHOD})
        records.append((files, response.status_code, response.json()))
        i += 5


LOAD_WORKERS = 4


async def answered(records: list) -> None:
    """Until one more request than there are load workers has been answered: at least one of
    them was sent after the last swap. The swaps are paced by the load, not the clock, so each
    version serves requests however slow the machine is."""
    target = len(records) + LOAD_WORKERS + 1
    await until(lambda: len(records) >= target, what=f"{target} requests answered")


async def run_all(*coros) -> None:
    """Run every coroutine to its end (so no load generator outlives the app), then raise
    the first failure."""
    for outcome in await asyncio.gather(*coros, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


def check_records(records: list, reference: dict, allowed: set[str]) -> set[str]:
    failures = [(status, body) for _, status, body in records if status != 200]
    assert not failures, f"{len(failures)} of {len(records)} requests failed during the swaps: {failures[:3]}"
    seen = set()
    for files, _, body in records:
        version = body["version"]
        assert version in allowed, body
        seen.add(version)
        assert [r["name"] for r in body["results"]] == [name_of(item) for item in files]
        for item, result in zip(files, body["results"]):
            # The whole request ran on the version it reports: never keys of one version
            # with the parameters or labels of another.
            assert_same_result(result, reference[version][name_of(item)], f"{version} {name_of(item)}",
                               **CACHE_METHOD)
    return seen


@pytest.mark.anyio
async def test_hot_swap_under_load_never_fails_or_mixes_versions(served_caches, tiny_encoder, images,
                                                                  reference, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    records: list = []
    stop = asyncio.Event()
    swaps: list[str] = []
    other = {"v0001": "v0002", "v0002": "v0001"}

    async with running_app(make_config(caches, max_batch=8, max_wait_ms=2), tiny_encoder) as (_, client):
        async def admin() -> None:
            current = "v0001"
            try:
                for step in range(6):
                    await answered(records)
                    target = other[current]
                    response = await client.post("/v1/caches/fashion/activate", json={"version": target})
                    assert response.status_code == 200, response.text
                    assert response.json()["version"] == target
                    current = target
                    swaps.append(current)
                    if step == 2:  # another process moves CURRENT; reload picks it up
                        await answered(records)
                        target = other[current]
                        await asyncio.to_thread(store.set_current, caches / "fashion", target)
                        response = await client.post("/v1/caches/reload")
                        assert response.status_code == 200, response.text
                        assert response.json()["loaded"] == {"fashion": target}
                        assert "fashion-caps" in response.json()["unchanged"]
                        current = target
                        swaps.append(current)
                await answered(records)
            finally:
                stop.set()
            ready = (await client.get("/readyz")).json()
            assert ready["caches"]["fashion"] == current and ready["errors"] == {}
            assert store.current_version(caches / "fashion") == current

        await run_all(admin(), *(_load(client, images, stop, w, records) for w in range(LOAD_WORKERS)))

    assert len(swaps) == 7
    seen = check_records(records, reference, set(VERSIONS))
    assert seen == set(VERSIONS), f"versions served during the swaps: {seen}"


@pytest.mark.anyio
async def test_activating_a_corrupt_version_under_load_answers_409_and_keeps_serving(
        served_caches, tiny_encoder, images, reference, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    keys = caches / "fashion" / "versions" / "v0002" / "image_keys.npy"
    keys.write_bytes(keys.read_bytes()[: keys.stat().st_size // 2])  # truncated: checksum mismatch
    records: list = []
    stop = asyncio.Event()

    async with running_app(make_config(caches, max_batch=8, max_wait_ms=2), tiny_encoder) as (_, client):
        async def admin() -> None:
            try:
                await answered(records)
                response = await client.post("/v1/caches/fashion/activate", json={"version": "v0002"})
                assert response.status_code == 409, response.text
                error = response.json()["error"]
                assert error["code"] == "version_not_loadable" and "image_keys.npy" in error["message"]
                await answered(records)
            finally:
                stop.set()

        await run_all(admin(), *(_load(client, images, stop, w, records) for w in range(LOAD_WORKERS)))
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["caches"]["fashion"] == "v0001"
        assert (await classify(client, images[:1]))["version"] == "v0001"

    assert store.current_version(caches / "fashion") == "v0001"
    assert check_records(records, reference, {"v0001"}) == {"v0001"}


# --- 4. the registry ------------------------------------------------------------------------

def test_registry_snapshot_keeps_its_version_across_a_swap(served_caches, tiny_encoder, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    changes: list[dict] = []
    registry = CacheRegistry(caches, tiny_encoder, on_change=changes.append)
    report = registry.reload()
    assert report.loaded == {"fashion": "v0001", "fashion-caps": "v0001"} and not report.failed

    before = registry.get("fashion")  # what a request in flight holds
    snapshot = registry.snapshot()
    keys = before.tensors.image_keys.clone()
    weights = before.tensors.text_weights.clone()

    after = registry.activate("fashion", "v0002")

    assert after.version == "v0002" and registry.get("fashion") is after
    assert store.current_version(caches / "fashion") == "v0002"
    assert before.version == "v0001" and before.artifact.version == "v0001"
    assert torch.equal(before.tensors.image_keys, keys) and torch.equal(before.tensors.text_weights, weights)
    assert not torch.equal(after.tensors.image_keys, keys)
    assert snapshot["fashion"] is before and registry.snapshot() is not snapshot  # a new dict, not a mutation
    assert registry.get("fashion-caps") is snapshot["fashion-caps"]  # untouched caches are reused
    assert [c["fashion"].version for c in changes] == ["v0001", "v0002"]


def test_registry_reload_follows_current_on_disk(served_caches, tiny_encoder, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    registry = CacheRegistry(caches, tiny_encoder)
    registry.reload()
    caps = registry.get("fashion-caps")

    store.set_current(caches / "fashion", "v0002")  # e.g. `kvclip build` in another process
    assert registry.get("fashion").version == "v0001"  # nothing changes until a reload
    report = registry.reload()
    assert report.loaded == {"fashion": "v0002"} and report.unchanged == ["fashion-caps"]
    assert registry.get("fashion").version == "v0002"
    assert registry.get("fashion-caps") is caps

    again = registry.reload()
    assert again.loaded == {} and sorted(again.unchanged) == ["fashion", "fashion-caps"]

    # A CURRENT naming a broken version: reported, and the served version stays.
    keys = caches / "fashion" / "versions" / "v0001" / "image_keys.npy"
    keys.write_bytes(keys.read_bytes()[:100])
    store.set_current(caches / "fashion", "v0001")
    broken = registry.reload()
    assert "fashion" in broken.failed and "checksum" in broken.failed["fashion"]
    assert "fashion" in registry.errors
    assert registry.get("fashion").version == "v0002"

    # A removed cache stops being served.
    import shutil

    shutil.rmtree(caches / "fashion-caps")
    removed = registry.reload()
    assert removed.removed == ["fashion-caps"]
    with pytest.raises(CacheNotFound):
        registry.get("fashion-caps")


class OtherModel:
    """Stands in for an encoder of another model: only what the registry looks at."""

    def __init__(self, model_id: str, weights_sha256: str | None) -> None:
        self.model_id = model_id
        self.weights_sha256 = weights_sha256
        self.device = torch.device("cpu")


@pytest.mark.parametrize("encoder", [
    OtherModel("tiny-random", "0" * 64),  # same name, other weights: the checksum decides
    OtherModel("ViT-B-32:openai", None),  # no checksum: the name decides
], ids=["other-weights", "other-name"])
def test_registry_refuses_caches_of_another_model(served_caches, tmp_path, encoder):
    caches = copy_caches(served_caches, tmp_path / "caches")
    registry = CacheRegistry(caches, encoder)
    report = registry.reload()
    assert report.loaded == {} and sorted(report.failed) == ["fashion", "fashion-caps"]
    assert sorted(registry.errors) == ["fashion", "fashion-caps"]
    assert "tiny-random" in registry.errors["fashion"] and "rebuild" in registry.errors["fashion"]
    assert registry.snapshot() == {}
    with pytest.raises(CacheNotFound):
        registry.get("fashion")
    with pytest.raises(VersionNotLoadable) as refused:
        registry.activate("fashion", "v0002")
    assert isinstance(refused.value.__cause__, ModelLoadError)
    assert store.current_version(caches / "fashion") == "v0001"  # a refused version is never made CURRENT
    assert registry.snapshot() == {}


def test_registry_activate_unknown_version_or_cache(served_caches, tiny_encoder, tmp_path):
    from kvclip.service.registry import VersionNotFound

    caches = copy_caches(served_caches, tmp_path / "caches")
    registry = CacheRegistry(caches, tiny_encoder)
    registry.reload()
    with pytest.raises(VersionNotFound):
        registry.activate("fashion", "v0009")
    with pytest.raises(CacheNotFound):
        registry.activate("nope", "v0001")
    assert registry.get("fashion").version == "v0001"
    assert Path(caches / "fashion" / "CURRENT").read_text().strip() == "v0001"
