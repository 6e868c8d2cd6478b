"""A JSON-lines file as a read-only sequence whose lines are parsed when they are read.

A served cache reads a handful of its support items per explained query (kvclip/service/classify.py)
and one per thumbnail, never all of them. Parsing items.jsonl into a dict per line cost a
server about 7 MiB and tens of milliseconds of start per 16k-item cache, holding the GIL; the
file's bytes and two offset arrays cost a fraction of that and parse nothing at start.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np


class JsonLines(Sequence[dict[str, Any]]):
    """The non-empty lines of `data` (UTF-8 JSON, one value per line); immutable, thread-safe."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
        starts = np.concatenate(([0], newlines + 1))
        ends = np.concatenate((newlines, [len(data)]))
        keep = ends > starts  # blank lines, and the empty tail after the last newline, are no items
        self._starts, self._ends = starts[keep], ends[keep]

    def __len__(self) -> int:
        return int(self._starts.shape[0])

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"item {index} out of range ({n} items)")
        i = index % n
        return json.loads(self._data[int(self._starts[i]):int(self._ends[i])])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same items, as the list of dicts it replaces was."""
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # compared by content, like a list

    def __repr__(self) -> str:
        return f"JsonLines({len(self)} items)"
