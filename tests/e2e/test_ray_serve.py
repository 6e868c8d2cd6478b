"""The Ray Serve deployment (deploy/ray/app.py) on a local one-node Ray cluster on 127.0.0.1.

Two classifier replicas with the tiny model: requests spread over both, answers equal the
plain server's for the same images and cache, and an activation (v0001 -> v0002) written
through one replica is followed by both. Needs ray (`pip install -e '.[ray]'`); skipped
without it.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kvclip import artifact as store
from tests.server_process import free_port
from tests.service_helpers import copy_caches, image_files, make_config, running_app

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
PARAMS = {"cache": "fashion", "top_k": 5, "explain": "true"}  # auto: the tuned method (tipx)
ZEROSHOT = {"cache": "fashion", "top_k": 10, "method": "zeroshot"}
_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report leaves the machine
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # the machine is small and shared
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
}


@pytest.fixture(scope="module")
def serve_url():
    """A local Ray cluster (2 CPUs, no dashboard, bound to 127.0.0.1) with Serve on a free port."""
    # Here, not at import: collecting the default suite (slow tests deselected) imports no Ray.
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install -e '.[ray]'")
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)  # inherited by the raylet and so by every worker
    port = free_port()
    # Serve's HTTP proxy listens on 127.0.0.1 only. Ray's own gRPC ports (GCS, raylet, workers)
    # listen on all interfaces by design (token-authenticated in Ray 2.60); the traffic of this
    # one-node cluster stays on this host, and usage stats are off.
    ray.init(address="local", include_dashboard=False, num_cpus=2, num_gpus=0,
             log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _plain_results(caches: Path, files, encoder) -> tuple[dict, dict]:
    """The plain server's answers (auto method with explain; zeroshot) for the same images and
    cache, in-process with the same tiny model."""
    async def go():
        async with running_app(make_config(caches), encoder) as (_, client):
            out = []
            for params in (PARAMS, ZEROSHOT):
                response = await client.post("/v1/classify", params=params, files=files)
                assert response.status_code == 200, response.text
                out.append(response.json())
            return tuple(out)
    return asyncio.run(go())


# As in tests/integration/test_service_batching.py: zero-shot scores agree to 1e-5; the cache methods
# amplify the encoder's last-digit differences between batch sizes (tipx by ~2e-4 in scores).
STRICT = dict(score_abs=1e-5, logit_rel=1e-5)
CACHE_METHOD = dict(score_abs=5e-4, logit_rel=1e-3)


def _assert_same(got: dict, want: dict, score_abs: float, logit_rel: float) -> None:
    assert {k: got[k] for k in ("cache", "version", "method", "model")} == \
        {k: want[k] for k in ("cache", "version", "method", "model")}
    assert len(got["results"]) == len(want["results"])
    for g, w in zip(got["results"], want["results"]):
        assert (g["index"], g["name"], g["error"]) == (w["index"], w["name"], w["error"])
        assert [x["label"] for x in g["labels"]] == [x["label"] for x in w["labels"]]
        for x, y in zip(g["labels"], w["labels"]):
            assert x["score"] == pytest.approx(y["score"], abs=score_abs)
            assert x["logit"] == pytest.approx(y["logit"], rel=logit_rel, abs=1e-5)
        assert (g["neighbors"] is None) == (w["neighbors"] is None)
        for x, y in zip(g["neighbors"] or [], w["neighbors"] or []):
            assert (x["item"], x["label"], x["name"]) == (y["item"], y["label"], y["name"])
            assert x["affinity"] == pytest.approx(y["affinity"], abs=1e-5)


def _classify_round(url: str, files, concurrency: int = 6) -> list[httpx.Response]:
    def one(_):
        return httpx.post(url + "/v1/classify", params=PARAMS, files=files, timeout=120)
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(concurrency)))


def _until_both_replicas(url: str, files, rounds: int = 15, version: str | None = None) -> list[httpx.Response]:
    """Concurrent rounds until two replicas have answered (with `version`: answered from that
    version). Serve routes a cache to the replicas that hold it, and spills to the other one
    when those are at max_ongoing_requests."""
    responses, replicas = [], set()
    for _ in range(rounds):
        batch = _classify_round(url, files)
        for r in batch:
            assert r.status_code == 200, r.text
            if version is None or r.headers["X-Kvclip-Version"] == version:
                replicas.add(r.headers["X-Kvclip-Replica"])
        responses += batch
        if len(replicas) >= 2:
            return responses
    raise AssertionError(f"only replicas {replicas} answered in {rounds} rounds")


def test_ray_serve_two_replicas_match_plain_server_and_follow_activation(
        serve_url, served_caches, fashion_test, tiny_encoder, tmp_path):
    from ray import serve

    from kvclip.deploy.ray.app import build_app

    caches = copy_caches(served_caches, tmp_path / "caches")
    files = image_files(fashion_test, 3)
    want_v1, want_v1_zs = _plain_results(caches, files, tiny_encoder)
    assert want_v1["version"] == "v0001"

    serve.run(build_app({
        "caches": str(caches), "model": "tiny-random", "device": "cpu",
        "num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1, "decode_workers": 1,
        "max_ongoing_requests": 2, "max_batch": 8, "max_wait_ms": 50, "refresh_interval_s": 0.2,
    }), name="kvclip", route_prefix="/")
    url = serve_url
    assert httpx.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
    openapi = httpx.get(url + "/openapi.json", timeout=30).json()  # the hand-read JSON body is documented
    assert "ClassifyJson" in openapi["components"]["schemas"] and "/v1/caches/{name}/activate" in openapi["paths"]

    # Spread over both replicas; every answer equals the plain server's.
    responses = _until_both_replicas(url, files)
    for r in responses:
        _assert_same(r.json(), want_v1, **CACHE_METHOD)
        assert r.headers["X-Kvclip-Version"] == "v0001"
    batches = [int(r.headers["X-Kvclip-Batch-Images"]) for r in responses]
    print("encoder batch sizes seen:", batches)
    assert max(batches) > len(files)  # two requests' images shared one encoder call
    r = httpx.post(url + "/v1/classify", params=ZEROSHOT, files=files, timeout=60)
    _assert_same(r.json(), want_v1_zs, **STRICT)

    # The plain server's errors, unchanged.
    r = httpx.post(url + "/v1/classify", params={"cache": "nope"}, files=files, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_cache"
    r = httpx.post(url + "/v1/classify", params={"cache": "fashion"},
                   files=[("file", ("bad.png", b"not an image", "image/png"))], timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"
    r = httpx.post(url + "/v1/caches/fashion/activate", json={"version": "v0099"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_version"

    # Activate v0002 through one replica: CURRENT changes on disk and both replicas follow.
    r = httpx.post(url + "/v1/caches/fashion/activate", json={"version": "v0002"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v0002"
    assert store.current_version(caches / "fashion") == "v0002"
    # Every replica re-reads CURRENT on its first request after refresh_interval_s.
    _until_both_replicas(url, files, rounds=100, version="v0002")
    want_v2, _ = _plain_results(caches, files, tiny_encoder)
    assert want_v2["version"] == "v0002"
    assert [x["label"] for x in want_v2["results"][0]["neighbors"]] != \
        [x["label"] for x in want_v1["results"][0]["neighbors"]] or want_v2["results"] != want_v1["results"]
    responses = _until_both_replicas(url, files)
    for r in responses:
        assert r.headers["X-Kvclip-Version"] == "v0002"
        _assert_same(r.json(), want_v2, **CACHE_METHOD)
    serve.delete("kvclip")
