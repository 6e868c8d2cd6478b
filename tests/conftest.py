"""Shared fixtures. Nothing here touches the network: the hub is switched off first."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A developer's own server keys must not leak into apps the tests start: keyless unless a
# test sets keys itself.
for _name in ("KVCLIP_API_KEYS", "KVCLIP_API_KEYS_FILE"):
    os.environ.pop(_name, None)
# As `kvclip serve` does (kvclip/threads.py), before torch loads: OpenMP threads that spin at
# every barrier starve the other process on a busy machine (tests/unit/test_class_balance.py
# under load: 152-170 s with spinning threads, 59-73 s waiting passively).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """In a process that runs tests, not in pytest-xdist's controller (.ci/run), which only
    hands out files: importing torch there would delay every test process's start by its
    import (about 10 s of the suite's wall time)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and _runs_xdist_workers(config):
        return
    import torch

    # Under pytest-xdist each test process gets its share of the cores: two processes with two
    # threads each on two cores would only thrash.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


def _runs_xdist_workers(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not getattr(config.option, "collectonly", False)


# The order test files are handed out in (.ci/run passes --no-loadscope-reorder): real
# processes first, so that the many short in-process files fill the test processes' ends and
# neither waits long for the other at the end of the run.
_TIERS = ("e2e", "deploy", "integration", "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def tier(item: pytest.Item) -> int:
        part = item.path.relative_to(_TESTS).parts[0] if item.path.is_relative_to(_TESTS) else ""
        return _TIERS.index(part) if part in _TIERS else len(_TIERS)

    items.sort(key=tier)  # stable: a file's tests stay together and in order


_TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def tiny_encoder():
    from kvclip.models import load_encoder

    return load_encoder("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def fashion_train(tmp_path_factory) -> Path:
    """16 real Fashion-MNIST training images per class, as DATA_DIR/<label>/<file>."""
    from kvclip.cache_builder.datasets import export_fashion_mnist

    out = tmp_path_factory.mktemp("fmnist") / "train"
    export_fashion_mnist(out, "train", per_class=16, seed=0)
    return out


@pytest.fixture(scope="session")
def fashion_test(tmp_path_factory) -> Path:
    """The first 1000 Fashion-MNIST test images (never seen by a build)."""
    from kvclip.cache_builder.datasets import export_fashion_mnist

    out = tmp_path_factory.mktemp("fmnist") / "test"
    export_fashion_mnist(out, "test", limit=1000)
    return out


def write_images(folder: Path, count: int, seed: int = 0, size: int = 40, suffix: str = ".png") -> list[Path]:
    """Small random RGB images (for plumbing tests that need no real content)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}{suffix}"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def served_caches(tmp_path_factory, fashion_train, tiny_encoder) -> Path:
    """A caches folder for server tests: `fashion` with two versions (v0001 current, v0002
    built with another seed) and `fashion-caps` with caption sidecars (caps method).
    Tests that change caches copy it first (see tests/service_helpers.copy_caches)."""
    import shutil

    from kvclip.cache_builder.build import BuildConfig, build_cache

    root = tmp_path_factory.mktemp("served") / "caches"
    common = dict(model="tiny-random", shots=8, views=2, batch_size=64, progress=False)
    build_cache(BuildConfig(out=root / "fashion", data_dir=fashion_train, captioner="none", seed=0, **common),
                tiny_encoder)
    build_cache(BuildConfig(out=root / "fashion", data_dir=fashion_train, captioner="none", seed=1,
                            activate=False, **common), tiny_encoder)
    captioned = tmp_path_factory.mktemp("captioned") / "train"
    shutil.copytree(fashion_train, captioned)
    for image in captioned.rglob("*.png"):
        image.with_suffix(".txt").write_text(f"a photo of a {image.parent.name}")
    build_cache(BuildConfig(out=root / "fashion-caps", data_dir=captioned, captioner="sidecar", **common),
                tiny_encoder)
    return root


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Async tests (@pytest.mark.anyio) run on asyncio, the loop uvicorn uses. Module scope, so
    module-scoped async fixtures (a shared running app) and the tests run on one loop."""
    return "asyncio"
