"""The server on a CUDA device answers as on the CPU: nvJPEG decode of the request's JPEGs,
pinned uint8 pixels normalised on the GPU, the fp16 encoder, float16 keys and the blend on the
GPU. Skipped without CUDA: scripts/device_check.sh runs it on a GPU host (docs/server.md, The
GPU path). The images are the foolbox wheel's (scripts/fetch_test_data.sh), which a GPU host
gets carried with the working tree: it may lack Debian's Fashion-MNIST."""
from __future__ import annotations

import pytest
import torch

from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.models import load_encoder
from tests.foolbox_data import CIFAR10_LABELS, export_foolbox, read_foolbox_images
from tests.service_helpers import make_config, running_app

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
METHODS = ("zeroshot", "tip", "tipx")


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_encoder):
    support = tmp_path_factory.mktemp("cuda-support")
    export_foolbox(support, "cifar10", CIFAR10_LABELS)
    root = tmp_path_factory.mktemp("cuda") / "caches"
    build_cache(BuildConfig(out=root / "cifar", data_dir=support, model="tiny-random", shots=2, views=1,
                            captioner="none", progress=False), tiny_encoder)
    return root


@pytest.fixture(scope="module")
def cuda_encoder():
    return load_encoder("tiny-random", device="cuda")


def jpeg_files() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (img.name, img.data, "image/jpeg")) for img in read_foolbox_images("imagenet")[:8]]


async def answers(caches, encoder, method: str) -> tuple[dict, dict]:
    async with running_app(make_config(caches, device=str(encoder.device)), encoder) as (_, client):
        response = await client.post("/v1/classify", params={"cache": "cifar", "method": method, "top_k": 10},
                                     files=jpeg_files())
        info = (await client.get("/v1/caches/cifar")).json()
    assert response.status_code == 200, response.text
    return response.json(), info


@pytest.mark.parametrize("method", METHODS)
async def test_a_cuda_server_scores_as_the_cpu_server(caches, tiny_encoder, cuda_encoder, method):
    cpu, _ = await answers(caches, tiny_encoder, method)
    gpu, info = await answers(caches, cuda_encoder, method)
    assert info["key_precision"] == "float16"  # auto on CUDA
    for ours, theirs in zip(gpu["results"], cpu["results"]):
        assert ours["name"] == theirs["name"] and ours["error"] is None and theirs["error"] is None
        scores = {lb["label"]: lb["score"] for lb in theirs["labels"]}
        # fp16 encoder and keys, nvJPEG and GPU resampling against Pillow: the same scores but
        # for the last digits, and the same top label wherever the CPU's is not a near tie.
        assert max(abs(lb["score"] - scores[lb["label"]]) for lb in ours["labels"]) < 2e-2
        first, second = theirs["labels"][0]["score"], theirs["labels"][1]["score"]
        if first - second > 4e-2:
            assert ours["labels"][0]["label"] == theirs["labels"][0]["label"]
