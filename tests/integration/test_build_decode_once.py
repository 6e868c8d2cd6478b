"""Each support image is decoded once per build: the reading step's check (or the pool's
pseudo-labelling) hands its decoded image to the encoding step (cache_builder/decoded.py)."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kvclip import artifact as store
from kvclip import images
from kvclip.cache_builder import decoded
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.cache_builder.decoded import DecodedImages
from tests.conftest import write_images

LABELS = ["bag", "sandal", "trouser"]


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """How often each file was decoded (every image read goes through kvclip.images.decode_image)."""
    counts: Counter = Counter()
    real = images.decode_image

    def counting(data, max_pixels=images.DEFAULT_MAX_PIXELS, name="image", **kwargs):
        counts[name] += 1
        return real(data, max_pixels=max_pixels, name=name, **kwargs)

    monkeypatch.setattr(images, "decode_image", counting)
    return counts


@pytest.fixture(scope="module")
def data(tmp_path_factory, fashion_train) -> Path:
    root = tmp_path_factory.mktemp("decode-once")
    for label in LABELS:
        shutil.copytree(fashion_train / label, root / "data" / label)
    (root / "data" / "bag" / "000-broken.png").write_bytes(b"not a png")  # sampled first, skipped, replaced
    (root / "pool").mkdir()
    for image in sorted(fashion_train.rglob("*.png"))[::8]:
        shutil.copy(image, root / "pool" / f"{image.parent.name}-{image.name}")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


def labelled(data: Path, out: Path) -> BuildConfig:
    return BuildConfig(out=out, data_dir=data / "data", model="tiny-random", shots=4, views=2, batch_size=3,
                       captioner="none", progress=False)


def test_labelled_build_decodes_each_support_image_once(data, tiny_encoder, tmp_path, decodes):
    result = build_cache(labelled(data, tmp_path / "c"), tiny_encoder)
    support = [item["path"] for item in store.load_cache(tmp_path / "c").items]
    assert len(support) == result.manifest.counts.items == 12
    assert {path: decodes[path] for path in support} == {path: 1 for path in support}
    assert sum(decodes.values()) == 12 + result.report.skipped_count  # nothing else was decoded


def test_kept_images_encode_as_the_files_do(data, tiny_encoder, tmp_path, monkeypatch):
    """With no budget for decoded images, encoding re-reads the files: the cache is the same."""
    kept = build_cache(labelled(data, tmp_path / "kept"), tiny_encoder)
    monkeypatch.setattr(decoded, "DEFAULT_BUDGET_BYTES", 0)
    reread = build_cache(labelled(data, tmp_path / "reread"), tiny_encoder)
    for name in ("image_keys", "query_features"):
        assert np.array_equal(np.load(kept.path / f"{name}.npy"), np.load(reread.path / f"{name}.npy"))


def test_pool_build_decodes_each_pool_image_once(data, tiny_encoder, tmp_path, decodes):
    result = build_cache(BuildConfig(out=tmp_path / "p", labels_file=data / "labels.txt", pool_dir=data / "pool",
                                     pool_per_class=2, model="tiny-random", views=2, captioner="none",
                                     progress=False), tiny_encoder)
    assert result.manifest.counts.items >= 1
    pool_files = sorted(str(p) for p in (data / "pool").iterdir())
    assert [decodes[p] for p in pool_files] == [1] * len(pool_files)


def test_decoded_images_keep_within_budget_and_release_on_take(tmp_path):
    paths = write_images(tmp_path, 3, size=10)  # 10 x 10 RGB: 300 bytes each
    kept = DecodedImages(budget_bytes=700)
    for path in paths:
        kept.keep(path, images.load_image(path))
    assert len(kept) == 2 and kept.used_bytes == 600  # the third is past the budget
    kept.retain([paths[0], paths[2]])
    assert len(kept) == 1 and kept.used_bytes == 300
    first = kept.take(paths[0])
    assert len(kept) == 0 and kept.used_bytes == 0 and first.size == (10, 10)
    assert np.array_equal(np.asarray(kept.take(paths[1])), np.asarray(images.load_image(paths[1])))  # from its file

