"""Labels without images: a zero-shot cache (N = 0) through build, artifact, eval, registry and HTTP."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kvclip import artifact as store
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.evaluate import evaluate
from kvclip.cli import main
from kvclip.errors import DataError
from kvclip.images import load_image
from kvclip.prompts import DEFAULT_TEMPLATES, text_classifier
from tests.build_helpers import ProgressLog
from tests.conftest import write_images
from tests.manifests import sample_manifest
from tests.service_helpers import image_files, make_config, running_app

LABELS = ["cat", "dog", "golden_retriever"]


@pytest.fixture(scope="module")
def label_files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labels")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (root / "descriptions.json").write_text(json.dumps({"dog": ["a dog, a four-legged pet that barks"]}))
    return root


@pytest.fixture(scope="module")
def zeroshot_caches(label_files, tiny_encoder, tmp_path_factory) -> Path:
    """A caches folder holding the zero-shot cache `pets` (v0001)."""
    root = tmp_path_factory.mktemp("zs") / "caches"
    build_cache(BuildConfig(out=root / "pets", labels_file=label_files / "labels.txt",
                            descriptions=label_files / "descriptions.json", model="tiny-random",
                            progress=False), tiny_encoder)
    return root


def test_labels_only_build_is_a_zero_item_cache(label_files, tiny_encoder, tmp_path):
    log = ProgressLog()
    result = build_cache(BuildConfig(out=tmp_path / "pets", labels_file=label_files / "labels.txt",
                                     descriptions=label_files / "descriptions.json", model="tiny-random",
                                     captioner="coca", progress=False, monitor=log.monitor()), tiny_encoder)
    assert log.steps() == ["reading", "text", "publishing"]  # nothing to encode, tune or index
    log.check_bounds()
    m = result.manifest
    assert m.labels == LABELS and m.counts.items == 0 and m.counts.per_class == {lb: 0 for lb in LABELS}
    assert m.params.best_method == "zeroshot" and m.params.methods == {}
    assert m.tuning.loo_top1 == {} and m.faiss.methods == {}
    assert m.captioner.name == "none"  # no CoCa model is loaded for a cache without images
    report = result.report
    assert report.mode == "labels-only" and report.used == 0 and report.skipped == []
    assert report.source == str(label_files / "labels.txt")

    files = sorted(p.name for p in result.path.iterdir())
    assert not [f for f in files if f.endswith(".faiss")]
    assert "caption_keys.npy" not in files and (result.path / "items.jsonl").read_text() == ""

    loaded = store.load_cache(tmp_path / "pets")
    dim = loaded.text_weights.shape[0]
    assert loaded.text_weights.shape == (dim, 3) and dim == m.counts.dim > 0
    assert loaded.image_keys.shape == (0, dim) and loaded.query_features.shape == (0, dim)
    assert loaded.label_ids.shape == (0,) and loaded.caption_keys is None and loaded.items == []
    assert loaded.image_index is None and loaded.caption_index is None
    assert loaded.methods == ["zeroshot"] and loaded.best_method == "zeroshot"
    # The text weights are the prompt ensemble: templates plus the descriptions file.
    expected = text_classifier(tiny_encoder.encode_texts, LABELS, DEFAULT_TEMPLATES,
                               {"dog": ["a dog, a four-legged pet that barks"]})
    assert np.allclose(loaded.text_weights, expected.cpu().numpy(), atol=1e-5)
    without = text_classifier(tiny_encoder.encode_texts, LABELS, DEFAULT_TEMPLATES)
    assert not np.allclose(loaded.text_weights[:, 1], without[:, 1].cpu().numpy(), atol=1e-4)

    tensors = loaded.tensors("cpu")
    assert tensors.num_items == 0 and tensors.label_ids.shape == (0,) and tensors.num_classes == 3


def test_zero_item_artifact_round_trip_and_a_manifest_that_names_another_method(tmp_path):
    """Loading does not trust the manifest's best method where the cache cannot serve it."""
    artifact = store.CacheArtifact(
        labels=["a", "b"], text_weights=np.eye(4, 2, dtype=np.float32),
        image_keys=np.zeros((0, 4), np.float32), label_ids=np.zeros(0, np.int64),
        query_features=np.zeros((0, 4), np.float32),
        manifest=sample_manifest("zs", labels=["a", "b"], params={"best_method": "tip", "methods": {}}),
    )
    store.publish(tmp_path / "c", artifact)
    loaded = store.load_cache(tmp_path / "c")
    assert loaded.methods == ["zeroshot"] and loaded.best_method == "zeroshot"
    assert sorted(loaded.manifest.files) == ["image_keys.npy", "items.jsonl", "label_ids.npy",
                                                 "query_features.npy", "text_weights.npy"]


def test_eval_of_a_zero_shot_cache_scores_zeroshot_only(zeroshot_caches, tiny_encoder, tmp_path):
    write_images(tmp_path / "test" / "cat", 3)
    write_images(tmp_path / "test" / "dog", 2, seed=1)
    report = evaluate(zeroshot_caches / "pets", tmp_path / "test", encoder=tiny_encoder, progress=False)
    assert report.n == 5 and list(report.methods) == ["zeroshot"] and report.cache["items"] == 0


@pytest.mark.parametrize("fields, message", [
    ({}, "--labels FILE alone"),
    ({"pool_dir": Path("pool")}, "--labels FILE alone"),  # a pool needs labels
    ({"data_dir": Path("d"), "manifest": Path("m.jsonl")}, "not both"),
    ({"data_dir": Path("d"), "labels_file": Path("l.txt"), "pool_dir": Path("p")}, "does not combine"),
    ({"labels_file": Path("missing.txt")}, "cannot read labels file missing.txt"),
    ({"labels": ["a"], "labels_file": Path("l.txt")}, "labels or a labels file, not both"),
    ({"labels": []}, "the label set is empty"),
    ({"labels": ["Dog", "dog"]}, "duplicate labels"),
    ({"labels": ["a"], "templates": ["no slot"]}, "exactly one"),
    ({"labels": ["a"], "templates": []}, "no templates"),
    ({"labels": ["a"], "descriptions": {"a": "not a list"}}, "mapping each label to a list of sentences"),
])
def test_inputs_that_make_no_cache_are_errors(tmp_path, fields, message):
    with pytest.raises(DataError, match=message):
        build_cache(BuildConfig(out=tmp_path / "c", model="tiny-random", **fields))
    assert not (tmp_path / "c").exists()


def test_labels_and_prompts_given_as_values_build_what_their_files_do(label_files, tiny_encoder, tmp_path):
    """The server hands labels, templates and descriptions over in memory (BuildConfig values)."""
    files = build_cache(BuildConfig(out=tmp_path / "files", labels_file=label_files / "labels.txt",
                                    descriptions=label_files / "descriptions.json", templates=None,
                                    model="tiny-random", progress=False), tiny_encoder)
    values = build_cache(BuildConfig(out=tmp_path / "values", labels=list(LABELS),
                                     descriptions={"dog": ["a dog, a four-legged pet that barks"]},
                                     templates=list(DEFAULT_TEMPLATES), model="tiny-random", progress=False),
                         tiny_encoder)
    assert values.manifest.labels == files.manifest.labels == LABELS
    assert values.manifest.prompts == files.manifest.prompts
    assert values.report.source == "3 labels given in memory"
    assert np.array_equal(np.load(values.path / "text_weights.npy"), np.load(files.path / "text_weights.npy"))


def test_duplicate_labels_are_an_error_without_images_too(tmp_path, tiny_encoder):
    (tmp_path / "labels.txt").write_text("Dog\ndog\n")
    with pytest.raises(DataError, match="duplicate labels"):
        build_cache(BuildConfig(out=tmp_path / "c", labels_file=tmp_path / "labels.txt", model="tiny-random"),
                    tiny_encoder)


def test_cli_builds_a_zero_shot_cache_from_labels_alone(label_files, tmp_path, capsys):
    code = main(["build", "--labels", str(label_files / "labels.txt"), "--out", str(tmp_path / "c"),
                 "--model", "tiny-random", "--quiet", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "v0001" and out["build_report"]["mode"] == "labels-only"
    assert out["counts"]["items"] == 0 and out["params"]["best_method"] == "zeroshot"
    code = main(["build", "--out", str(tmp_path / "d"), "--model", "tiny-random"])
    assert code == 2 and "--labels FILE with --pool DIR" in capsys.readouterr().err


@pytest.mark.anyio
async def test_zero_shot_cache_serves_over_http(zeroshot_caches, tiny_encoder, tmp_path):
    write_images(tmp_path / "q", 2, size=32)
    files = image_files(tmp_path / "q", 2)
    async with running_app(make_config(zeroshot_caches), tiny_encoder) as (_, client):
        detail = (await client.get("/v1/caches/pets")).json()
        assert detail["items"] == 0 and detail["classes"] == 3 and detail["labels"] == LABELS
        assert detail["methods"] == ["zeroshot"] and detail["best_method"] == "zeroshot"
        assert detail["captions"] is False and detail["report"]["mode"] == "labels-only"

        response = await client.post("/v1/classify", params={"cache": "pets", "explain": "true", "top_k": 3},
                                     files=files)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["method"] == "zeroshot" and len(body["results"]) == 2
        # the logits are zero-shot CLIP's, 100 · f W_t
        pixels = torch.stack([tiny_encoder.preprocess(load_image(tmp_path / "q" / name))
                              for name in ("img_000.png", "img_001.png")])
        text = torch.from_numpy(store.load_cache(zeroshot_caches / "pets").text_weights)
        logits = 100 * tiny_encoder.encode_images(pixels).cpu() @ text
        for result, row in zip(body["results"], logits):
            assert result["neighbors"] == []
            got = {lb["label"]: lb["logit"] for lb in result["labels"]}
            assert got == pytest.approx(dict(zip(LABELS, row.tolist())), abs=1e-3)

        for method in ("tip", "tipx", "caps"):
            response = await client.post("/v1/classify", params={"cache": "pets", "method": method}, files=files)
            assert response.status_code == 422, response.text
            assert "cannot serve method" in response.json()["error"]["message"]
