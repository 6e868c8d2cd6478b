"""The search path a loaded cache blends on (service/search_path.py): dense unless FAISS is
measured faster and agrees enough. Timings are injected, so each test decides which path is
"faster"; nothing here asserts on wall-clock time."""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from kvclip import artifact as store
from kvclip.errors import ArtifactError
from kvclip.index import build_index
from kvclip.service import search_path
from kvclip.service.config import ServerConfig, add_arguments, from_namespace
from kvclip.service.registry import key_dtype
from kvclip.service.search_path import SearchPolicy, choose
from tests.manifests import sample_manifest

N, D = 40, 8
TIP = {"alpha": 2.0, "beta": 3.0, "gamma": 0.0, "delta": 0.0}


def make_artifact(index: bool = True, agreement: float = 1.0, k: int = 64, tipx_gamma: float = 0.5,
                  caps_delta: float = 0.3, captions: bool = True) -> store.CacheArtifact:
    rng = np.random.default_rng(0)
    unit = lambda a, axis: (a / np.linalg.norm(a, axis=axis, keepdims=True)).astype(np.float32)  # noqa: E731
    keys = unit(rng.normal(size=(N, D)), 1)
    caps = unit(rng.normal(size=(N, D)), 1) if captions else None
    report = {"top1_agreement": agreement, "max_abs_logit_diff": 0.0, "top1_dense": 0.5, "top1_topk": 0.5}
    params = {"best_method": "tip", "methods": {
        "tip": TIP, "tipx": {**TIP, "gamma": tipx_gamma}, "caps": {**TIP, "gamma": 0.0, "delta": caps_delta}}}
    return store.CacheArtifact(
        labels=["a", "b", "c"],
        text_weights=unit(rng.normal(size=(D, 3)), 0),
        image_keys=keys,
        label_ids=np.arange(N) % 3,
        query_features=None,
        caption_keys=caps,
        items=[{"path": f"/x/{i}.png", "label": "abc"[i % 3]} for i in range(N)],
        manifest=sample_manifest(labels=["a", "b", "c"], params=params, faiss={
            "index": "flat", "k": k, "n_queries": N, "methods": {m: report for m in ("tip", "tipx", "caps")}}),
        image_index=build_index(keys) if index else None,
        caption_index=build_index(caps) if index and captions else None,
        version="v0001",
    )


class FakeTimes:
    """Seconds per call of each path, per image, as a measure; records what it was asked."""

    def __init__(self, dense: float, faiss: float | dict[int, float]) -> None:
        self.dense, self.faiss, self.calls = dense, faiss, []

    def __call__(self, probe, path, batch) -> float:
        self.calls.append((path, batch))
        per_image = self.dense if path == "dense" else (
            self.faiss[batch] if isinstance(self.faiss, dict) else self.faiss)
        return per_image * batch


def policy(measure=None, **changes) -> SearchPolicy:
    return SearchPolicy(**{"probe_min_keys": 1, "batches": (1, 32), "measure": measure, **changes})


def test_faiss_is_chosen_when_measured_faster_at_every_batch_and_agreeing():
    artifact = make_artifact()
    times = FakeTimes(dense=0.004, faiss=0.001)
    decision = choose(artifact, artifact.tensors("cpu"), policy(times))
    assert (decision.path, decision.reason, decision.method, decision.index) == ("faiss", "measured", "tip", "flat")
    assert decision.methods == ["tip", "caps"]  # tipx has a KL term (γ = 0.5): always dense
    assert (decision.agreement, decision.agreement_source) == (1.0, "build")
    assert [(t.batch, t.dense_ms_per_image, t.faiss_ms_per_image) for t in decision.timings] == [
        (1, pytest.approx(4.0), pytest.approx(1.0)), (32, pytest.approx(4.0), pytest.approx(1.0))]
    assert [t.faiss_over_dense for t in decision.timings] == [pytest.approx(0.25)] * 2
    # Dense and FAISS alternate within each batch size: a burst of load hits both.
    assert times.calls[:4] == [("dense", 1), ("faiss", 1), ("dense", 1), ("faiss", 1)]
    assert len(times.calls) == 2 * 2 * search_path.ROUNDS


def test_dense_stays_when_faiss_is_slower_at_one_batch_and_the_unused_indexes_are_dropped():
    artifact = make_artifact()
    times = FakeTimes(dense=0.004, faiss={1: 0.001, 32: 0.02})  # faster alone, 5x slower in a full batch
    served, decision = search_path.decide("demo", artifact, artifact.tensors("cpu"), policy(times))
    assert (decision.path, decision.reason, decision.methods) == ("dense", "measured", [])
    assert [t.batch for t in decision.timings] == [1, 32] and decision.timings[1].faiss_over_dense == pytest.approx(5)
    assert "not faster" in decision.detail
    assert served.image_index is None and served.caption_index is None  # never searched: not kept
    assert artifact.image_index is not None  # the loaded object itself is not changed


def test_near_parity_keeps_the_exact_path():
    artifact = make_artifact()
    decision = choose(artifact, artifact.tensors("cpu"), policy(FakeTimes(dense=0.004, faiss=0.0039)))
    assert decision.path == "dense"


def test_low_agreement_stays_dense_without_timing():
    artifact = make_artifact(agreement=0.9)
    times = FakeTimes(dense=0.004, faiss=0.0001)
    decision = choose(artifact, artifact.tensors("cpu"), policy(times, min_agreement=0.95))
    assert (decision.path, decision.reason, decision.agreement) == ("dense", "low_agreement", 0.9)
    assert times.calls == [] and decision.timings == []


def test_agreement_is_probed_on_the_device_when_the_build_measured_another_k():
    """The build's report is for k = 5, the server serves k = N: every item is a candidate, so
    the leave-one-out probe finds the candidate blend equal to dense."""
    artifact = make_artifact(agreement=0.1, k=5)
    decision = choose(artifact, artifact.tensors("cpu"), policy(FakeTimes(0.004, 0.001), faiss_k=N))
    assert (decision.agreement, decision.agreement_source, decision.path) == (1.0, "probe", "faiss")


def test_a_forced_flag_wins_over_the_measurement():
    artifact = make_artifact()
    times = FakeTimes(dense=0.001, faiss=0.004)  # FAISS slower
    forced = choose(artifact, artifact.tensors("cpu"), policy(times, mode="faiss"))
    assert (forced.path, forced.reason, forced.methods) == ("faiss", "forced", ["tip", "caps"])
    times = FakeTimes(dense=0.004, faiss=0.001)  # FAISS faster
    assert choose(artifact, artifact.tensors("cpu"), policy(times, mode="dense")).reason == "forced"
    assert choose(artifact, artifact.tensors("cpu"), policy(times, mode="dense")).path == "dense"
    assert times.calls == []


def test_a_cache_without_index_is_dense():
    artifact = make_artifact(index=False)
    times = FakeTimes(dense=0.004, faiss=0.001)
    for mode in ("auto", "faiss"):
        decision = choose(artifact, artifact.tensors("cpu"), policy(times, mode=mode))
        assert (decision.path, decision.reason, decision.index) == ("dense", "no_index", None)
    assert times.calls == []


def test_small_caches_are_dense_without_a_measurement():
    artifact = make_artifact()
    times = FakeTimes(dense=0.004, faiss=0.001)
    decision = choose(artifact, artifact.tensors("cpu"), policy(times, probe_min_keys=N + 1))
    assert (decision.path, decision.reason) == ("dense", "small") and times.calls == []


def test_above_the_dense_limit_faiss_serves_and_without_an_index_the_load_fails():
    artifact = make_artifact()
    times = FakeTimes(dense=0.001, faiss=0.004)
    decision = choose(artifact, artifact.tensors("cpu"), policy(times, dense_max_keys=N - 1))
    assert (decision.path, decision.reason) == ("faiss", "too_large") and times.calls == []
    bare = make_artifact(index=False)
    with pytest.raises(ArtifactError, match="more than --dense-max-keys"):
        choose(bare, bare.tensors("cpu"), policy(times, dense_max_keys=N - 1))


def test_methods_with_a_kl_term_or_missing_caption_index_never_use_candidates():
    artifact = make_artifact(tipx_gamma=0.0, captions=False)
    assert search_path.candidate_methods(artifact) == ["tip", "tipx"]  # no caption keys: no caps
    artifact = make_artifact()
    without_captions = dataclasses.replace(artifact, caption_index=None)
    assert search_path.candidate_methods(without_captions) == ["tip"]  # caps' δ > 0 needs its index


def test_the_real_timer_times_both_paths():
    artifact = make_artifact()
    probe = search_path.PathProbe(artifact.tensors("cpu"), artifact.image_index, artifact.caption_index, "tip",
                                  artifact.params("tip").for_method("tip"), 8,
                                  search_path.probe_queries(artifact.tensors("cpu").image_keys, 4))
    assert probe.queries.shape == (4, D)
    for path in ("dense", "faiss"):
        assert search_path.time_path(probe, path, 4) > 0


@pytest.mark.parametrize("mode, expected", [("dense", 2**63 - 1), ("faiss", 0), ("auto", 99)])
def test_indexes_are_read_only_for_caches_that_may_search_them(mode, expected):
    assert SearchPolicy(mode=mode, probe_min_keys=100, dense_max_keys=1000).index_min_items == expected
    assert SearchPolicy(probe_min_keys=100, dense_max_keys=10).index_min_items == 10


def test_policy_from_config_probes_batch_one_and_the_full_batch():
    config = ServerConfig(caches="/c", model="tiny-random", max_batch=16, search_path="faiss", faiss_k=8,
                          probe_min_keys=5, dense_max_keys=50, faiss_min_agreement=0.9)
    assert SearchPolicy.from_config(config) == SearchPolicy(mode="faiss", faiss_k=8, batches=(1, 16),
                                                            probe_min_keys=5, dense_max_keys=50, min_agreement=0.9)
    assert SearchPolicy.from_config(dataclasses.replace(config, max_batch=1)).batches == (1,)
    with pytest.raises(ValueError, match="search_path must be one of auto, dense, faiss"):
        dataclasses.replace(config, search_path="fast")
    with pytest.raises(ValueError, match="faiss_min_agreement must lie in 0..1"):
        dataclasses.replace(config, faiss_min_agreement=1.5)


def test_float16_keys_are_probed_and_timed_like_float32_ones():
    """The dense path's keys in float16 (--key-precision): the agreement probe (the keys as
    queries) and the real timer run on them; FAISS searches its own float32 index."""
    artifact = make_artifact(agreement=0.1, k=5)
    tensors = artifact.tensors("cpu", key_dtype=torch.float16)
    decision = choose(artifact, tensors, policy(FakeTimes(0.004, 0.001), faiss_k=N))
    assert (decision.agreement, decision.agreement_source, decision.path) == (1.0, "probe", "faiss")
    probe = search_path.PathProbe(tensors, artifact.image_index, artifact.caption_index, "tip",
                                  artifact.params("tip").for_method("tip"), 8, search_path.probe_queries(tensors.image_keys, 4))
    assert probe.queries.dtype == torch.float32
    for path in ("dense", "faiss"):
        assert search_path.time_path(probe, path, 4) > 0


def test_key_precision_auto_is_float16_on_cuda_only_and_a_flag_or_variable_forces_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (key_dtype("auto", cpu), key_dtype("auto", cuda)) == (torch.float32, torch.float16)
    assert (key_dtype("float16", cpu), key_dtype("float32", cuda)) == (torch.float16, torch.float32)
    config = ServerConfig(caches="/c", model="tiny-random", key_precision="float16")
    assert SearchPolicy.from_config(config).key_precision == "float16"
    assert SearchPolicy.from_config(dataclasses.replace(config, key_precision="auto")) == SearchPolicy()
    with pytest.raises(ValueError, match="key_precision must be one of auto, float32, float16"):
        dataclasses.replace(config, key_precision="bfloat16")
    monkeypatch.setenv("KVCLIP_KEY_PRECISION", "float32")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_namespace(parser.parse_args(["--caches", "/c", "--model", "m"])).key_precision == "float32"
    assert from_namespace(parser.parse_args(["--caches", "/c", "--model", "m", "--key-precision", "float16"])
                          ).key_precision == "float16"


def test_the_client_reads_and_prints_the_decision():
    from kvclip.clients.models import CacheInfo
    from kvclip.clients.render import cache_detail

    artifact = make_artifact()
    decision = choose(artifact, artifact.tensors("cpu"), policy(FakeTimes(dense=0.004, faiss=0.001)))
    info = CacheInfo.from_json({"name": "demo", "version": "v0001", "model": "m", "classes": 3, "items": N,
                                "methods": artifact.methods, "best_method": "tip", "captions": True,
                                "search": decision.as_dict(), "key_precision": "float16"})
    assert info.search.timings[0].faiss_over_dense == pytest.approx(0.25) and info.key_precision == "float16"
    assert "search path  faiss (measured: FAISS (flat) measured faster than dense" in cache_detail(info)
    assert "keys         float16" in cache_detail(info)


def test_the_agreement_probe_goes_in_chunks_with_the_same_answer():
    """topk_agreement bounds its dense pass to `chunk` queries; the report does not depend on it."""
    from kvclip.cache_builder.build import topk_agreement

    artifact = make_artifact()
    tensors = artifact.tensors("cpu")
    params = {m: artifact.params(m) for m in ("tip", "tipx", "caps")}
    reports = [topk_agreement(tensors, tensors.image_keys, tensors.label_ids, params, artifact.image_index,
                              artifact.caption_index, 4, chunk=chunk) for chunk in (7, N)]
    assert reports[0]["n_queries"] == N and reports[0]["methods"].keys() == {"tip", "tipx", "caps"}
    for method, whole in reports[1]["methods"].items():
        chunked = reports[0]["methods"][method]
        assert chunked == {name: pytest.approx(value, abs=1e-4) for name, value in whole.items()}
