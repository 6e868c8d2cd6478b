"""Builds through the `kvclip` command as a user runs them, in-process (kvclip.cli.main), on
real Fashion-MNIST images. The command as a process: tests/e2e/test_build.py."""
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from kvclip.artifact import load_cache
from tests.client_fakes import run_cli
from tests.conftest import write_images


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def kvclip(capsys):
    """`kvclip ARGS...` in-process; fails the test on a non-zero exit unless check=False."""
    def run(*args: str, check: bool = True) -> Result:
        result = Result(*run_cli(capsys, *args))
        if check and result.returncode != 0:
            raise AssertionError(f"kvclip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result
    return run


def add_corrupt_files(folder: Path) -> list[Path]:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="JPEG")
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "notes.jpg"
    text.write_text("this is a text file with an image's name\n")
    return [truncated, empty, text]


def test_build_skips_and_reports_corrupt_files(kvclip, fashion_train, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(fashion_train, data)
    bad = add_corrupt_files(data / "sandal")
    proc = kvclip("build", str(data), "--out", str(tmp_path / "caches/shoes"), "--model", "tiny-random",
                  "--shots", "all", "--views", "2", "--captioner", "none", "--quiet", "--json")
    manifest = json.loads(proc.stdout)
    report = manifest["build_report"]
    assert report["skipped_count"] == 3
    assert sorted(s["path"] for s in report["skipped"]) == sorted(str(p) for p in bad)
    assert manifest["counts"]["per_class"]["sandal"] == 16 and manifest["counts"]["items"] == 160
    for path in bad:
        assert f"skipped {path}:" in caplog.text  # logged as a warning too
    assert load_cache(tmp_path / "caches/shoes").version == "v0001"


def test_build_errors_are_one_clear_line(kvclip, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = kvclip("build", str(tmp_path / "empty"), "--out", str(tmp_path / "c"), "--model", "tiny-random", check=False)
    assert proc.returncode == 2 and "kvclip: error: data folder" in proc.stderr and "no images" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    write_images(tmp_path / "data" / "cat", 2)
    proc = kvclip("build", str(tmp_path / "data"), "--out", str(tmp_path / "c"), "--model", "ViT-B-32:openai",
                  "--captioner", "none", check=False)
    # weights that cannot be had are a runtime error (1), not a usage error (2)
    assert proc.returncode == 1 and "could not load the weights of model 'ViT-B-32:openai'" in proc.stderr


def test_failed_build_leaves_previous_version_serving(kvclip, fashion_train, tmp_path):
    cache = tmp_path / "caches/fm"
    kvclip("build", str(fashion_train), "--out", str(cache), "--model", "tiny-random", "--shots", "2",
           "--views", "1", "--captioner", "none", "--quiet")
    proc = kvclip("build", str(fashion_train), "--out", str(cache), "--model", "tiny-random", "--shots", "2",
                  "--captioner", "sidecar", "--quiet", check=False)  # no sidecar captions exist
    assert proc.returncode == 2 and "no caption for" in proc.stderr and ".txt" in proc.stderr
    assert load_cache(cache).version == "v0001"


def test_fashion_mnist_end_to_end(kvclip, fashion_train, fashion_test, tmp_path):
    """Build from 16 real shots per class with the random tiny model, evaluate on 1000 test images.

    Zero-shot with random text weights is chance; the image cache must beat it widely.
    """
    data = tmp_path / "train"
    shutil.copytree(fashion_train, data)
    for image in data.glob("*/*.png"):  # sidecar captions, as a user would ship them
        image.with_suffix(".txt").write_text(f"a small grey photo of a {image.parent.name}")
    cache = tmp_path / "caches/fmnist"
    build = json.loads(kvclip("build", str(data), "--out", str(cache), "--model", "tiny-random",
                              "--shots", "16", "--captioner", "sidecar", "--quiet", "--json").stdout)
    assert build["counts"]["items"] == 160 and build["views"] == 10
    loo = build["tuning"]["loo_top1"]
    assert all(loo[m] >= loo["zeroshot"] for m in ("tip", "tipx", "caps"))
    assert set(build["faiss"]["methods"]) == {"tip", "tipx", "caps"}

    report = json.loads(kvclip("eval", "--cache", str(cache), "--data", str(fashion_test), "--json", "--quiet").stdout)
    print("\nFashion-MNIST, tiny-random, 16 shots, 1000 test images:", json.dumps(report["methods"]))
    assert report["n"] == 1000
    assert set(report["methods"]) == {"zeroshot", "tip", "tipx", "caps"}
    assert set(report["params"]["methods"]) == {"tip", "tipx", "caps"}
    assert report["methods"]["zeroshot"]["top1"] < 0.2  # chance is 0.1
    for method in ("tip", "tipx", "caps"):
        assert report["methods"][method]["top1"] >= report["methods"]["zeroshot"]["top1"] + 0.3
        assert report["methods"][method]["top5"] >= report["methods"][method]["top1"]
    table = kvclip("eval", "--cache", str(cache), "--data", str(fashion_test), "--limit", "50", "--quiet").stdout
    assert "method" in table and "caps" in table and "images 50" in table
