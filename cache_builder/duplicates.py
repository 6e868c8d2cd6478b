"""Duplicate support images, found after encoding: exact ones dropped (by default), near ones reported.

A support set with copies in it defeats leave-one-out (a query meets its own copy, so every
cache method reads ~1.0 and the tuner picks parameters for that) and weighs the copied image
twice. Two kinds, grouped (connected components: a ~ b ~ c is one group):

- exact: the same file bytes (sha256), or plain-view features equal to within EXACT_FEATURE_TOL
  (the same pixels in another container). Dropped by default, keeping one copy per class.
- near: plain-view cosine >= NEAR_DUPLICATE_COSINE (a resized or re-compressed copy, a crop).
  Reported, kept; the tuner's leave-one-out excludes a query's near duplicates with it
  (cache_builder/tune.py duplicate_mask).

A group whose copies carry different labels (the same image labelled twice) is a conflict:
reported prominently, and one copy per label is kept, since the build cannot know which label
is right.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvclip.hashing import sha256_file
from kvclip.vocabulary import NEAR_DUPLICATE_COSINE

# Largest absolute difference of two plain-view feature vectors that still counts as the same image.
EXACT_FEATURE_TOL = 1e-6
_CHUNK = 1024  # query rows per similarity block: O(chunk x N) memory, never O(N x N)


@dataclass
class DuplicateGroup:
    kind: str  # "exact" or "near"
    members: list[int]  # item indices, ascending
    labels: list[str]  # each member's label
    min_cosine: float  # the lowest plain-view cosine of the group's linked pairs
    same_bytes: bool = False  # every member has the same file bytes
    dropped: list[int] = field(default_factory=list)

    @property
    def cross_class(self) -> bool:
        return len(set(self.labels)) > 1


@dataclass
class Duplicates:
    groups: list[DuplicateGroup]
    near_cosine: float = NEAR_DUPLICATE_COSINE

    @property
    def dropped(self) -> list[int]:
        return sorted(i for g in self.groups for i in g.dropped)

    @property
    def conflicts(self) -> list[DuplicateGroup]:
        return [g for g in self.groups if g.cross_class]


def find_duplicates(
    paths: Sequence[Path],
    labels: Sequence[str],
    features: torch.Tensor,
    near_cosine: float = NEAR_DUPLICATE_COSINE,
    drop: bool = True,
) -> Duplicates:
    """Exact and near duplicate groups of the items (`features`: N x D plain-view, L2-normalised).

    `drop`: mark every exact copy but the first of each label for dropping."""
    n = len(paths)
    digests = [_digest(p) for p in paths]
    exact, near = _Components(n), _Components(n)
    for i, j in _same_digest_pairs(digests):
        exact.union(i, j)
        near.union(i, j)
    features = features.float()
    link_cosine: dict[int, float] = {}
    for start in range(0, n, _CHUNK):
        sims = features[start:start + _CHUNK] @ features.T
        rows, cols = torch.nonzero(sims >= near_cosine, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c <= i:
                continue
            cosine = float(sims[r, c])
            if float((features[i] - features[c]).abs().max()) <= EXACT_FEATURE_TOL:
                exact.union(i, c)
            near.union(i, c)
            for k in (i, c):
                link_cosine[k] = min(link_cosine.get(k, 1.0), cosine)
    groups = []
    for members in exact.groups():
        group = DuplicateGroup("exact", members, [labels[i] for i in members],
                               min(link_cosine.get(i, 1.0) for i in members),
                               same_bytes=len({digests[i] for i in members}) == 1)
        if drop:
            seen: set[str] = set()
            for i in members:
                if labels[i] in seen:
                    group.dropped.append(i)
                seen.add(labels[i])
        groups.append(group)
    exact_of = exact.roots()
    for members in near.groups():
        if len({exact_of[i] for i in members}) > 1:  # more than one distinct image: near duplicates
            groups.append(DuplicateGroup("near", members, [labels[i] for i in members],
                                         min(link_cosine.get(i, 1.0) for i in members)))
    groups.sort(key=lambda g: (not g.cross_class, g.members[0]))  # conflicts first
    return Duplicates(groups, near_cosine)


def _digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:  # read once already; a file gone since is compared by its features alone
        return None


def _same_digest_pairs(digests: Sequence[str | None]) -> list[tuple[int, int]]:
    first: dict[str, int] = {}
    pairs = []
    for i, digest in enumerate(digests):
        if digest is None:
            continue
        if digest in first:
            pairs.append((first[digest], i))
        else:
            first[digest] = i
    return pairs


class _Components:
    """Union-find over item indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def roots(self) -> list[int]:
        return [self.find(i) for i in range(len(self.parent))]

    def groups(self) -> list[list[int]]:
        """Components of two or more members, each ascending."""
        by_root: dict[int, list[int]] = defaultdict(list)
        for i, root in enumerate(self.roots()):
            by_root[root].append(i)
        return [members for members in by_root.values() if len(members) > 1]


def duplicates_report(duplicates: Duplicates, paths: Sequence[Path], kept: bool) -> dict:
    """The build report's `duplicates` (kvclip.manifest.DuplicatesReport)."""
    groups = duplicates.groups
    return {
        "near_cosine": duplicates.near_cosine,
        "kept": kept,
        "exact_groups": sum(g.kind == "exact" for g in groups),
        "near_groups": sum(g.kind == "near" for g in groups),
        "cross_class_groups": len(duplicates.conflicts),
        "dropped": len(duplicates.dropped),
        "groups": [{"kind": g.kind, "cross_class": g.cross_class, "same_bytes": g.same_bytes,
                    "min_cosine": round(g.min_cosine, 6),
                    "items": [{"path": str(paths[i]), "label": label, "dropped": i in g.dropped}
                              for i, label in zip(g.members, g.labels)]}
                   for g in groups],
    }
