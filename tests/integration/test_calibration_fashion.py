"""Calibrated scores and abstention on real images: a Fashion-MNIST cache (16 shots, tiny-random
model) scored on 1000 test images it never saw; `kvclip eval --json`; min_score over HTTP and
through the async client."""
from __future__ import annotations

import base64
import json

import httpx
import pytest
import torch

from kvclip.artifact import load_cache
from kvclip.blend import blend
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.features import encode_image_files
from kvclip.cache_builder.sources import discover_folder
from kvclip.calibration import ece, fit_temperature, nll, probabilities
from kvclip.cli import main
from kvclip.clients.client import AsyncKvclipClient
from tests.service_helpers import image_files, make_config, running_app

METRICS = ("top1", "top5", "temperature", "transform", "mix", "ece", "nll", "brier", "aurc", "min_score", "coverage",
           "accuracy")


@pytest.fixture(scope="module")
def calibrated_cache(tmp_path_factory, fashion_train, tiny_encoder):
    """`fashion` built with --target-precision 0.8: a default min_score per method."""
    root = tmp_path_factory.mktemp("calibrated") / "caches"
    build_cache(BuildConfig(out=root / "fashion", data_dir=fashion_train, model="tiny-random", shots=16, views=2,
                            captioner="none", progress=False, batch_size=64, target_precision=0.8), tiny_encoder)
    return root


@pytest.fixture(scope="module")
def test_logits(calibrated_cache, fashion_test, tiny_encoder):
    """The served method's raw logits on the 1000 test images, and their labels."""
    cache = load_cache(calibrated_cache / "fashion")
    items = discover_folder(fashion_test)
    features, kept, _ = encode_image_files(tiny_encoder, [it.path for it in items], 128, False)
    label_id = {label: i for i, label in enumerate(cache.labels)}
    truth = torch.tensor([label_id[items[i].label] for i in kept])
    method = cache.best_method
    return cache, method, blend(features, cache.tensors("cpu"), cache.params(method), method).double(), truth


def test_served_scores_are_calibrated_on_unseen_test_images(test_logits):
    cache, method, logits, truth = test_logits
    assert method != "zeroshot" and len(truth) == 1000
    served = cache.calibrated(logits, method)
    raw = probabilities(logits)
    # Before: softmax of the raw logits, ~0.98 mean top score at ~0.57 accuracy.
    assert ece(raw, truth) > 0.35 and nll(logits, truth) > 20
    # One temperature fitted on the test set itself: the best plain temperature scaling can do.
    oracle_t = fit_temperature(logits, truth)
    served_nll = float(torch.nn.functional.nll_loss(served.clamp_min(1e-300).log(), truth))
    assert served_nll <= 1.05 * nll(logits, truth, oracle_t)
    # Goal ECE <= 0.10 (measured 0.072 with log-mix; 0.105 with the log-gap map it replaced); the best
    # plain temperature reaches only ~0.23 even when fitted on the test set.
    assert ece(served, truth) <= 0.10 < ece(probabilities(logits, oracle_t), truth) - 0.05
    assert torch.equal(served.argmax(1), logits.argmax(1))  # accuracy unchanged


def test_build_stores_temperatures_and_a_threshold_for_the_target_precision(calibrated_cache):
    calibration = load_cache(calibrated_cache / "fashion").manifest.calibration
    assert calibration is not None and calibration.target_precision == 0.8
    assert set(calibration.temperatures) == {"zeroshot", "tip", "tipx"} == set(calibration.min_score)
    loo = calibration.loo["tip"]
    assert loo["nll"] < loo["nll_raw"] / 10 and loo["ece"] < loo["ece_raw"] / 2
    assert loo["accuracy"] >= 0.8 and 0 < loo["coverage"] < 1


def test_eval_json_reports_calibration_and_coverage_per_method(calibrated_cache, fashion_test, capsys):
    assert main(["eval", "--cache", str(calibrated_cache / "fashion"), "--data", str(fashion_test), "--limit", "300",
                 "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    for method, values in report["methods"].items():
        assert set(METRICS) <= set(values), method
        assert 0 <= values["ece"] <= 1 and values["nll"] > 0 and 0 <= values["brier"] <= 2
        assert 0 <= values["aurc"] <= 1 and 0 <= values["coverage"] <= 1
    tip = report["methods"]["tip"]
    assert tip["min_score"] is not None and tip["coverage"] < 1  # the cache's own threshold
    assert main(["eval", "--cache", str(calibrated_cache / "fashion"), "--data", str(fashion_test), "--limit", "50",
                 "--min-score", "0", "--quiet"]) == 0
    assert "coverage" in capsys.readouterr().out



@pytest.mark.anyio
async def test_min_score_over_http_and_through_the_client(calibrated_cache, fashion_test, tiny_encoder):
    files = image_files(fashion_test, 12)
    async with running_app(make_config(calibrated_cache), tiny_encoder) as (app, client):
        default = (await client.post("/v1/classify", params={"cache": "fashion"}, files=files)).json()
        threshold = load_cache(calibrated_cache / "fashion").default_min_score(default["method"])
        for result in default["results"]:
            assert result["abstained"] == (result["labels"][0]["score"] < threshold)
            assert len(result["labels"]) == 5  # the top-k is kept either way
        assert any(r["abstained"] for r in default["results"]) and not all(r["abstained"] for r in default["results"])
        # The query string and the JSON body set it; the request's value overrides the cache's.
        everything = await client.post("/v1/classify", params={"cache": "fashion", "min_score": "1"}, files=files)
        assert all(r["abstained"] for r in everything.json()["results"])
        body = {"cache": "fashion", "min_score": 0.0,
                "images": [{"data": base64.b64encode(f[1][1]).decode(), "name": f[1][0]} for f in files]}
        nothing = await client.post("/v1/classify", json=body)
        assert not any(r["abstained"] for r in nothing.json()["results"])
        bad = await client.post("/v1/classify", params={"cache": "fashion", "min_score": "1.5"}, files=files)
        assert bad.status_code == 422

        kv = AsyncKvclipClient("http://kvclip.test", transport=httpx.ASGITransport(app=app))
        paths = sorted(fashion_test.rglob("*.png"), key=lambda p: p.name)[:12]
        typed = await kv.classify(paths, "fashion", min_score=1.0)
        assert all(r.abstained for r in typed.results) and all(r.labels for r in typed.results)
        typed = await kv.classify(paths, "fashion")
        assert [r.abstained for r in typed.results] == [r["abstained"] for r in default["results"]]
        await kv.aclose()
