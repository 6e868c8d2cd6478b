"""Labels + an unlabelled pool: zero-shot pseudo-labels pick each class's support images."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kvclip import artifact as store
from kvclip.blend import BlendParams, CacheTensors, blend
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.features import encode_image_files
from kvclip.cache_builder.pool import PoolFeatures, pseudo_label, select_confident
from kvclip.cache_builder.tune import loo_exclusions
from kvclip.cli import main
from kvclip.errors import DataError
from tests.build_helpers import ProgressLog

LABELS = ["T-shirt or top", "ankle boot", "bag", "coat", "dress", "pullover", "sandal", "shirt",
          "sneaker", "trouser"]


# select_confident: pure selection logic on synthetic probabilities ---------------------------


def test_select_confident_keeps_each_classs_most_confident_argmax_rows():
    probs = torch.tensor([
        [0.70, 0.20, 0.10],  # 0 -> class 0
        [0.90, 0.05, 0.05],  # 1 -> class 0, most confident
        [0.45, 0.55, 0.00],  # 2 -> class 1, least confident
        [0.40, 0.60, 0.00],  # 3 -> class 1
        [0.80, 0.10, 0.10],  # 4 -> class 0
        [0.10, 0.85, 0.05],  # 5 -> class 1, most confident
    ])
    picks = select_confident(probs, 2)
    assert [p.indices for p in picks] == [[1, 4], [5, 3], []]
    assert picks[0].confidences == pytest.approx([0.90, 0.80])
    assert picks[1].confidences == pytest.approx([0.85, 0.60])
    assert [p.assigned for p in picks] == [3, 3, 0]
    # k larger than a class's rows keeps them all, most confident first
    assert [p.indices for p in select_confident(probs, 10)] == [[1, 4, 0], [5, 3, 2], []]


def test_select_confident_never_takes_a_row_whose_argmax_is_another_class():
    # Row 1 has a higher probability for class 1 (0.45) than row 0 (0.40), but its argmax is 0.
    probs = torch.tensor([[0.35, 0.40, 0.25], [0.55, 0.45, 0.00]])
    picks = select_confident(probs, 1)
    assert [p.indices for p in picks] == [[1], [0], []]
    assert picks[1].confidences == pytest.approx([0.40])


def test_select_confident_ties_and_bad_arguments():
    probs = torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    # equal confidences keep the lower row first; row 0 ties between classes and goes to class 0
    assert [p.indices for p in select_confident(probs, 2)] == [[1, 2], []]
    with pytest.raises(ValueError):
        select_confident(probs, 0)
    with pytest.raises(ValueError):
        select_confident(probs[0], 1)


def test_pseudo_label_assigns_by_zero_shot_softmax():
    text = torch.eye(4)[:, :3]  # class c's weight is axis c
    features = F.normalize(torch.tensor([
        [1.0, 0.1, 0.0, 0.0], [0.0, 1.0, 0.0, 0.2], [0.9, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 1.0],
    ]), dim=-1)
    paths = [Path(f"/pool/{i}.png") for i in range(4)]
    selection = pseudo_label(PoolFeatures(paths, features, found=4), text, ["a", "b", "c"], k=1)
    # rows 0 and 2 go to "a", and row 3 too (uniform probabilities: the tie goes to the first
    # class); k = 1 keeps row 0, the most confident. Row 1 goes to "b"; nothing to "c".
    assert [(it.path.name, it.label) for it in selection.items] == [("0.png", "a"), ("1.png", "b")]
    assert selection.empty_classes == ["c"]
    report = selection.report()
    assert report["per_class"]["c"] == {"count": 0, "assigned": 0, "mean_confidence": None, "min_confidence": None}
    assert report["per_class"]["a"]["count"] == 1 and report["per_class"]["a"]["assigned"] == 3
    expected = (100 * features[0] @ text).softmax(-1)[0]
    assert report["per_class"]["a"]["mean_confidence"] == pytest.approx(float(expected), abs=1e-6)


# Whole builds on real Fashion-MNIST images ------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory, fashion_train) -> Path:
    """40 unlabelled images in nested folders (with sidecar captions), one corrupt file, a labels file."""
    root = tmp_path_factory.mktemp("pool")
    images = sorted(fashion_train.rglob("*.png"))[::4]
    for i, image in enumerate(images):
        target = root / "pool" / f"batch{i % 3}" / ("deeper" if i % 2 else "") / f"{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        target.with_suffix(".txt").write_text(f"caption of image {i}")
    (root / "pool" / "broken.jpg").write_bytes(b"not an image")
    (root / "pool" / ".hidden").mkdir()
    shutil.copy(images[0], root / "pool" / ".hidden" / "ignored.png")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


def test_pool_build_pseudo_labels_the_support_set(pool, tiny_encoder, tmp_path, caplog):
    log = ProgressLog()
    with caplog.at_level(logging.WARNING, logger="kvclip.build"):
        result = build_cache(BuildConfig(out=tmp_path / "caches/mine", labels_file=pool / "labels.txt",
                                         pool_dir=pool / "pool", pool_per_class=2, model="tiny-random",
                                         views=2, batch_size=8, captioner="sidecar", progress=False,
                                         monitor=log.monitor()), tiny_encoder)
    assert log.steps() == ["reading", "pseudo-labelling", "text", "encoding", "caption-keys", "tuning",
                           "indexing", "publishing"]
    log.check_bounds()
    assert log.last("pseudo-labelling") == (41, 41)  # every pool file, the broken one included

    m, report = result.manifest.to_json(), result.report.model_dump(mode="json")
    assert report["mode"] == "pool" and report["source"] == str(pool / "pool")
    info = report["pool"]
    assert info["images"] == 41 and info["usable"] == 40
    assert [s["path"] for s in info["skipped"]] == [str(pool / "pool" / "broken.jpg")]
    assert report["skipped"] == info["skipped"] and report["skipped_count"] == 1
    assert "broken.jpg" in caplog.text

    per_class = info["per_class"]
    assert list(per_class) == LABELS
    assert sum(c["assigned"] for c in per_class.values()) == 40
    for label, c in per_class.items():
        assert c["count"] == min(2, c["assigned"]) == m["counts"]["per_class"][label]
        if c["count"]:
            assert 0 < c["min_confidence"] <= c["mean_confidence"] <= 1
    empty = [lb for lb, c in per_class.items() if c["count"] == 0]
    assert info["empty_classes"] == empty
    assert report["short_classes"] == {lb: c["count"] for lb, c in per_class.items() if c["count"] < 2}
    for label in empty:
        assert f"no pool image was pseudo-labelled {label!r}" in caplog.text

    loaded = store.load_cache(tmp_path / "caches/mine")
    n = sum(c["count"] for c in per_class.values())
    assert m["counts"]["items"] == n == len(loaded.items) and loaded.image_keys.shape[0] == n
    assert loaded.labels == LABELS and loaded.text_weights.shape[1] == 10  # empty classes stay labels
    assert loaded.caption_keys is not None and loaded.caption_keys.shape == loaded.image_keys.shape
    assert loaded.image_index.ntotal == n and loaded.caption_index.ntotal == n
    assert all(it["caption"] == Path(it["path"]).with_suffix(".txt").read_text() for it in loaded.items)
    assert [LABELS[i] for i in loaded.label_ids] == [it["label"] for it in loaded.items]
    assert not any(".hidden" in it["path"] for it in loaded.items)

    # Recompute the pseudo-labels independently: every kept image is zero-shot's argmax for its
    # label and among that label's two most confident images.
    paths = sorted(p for p in (pool / "pool").rglob("*.png") if ".hidden" not in p.parts)
    features, kept, _ = encode_image_files(tiny_encoder, paths, progress=False)
    probs = (100 * features @ torch.from_numpy(loaded.text_weights)).softmax(-1)
    row_of = {str(paths[i]): row for row, i in enumerate(kept)}
    for item in loaded.items:
        row, cls = row_of[item["path"]], LABELS.index(item["label"])
        assert int(probs[row].argmax()) == cls
        rivals = probs[(probs.argmax(1) == cls), cls]
        assert float(probs[row, cls]) >= float(rivals.sort(descending=True).values[:2][-1]) - 1e-5

    # The query features are the pool's plain-view features, encoded once while pseudo-labelling.
    expected = features[[row_of[item["path"]] for item in loaded.items]]
    assert torch.allclose(torch.from_numpy(loaded.query_features), expected, atol=1e-5)

    # The reported leave-one-out accuracy of tip is that of the parameters served.
    cache = CacheTensors.build(torch.from_numpy(loaded.text_weights), torch.from_numpy(loaded.image_keys),
                               torch.from_numpy(loaded.label_ids), None, temperature=loaded.temperature)
    queries = torch.from_numpy(loaded.query_features)
    truth = torch.from_numpy(loaded.label_ids)
    exclude = loo_exclusions(truth, torch.arange(n), len(LABELS), 0, queries)
    served = blend(queries, cache, BlendParams(alpha=1.0, beta=5.5), "tip", exclude)
    assert m["tuning"]["loo_top1"]["tip"] == pytest.approx(float((served.argmax(1) == truth).float().mean()))

    assert m["tuning"]["protocol"].startswith("balanced leave-one-out on the pool's zero-shot pseudo-labels")
    assert m["tuning"]["loo_top1"]["zeroshot"] == pytest.approx(1.0)  # by construction (docs/methods.md)
    # Pseudo-labels cannot choose a method, so auto serves tip with fixed, published parameters.
    assert m["params"]["best_method"] == "tip" == loaded.best_method
    assert loaded.params("tip").alpha == 1.0 and loaded.params("tip").beta == 5.5
    assert "auto serves tip with fixed parameters" in m["tuning"]["protocol"]


def test_a_pool_without_usable_images_is_an_error(pool, tiny_encoder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_text("text")
    config = dict(out=tmp_path / "caches/c", labels_file=pool / "labels.txt", model="tiny-random", progress=False)
    with pytest.raises(DataError, match=r"the pool has no usable image: all 2 files were skipped"):
        build_cache(BuildConfig(pool_dir=bad, **config), tiny_encoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        build_cache(BuildConfig(pool_dir=tmp_path / "empty", **config), tiny_encoder)
    with pytest.raises(DataError, match="pool-per-class"):
        build_cache(BuildConfig(pool_dir=pool / "pool", pool_per_class=0, **config), tiny_encoder)
    assert store.list_versions(tmp_path / "caches/c") == []


def test_cli_pool_build(pool, tmp_path, capsys):
    code = main(["build", "--labels", str(pool / "labels.txt"), "--pool", str(pool / "pool"),
                 "--pool-per-class", "1", "--out", str(tmp_path / "c"), "--model", "tiny-random",
                 "--captioner", "none", "--views", "1", "--quiet", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["build_report"]["mode"] == "pool" and out["shots"] == 1
    counts = [c["count"] for c in out["build_report"]["pool"]["per_class"].values()]
    assert all(c <= 1 for c in counts) and sum(counts) == out["counts"]["items"] >= 1
    assert out["captioner"] == {"name": "none"} and "caps" not in out["params"]["methods"]
