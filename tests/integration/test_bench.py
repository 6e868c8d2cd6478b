"""`kvclip bench` on a small CoOp-layout folder of real Fashion-MNIST images (split_zhou_fashion.json)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvclip.artifact import load_cache
from kvclip.cache_builder.bench import format_table, published_figures, read_split, run_bench
from kvclip.cache_builder.datasets import FASHION_MNIST_LABELS, load_fashion_mnist
from kvclip.cli import main
from kvclip.errors import DataError

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 4


@pytest.fixture(scope="module")
def coop_root(tmp_path_factory) -> Path:
    """root/images/<split>_<index>.png and root/split_zhou_fashion.json, as CoOp lays a dataset out."""
    root = tmp_path_factory.mktemp("coop") / "fashion"
    (root / "images").mkdir(parents=True)
    split = {}
    for part, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images, labels = load_fashion_mnist(part)
        rows = []
        for label in range(len(FASHION_MNIST_LABELS)):
            for index in np.flatnonzero(labels == label)[:per_class]:
                name = f"images/{part}_{index:05d}.png"
                Image.fromarray(images[index], mode="L").save(root / name)
                rows.append([name, label, FASHION_MNIST_LABELS[label]])
        split[part] = rows
    split["val"] = split["test"][:2]  # present in CoOp's files; bench does not read it
    (root / "split_zhou_fashion.json").write_text(json.dumps(split))
    return root


def test_bench_builds_tunes_on_train_and_evaluates_on_test(coop_root, tiny_encoder, tmp_path):
    split_file = coop_root / "split_zhou_fashion.json"
    report = run_bench(split_file, shots=(1, 2), seeds=(1, 2), encoder=tiny_encoder, views=1,
                       work_dir=tmp_path, progress=False)
    classes = len(FASHION_MNIST_LABELS)
    assert [(r.shots, r.seed) for r in report.runs] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    train = {str((coop_root / row[0]).resolve()) for row in json.loads(split_file.read_text())["train"]}
    samples = {}
    for run in report.runs:
        assert run.support == run.shots * classes and run.test == TEST_PER_CLASS * classes
        assert set(run.top1) == {"zeroshot", "tip", "tipx", "auto"}
        assert run.top1["auto"] == run.top1[run.best_method]
        items = load_cache(tmp_path / "caches" / f"k{run.shots}-seed{run.seed}").items
        paths = {item["path"] for item in items}
        assert paths <= train  # support images come from train only; tuning sees nothing else
        samples[(run.shots, run.seed)] = paths
    assert samples[(1, 1)] != samples[(1, 2)]  # the seed picks the shots
    summary = report.summary()
    for k in (1, 2):
        values = [r.top1["tip"] for r in report.runs if r.shots == k]
        assert summary[k]["tip"]["mean"] == pytest.approx(statistics.fmean(values))
        assert summary[k]["tip"]["std"] == pytest.approx(statistics.stdev(values))


def test_bench_cli_prints_the_table_beside_the_published_figures(coop_root, capsys):
    args = ["bench", str(coop_root / "split_zhou_fashion.json"), "--model", "tiny-random", "--shots", "1,16",
            "--seeds", "1", "--views", "1", "--quiet"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "zeroshot" in table and "tip" in table and "± 0.00" in table
    assert "58.89" in table and "70.32" in table and "published: RN50, mean of 11 datasets" in table
    assert 'Zhang et al., "Tip-Adapter' in table
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["summary"]) == {"1", "16"} and out["published"] == published_figures()
    # 16 shots asked of 6 per class: the build takes all and reports the class short
    assert [r["support"] for r in out["runs"]] == [10, 10 * TRAIN_PER_CLASS]


def test_published_figures_name_their_source():
    published = published_figures()
    assert "Tip-Adapter" in published["source"] and "ECCV 2022" in published["source"]
    figures = {(f["model"], f["shots"], f["method"]): f["top1"] for f in published["figures"]}
    assert figures[("RN50", 16, "zeroshot")] == 58.89 and figures[("RN50", 16, "tip")] == 70.32


def test_split_files_are_checked(tmp_path):
    bad = tmp_path / "split_zhou_bad.json"
    bad.write_text(json.dumps({"train": [["a.png", 0, "cat"]], "test": [["b.png", 0, "dog"]]}))
    with pytest.raises(DataError, match="label 0 is both"):
        read_split(bad)
    bad.write_text(json.dumps({"train": [["a.png", "0", "cat"]], "test": []}))
    with pytest.raises(DataError, match=r"train\[0\]"):
        read_split(bad)


def test_bench_refuses_bad_shot_lists(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "x.json"), "--shots", "1,x"]) == 2  # a usage error
    assert "--shots must be" in capsys.readouterr().err


def test_format_table_lists_every_k(coop_root, tiny_encoder):
    report = run_bench(coop_root / "split_zhou_fashion.json", shots=(1,), seeds=(3,), encoder=tiny_encoder,
                       views=1, progress=False)
    lines = format_table(report).splitlines()
    assert lines[2].split()[0] == "1" and "auto" in lines[1]
