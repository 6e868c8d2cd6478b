"""Real labelled images for tests and benchmarks, read from the foolbox wheel.

The foolbox wheel from PyPI (fetched by scripts/fetch_test_data.sh into .cache/test-data/)
carries 20 labelled images per subset in foolbox/data/<subset>_<NN>_<label>.<ext>: small,
real and reachable through a package registry, so the tests read them from the zip. It
lives in tests/, not in the package: only tests and scripts/bench_*.py use it.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvclip.errors import DataError

CIFAR10_LABELS = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

# The wheel lives under the repo, not in site-packages: foolbox is never installed.
FOOLBOX_WHEEL_DIR = Path(__file__).resolve().parents[1] / ".cache" / "test-data"
FOOLBOX_WHEEL_ENV = "KVCLIP_FOOLBOX_WHEEL"
_FOOLBOX_MEMBER = re.compile(r"^foolbox/data/(?P<subset>.+)_(?P<index>\d+)_(?P<label>\d+)\.(?:png|jpe?g)$")


@dataclass(frozen=True)
class FoolboxImage:
    """One image from the wheel, as the encoded bytes stored there (PNG, or JPEG for imagenet)."""

    name: str  # file name in the wheel, e.g. "cifar10_00_3.png"
    label_id: int  # class index in the subset's dataset (CIFAR-10, ImageNet, ...)
    data: bytes


def find_foolbox_wheel(search: list[Path] | None = None) -> Path:
    """The foolbox wheel, from `search` (folders or wheel files) or, by default, from
    $KVCLIP_FOOLBOX_WHEEL and then <repo>/.cache/test-data/."""
    if search is None:
        search = [Path(os.environ[FOOLBOX_WHEEL_ENV])] if os.environ.get(FOOLBOX_WHEEL_ENV) else []
        search.append(FOOLBOX_WHEEL_DIR)
    for place in map(Path, search):
        if place.is_file() and place.suffix == ".whl":
            return place
        # Sorted so that with several versions present the choice is at least repeatable.
        wheels = sorted(place.glob("foolbox-*.whl")) if place.is_dir() else []
        if wheels:
            return wheels[-1]
    looked = ", ".join(str(p) for p in search) or "nowhere"
    raise DataError(
        f"foolbox wheel not found (looked in {looked}): run `bash scripts/fetch_test_data.sh`, "
        f"or set {FOOLBOX_WHEEL_ENV} to a foolbox-*.whl"
    )


def read_foolbox_images(subset: str, wheel: Path | None = None) -> list[FoolboxImage]:
    """The images of one subset ("cifar10", "cifar100", "imagenet", "mnist", "fashionMNIST"),
    read straight from the wheel's zip, in the order of their index."""
    wheel = Path(wheel) if wheel is not None else find_foolbox_wheel()
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [(m, _FOOLBOX_MEMBER.match(m)) for m in zf.namelist()]
            found = {}
            for member, match in members:
                if match and match["subset"] == subset:
                    found[int(match["index"])] = FoolboxImage(
                        member.rsplit("/", 1)[1], int(match["label"]), zf.read(member))
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{wheel}: not a readable wheel ({exc}); run `bash scripts/fetch_test_data.sh` "
                        "again after deleting it") from exc
    if not found:
        subsets = sorted({match["subset"] for _, match in members if match})
        raise DataError(f"{wheel}: no foolbox images for subset {subset!r}; it has {subsets}")
    return [found[index] for index in sorted(found)]


def export_foolbox(
    out_dir: str | Path,
    subset: str,
    label_names: tuple[str, ...] | list[str] | None = None,
    wheel: Path | None = None,
) -> list[Path]:
    """Write a subset as out_dir/<label>/<name> and return the paths, in index order.

    <label> is label_names[label_id] when given (e.g. CIFAR10_LABELS), else the id itself;
    the bytes are copied as stored, so imagenet images stay JPEG (<name> keeps its suffix).
    """
    out = Path(out_dir)
    paths = []
    for image in read_foolbox_images(subset, wheel):
        if label_names is not None and not 0 <= image.label_id < len(label_names):
            raise DataError(f"{image.name}: label {image.label_id} has no name "
                            f"({len(label_names)} label names given)")
        label = label_names[image.label_id] if label_names is not None else str(image.label_id)
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / image.name
        path.write_bytes(image.data)
        paths.append(path)
    return paths
