"""CacheRegistry.reload: caches load in parallel, swap in once, fail one by one, and a second
start hashes no unchanged file."""
from __future__ import annotations

import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest

from kvclip import artifact as store
from kvclip.digests import DigestRecord
from kvclip.service import registry as registry_module
from kvclip.service.registry import CacheRegistry
from tests.hash_counting import count_hashes
from tests.manifests import V1_CACHES

NAMES = ("a", "b", "c", "d")


@pytest.fixture
def root(tmp_path) -> Path:
    for name in NAMES:
        shutil.copytree(V1_CACHES / "pets", tmp_path / "caches" / name)
    return tmp_path / "caches"


def corrupt(root: Path, name: str, version: str = "v0001") -> None:
    keys = root / name / "versions" / version / "image_keys.npy"
    keys.write_bytes(keys.read_bytes()[:-16])


def test_reload_loads_in_parallel_swaps_once_and_reports_each_failure(root, tiny_encoder, monkeypatch):
    corrupt(root, "c")
    changes: list[dict] = []
    registry = CacheRegistry(root, tiny_encoder, on_change=changes.append, load_workers=len(NAMES))
    together = threading.Barrier(len(NAMES), timeout=60)  # broken unless all loads run at once
    seen_during_loads = []
    real_load = registry_module.load_version

    def load_version(*args, **kwargs):
        together.wait()
        seen_during_loads.append(dict(registry.snapshot()))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(registry_module, "load_version", load_version)
    report = registry.reload()
    assert report.loaded == {"a": "v0001", "b": "v0001", "d": "v0001"}
    assert list(report.failed) == ["c"] and "checksum" in report.failed["c"] and "c" in registry.errors
    assert seen_during_loads == [{}] * len(NAMES)  # nothing swapped in while any load ran
    assert len(changes) == 1 and sorted(changes[0]) == ["a", "b", "d"] and registry.snapshot() is changes[0]


def test_a_version_that_fails_to_load_leaves_the_previous_one_serving(root, tiny_encoder):
    registry = CacheRegistry(root, tiny_encoder, load_workers=2)
    registry.reload()
    served = registry.snapshot()
    for name in ("a", "b"):  # a new version of each; b's is broken
        shutil.copytree(root / name / "versions" / "v0001", root / name / "versions" / "v0002")
        store.set_current(root / name, "v0002")
    corrupt(root, "b", "v0002")
    shutil.rmtree(root / "d")
    report = registry.reload()
    assert report.loaded == {"a": "v0002"} and list(report.failed) == ["b"] and report.removed == ["d"]
    assert registry.get("a").version == "v0002" and registry.get("b") is served["b"]
    assert registry.get("c") is served["c"] and sorted(registry.snapshot()) == ["a", "b", "c"]


def test_a_second_start_hashes_no_unchanged_file(root, tiny_encoder, monkeypatch):
    hashed = count_hashes(monkeypatch)
    record = root / ".digests.json"
    def start(mode: str = "changed") -> CacheRegistry:  # as the server: small caches need no FAISS index
        return CacheRegistry(root, tiny_encoder, digests=DigestRecord(record, mode, racy_s=0))

    first = start()
    assert sorted(first.reload().loaded) == list(NAMES)
    assert sum(hashed.values()) == 5 * len(NAMES) and record.is_file()  # the serving files, once each
    hashed.clear()
    second = start()
    assert sorted(second.reload().loaded) == list(NAMES) and hashed == Counter()
    full = start("full")
    assert sorted(full.reload().loaded) == list(NAMES)
    assert sum(hashed.values()) == len(NAMES) * len(store.read_manifest(root / "a" / "versions" / "v0001").files)


def test_parallel_loads_never_parse_two_npy_headers_at_once(root, tiny_encoder, monkeypatch):
    """numpy parses .npy headers with ast.literal_eval, which CPython 3.11 cannot run in two
    threads at once (a server start failed with "AST constructor recursion depth mismatch").
    The first np.load waits (up to 2 s) for another to start beside it; none may."""
    import numpy as np

    real_load = np.load
    inside, overlaps, first_call = [0], [], threading.Lock()
    second = threading.Event()

    def load(*args, **kwargs):
        inside[0] += 1
        try:
            if inside[0] > 1:
                overlaps.append(args[0])
                second.set()
            elif first_call.acquire(blocking=False):  # only the very first call waits
                second.wait(2)
            return real_load(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(np, "load", load)
    report = CacheRegistry(root, tiny_encoder, load_workers=len(NAMES)).reload()
    assert sorted(report.loaded) == sorted(NAMES)
    assert overlaps == []
