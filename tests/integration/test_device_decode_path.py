"""The classify pipeline with a device JPEG decoder (what a CUDA encoder gets): a request's
JPEGs go to it in one batch, everything else to Pillow, and the answers are the Pillow path's.
Run on the CPU (decode_jpeg on the CPU stands in for nvJPEG)."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from kvclip.device_decode import DeviceJpegDecoder
from kvclip.service import api_classify
from tests.service_helpers import make_config, running_app

pytestmark = pytest.mark.anyio
CLASSIFY = "/v1/classify"
PARAMS = {"cache": "fashion", "top_k": 10, "method": "zeroshot", "partial": "true"}


def jpeg(path, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize((64, 48)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class SpyDecoder(DeviceJpegDecoder):
    def __init__(self, size: int) -> None:
        super().__init__(torch.device("cpu"), size)
        self.batches: list[list[str]] = []

    def __call__(self, datas, headers, names):
        self.batches.append(list(names))
        return super().__call__(datas, headers, names)


@pytest.fixture
def request_files(fashion_test):
    pngs = sorted(fashion_test.rglob("*.png"), key=lambda p: p.name)[:3]
    good = jpeg(pngs[0])
    broken = good[:200] + bytes(len(good) - 200)
    return [("file", ("a.jpg", good, "image/jpeg")), ("file", ("b.png", pngs[1].read_bytes(), "image/png")),
            ("file", ("c.jpg", jpeg(pngs[2]), "image/jpeg")), ("file", ("d.jpg", broken, "image/jpeg"))]


async def classify(served_caches, tiny_encoder, files) -> dict:
    async with running_app(make_config(served_caches), tiny_encoder) as (_, client):
        response = await client.post(CLASSIFY, params=PARAMS, files=files)
    assert response.status_code == 200, response.text
    return response.json()


async def test_jpegs_decode_in_one_batch_on_the_device_and_score_as_with_pillow(
        served_caches, tiny_encoder, request_files, monkeypatch):
    pillow = await classify(served_caches, tiny_encoder, request_files)
    spy = SpyDecoder(tiny_encoder.image_size)
    monkeypatch.setattr(api_classify.DeviceJpegDecoder, "for_encoder", classmethod(lambda cls, encoder: spy))
    device = await classify(served_caches, tiny_encoder, request_files)
    assert spy.batches == [["a.jpg", "c.jpg", "d.jpg"]]  # the PNG went to Pillow
    for ours, theirs in zip(device["results"], pillow["results"]):
        assert ours["name"] == theirs["name"]
        if theirs["error"] is not None:
            assert ours["error"]["code"] == theirs["error"]["code"] == "bad_image"
            continue
        assert ours["error"] is None
        scores = {lb["label"]: lb["score"] for lb in theirs["labels"]}
        # Pixels a level or two apart (resampling): the same scores but for the last digits.
        assert max(abs(lb["score"] - scores[lb["label"]]) for lb in ours["labels"]) < 1e-2
    assert device["results"][3]["error"]["message"].startswith("d.jpg: not a readable JPEG")
