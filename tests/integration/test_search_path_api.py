"""The search path the server chooses per cache at load (service/search_path.py), as it serves
and reports it in GET /v1/caches/{name}. The timings are injected (the measure the server calls),
so a test decides whether FAISS is "faster"; nothing asserts on wall-clock time."""
from __future__ import annotations

import logging

import pytest

from kvclip.clients.models import CacheInfo
from kvclip.service import search_path
from tests.service_helpers import image_files, make_config, running_app

pytestmark = pytest.mark.anyio


def fake_measure(dense_s: float, faiss_s: float):
    """Seconds per image of each path, whatever the device does."""
    def measure(probe, path, batch) -> float:
        return (dense_s if path == "dense" else faiss_s) * batch
    return measure


async def tip_logits(client, files) -> list[dict[str, float]]:
    response = await client.post("/v1/classify", params={"cache": "fashion", "top_k": 10, "method": "tip"},
                                 files=files)
    assert response.status_code == 200, response.text
    return [{lb["label"]: lb["logit"] for lb in r["labels"]} for r in response.json()["results"]]


async def test_the_measured_faster_path_serves_and_the_cache_detail_says_why(
        served_caches, fashion_test, tiny_encoder, monkeypatch, caplog):
    files = image_files(fashion_test, 8)
    async with running_app(make_config(served_caches, search_path="dense"), tiny_encoder) as (_, client):
        dense = await tip_logits(client, files)
        forced = (await client.get("/v1/caches/fashion")).json()["search"]
    assert (forced["path"], forced["reason"], forced["timings"]) == ("dense", "forced", [])

    # The 80-key cache is measured (probe_min_keys 1); FAISS "takes" a quarter of dense's time.
    monkeypatch.setattr(search_path, "time_path", fake_measure(0.004, 0.001))
    config = make_config(served_caches, probe_min_keys=1, faiss_k=8, faiss_min_agreement=0.0)
    with caplog.at_level(logging.INFO, logger="kvclip.search_path"):
        async with running_app(config, tiny_encoder) as (app, client):
            candidates = await tip_logits(client, files)
            body = (await client.get("/v1/caches/fashion")).json()
            assert app.state.kv.registry.get("fashion").artifact.image_index is not None
    search = body["search"]
    assert (search["path"], search["reason"], search["method"], search["index"]) == ("faiss", "measured", "tip", "flat")
    assert "tip" in search["methods"] and search["agreement_source"] == "probe"  # the build measured k = 64, not 8
    assert [(t["batch"], t["dense_ms_per_image"], t["faiss_ms_per_image"]) for t in search["timings"]] == [
        (1, pytest.approx(4.0), pytest.approx(1.0)), (32, pytest.approx(4.0), pytest.approx(1.0))]
    assert any("cache fashion v0001: search path faiss (measured)" in r.getMessage() for r in caplog.records)
    # The candidate path ran: 8 of 80 keys exactly, the rest through class sums, so the logits moved.
    assert max(abs(d[label] - c[label]) for d, c in zip(dense, candidates) for label in d) > 1.0
    info = CacheInfo.from_json(body)  # the client reads it
    assert info.search.path == "faiss" and info.search.timings[1].batch == 32


async def test_a_slower_faiss_leaves_the_cache_dense_without_its_index(served_caches, tiny_encoder, monkeypatch):
    monkeypatch.setattr(search_path, "time_path", fake_measure(0.001, 0.004))
    config = make_config(served_caches, probe_min_keys=1, faiss_min_agreement=0.0)
    async with running_app(config, tiny_encoder) as (app, client):
        search = (await client.get("/v1/caches/fashion")).json()["search"]
        served = app.state.kv.registry.get("fashion").artifact
    assert (search["path"], search["reason"], search["methods"]) == ("dense", "measured", [])
    assert [t["faiss_over_dense"] for t in search["timings"]] == [pytest.approx(4.0)] * 2
    assert served.image_index is None  # dense never searches it: not kept in memory


async def test_small_caches_are_dense_unmeasured_with_no_index_loaded(served_caches, tiny_encoder, monkeypatch):
    def never(probe, path, batch):
        raise AssertionError("a small cache was measured")

    monkeypatch.setattr(search_path, "time_path", never)
    async with running_app(make_config(served_caches), tiny_encoder) as (app, client):
        search = (await client.get("/v1/caches/fashion")).json()["search"]
        served = app.state.kv.registry.get("fashion").artifact
    assert (search["path"], search["reason"], search["index"]) == ("dense", "small", None)
    assert served.image_index is None
