"""kvclip/heap.py: the C heap's free pages go back after a cache's tensors are built."""
from __future__ import annotations

import platform

import pytest

from kvclip import artifact as store
from kvclip import heap
from tests.unit.test_artifact import make_artifact


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_is_found_on_glibc():
    assert heap.release_free_heap() is True


def test_building_a_caches_tensors_releases_the_free_heap(monkeypatch):
    calls = []
    monkeypatch.setattr(store, "release_free_heap", lambda: calls.append(1) or True)
    make_artifact().tensors("cpu")
    assert calls == [1]
