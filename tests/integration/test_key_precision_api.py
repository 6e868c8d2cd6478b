"""--key-precision as the server serves and reports it: the caches' key matrices in float16 or
float32 on the serving device (auto: float16 on CUDA only), in GET /v1/caches/{name}."""
from __future__ import annotations

import pytest
import torch

from kvclip.clients.models import CacheInfo
from tests.service_helpers import image_files, make_config, running_app

pytestmark = pytest.mark.anyio


async def classify(client, files, cache: str, method: str) -> list[dict]:
    response = await client.post("/v1/classify", files=files,
                                 params={"cache": cache, "method": method, "top_k": 10, "explain": "true"})
    assert response.status_code == 200, response.text
    return response.json()["results"]


async def served(config, encoder, files) -> tuple[dict, dict, set[tuple[torch.dtype, bool]]]:
    """(GET /v1/caches/fashion, classify results per (cache, method), the caches' (key dtype,
    whether the keys are the memory-mapped file's pages))."""
    async with running_app(config, encoder) as (app, client):
        detail = (await client.get("/v1/caches/fashion")).json()
        results = {(cache, method): await classify(client, files, cache, method)
                   for cache, method in [("fashion", "tip"), ("fashion", "tipx"), ("fashion-caps", "caps")]}
        snapshot = app.state.kv.registry.snapshot()
        keys = {(loaded.tensors.image_keys.dtype, loaded.tensors.image_keys.data_ptr() == loaded.artifact.image_keys.ctypes.data)
                for loaded in snapshot.values()}
        assert snapshot["fashion-caps"].tensors.caption_keys.dtype == snapshot["fashion-caps"].tensors.key_dtype
    return detail, results, keys


@pytest.mark.parametrize("search", [{}, {"search_path": "faiss", "faiss_k": 8}], ids=["auto", "faiss"])
async def test_float16_keys_serve_the_float32_answers_and_auto_is_float32_on_a_cpu(
        served_caches, fashion_test, tiny_encoder, search):
    """Forced FAISS, tip blends each query's 8 candidates (float32 index) on the float16 keys. The served
    (calibrated) scores moved by at most 7e-4 when measured; the bound is 1e-2, the top label the same."""
    files = image_files(fashion_test, 8)
    auto, exact, keys = await served(make_config(served_caches, **search), tiny_encoder, files)
    assert auto["key_precision"] == "float32" and keys == {(torch.float32, True)}  # a CPU shares the file's pages

    config = make_config(served_caches, key_precision="float16", **search)
    half, rounded, keys = await served(config, tiny_encoder, files)
    assert half["key_precision"] == "float16" and keys == {(torch.float16, False)}  # a cast copy
    assert half["search"]["path"] == auto["search"]["path"] == ("faiss" if search else "dense")
    assert ("tip" in half["search"]["methods"]) == bool(search)
    assert CacheInfo.from_json(half).key_precision == "float16"  # the client reads it
    for key, want in exact.items():
        got = rounded[key]
        for w, g in zip(want, got):
            assert w["labels"][0]["label"] == g["labels"][0]["label"], key
            scores = {lb["label"]: lb["score"] for lb in w["labels"]}
            diff = max(abs(scores[lb["label"]] - lb["score"]) for lb in g["labels"])
            assert diff < 1e-2, key
            assert [n["item"] for n in g["neighbors"]][:1] == [n["item"] for n in w["neighbors"]][:1], key
