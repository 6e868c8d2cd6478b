"""No bad input knocks the server over: every kind in tests/bad_inputs.py, as multipart and as
JSON, with and without partial=true, answers 200 or a clear JSON 4xx, never a 5xx; under
partial the good images beside it are still classified. Also: per-image errors for failures in
preprocessing, base64 forms, and JSON nested too deeply (classify and build options).
"""
from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.bad_inputs import BOMB_PIXELS, OVERSIZED_BYTES, corpus
from tests.service_helpers import make_config, running_app

pytestmark = pytest.mark.anyio

CLASSIFY = "/v1/classify"
CORPUS = {kind: (kind, data, ctype) for kind, data, ctype in corpus()}
DEEP = "[" * 1000 + "]" * 1000  # about 2 KB; json.loads raises RecursionError on it


@pytest.fixture(scope="module")
async def client(served_caches, tiny_encoder):
    config = make_config(served_caches, max_image_bytes=OVERSIZED_BYTES, max_pixels=BOMB_PIXELS)
    async with running_app(config, tiny_encoder) as (app, client):
        yield client


@pytest.fixture(scope="module")
def good() -> bytes:
    return CORPUS["one-pixel"][1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_clear_answer(response: httpx.Response, partial: bool) -> None:
    """200, or (without partial) a JSON 4xx naming the problem; under partial the neighbours of
    the bad image (indexes 0 and 2) are classified and the bad one has labels or an error."""
    assert response.status_code < 500, response.text
    if partial or response.status_code == 200:
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["index"] for r in results] == [0, 1, 2]
        assert results[0]["labels"] and results[2]["labels"], results
        assert bool(results[1]["labels"]) != bool(results[1]["error"]), results[1]
        if results[1]["error"]:
            assert results[1]["error"]["code"] and results[1]["error"]["message"]
    else:
        assert 400 <= response.status_code < 500
        error = response.json()["error"]
        assert error["code"] and error["message"]


def test_the_corpus_is_broad():
    assert len(CORPUS) >= 37


@pytest.mark.parametrize("kind", sorted(CORPUS))
@pytest.mark.parametrize("partial", [False, True])
async def test_bad_input_as_multipart(client, good, kind, partial):
    name, data, ctype = CORPUS[kind]
    files = [("file", ("good0.png", good, "image/png")), ("file", (name, data, ctype)),
             ("file", ("good1.png", good, "image/png"))]
    response = await client.post(CLASSIFY, params={"cache": "fashion", "partial": partial}, files=files)
    assert_clear_answer(response, partial)


@pytest.mark.parametrize("kind", sorted(CORPUS))
@pytest.mark.parametrize("partial", [False, True])
async def test_bad_input_as_json(client, good, kind, partial):
    name, data, _ = CORPUS[kind]
    body = {"cache": "fashion", "partial": partial,
            "images": [{"data": b64(good)}, {"data": b64(data), "name": name}, {"data": b64(good)}]}
    assert_clear_answer(await client.post(CLASSIFY, json=body), partial)


@pytest.mark.parametrize("data, message", [
    ("not base64 !!!", "base64"),
    ("data:image/png,notbase64", "data: URL"),
    ("data:image/png;base64", "data: URL"),
])
async def test_bad_base64_is_that_images_error(client, good, data, message):
    images = [{"data": b64(good)}, {"data": data, "name": "bad"}, {"data": b64(good)}]
    response = await client.post(CLASSIFY, json={"cache": "fashion", "images": images})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_image" and message in response.json()["error"]["message"]
    assert response.json()["error"]["details"][0]["index"] == 1
    response = await client.post(CLASSIFY, json={"cache": "fashion", "partial": True, "images": images})
    assert_clear_answer(response, partial=True)
    assert response.json()["results"][1]["error"]["code"] == "bad_image"


async def test_an_oversized_image_under_partial_is_that_images_error(client, good):
    _, big, _ = CORPUS["oversized"]
    files = [("file", ("a.png", good, "image/png")), ("file", ("big.png", big, "image/png")),
             ("file", ("b.png", good, "image/png"))]
    response = await client.post(CLASSIFY, params={"cache": "fashion", "partial": True}, files=files)
    assert_clear_answer(response, partial=True)
    assert response.json()["results"][1]["error"]["code"] == "image_too_large"
    response = await client.post(CLASSIFY, params={"cache": "fashion"}, files=files)
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"


async def test_base64_with_line_breaks_and_data_urls_are_accepted(client, good):
    wrapped = "\n".join(b64(good)[i:i + 76] for i in range(0, len(b64(good)), 76)) + "\n"
    forms = [wrapped, f"data:image/png;base64,{b64(good)}", " " + b64(good) + "\r\n"]
    response = await client.post(CLASSIFY, json={"cache": "fashion", "images": [{"data": f} for f in forms]})
    assert response.status_code == 200, response.text
    assert all(r["labels"] and r["error"] is None for r in response.json()["results"])


async def test_a_failure_in_preprocessing_is_that_images_error(client, good, tiny_encoder, monkeypatch):
    preprocess = tiny_encoder.preprocess

    def fragile(image):
        if image.size == (20000, 1):
            raise MemoryError()
        return preprocess(image)

    monkeypatch.setattr(tiny_encoder, "preprocess", fragile)
    _, wide, _ = CORPUS["elongated-wide"]
    files = [("file", ("a.png", good, "image/png")), ("file", ("wide.png", wide, "image/png")),
             ("file", ("b.png", good, "image/png"))]
    response = await client.post(CLASSIFY, params={"cache": "fashion", "partial": True}, files=files)
    assert_clear_answer(response, partial=True)
    error = response.json()["results"][1]["error"]
    assert error["code"] == "bad_image" and "wide.png" in error["message"] and "MemoryError" in error["message"]
    response = await client.post(CLASSIFY, params={"cache": "fashion"}, files=files)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["details"] == [{"index": 1, "name": "wide.png", "message": error["message"]}]


@pytest.mark.parametrize("body", [DEEP, f'{{"images": {DEEP}}}', f'{{"images": [{{"data": "", "name": {DEEP}}}]}}'])
async def test_deeply_nested_json_for_classify_is_400(client, body):
    response = await client.post(CLASSIFY, params={"cache": "fashion"}, content=body,
                                 headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_json" and "deeply" in response.json()["error"]["message"]


@pytest.mark.parametrize("as_form", [False, True])
async def test_deeply_nested_build_options_are_400(client, as_form):
    options = f'{{"labels": {DEEP}}}'
    if as_form:
        response = await client.post("/v1/caches/deep/builds", files={"options": (None, options)})
    else:
        response = await client.post("/v1/caches/deep/builds", content=options,
                                     headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_json"


async def test_deeply_nested_activate_body_is_4xx(client):
    response = await client.post("/v1/caches/fashion/activate", content=f'{{"version": {DEEP}}}',
                                 headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text


async def test_the_server_is_alive_after_the_corpus(client, good):
    assert (await client.get("/healthz")).status_code == 200
    response = await client.post(CLASSIFY, json={"cache": "fashion", "images": [{"data": b64(good)}]})
    assert response.status_code == 200 and response.json()["results"][0]["labels"]
    assert json.loads((await client.get("/readyz")).text)["ready"] is True
