"""Duplicate support images (real Fashion-MNIST images copied): found at build, reported, exact ones dropped,
near ones left out together in leave-one-out."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cli import main
from kvclip.service.build_requests import build_config
from kvclip.service.config import ServerConfig
from kvclip.service.schemas import BuildOptions

COMMON = dict(model="tiny-random", shots=None, views=2, batch_size=64, captioner="none", progress=False)
CACHE_METHODS = ("tip", "tipx")


def _copy(train: Path, root: Path, per_class: int = 6) -> Path:
    """`per_class` images of every class of the fixture."""
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def _build(data: Path, out: Path, encoder, **options):
    return build_cache(BuildConfig(out=out, data_dir=data, **{**COMMON, **options}), encoder)


@pytest.fixture(scope="module")
def clean(fashion_train, tmp_path_factory) -> Path:
    return _copy(fashion_train, tmp_path_factory.mktemp("clean") / "data")


@pytest.fixture(scope="module")
def doubled(clean, tmp_path_factory) -> Path:
    """Every image twice: a byte copy under another name."""
    root = tmp_path_factory.mktemp("doubled") / "data"
    shutil.copytree(clean, root)
    for image in list(root.rglob("*.png")):
        shutil.copy(image, image.with_name("copy_" + image.name))
    return root


def test_exact_duplicates_are_dropped_and_reported_by_default(clean, doubled, tmp_path, tiny_encoder):
    n = len(list(clean.rglob("*.png")))
    report = _build(doubled, tmp_path / "doubled", tiny_encoder).manifest
    duplicates = report.build_report.duplicates
    assert report.counts.items == n and report.build_report.used == n
    assert duplicates.exact_groups == n and duplicates.dropped == n and not duplicates.kept
    assert duplicates.cross_class_groups == 0
    for group in duplicates.groups:
        assert group.kind == "exact" and group.same_bytes and len(group.items) == 2
        assert sorted(it.dropped for it in group.items) == [False, True]
        assert {Path(it.path).name.removeprefix("copy_") for it in group.items} == {Path(group.items[0].path).name
                                                                                     .removeprefix("copy_")}
    # the cache equals the clean one's in what leave-one-out sees: no copy is left to meet
    assert report.tuning.n_queries == n
    clean_report = _build(clean, tmp_path / "clean", tiny_encoder).manifest
    assert clean_report.build_report.duplicates.groups == []
    for method in CACHE_METHODS:
        assert report.tuning.loo_top1[method] < 0.9


def test_keep_duplicates_keeps_them_and_leave_one_out_leaves_them_out(doubled, tmp_path, tiny_encoder):
    manifest = _build(doubled, tmp_path / "kept", tiny_encoder, keep_duplicates=True).manifest
    n = len(list(doubled.rglob("*.png")))
    duplicates = manifest.build_report.duplicates
    assert manifest.counts.items == n and duplicates.kept and duplicates.dropped == 0
    assert duplicates.exact_groups == n // 2
    assert manifest.tuning.duplicates_excluded == n  # every item is some query's copy
    for method in CACHE_METHODS:
        assert manifest.tuning.loo_top1[method] < 0.9


def test_near_duplicates_are_reported_kept_and_left_out_together(clean, tmp_path, tiny_encoder):
    """A resized JPEG of every image: not the same bytes or features, but the same picture. Before
    near duplicates were left out together, tip's leave-one-out read ~1.0 here."""
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    originals = list(data.rglob("*.png"))
    for image in originals:
        Image.open(image).convert("L").resize((26, 26)).save(image.with_suffix(".jpg"), quality=90)
    manifest = _build(data, tmp_path / "near", tiny_encoder).manifest
    duplicates = manifest.build_report.duplicates
    assert manifest.counts.items == 2 * len(originals) and duplicates.dropped == 0
    assert duplicates.exact_groups == 0 and duplicates.near_groups >= 0.9 * len(originals)
    for group in duplicates.groups:
        assert group.kind == "near" and group.min_cosine >= duplicates.near_cosine
        assert not any(it.dropped for it in group.items)
    assert manifest.tuning.duplicates_excluded >= 1.8 * len(originals)
    for method in CACHE_METHODS:
        assert manifest.tuning.loo_top1[method] < 0.9
    assert str(duplicates.near_cosine) in manifest.tuning.protocol


def test_the_same_image_under_two_labels_is_reported_first_and_kept_once_per_label(clean, tmp_path,
                                                                                  tiny_encoder, capsys):
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    image = sorted((data / "bag").glob("*.png"))[0]
    shutil.copy(image, data / "sneaker" / "mislabelled.png")
    shutil.copy(image, data / "bag" / "again.png")  # and a plain copy within its own class
    out = tmp_path / "cache"
    assert main(["build", str(data), "--out", str(out), "--model", "tiny-random", "--shots", "all",
                 "--views", "1", "--captioner", "none", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: the same image carries different labels" in printed
    assert "mislabelled.png [sneaker]" in printed
    from kvclip.artifact import load_cache
    duplicates = load_cache(out).manifest.build_report.duplicates
    first = duplicates.groups[0]
    assert first.cross_class and duplicates.cross_class_groups == 1 and len(first.items) == 3
    kept = sorted(it.label for it in first.items if not it.dropped)
    assert kept == ["bag", "sneaker"] and duplicates.dropped == 1


def test_the_same_pixels_in_another_format_are_exact_duplicates(clean, tmp_path, tiny_encoder):
    data = tmp_path / "data"
    shutil.copytree(clean, data)
    image = sorted((data / "coat").glob("*.png"))[0]
    Image.open(image).save(image.with_suffix(".bmp"))
    duplicates = _build(data, tmp_path / "cache", tiny_encoder).manifest.build_report.duplicates
    [group] = duplicates.groups
    assert group.kind == "exact" and not group.same_bytes and duplicates.dropped == 1


def test_keep_duplicates_is_a_build_option_over_http(tmp_path):
    config = ServerConfig(caches=tmp_path, model="tiny-random")
    assert build_config("c", BuildOptions(), tmp_path, None, config).keep_duplicates is False
    assert build_config("c", BuildOptions(keep_duplicates=True), tmp_path, None, config).keep_duplicates is True
