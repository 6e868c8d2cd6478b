"""Export real labelled images from installed datasets into DATA_DIR/<label>/<file> (`kvclip export-dataset`).

Fashion-MNIST comes from Debian's dataset-fashion-mnist package (IDX files); the tests and
the demo use it because no other labelled images can be downloaded on offline machines.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from kvclip.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = (
    "T-shirt or top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a numpy array of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise DataError(
            f"Fashion-MNIST not found at {root}: install Debian's dataset-fashion-mnist package "
            "(apt-get install dataset-fashion-mnist)"
        )
    return read_idx(images), read_idx(labels)


def export_fashion_mnist(
    out: str | Path,
    split: str = "train",
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    fmt: str = "png",
) -> int:
    """Write images as out/<label>/<split>_<index>.<fmt>; returns how many were written.

    `per_class` takes that many per class (seeded); `limit` takes at most N (of that sample, or
    the first N of the split).
    """
    images, labels = load_fashion_mnist(split)
    if per_class is not None:
        rng = np.random.default_rng(seed)
        chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                 for c in range(len(FASHION_MNIST_LABELS))])
    else:
        chosen = np.arange(len(labels))
    chosen = chosen[:limit] if limit else chosen  # with per_class too: at most `limit` of the sample
    out = Path(out)
    for index in chosen:
        folder = out / FASHION_MNIST_LABELS[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], mode="L").save(folder / f"{split}_{index:05d}.{fmt}")
    return len(chosen)
