"""Digests remembered per file identity (kvclip/digests.py), as cache loads and the model use them."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from kvclip import artifact as store
from kvclip.digests import DigestRecord
from kvclip.errors import ArtifactError
from kvclip.hashing import sha256_file
from kvclip.models import load_encoder
from tests.hash_counting import count_hashes
from tests.manifests import V1_CACHES

SERVED = {"text_weights.npy", "image_keys.npy", "caption_keys.npy", "label_ids.npy", "items.jsonl"}


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    return count_hashes(monkeypatch)


@pytest.fixture
def cache(tmp_path) -> Path:
    return Path(shutil.copytree(V1_CACHES / "pets", tmp_path / "caches" / "pets"))


def serve_load(cache: Path, record: DigestRecord) -> store.CacheArtifact:
    """What the server loads (kvclip.service.registry.load_version): serving arrays, no indexes."""
    return store.load_cache(cache, arrays=store.SERVING_ARRAYS, mmap=True, index_min_items=65_536, digests=record)


def record_at(cache: Path, mode: str = "changed", racy_s: float = 0.0) -> DigestRecord:
    # racy_s=0: the files were copied a moment ago, and tests must not wait for them to settle.
    return DigestRecord(cache.parent / ".digests.json", mode, racy_s=racy_s)


def version_file(cache: Path, name: str) -> Path:
    return cache / "versions" / "v0001" / name


def claim(path: Path, sha256: str, ctime_shift: int = 0) -> None:
    """Write the cache's digest record saying that `path`, as it is now, has `sha256`."""
    st = path.stat()
    entry = {"path": os.path.abspath(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns + ctime_shift, "sha256": sha256}
    (path.parents[3] / ".digests.json").write_text(json.dumps({"version": 1, "files": [entry]}))


def test_an_unchanged_file_is_hashed_once_across_starts(cache, hashed):
    first = record_at(cache)
    serve_load(cache, first)
    assert set(hashed) == SERVED and all(n == 1 for n in hashed.values())  # only what serving reads
    first.save()
    hashed.clear()
    second = record_at(cache)  # the next start reads the record back
    loaded = serve_load(cache, second)
    assert hashed == Counter() and second.hashed == 0
    assert loaded.num_items == 4 and loaded.items[1]["label"] == "cat"


def test_a_file_changed_in_place_is_hashed_again_and_caught(cache, hashed):
    first = record_at(cache)
    serve_load(cache, first)
    first.save()
    keys = version_file(cache, "image_keys.npy")
    keys.write_bytes(keys.read_bytes()[:-16])  # new content: new size and mtime
    hashed.clear()
    with pytest.raises(ArtifactError, match="image_keys.npy: missing or corrupt"):
        serve_load(cache, record_at(cache))
    assert hashed["image_keys.npy"] == 1


def test_a_file_replaced_with_its_old_size_and_mtime_is_caught(cache):
    first = record_at(cache)
    serve_load(cache, first)
    first.save()
    keys = version_file(cache, "image_keys.npy")
    old = keys.stat()
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF
    replacement = keys.with_name("replacement")
    replacement.write_bytes(bytes(data))
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(replacement, keys)  # same size and mtime, another inode
    with pytest.raises(ArtifactError, match="image_keys.npy: missing or corrupt"):
        serve_load(cache, record_at(cache))


def test_the_record_is_trusted_only_for_the_exact_identity_ctime_included(cache):
    """A same-size edit with its mtime set back keeps (dev, inode, size, mtime); only ctime
    tells. A record entry made to match all but ctime must not be trusted."""
    keys = version_file(cache, "image_keys.npy")
    good = store.read_manifest(keys.parent).files["image_keys.npy"]
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF
    keys.write_bytes(bytes(data))  # corrupt, same size
    claim(keys, good, ctime_shift=-1)
    with pytest.raises(ArtifactError, match="image_keys.npy: missing or corrupt"):
        serve_load(cache, record_at(cache))
    claim(keys, good)  # the control: the very same identity is trusted (so the test above means something)
    serve_load(cache, record_at(cache))


def test_full_mode_hashes_every_file_of_the_version_again(cache, hashed):
    first = record_at(cache)
    serve_load(cache, first)
    first.save()
    hashed.clear()
    serve_load(cache, record_at(cache, "full"))
    files = store.read_manifest(version_file(cache, "")).files
    assert set(hashed) == set(files) and all(n == 1 for n in hashed.values())  # unread files too
    assert {"query_features.npy", "image_keys.faiss"} <= set(hashed)


def test_full_mode_catches_a_corrupt_file_the_record_vouched_for(cache):
    """The record keeps the files' digests, not a verdict: full mode re-reads the bytes."""
    keys = version_file(cache, "image_keys.npy")
    good = store.read_manifest(keys.parent).files["image_keys.npy"]
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF
    keys.write_bytes(bytes(data))
    claim(keys, good)
    with pytest.raises(ArtifactError, match="image_keys.npy: missing or corrupt"):
        serve_load(cache, record_at(cache, "full"))


def test_a_file_changed_just_before_hashing_is_not_remembered(cache, hashed):
    """Timestamps are coarse: a write in the same tick would keep the identity, so a fresh
    file is hashed again next time (git's racy-clean rule)."""
    first = record_at(cache, racy_s=3600)  # every file here is younger than that
    serve_load(cache, first)
    first.save()
    hashed.clear()
    serve_load(cache, record_at(cache))
    assert set(hashed) == SERVED


@pytest.mark.parametrize("content", ["not json", '{"version": 1, "files": [{"path": "/x", "dev": 1}]}',
                                     '{"version": 99, "files": []}'])
def test_an_unusable_record_is_ignored_and_everything_hashed(cache, hashed, caplog, content):
    (cache.parent / ".digests.json").write_text(content)
    serve_load(cache, record_at(cache))
    assert set(hashed) == SERVED
    assert "digest record" in caplog.text


def test_a_record_that_cannot_be_written_is_logged_not_raised(cache, caplog):
    record = DigestRecord(cache.parent / "missing-folder" / ".digests.json", racy_s=0)
    serve_load(cache, record)
    record.save()
    assert "could not write the digest record" in caplog.text
    assert record.sha256(version_file(cache, "items.jsonl")) and record.hashed == len(SERVED)  # in memory still


def test_processes_sharing_a_record_merge_into_it(cache, hashed):
    """Replicas on one volume each save what they hashed; neither drops the other's digests."""
    files = [version_file(cache, name) for name in sorted(SERVED)]
    first, second = record_at(cache), record_at(cache)  # both read the record before either saved
    for path in files[:2]:
        first.sha256(path)
    for path in files[2:]:
        second.sha256(path)
    first.save()
    second.save()
    hashed.clear()
    third = record_at(cache)
    for path in files:
        third.sha256(path)
    assert hashed == Counter()


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="changed, full"):
        DigestRecord(None, "sometimes")


def test_the_model_checkpoint_is_hashed_once_across_starts(tmp_path, tiny_encoder, hashed):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), checkpoint)
    record = DigestRecord(tmp_path / ".digests.json", racy_s=0)
    first = load_encoder(f"kvclip-tiny:{checkpoint}", device="cpu", digests=record)
    record.save()
    assert hashed == Counter({"tiny.pt": 1}) and first.weights_sha256 == sha256_file(checkpoint)
    again = load_encoder(f"kvclip-tiny:{checkpoint}", device="cpu",
                         digests=DigestRecord(tmp_path / ".digests.json", racy_s=0))
    assert hashed == Counter({"tiny.pt": 1}) and again.weights_sha256 == first.weights_sha256
    load_encoder(f"kvclip-tiny:{checkpoint}", device="cpu",
                 digests=DigestRecord(tmp_path / ".digests.json", "full", racy_s=0))
    assert hashed == Counter({"tiny.pt": 2})
