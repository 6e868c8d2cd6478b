"""The heaps of a serving process: the C heap's free pages handed back to the OS after cache
loads, and the objects start-up made kept out of the garbage collector's scans.

Loading a cache computes its blend terms in float64 chunks (kvclip/blend.py): tens of MiB of
temporaries per cache. glibc raises its mmap threshold after the first such free, so later
temporaries come from the heap, and the small tensors each cache keeps are placed among
them; the freed space then stays resident. Measured: 61 MiB of anonymous memory kept per
16k-key cache, 1.9 MiB after malloc_trim(0). No library wraps malloc_trim; this is ctypes.
"""
from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only (not musl, not macOS)


def release_free_heap() -> bool:
    """glibc's malloc_trim(0): free pages of every arena go back to the OS. False where there is none."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def freeze_start_up_objects() -> int:
    """gc.freeze() once start-up is done; returns the number of objects frozen.

    Start-up leaves ~450k objects that live as long as the process (the modules of torch,
    open_clip and the app, the model). A full collection scans them all, holding the GIL for
    0.2-0.3 s while every request waits (docs/server.md, scripts/bench_gc_pauses.py); frozen,
    collections scan only what came later. The young garbage goes first (milliseconds); what
    little older garbage there is stays, once."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()
