"""The HTTP API in-process (httpx over ASGI, lifespan running): classify, caches, auth,
limits and error bodies, metrics, request ids, OpenAPI, and the server configuration.

Read-only checks share one app per module (`shared`); tests that change caches work on a
copy of `served_caches`; tests that need other settings start their own app.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import os
import re
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kvclip.service.config import ServerConfig, add_arguments, from_namespace
from kvclip.service.schemas import ReadyResponse
from tests.service_helpers import copy_caches, image_files, make_config, metric_value, running_app
from tests.waiting import until

pytestmark = pytest.mark.anyio

CLASSIFY = "/v1/classify"
LABELS = ["T-shirt or top", "ankle boot", "bag", "coat", "dress", "pullover", "sandal", "shirt",
          "sneaker", "trouser"]


# Fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
async def shared(served_caches, tiny_encoder):
    """One running app over the (read-only) served caches, without API keys."""
    config = make_config(served_caches)
    async with running_app(config, tiny_encoder) as (app, client):
        yield app, client


@pytest.fixture(scope="module")
def client(shared) -> httpx.AsyncClient:
    return shared[1]


def png_bytes(size: int = 20, seed: int = 0, noise: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if noise:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def first_pngs(folder: Path, count: int) -> list[Path]:
    return sorted(Path(folder).rglob("*.png"), key=lambda p: p.name)[:count]


def b64_body(files, **params) -> dict:
    return {"images": [{"data": base64.b64encode(data).decode(), "name": name} for _, (name, data, _) in files],
            **params}


def assert_error(response: httpx.Response, status: int, code: str | None = None, *mentions: str) -> dict:
    """The response is `status` with {"error": {"code", "message", "details"?}}; returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) <= {"code", "message", "details"} and {"code", "message"} <= set(error), error
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if "details" in error:
        assert isinstance(error["details"], list) and error["details"]
    if code is not None:
        assert error["code"] == code, error
    for text in mentions:
        assert text in error["message"], (text, error["message"])
    return error


async def classify(client, files, **params) -> dict:
    response = await client.post(CLASSIFY, params=params, files=files)
    assert response.status_code == 200, response.text
    return response.json()


# 1. classify, multipart -------------------------------------------------------------------


async def test_results_follow_request_order_and_top_k(client, fashion_test):
    files = image_files(fashion_test, 6)
    body = await classify(client, files, cache="fashion", top_k=3)
    assert body["cache"] == "fashion" and body["version"] == "v0001" and body["model"] == "tiny-random"
    assert [r["index"] for r in body["results"]] == list(range(6))
    assert [r["name"] for r in body["results"]] == [name for _, (name, _, _) in files]
    for result in body["results"]:
        assert result["error"] is None and result["neighbors"] is None
        assert len(result["labels"]) == 3
        names = [lb["label"] for lb in result["labels"]]
        assert len(set(names)) == 3 and set(names) <= set(LABELS)
        scores = [lb["score"] for lb in result["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)

    # Reversed upload order: same per-image answers, reversed.
    back = await classify(client, files[::-1], cache="fashion", top_k=3)
    assert [r["name"] for r in back["results"]] == [r["name"] for r in body["results"]][::-1]
    for fwd, rev in zip(body["results"], back["results"][::-1]):
        assert [lb["label"] for lb in fwd["labels"]][0] == [lb["label"] for lb in rev["labels"]][0]


async def test_top_k_clamped_and_scores_are_probabilities(client, fashion_test, served_caches):
    files = image_files(fashion_test, 3)
    full = await classify(client, files, cache="fashion", top_k=10, method="tip")
    clamped = await classify(client, files, cache="fashion", top_k=1000, method="tip")
    one = await classify(client, files, cache="fashion", top_k=1, method="tip")
    for a, b, c in zip(full["results"], clamped["results"], one["results"]):
        assert len(a["labels"]) == 10 and len(b["labels"]) == 10 and len(c["labels"]) == 1
        assert sorted(lb["label"] for lb in a["labels"]) == sorted(LABELS)
        assert sum(lb["score"] for lb in a["labels"]) == pytest.approx(1.0, abs=1e-4)
        scores = [lb["score"] for lb in a["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert [lb["label"] for lb in b["labels"]] == [lb["label"] for lb in a["labels"]]
        assert c["labels"][0]["label"] == a["labels"][0]["label"]
        # calibrated softmax: the score ratio of two labels is the cache's map of the logits (all
        # of them: the log-mix transform reads the lowest logit too)
        p0, p1 = a["labels"][0], a["labels"][1]
        if p1["score"] > 1e-6:
            import torch

            from kvclip.artifact import load_cache

            row = torch.tensor([[lb["logit"] for lb in a["labels"]]], dtype=torch.float64)
            mapped = load_cache(served_caches / "fashion").calibrated(row, "tip")[0]
            assert np.log(p0["score"] / p1["score"]) == pytest.approx(float(mapped[0].log() - mapped[1].log()),
                                                                      rel=1e-3, abs=1e-3)


async def test_labels_are_ranked_by_logit_even_when_probabilities_underflow(client, fashion_test):
    """Labels are ranked by logit: with tuned alpha the logits span ~100s and the float32
    softmax underflows to exactly 0.0 for most labels, so ranking by probability would leave
    their order (and, for top_k < C, the choice) arbitrary."""
    files = image_files(fashion_test, 6)
    body = await classify(client, files, cache="fashion", top_k=10, method="tip")
    three = await classify(client, files, cache="fashion", top_k=3, method="tip")
    for full, top3 in zip(body["results"], three["results"]):
        logits = [lb["logit"] for lb in full["labels"]]
        assert logits == sorted(logits, reverse=True), logits
        by_logit = sorted(full["labels"], key=lambda lb: -lb["logit"])[:3]
        assert [lb["label"] for lb in top3["labels"]] == [lb["label"] for lb in by_logit]


async def test_method_auto_resolves_to_best_method_and_explicit_methods(client, fashion_test):
    detail = (await client.get("/v1/caches/fashion")).json()
    files = image_files(fashion_test, 4)
    default = await classify(client, files, cache="fashion", top_k=10)
    auto = await classify(client, files, cache="fashion", top_k=10, method="auto")
    assert default["method"] == auto["method"] == detail["best_method"]
    by_method = {}
    for method in ("zeroshot", "tip", "tipx"):
        assert method in detail["methods"]
        body = await classify(client, files, cache="fashion", top_k=10, method=method)
        assert body["method"] == method
        by_method[method] = [{lb["label"]: lb["logit"] for lb in r["labels"]} for r in body["results"]]
    best = detail["best_method"]
    for got, want in zip(auto["results"], by_method[best]):
        assert {lb["label"]: lb["logit"] for lb in got["labels"]} == pytest.approx(want, abs=1e-4)
    # The method is really applied: the cache changes the logits relative to zero-shot.
    assert any(
        zs[label] != pytest.approx(tip[label], abs=1e-3)
        for zs, tip in zip(by_method["zeroshot"], by_method["tip"]) for label in LABELS
    )


async def test_caps_only_on_captioned_cache(client, fashion_test):
    files = image_files(fashion_test, 2)
    caps = await classify(client, files, cache="fashion-caps", method="caps")
    assert caps["cache"] == "fashion-caps" and caps["method"] == "caps"
    assert all(len(r["labels"]) == 5 for r in caps["results"])
    response = await client.post(CLASSIFY, params={"cache": "fashion", "method": "caps"}, files=files)
    error = assert_error(response, 422, "invalid_parameters", "caps", "fashion")
    assert "tipx" in error["message"]  # says what the cache serves instead


async def test_explain_returns_neighbours(client, fashion_test):
    files = image_files(fashion_test, 3)
    detail = (await client.get("/v1/caches/fashion")).json()
    body = await classify(client, files, cache="fashion", explain="true", method="tip")
    for result in body["results"]:
        neighbors = result["neighbors"]
        assert neighbors is not None and len(neighbors) == 5  # explain_k default
        assert all(n["label"] in detail["labels"] for n in neighbors)
        assert all(0 <= n["item"] < detail["items"] for n in neighbors)
        assert len({n["item"] for n in neighbors}) == len(neighbors)
        affinities = [n["affinity"] for n in neighbors]
        assert affinities == sorted(affinities, reverse=True)
        assert all(n["caption"] is None for n in neighbors)
        assert all(n["name"] and n["name"].endswith(".png") for n in neighbors)

    caps = await classify(client, files, cache="fashion-caps", explain="true", method="caps")
    for result in caps["results"]:
        assert result["neighbors"]
        for n in result["neighbors"]:
            assert n["caption"] == f"a photo of a {n['label']}"  # the sidecar captions

    plain = await classify(client, files, cache="fashion", explain="false")
    assert all(r["neighbors"] is None for r in plain["results"])


async def test_form_fields_are_parameters(client, fashion_test):
    files = image_files(fashion_test, 2)
    response = await client.post(CLASSIFY, params={"cache": "fashion-caps", "top_k": 2},
                                 data={"cache": "fashion", "top_k": "4", "method": "zeroshot"}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cache"] == "fashion" and body["method"] == "zeroshot"
    assert all(len(r["labels"]) == 4 for r in body["results"])


# 2. classify, JSON ------------------------------------------------------------------------


async def test_json_body_matches_multipart(client, fashion_test):
    files = image_files(fashion_test, 4)
    multipart = await classify(client, files, cache="fashion", top_k=10, method="tipx")
    response = await client.post(CLASSIFY, json=b64_body(files, cache="fashion", top_k=10, method="tipx"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["cache"], body["version"], body["method"]) == ("fashion", "v0001", "tipx")
    assert [r["name"] for r in body["results"]] == [r["name"] for r in multipart["results"]]
    for a, b in zip(body["results"], multipart["results"]):
        assert [lb["label"] for lb in a["labels"]] == [lb["label"] for lb in b["labels"]]
        assert [lb["score"] for lb in a["labels"]] == pytest.approx([lb["score"] for lb in b["labels"]], abs=1e-5)

    # Unnamed images are called image[i].
    unnamed = {"images": [{"data": base64.b64encode(data).decode()} for _, (_, data, _) in files[:2]]}
    response = await client.post(CLASSIFY, params={"cache": "fashion"}, json=unnamed)
    assert response.status_code == 200, response.text
    assert [r["name"] for r in response.json()["results"]] == ["image[0]", "image[1]"]


async def test_json_body_parameters_override_query(client, fashion_test):
    files = image_files(fashion_test, 2)
    response = await client.post(
        CLASSIFY, params={"cache": "fashion-caps", "top_k": 2, "method": "zeroshot", "explain": "true"},
        json=b64_body(files, cache="fashion", top_k=4, method="tip", explain=False),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cache"] == "fashion" and body["method"] == "tip"
    assert all(len(r["labels"]) == 4 and r["neighbors"] is None for r in body["results"])
    # ... and the query string fills in what the body leaves out.
    response = await client.post(CLASSIFY, params={"cache": "fashion-caps", "top_k": 2}, json=b64_body(files))
    assert response.status_code == 200, response.text
    assert response.json()["cache"] == "fashion-caps"
    assert all(len(r["labels"]) == 2 for r in response.json()["results"])


async def test_json_errors(client, fashion_test):
    files = image_files(fashion_test, 2)
    body = b64_body(files, cache="fashion")
    body["images"][1]["data"] = "not base64 !!!"
    error = assert_error(await client.post(CLASSIFY, json=body), 400, "bad_image", "base64", "image 1")
    assert error["details"][0]["index"] == 1

    assert_error(await client.post(CLASSIFY, content=b"{not json", headers={"content-type": "application/json"}),
                 400, "bad_json")
    assert_error(await client.post(CLASSIFY, json={"images": [], "cache": "fashion"}), 422, "invalid_parameters",
                 "images")
    assert_error(await client.post(CLASSIFY, json={**b64_body(files), "cache": "fashion", "colour": "red"}), 422,
                 "invalid_parameters", "colour")
    assert_error(await client.post(CLASSIFY, json=b64_body(files, cache="fashion", top_k=0)), 422,
                 "invalid_parameters", "top_k")

    # JSON with partial: valid base64 of bytes that are no image.
    body = b64_body(files, cache="fashion", partial=True)
    body["images"].insert(1, {"data": base64.b64encode(b"definitely not a png").decode(), "name": "junk"})
    response = await client.post(CLASSIFY, json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["name"] for r in results] == [files[0][1][0], "junk", files[1][1][0]]
    assert results[1]["error"]["code"] == "bad_image" and results[1]["labels"] == []
    assert results[0]["labels"] and results[2]["labels"]


# 3. real-data sanity ----------------------------------------------------------------------


async def test_tip_accuracy_on_fashion_mnist_is_well_above_chance(client, fashion_test):
    paths = first_pngs(fashion_test, 50)
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    body = await classify(client, files, cache="fashion", method="tip", top_k=1)
    truth = {p.name: p.parent.name for p in paths}
    correct = sum(r["labels"][0]["label"] == truth[r["name"]] for r in body["results"])
    assert len(body["results"]) == 50
    assert correct / 50 > 0.3, f"top-1 accuracy {correct / 50:.2f} (chance is 0.1)"


# 4. error paths ---------------------------------------------------------------------------


async def test_undecodable_image_fails_whole_request_naming_it(client, fashion_test):
    files = image_files(fashion_test, 2)
    broken = ("file", ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "image/png"))
    request = [files[0], broken, files[1]]
    error = assert_error(await client.post(CLASSIFY, params={"cache": "fashion"}, files=request),
                         400, "bad_image", "broken.png")
    assert "1 of 3" in error["message"]
    assert [(d["index"], d["name"]) for d in error["details"]] == [(1, "broken.png")]

    response = await client.post(CLASSIFY, params={"cache": "fashion", "partial": "true"}, files=request)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["index"], r["name"]) for r in results] == [(0, files[0][1][0]), (1, "broken.png"),
                                                           (2, files[1][1][0])]
    assert results[1]["labels"] == [] and results[1]["error"]["code"] == "bad_image"
    assert "broken.png" in results[1]["error"]["message"]
    for good in (results[0], results[2]):
        assert good["error"] is None and len(good["labels"]) == 5

    # An empty file is unreadable too.
    empty = ("file", ("empty.png", b"", "image/png"))
    assert_error(await client.post(CLASSIFY, params={"cache": "fashion"}, files=[empty]), 400, "bad_image",
                 "empty.png")


async def test_unknown_cache_is_404(client, fashion_test):
    files = image_files(fashion_test, 1)
    assert_error(await client.post(CLASSIFY, params={"cache": "nope"}, files=files), 404, "unknown_cache", "nope")
    assert_error(await client.post(CLASSIFY, json=b64_body(files, cache="nope")), 404, "unknown_cache", "nope")


async def test_unsupported_content_types_are_415(client, fashion_test):
    assert_error(await client.post(CLASSIFY, params={"cache": "fashion"}, content=b"hello",
                                   headers={"content-type": "text/plain"}), 415, "unsupported_media_type",
                 "text/plain")
    assert_error(await client.post(CLASSIFY, params={"cache": "fashion"}, content=b""), 415,
                 "unsupported_media_type")
    files = image_files(fashion_test, 1) + [("file", ("notes.txt", b"just text", "text/plain"))]
    error = assert_error(await client.post(CLASSIFY, params={"cache": "fashion"}, files=files), 415,
                         "unsupported_media_type", "notes.txt", "text/plain")
    assert error["details"][0]["index"] == 1


async def test_partial_reports_a_non_image_part_on_that_image_only(client, fashion_test):
    # partial=true as a form field after the files: the part's type is judged once all is read.
    files = [("file", ("notes.txt", b"just text", "text/plain"))] + image_files(fashion_test, 1)
    response = await client.post(CLASSIFY, files=files, data={"cache": "fashion", "partial": "true"})
    assert response.status_code == 200, response.text
    refused, good = response.json()["results"]
    assert refused["labels"] == [] and refused["error"]["code"] == "unsupported_media_type"
    assert "text/plain" in refused["error"]["message"] and refused["name"] == "notes.txt"
    assert good["error"] is None and len(good["labels"]) == 5


async def test_invalid_parameters_are_422(client, fashion_test):
    files = image_files(fashion_test, 1)
    for params, field in [({"cache": "fashion", "top_k": 0}, "top_k"),
                          ({"cache": "fashion", "top_k": 1001}, "top_k"),
                          ({"cache": "fashion", "top_k": "many"}, "top_k"),
                          ({"cache": "fashion", "method": "bogus"}, "method"),
                          ({"cache": "fashion", "explain": "perhaps"}, "explain"),
                          ({}, "cache")]:
        response = await client.post(CLASSIFY, params=params, files=files)
        error = assert_error(response, 422, "invalid_parameters", field)
        assert any(field in d["field"] for d in error["details"]), error
    # An unknown form field is refused, not ignored.
    response = await client.post(CLASSIFY, params={"cache": "fashion"}, data={"colour": "red"}, files=files)
    assert_error(response, 422, "invalid_parameters", "colour")
    # A multipart body with fields but no images.
    body = b'--xyz\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n2\r\n--xyz--\r\n'
    response = await client.post(CLASSIFY, params={"cache": "fashion"}, content=body,
                                 headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(response, 422, "no_images", "no images")


@pytest.fixture(scope="module")
async def limited(served_caches, tiny_encoder):
    """An app with small limits: 3 images, 5000 bytes per image, 20000 bytes per body."""
    config = make_config(served_caches, max_images=3, max_image_bytes=5000, max_body_bytes=20_000)
    async with running_app(config, tiny_encoder) as (app, client):
        yield client


async def test_body_too_large_is_413(limited):
    big = png_bytes(100, noise=True)  # about 30 kB
    assert len(big) > 20_000
    files = [("file", ("big.png", big, "image/png"))]
    response = await limited.post(CLASSIFY, params={"cache": "fashion"}, files=files)
    assert_error(response, 413, "too_large", "20000")
    response = await limited.post(CLASSIFY, params={"cache": "fashion"},
                                  json={"images": [{"data": base64.b64encode(big).decode()}]})
    assert_error(response, 413, "too_large")

    # Chunked upload (no Content-Length): counted while reading, still 413.
    async def chunks():
        for _ in range(10):
            yield b"x" * 4000

    response = await limited.post(CLASSIFY, params={"cache": "fashion"}, content=chunks(),
                                  headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "too_large", "20000")

    async def multipart_chunks():
        yield (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
               b"Content-Type: image/png\r\n\r\n")
        for start in range(0, len(big), 4000):
            yield big[start:start + 4000]
        yield b"\r\n--xyz--\r\n"

    response = await limited.post(CLASSIFY, params={"cache": "fashion"}, content=multipart_chunks(),
                                  headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(response, 413, "too_large", "20000")


async def test_one_image_over_max_image_bytes_is_413(limited, fashion_test):
    files = image_files(fashion_test, 1)
    big = png_bytes(48, noise=True)  # about 7 kB: fits the body, not the image limit
    assert 5000 < len(big) < 15_000
    request = files + [("file", ("big.png", big, "image/png"))]
    error = assert_error(await limited.post(CLASSIFY, params={"cache": "fashion"}, files=request), 413,
                         "image_too_large", "big.png", "5000")
    assert [d["index"] for d in error["details"]] == [1]
    assert_error(await limited.post(CLASSIFY, json=b64_body(request, cache="fashion")), 413, "image_too_large",
                 "big.png")
    # Within the limits the same app classifies.
    assert (await limited.post(CLASSIFY, params={"cache": "fashion"}, files=files)).status_code == 200


async def test_more_images_than_max_images_is_413(limited, fashion_test):
    files = image_files(fashion_test, 4)
    assert_error(await limited.post(CLASSIFY, params={"cache": "fashion"}, files=files), 413, "too_many_images", "3")
    assert_error(await limited.post(CLASSIFY, json=b64_body(files, cache="fashion")), 413, "too_many_images", "3")
    assert (await limited.post(CLASSIFY, params={"cache": "fashion"}, files=files[:3])).status_code == 200


async def test_many_more_images_than_max_images_is_still_413(limited, fashion_test):
    """Far too many files is 413 too_many_images, not the multipart parser's bare 400."""
    files = image_files(fashion_test, 6)
    assert_error(await limited.post(CLASSIFY, params={"cache": "fashion"}, files=files), 413, "too_many_images")


async def test_decompression_bomb_is_400(served_caches, tiny_encoder):
    async with running_app(make_config(served_caches, max_pixels=100), tiny_encoder) as (_, client):
        bomb = ("file", ("bomb.png", png_bytes(20), "image/png"))  # 400 pixels > 100
        error = assert_error(await client.post(CLASSIFY, params={"cache": "fashion"}, files=[bomb]), 400,
                             "bad_image", "bomb.png", "20x20")
        assert "100" in error["message"]
        small = ("file", ("small.png", png_bytes(8), "image/png"))  # 64 pixels
        response = await client.post(CLASSIFY, params={"cache": "fashion", "partial": "true"}, files=[small, bomb])
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert results[0]["labels"] and results[0]["error"] is None
        assert results[1]["error"]["code"] == "bad_image" and not results[1]["labels"]


async def test_not_ready_is_503_with_retry_after(tmp_path, fashion_test):
    config = make_config(tmp_path, model="ViT-B-32:/nonexistent/weights.pt", retry_after_s=7)
    async with running_app(config, None, wait_ready=False) as (_, client):
        async def failed():
            ready = await client.get("/readyz")
            return ready if ready.json()["errors"] else None

        ready = await until(failed, what="/readyz reporting the failed model load", interval=0.05)
        assert ready.status_code == 503 and ready.headers["retry-after"] == "7"
        assert ready.json()["ready"] is False and "model" in ready.json()["errors"]
        assert (await client.get("/healthz")).status_code == 200
        response = await client.post(CLASSIFY, params={"cache": "fashion"}, files=image_files(fashion_test, 1))
        assert_error(response, 503, "not_ready", "nonexistent")
        assert response.headers["retry-after"] == "7"
        response = await client.get("/v1/caches")
        assert_error(response, 503, "not_ready")
        assert response.headers["retry-after"] == "7"


class HeldEncoder:
    """The tiny encoder, whose image batches wait until the test releases them."""

    def __init__(self, inner) -> None:
        self.inner, self.release, self.calls = inner, threading.Event(), 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode_images(self, pixels):
        self.calls += 1
        assert self.release.wait(120), "the test never released the encoder"
        return self.inner.encode_images(pixels)


async def test_overloaded_is_503_with_retry_after(served_caches, tiny_encoder, fashion_test):
    config = make_config(served_caches, max_queue=1, max_images=1, retry_after_s=3)
    encoder = HeldEncoder(tiny_encoder)
    async with running_app(config, encoder) as (app, client):
        files = image_files(fashion_test, 1)
        post = functools.partial(client.post, CLASSIFY, params={"cache": "fashion"}, files=files)
        on_device = asyncio.create_task(post())
        await until(lambda: encoder.calls == 1, what="the first request to reach the encoder")
        queued = asyncio.create_task(post())
        await until(lambda: app.state.kv.batcher.queued_images == 1, what="the second request to fill the queue")
        response = await post()
        assert_error(response, 503, "overloaded", "retry")
        assert response.headers["retry-after"] == "3"
        encoder.release.set()
        assert [r.status_code for r in await asyncio.gather(on_device, queued)] == [200, 200]
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "kvclip_rejected_requests_total") == 1


async def test_invalid_utf8_json_body_is_400_not_500(shared, fashion_test):
    """A JSON body that is not UTF-8 text is the client's error (400), not a 500."""
    app, _ = shared
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://kvclip.test") as client:
        response = await client.post(CLASSIFY, params={"cache": "fashion"}, content=b'{"images": "\xff\xfe"}',
                                     headers={"content-type": "application/json"})
    assert_error(response, 400, "bad_json")


async def test_internal_error_is_json_and_carries_request_id(shared, fashion_test, monkeypatch):
    """An unexpected error is a JSON 500 without internals, carrying the X-Request-ID that its
    message tells the client to quote."""
    app, _ = shared

    def broken_score(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("kvclip.service.classify.score", broken_score)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://kvclip.test") as client:
        response = await client.post(CLASSIFY, params={"cache": "fashion"}, files=image_files(fashion_test, 1),
                                     headers={"X-Request-ID": "trace-500"})
    error = assert_error(response, 500, "internal")
    assert "boom" not in error["message"]  # no internals leak
    assert response.headers.get("x-request-id") == "trace-500"


# 5. auth ----------------------------------------------------------------------------------


async def test_api_keys_from_environment(served_caches, tiny_encoder, fashion_test, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLIP_API_KEYS", "r1:read,a1:admin")
    caches = copy_caches(served_caches, tmp_path / "caches")
    files = image_files(fashion_test, 1)
    async with running_app(make_config(caches), tiny_encoder) as (_, client):
        def bearer(key):
            return {"Authorization": f"Bearer {key}"}

        for headers in ({}, bearer("wrong"), {"X-API-Key": "wrong"}, {"Authorization": "Basic cjE6"}):
            response = await client.post(CLASSIFY, params={"cache": "fashion"}, files=files, headers=headers)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
            assert_error(await client.get("/v1/caches", headers=headers), 401, "unauthorized")
        assert "API key" in (await client.get("/v1/caches")).json()["error"]["message"]

        for read in (bearer("r1"), {"X-API-Key": "r1"}, {"Authorization": "bearer r1"}):
            assert (await client.post(CLASSIFY, params={"cache": "fashion"}, files=files,
                                      headers=read)).status_code == 200
            assert (await client.get("/v1/caches", headers=read)).status_code == 200
            assert (await client.get("/v1/caches/fashion", headers=read)).status_code == 200
            for response in (
                await client.post("/v1/caches/fashion/activate", json={"version": "v0002"}, headers=read),
                await client.post("/v1/caches/reload", headers=read),
                await client.delete("/v1/caches/fashion/versions/v0002", headers=read),
            ):
                assert_error(response, 403, "forbidden", "admin")
                assert "www-authenticate" not in response.headers
        assert (caches / "fashion" / "versions" / "v0002").is_dir()
        assert (caches / "fashion" / "CURRENT").read_text().strip() == "v0001"

        for admin in (bearer("a1"), {"X-API-Key": "a1"}):
            assert (await client.post(CLASSIFY, params={"cache": "fashion"}, files=files,
                                      headers=admin)).status_code == 200
            assert (await client.get("/v1/caches", headers=admin)).status_code == 200
            assert (await client.post("/v1/caches/reload", headers=admin)).status_code == 200
        response = await client.post("/v1/caches/fashion/activate", json={"version": "v0002"}, headers=bearer("a1"))
        assert response.status_code == 200, response.text
        response = await client.delete("/v1/caches/fashion/versions/v0001", headers={"X-API-Key": "a1"})
        assert response.status_code == 204, response.text

        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


async def test_api_keys_from_file(served_caches, tiny_encoder, fashion_test, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# reader and admin\nfile-reader read\n\nfile-admin admin   # ops\nboth read,admin\n")
    files = image_files(fashion_test, 1)
    async with running_app(make_config(served_caches, api_keys_file=keys), tiny_encoder) as (_, client):
        assert_error(await client.get("/v1/caches"), 401, "unauthorized")
        assert_error(await client.get("/v1/caches", headers={"X-API-Key": "read"}), 401)
        reader = {"X-API-Key": "file-reader"}
        assert (await client.post(CLASSIFY, params={"cache": "fashion"}, files=files,
                                  headers=reader)).status_code == 200
        assert_error(await client.post("/v1/caches/reload", headers=reader), 403, "forbidden")
        for admin in ("file-admin", "both"):
            response = await client.post("/v1/caches/reload", headers={"Authorization": f"Bearer {admin}"})
            assert response.status_code == 200, response.text
            assert sorted(response.json()["unchanged"]) == ["fashion", "fashion-caps"]
        assert (await client.get("/metrics")).status_code == 200


# 6. cache endpoints -----------------------------------------------------------------------


async def test_list_and_describe_caches(client):
    response = await client.get("/v1/caches")
    assert response.status_code == 200
    listed = {c["name"]: c for c in response.json()}
    assert sorted(listed) == ["fashion", "fashion-caps"]
    for cache in listed.values():
        assert {"name", "version", "model", "classes", "items", "methods", "best_method", "captions"} <= set(cache)
        assert cache["version"] == "v0001" and cache["model"] == "tiny-random"
        assert cache["classes"] == 10 and cache["items"] == 80
        assert cache["best_method"] in cache["methods"]
    assert listed["fashion"]["methods"] == ["zeroshot", "tip", "tipx"] and listed["fashion"]["captions"] is False
    assert "caps" in listed["fashion-caps"]["methods"] and listed["fashion-caps"]["captions"] is True

    detail = (await client.get("/v1/caches/fashion")).json()
    assert detail["labels"] == LABELS
    assert detail["versions"] == ["v0001", "v0002"]
    assert detail["current_version"] == "v0001" and detail["version"] == "v0001"
    assert detail["params"]["best_method"] == detail["best_method"]
    assert set(detail["params"]["methods"]) >= {"tip", "tipx"}
    assert detail["report"]["used"] == 80
    assert detail["created"]

    assert_error(await client.get("/v1/caches/nope"), 404, "unknown_cache", "nope")


async def test_cache_detail_of_a_v1_cache_keeps_the_manifest_keys(tiny_encoder, tmp_path):
    """A cache built before the manifest was typed: the detail response carries its params
    and build report as they are on disk (typing adds no keys, drops none)."""
    from tests.manifests import V1_CACHES, v1_manifest_json

    for name in ("pets", "pooled"):
        shutil.copytree(V1_CACHES / name, tmp_path / "caches" / name)
    async with running_app(make_config(tmp_path / "caches"), tiny_encoder) as (_, client):
        for name in ("pets", "pooled"):
            raw = v1_manifest_json(name)
            detail = (await client.get(f"/v1/caches/{name}")).json()
            assert detail["params"] == raw["params"] and detail["report"] == raw["build_report"]
            assert detail["created"] == raw["created_at"] and detail["best_method"] == raw["params"]["best_method"]


async def test_invalid_cache_names_never_reach_the_filesystem(served_caches, tiny_encoder, tmp_path):
    root = tmp_path / "root"
    caches = copy_caches(served_caches, root / "caches")
    shutil.copytree(served_caches / "fashion", root / "outside")  # a valid cache next to the caches folder
    async with running_app(make_config(caches), tiny_encoder) as (_, client):
        for name in ("..%2Foutside", "%2E%2E%2Foutside", "..", "%2E%2E", "bad name!", ".hidden", "a%00b"):
            for response in (
                await client.get(f"/v1/caches/{name}"),
                await client.post(f"/v1/caches/{name}/activate", json={"version": "v0002"}),
                await client.delete(f"/v1/caches/{name}/versions/v0002"),
            ):
                assert response.status_code in (404, 405, 422), (name, response.status_code, response.text)
                assert "error" in response.json()
        response = await client.delete("/v1/caches/fashion/versions/..%2F..%2Fv0001")
        assert response.status_code in (404, 422)
    assert (root / "outside" / "versions" / "v0002").is_dir()
    assert (root / "outside" / "CURRENT").read_text().strip() == "v0001"
    assert (caches / "fashion" / "versions" / "v0001").is_dir()


async def test_activate_version(served_caches, tiny_encoder, fashion_test, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    files = image_files(fashion_test, 2)
    async with running_app(make_config(caches), tiny_encoder) as (_, client):
        assert (await classify(client, files, cache="fashion"))["version"] == "v0001"
        response = await client.post("/v1/caches/fashion/activate", json={"version": "v0002"})
        assert response.status_code == 200, response.text
        assert response.json()["name"] == "fashion" and response.json()["version"] == "v0002"
        assert (await classify(client, files, cache="fashion"))["version"] == "v0002"
        response = await client.post(CLASSIFY, json=b64_body(files, cache="fashion"))
        assert response.json()["version"] == "v0002"
        assert (caches / "fashion" / "CURRENT").read_text().strip() == "v0002"
        detail = (await client.get("/v1/caches/fashion")).json()
        assert detail["version"] == "v0002" and detail["current_version"] == "v0002"
        assert (await client.get("/readyz")).json()["caches"]["fashion"] == "v0002"
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "kvclip_cache_info", {"cache": "fashion", "version": "v0002"}) == 1
        assert metric_value(metrics, "kvclip_cache_info", {"cache": "fashion", "version": "v0001"}) == 0

        assert_error(await client.post("/v1/caches/fashion/activate", json={"version": "v0009"}), 404,
                     "unknown_version", "v0009")
        assert_error(await client.post("/v1/caches/nope/activate", json={"version": "v0001"}), 404,
                     "unknown_cache", "nope")
        assert_error(await client.post("/v1/caches/fashion/activate", json={"version": "latest"}), 422,
                     "invalid_parameters", "version")
        assert_error(await client.post("/v1/caches/fashion/activate", json={}), 422, "invalid_parameters")
        assert (caches / "fashion" / "CURRENT").read_text().strip() == "v0002"


async def test_activate_corrupted_version_is_409_and_old_version_keeps_serving(
        served_caches, tiny_encoder, fashion_test, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    npy = caches / "fashion" / "versions" / "v0002" / "image_keys.npy"
    npy.write_bytes(npy.read_bytes()[:100])
    files = image_files(fashion_test, 2)
    async with running_app(make_config(caches), tiny_encoder) as (_, client):
        response = await client.post("/v1/caches/fashion/activate", json={"version": "v0002"})
        assert_error(response, 409, "version_not_loadable", "v0002")
        assert (caches / "fashion" / "CURRENT").read_text().strip() == "v0001"
        assert (await classify(client, files, cache="fashion"))["version"] == "v0001"
        assert (await client.get("/v1/caches/fashion")).json()["version"] == "v0001"


async def test_delete_versions(served_caches, tiny_encoder, fashion_test, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    versions = caches / "fashion" / "versions"
    async with running_app(make_config(caches), tiny_encoder) as (_, client):
        assert_error(await client.delete("/v1/caches/fashion/versions/v0001"), 409, "version_in_use", "v0001")
        assert (versions / "v0001").is_dir()
        assert_error(await client.delete("/v1/caches/fashion/versions/v0009"), 404, "unknown_version", "v0009")
        assert_error(await client.delete("/v1/caches/nope/versions/v0001"), 404, "unknown_cache", "nope")
        assert_error(await client.delete("/v1/caches/fashion/versions/latest"), 422, "invalid_parameters")

        response = await client.delete("/v1/caches/fashion/versions/v0002")
        assert response.status_code == 204, response.text
        assert response.content == b""
        assert not (versions / "v0002").exists()
        assert not any(p.name.startswith(".deleted") for p in (caches / "fashion").iterdir())
        assert (await client.get("/v1/caches/fashion")).json()["versions"] == ["v0001"]
        assert (await classify(client, image_files(fashion_test, 1), cache="fashion"))["version"] == "v0001"
        assert_error(await client.delete("/v1/caches/fashion/versions/v0002"), 404)


async def test_reload_picks_up_new_and_removed_caches(served_caches, tiny_encoder, fashion_test, tmp_path):
    caches = copy_caches(served_caches, tmp_path / "caches")
    files = image_files(fashion_test, 2)
    async with running_app(make_config(caches), tiny_encoder) as (_, client):
        response = await client.post("/v1/caches/reload")
        assert response.status_code == 200
        assert response.json() == {"loaded": {}, "unchanged": ["fashion", "fashion-caps"], "removed": [],
                                   "failed": {}}

        versions = caches / "fashion" / "versions"
        shutil.copytree(versions / "v0002", versions / "v0003")
        (caches / "fashion" / "CURRENT").write_text("v0003\n")
        shutil.rmtree(caches / "fashion-caps")
        report = (await client.post("/v1/caches/reload")).json()
        assert report["loaded"] == {"fashion": "v0003"}
        assert report["removed"] == ["fashion-caps"]
        assert report["unchanged"] == [] and report["failed"] == {}

        assert (await classify(client, files, cache="fashion"))["version"] == "v0003"
        assert_error(await client.post(CLASSIFY, params={"cache": "fashion-caps"}, files=files), 404,
                     "unknown_cache", "fashion-caps")
        assert [c["name"] for c in (await client.get("/v1/caches")).json()] == ["fashion"]
        detail = (await client.get("/v1/caches/fashion")).json()
        assert detail["versions"] == ["v0001", "v0002", "v0003"] and detail["version"] == "v0003"
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "kvclip_cache_info", {"cache": "fashion", "version": "v0003"}) == 1
        assert metric_value(metrics, "kvclip_cache_info", {"cache": "fashion-caps"}) == 0

        # A version that fails to load is reported and the served one stays.
        shutil.copytree(versions / "v0002", versions / "v0004")
        npy = versions / "v0004" / "text_weights.npy"
        npy.write_bytes(npy.read_bytes()[:64])
        (caches / "fashion" / "CURRENT").write_text("v0004\n")
        report = (await client.post("/v1/caches/reload")).json()
        assert list(report["failed"]) == ["fashion"] and report["loaded"] == {}
        assert (await classify(client, files, cache="fashion"))["version"] == "v0003"
        assert "fashion" in (await client.get("/readyz")).json()["errors"]


# 7. metrics -------------------------------------------------------------------------------


async def test_metrics(client, fashion_test):
    before = (await client.get("/metrics")).text
    files = image_files(fashion_test, 3)
    await classify(client, files, cache="fashion", method="tip")
    await classify(client, files[:1], cache="fashion-caps", method="caps")
    assert (await client.post(CLASSIFY, params={"cache": "nope"}, files=files[:1])).status_code == 404
    assert (await client.get("/v1/caches/fashion")).status_code == 200
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name, labels=None):
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    route = {"method": "POST", "route": CLASSIFY}
    assert delta("kvclip_http_requests_total", {**route, "status": "200"}) == 2
    assert delta("kvclip_http_requests_total", {**route, "status": "404"}) == 1
    assert delta("kvclip_http_requests_total", {"route": "/v1/caches/{name}", "status": "200"}) == 1
    assert "/v1/caches/fashion\"" not in after  # templates, not raw paths
    assert delta("kvclip_cache_requests_total", {"cache": "fashion", "method": "tip"}) == 1
    assert delta("kvclip_cache_requests_total", {"cache": "fashion-caps", "method": "caps"}) == 1
    assert delta("kvclip_images_classified_total", {"cache": "fashion"}) == 3
    assert delta("kvclip_batch_images_count") >= 1 and delta("kvclip_batch_images_sum") == 4
    assert metric_value(after, "kvclip_http_request_duration_seconds_count", route) > 0
    assert metric_value(after, "kvclip_model_info", {"model": "tiny-random", "device": "cpu"}) == 1
    for cache in ("fashion", "fashion-caps"):
        labels = {"cache": cache, "version": "v0001", "model": "tiny-random", "classes": "10", "items": "80"}
        assert metric_value(after, "kvclip_cache_info", labels) == 1
    assert metric_value(after, "kvclip_ready") == 1
    assert metric_value(after, "kvclip_queue_images") == 0


# 8. request ids ---------------------------------------------------------------------------


async def test_request_id_echoed_or_generated(client, fashion_test):
    response = await client.get("/healthz", headers={"X-Request-ID": "abc-123.x_y"})
    assert response.headers["x-request-id"] == "abc-123.x_y"
    response = await client.post(CLASSIFY, params={"cache": "fashion"}, files=image_files(fashion_test, 1),
                                 headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-42"
    response = await client.get("/v1/caches/nope", headers={"X-Request-ID": "req-404"})
    assert response.status_code == 404 and response.headers["x-request-id"] == "req-404"

    generated = [(await client.get("/healthz")).headers.get("x-request-id") for _ in range(2)]
    assert all(g and re.fullmatch(r"[A-Za-z0-9._-]{8,128}", g) for g in generated)
    assert generated[0] != generated[1]
    for bad in ("has space", "x" * 200, "semi;colon"):
        got = (await client.get("/healthz", headers={"X-Request-ID": bad})).headers["x-request-id"]
        assert got != bad and re.fullmatch(r"[A-Za-z0-9._-]{8,128}", got)


async def test_request_id_on_refused_body(limited):
    response = await limited.post(CLASSIFY, params={"cache": "fashion"}, content=b"x" * 30_000,
                                  headers={"content-type": "application/json", "X-Request-ID": "big-1"})
    assert response.status_code == 413 and response.headers["x-request-id"] == "big-1"


# 9. OpenAPI -------------------------------------------------------------------------------


async def test_openapi_and_docs(client):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    post = spec["paths"][CLASSIFY]["post"]
    content = post["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert {p["name"] for p in post["parameters"]} >= {"cache", "top_k", "method", "explain", "partial"}
    assert {"200", "400", "413", "415", "422", "503"} <= set(post["responses"])
    assert {"/v1/caches", "/v1/caches/{name}", "/v1/caches/reload", "/v1/caches/{name}/activate",
            "/v1/caches/{name}/versions/{version}", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    docs = await client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "swagger" in docs.text.lower()


async def test_openapi_refs_resolve(client):
    """Every $ref in the OpenAPI document resolves (the hand-documented JSON body included)."""
    spec = (await client.get("/openapi.json")).json()
    refs = set(re.findall(r'"\$ref":\s*"#/components/schemas/([^"]+)"', json.dumps(spec)))
    missing = sorted(refs - set(spec["components"]["schemas"]))
    assert not missing, f"dangling $refs: {missing}"


async def test_readyz_answers_and_documents_ready_response(client):
    spec = (await client.get("/openapi.json")).json()
    responses = spec["paths"]["/readyz"]["get"]["responses"]
    for status in ("200", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ReadyResponse"}, (status, schema)
    body = (await client.get("/readyz")).json()
    assert set(body) == set(ReadyResponse.model_fields)
    assert ReadyResponse.model_validate(body).ready is True


async def test_openapi_documents_the_manifest_parts_it_serves(client):
    """The cache detail's params and report, and a job's report, are the manifest's typed models."""
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    detail = schemas["CacheDetail"]["properties"]
    assert detail["params"]["$ref"].endswith("/TunedParams") and detail["report"]["$ref"].endswith("/BuildReport")
    job_report = json.dumps(schemas["JobInfo"]["properties"]["report"])
    assert "#/components/schemas/BuildReport" in job_report
    report = schemas["BuildReport"]["properties"]
    assert {"mode", "source", "candidates", "used", "skipped", "short_classes", "timings_s", "throughput",
            "pool"} <= set(report)
    assert set(schemas["BuildReport"]["properties"]["mode"]["enum"]) == {"labelled", "labels-only", "pool"}
    assert {"per_class", "empty_classes"} <= set(schemas["PoolReport"]["properties"])
    assert set(schemas["MethodParams"]["properties"]) == {"alpha", "beta", "gamma", "delta"}


# 10. configuration ------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("KVCLIP_"):
            monkeypatch.delenv(name)
    return monkeypatch


def parse(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv))


REQUIRED = ["--caches", "/srv/caches", "--model", "tiny-random"]


def test_config_defaults_env_and_flags(clean_env):
    config = parse(REQUIRED)
    assert config.max_batch == 32 and config.caches == Path("/srv/caches") and config.model == "tiny-random"
    assert config.api_keys_file is None and config.device is None

    clean_env.setenv("KVCLIP_MAX_BATCH", "7")
    clean_env.setenv("KVCLIP_MAX_WAIT_MS", "2.5")
    clean_env.setenv("KVCLIP_API_KEYS_FILE", "/etc/kvclip/keys")
    config = parse(REQUIRED)
    assert config.max_batch == 7 and isinstance(config.max_batch, int)
    assert config.max_wait_ms == 2.5 and isinstance(config.max_wait_ms, float)
    assert config.api_keys_file == Path("/etc/kvclip/keys")

    config = parse(REQUIRED + ["--max-batch", "9", "--max-wait-ms", "1"])
    assert config.max_batch == 9 and config.max_wait_ms == 1.0

    # Required settings may come from the environment instead of flags.
    clean_env.setenv("KVCLIP_CACHES", "/env/caches")
    clean_env.setenv("KVCLIP_MODEL", "ViT-B-32:openai")
    config = parse([])
    assert config.caches == Path("/env/caches") and config.model == "ViT-B-32:openai"
    assert parse(["--model", "tiny-random"]).model == "tiny-random"


def test_config_required_and_invalid_values(clean_env):
    with pytest.raises(SystemExit):
        parse([])  # --caches and --model are required without their variables
    with pytest.raises(ValueError, match="max_batch"):
        parse(REQUIRED + ["--max-batch", "0"])
    clean_env.setenv("KVCLIP_MAX_BATCH", "0")
    with pytest.raises(ValueError, match="max_batch"):
        parse(REQUIRED)
    with pytest.raises(ValueError):
        parse(REQUIRED + ["--max-batch", "lots"])
    clean_env.delenv("KVCLIP_MAX_BATCH")
    for flag in ("--max-images", "--max-queue", "--max-pixels", "--explain-k"):
        with pytest.raises(ValueError):
            parse(REQUIRED + [flag, "0"])
    with pytest.raises(ValueError):
        parse(REQUIRED + ["--max-wait-ms", "-1"])
    with pytest.raises(SystemExit):
        parse(REQUIRED + ["--log-format", "xml"])
    with pytest.raises(ValueError, match="max_batch"):
        ServerConfig(caches=Path("x"), model="tiny-random", max_batch=0)
    described = parse(REQUIRED).describe()
    assert described["caches"] == "/srv/caches" and "api_keys" not in described


def test_config_env_values_are_validated_like_flags(clean_env):
    """Values from the environment are validated like flags (argparse checks flags only)."""
    clean_env.setenv("KVCLIP_LOG_FORMAT", "xml")
    with pytest.raises((SystemExit, ValueError)):
        parse(REQUIRED)


async def test_large_cache_path_blends_over_faiss_candidates(served_caches, fashion_test, tiny_encoder):
    """A cache above --dense-max-keys is served over each query's --faiss-k nearest keys (8 of its
    80 here, the cache tensors' per-class key sums standing in for the rest): the logits differ
    from the dense ones, the scores are still probabilities, and the top label is the dense one for
    nearly every image."""
    files = image_files(fashion_test, 24)
    answers = {}
    for name, overrides in (("dense", {}), ("faiss", {"dense_max_keys": 10, "faiss_k": 8})):
        async with running_app(make_config(served_caches, **overrides), tiny_encoder) as (_, client):
            body = await classify(client, files, cache="fashion", top_k=10, method="tip")
        answers[name] = [{lb["label"]: lb["logit"] for lb in r["labels"]} for r in body["results"]]
        for result in body["results"]:
            assert sum(lb["score"] for lb in result["labels"]) == pytest.approx(1.0, abs=1e-4)
    pairs = list(zip(answers["dense"], answers["faiss"]))
    assert max(abs(d[label] - f[label]) for d, f in pairs for label in d) > 1.0  # the candidate path ran
    assert sum(max(d, key=d.get) == max(f, key=f.get) for d, f in pairs) >= 22
