"""What dead builders leave in a cache folder is recognised by locks, not PIDs, and removed."""
from __future__ import annotations

import fcntl
import os

from kvclip import artifact as store
from tests.unit.test_artifact import make_artifact


def test_staging_named_after_a_live_pid_but_unlocked_is_removed(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))
    # PID 1 is always alive (in a container it is often the builder itself): the name says nothing
    dead = cache_dir / ".staging-1-deadbeef"
    dead.mkdir()
    (dead / "image_keys.npy").write_bytes(b"half written")
    store.publish(cache_dir, make_artifact(1))
    assert not dead.exists()


def test_staging_whose_writer_holds_its_lock_is_kept(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))
    live = cache_dir / f".staging-{os.getpid()}-cafecafe"
    live.mkdir()
    with open(live / ".writing", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        store.publish(cache_dir, make_artifact(1))
        assert live.is_dir()
    store.recover(cache_dir)
    assert not live.exists()


def test_pending_version_of_an_owner_waits_for_the_owner(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))
    version = store.publish(cache_dir, make_artifact(1), activate=False, owner="job1")
    assert store.pending_versions(cache_dir) == {version: "job1"}
    assert store.recover(cache_dir) == [] and store.list_versions(cache_dir) == ["v0001", version]
    # the owner's records say it will never finish: the version goes, CURRENT stays
    assert store.recover(cache_dir, orphaned=lambda owner: owner == "job1") == [version]
    assert store.list_versions(cache_dir) == ["v0001"] and store.current_version(cache_dir) == "v0001"
    assert store.pending_versions(cache_dir) == {}


def test_settled_version_is_never_removed(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))
    version = store.publish(cache_dir, make_artifact(1), activate=False, owner="job1")
    store.set_current(cache_dir, version)
    store.settle_version(cache_dir, version)
    assert store.recover(cache_dir, orphaned=lambda owner: True) == []
    assert store.load_cache(cache_dir).version == version


def test_a_current_version_is_kept_even_if_its_marker_was_left(tmp_path):
    cache_dir = tmp_path / "demo"
    version = store.publish(cache_dir, make_artifact(0), owner="job1")  # activated, not settled
    assert store.recover(cache_dir, orphaned=lambda owner: True) == []
    assert store.current_version(cache_dir) == version and store.pending_versions(cache_dir) == {}


def test_a_marker_whose_version_is_gone_is_dropped(tmp_path):
    cache_dir = tmp_path / "demo"
    store.publish(cache_dir, make_artifact(0))
    version = store.publish(cache_dir, make_artifact(1), activate=False, owner="job1")
    store.delete_version(cache_dir, version)  # e.g. DELETE /versions before the job settled it
    assert store.recover(cache_dir) == [] and store.pending_versions(cache_dir) == {}
