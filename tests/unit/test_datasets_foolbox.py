"""Real labelled images read from the foolbox wheel (fetched by scripts/fetch_test_data.sh).

No network here: if the wheel is missing the tests fail with find_foolbox_wheel's DataError,
which says to run the script, rather than skipping.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kvclip.errors import DataError
from kvclip.images import decode_image
from tests.foolbox_data import (
    CIFAR10_LABELS,
    FoolboxImage,
    export_foolbox,
    find_foolbox_wheel,
    read_foolbox_images,
)


@pytest.fixture(scope="module")
def wheel() -> Path:
    return find_foolbox_wheel()


def test_cifar10_images_decode_with_labels(wheel):
    images = read_foolbox_images("cifar10", wheel)
    assert len(images) == 20
    assert all(isinstance(image, FoolboxImage) for image in images)
    # The first CIFAR-10 test images: cat, ship, ship, airplane (the label is the file's last field).
    assert [image.name for image in images[:4]] == [
        "cifar10_00_3.png", "cifar10_01_8.png", "cifar10_02_8.png", "cifar10_03_0.png"]
    assert [image.label_id for image in images[:4]] == [3, 8, 8, 0]
    for image in images:
        assert image.label_id == int(image.name.rsplit(".", 1)[0].rsplit("_", 1)[1])
        assert 0 <= image.label_id < len(CIFAR10_LABELS)
        assert decode_image(image.data, name=image.name).size == (32, 32)


def test_imagenet_images_decode_with_labels(wheel):
    images = read_foolbox_images("imagenet", wheel)
    assert len(images) == 20
    # Index order, not zip order; the index is the middle field.
    assert [int(image.name.split("_")[1]) for image in images] == list(range(20))
    assert images[0].name == "imagenet_00_243.jpg" and images[0].label_id == 243
    assert images[15].name == "imagenet_15_99.jpg" and images[15].label_id == 99
    for image in images:
        assert 0 <= image.label_id < 1000
        decoded = decode_image(image.data, name=image.name)
        assert decoded.mode == "RGB" and min(decoded.size) >= 224


def test_cifar100_is_not_mixed_into_cifar10(wheel):
    # "cifar10" is a prefix of "cifar100": the subset must match exactly.
    assert all(image.name.startswith("cifar100_") for image in read_foolbox_images("cifar100", wheel))
    assert not any(image.name.startswith("cifar100_") for image in read_foolbox_images("cifar10", wheel))


def test_export_cifar10_with_label_names(wheel, tmp_path):
    paths = export_foolbox(tmp_path / "data", "cifar10", label_names=CIFAR10_LABELS)
    assert len(paths) == 20
    assert paths[0] == tmp_path / "data" / "cat" / "cifar10_00_3.png"
    assert paths[3] == tmp_path / "data" / "airplane" / "cifar10_03_0.png"
    images = read_foolbox_images("cifar10", wheel)
    for path, image in zip(paths, images):
        assert path.parent.name == CIFAR10_LABELS[image.label_id]
        assert path.read_bytes() == image.data
    on_disk = sorted(p.relative_to(tmp_path / "data") for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert on_disk == sorted(p.relative_to(tmp_path / "data") for p in paths)
    assert {p.parent.name for p in paths} <= set(CIFAR10_LABELS)


def test_export_imagenet_uses_label_ids(wheel, tmp_path):
    paths = export_foolbox(tmp_path, "imagenet")
    assert len(paths) == 20
    assert paths[0] == tmp_path / "243" / "imagenet_00_243.jpg"
    for path in paths:
        assert path.parent.name == path.stem.rsplit("_", 1)[1]
        decode_image(path.read_bytes(), name=str(path))


def test_export_rejects_too_few_label_names(wheel, tmp_path):
    with pytest.raises(DataError, match="no name"):
        export_foolbox(tmp_path, "imagenet", label_names=CIFAR10_LABELS)


def test_unknown_subset(wheel):
    with pytest.raises(DataError, match="cifar10"):
        read_foolbox_images("svhn", wheel)


def test_missing_wheel_says_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match=r"bash scripts/fetch_test_data\.sh"):
        find_foolbox_wheel([tmp_path])


def test_env_var_points_at_wheel(wheel, monkeypatch):
    monkeypatch.setenv("KVCLIP_FOOLBOX_WHEEL", str(wheel))
    assert find_foolbox_wheel() == wheel
