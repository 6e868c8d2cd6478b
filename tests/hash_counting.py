"""Count the files kvclip.digests hashes (a test helper): names -> times hashed."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from kvclip import digests
from kvclip.hashing import sha256_file


def count_hashes(monkeypatch) -> Counter:
    """Every file a DigestRecord hashes from now on, counted by name (the record's own counter
    would not see a load that bypassed the record)."""
    counts: Counter = Counter()

    def counting(path, *args, **kwargs):
        counts[Path(path).name] += 1
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(digests, "sha256_file", counting)
    return counts
