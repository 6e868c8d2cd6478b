"""sha256 digests of files, remembered per file identity so an unchanged file is hashed once.

A server start used to hash every cache file and the model checkpoint again (hundreds of MB
per start). Published versions are immutable and a checkpoint is never edited in place, so a
digest verified once stays true while the file keeps its identity: device, inode, size,
mtime and ctime (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns). Writing to a file
changes its mtime and ctime (ctime cannot be set back, unlike mtime: `rsync --inplace -t`
or `touch -d` keep an mtime, not a ctime), and replacing it gives a new inode; either way
the file is hashed again. As in git's "racy clean" rule, a file changed within RACY_S of
being hashed is not remembered: timestamps are coarse (a clock tick, 2 s on FAT), so a second
write in the same tick could leave the identity as it was. The record is one JSON file,
written atomically; an unreadable or invalid record is logged and ignored (everything is
hashed again), never trusted in part.

Whoever can write the record can also write the files and their manifest, so the record
adds no new way to make a corrupt file pass.

Mode "changed" trusts the record; mode "full" hashes every file again (and refreshes it).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from kvclip.hashing import sha256_file
from kvclip.vocabulary import VERIFY_MODES

log = logging.getLogger("kvclip.digests")
RECORD_VERSION = 1
RACY_S = 2.0


class _Entry(BaseModel):
    path: str  # where it was seen: entries of files that are gone are dropped
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _RecordFile(BaseModel):
    version: int = RECORD_VERSION
    files: list[_Entry] = Field(default_factory=list)


@dataclass(frozen=True)
class _Identity:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str) -> _Identity:
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class _Known:
    identity: _Identity
    path: str
    sha256: str


_Entries = dict[tuple[int, int], _Known]  # by (device, inode): replicas on other nodes may see other devices


class DigestRecord:
    """Thread-safe: parallel cache loads share one record; `save` writes it once after them.
    Processes sharing a record (replicas on one volume) merge into it; a lost race costs a re-hash."""

    def __init__(self, path: Path | None, mode: str = "changed", racy_s: float | None = None) -> None:
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify mode must be one of {', '.join(VERIFY_MODES)}, not {mode!r}")
        self.path = path  # None: remembered in memory only
        self.mode = mode
        self.racy_ns = int((RACY_S if racy_s is None else racy_s) * 1e9)
        self.hashed = 0  # files hashed by this record (the rest were remembered)
        self._entries: _Entries = _read(path) if path is not None else {}
        self._added: _Entries = {}  # since the last save
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def sha256(self, path: str | Path) -> str:
        """The file's sha256: remembered when its identity is unchanged (mode "changed"), else hashed."""
        where = os.path.abspath(path)
        before = _Identity.of(where)
        with self._lock:
            known = self._entries.get((before.dev, before.ino))
        if known is not None and known.identity == before and not self.full:
            return known.sha256
        digest = sha256_file(where)
        after = _Identity.of(where)
        settled = time.time_ns() - max(after.mtime_ns, after.ctime_ns) >= self.racy_ns
        with self._lock:
            self.hashed += 1
            if after == before and settled:  # else it changed while or just before being hashed
                self._entries[(after.dev, after.ino)] = self._added[(after.dev, after.ino)] = _Known(
                    after, where, digest)
        return digest

    def save(self) -> None:
        """Merge what was hashed since the last save into the record file (atomic rename), dropping
        files that are gone. A record that cannot be written is logged: digests are then remembered
        by this process only."""
        if self.path is None:
            return
        with self._lock:
            added, self._added = self._added, {}
        if not added:
            return
        merged = {key: known for key, known in {**_read(self.path), **added}.items() if os.path.exists(known.path)}
        body = _RecordFile(files=[_Entry(path=merged[key].path, **asdict(merged[key].identity),
                                         sha256=merged[key].sha256) for key in sorted(merged)])
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(body.model_dump_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("could not write the digest record %s (%s): files will be hashed again at the next "
                        "start", self.path, exc)


def _read(path: Path) -> _Entries:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("could not read the digest record %s (%s): every file is hashed again", path, exc)
        return {}
    try:
        record = _RecordFile.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        log.warning("the digest record %s is invalid (%s): every file is hashed again", path, exc)
        return {}
    if record.version != RECORD_VERSION:
        log.warning("the digest record %s has version %s, not %s: every file is hashed again",
                    path, record.version, RECORD_VERSION)
        return {}
    return {(e.dev, e.ino): _Known(_Identity(e.dev, e.ino, e.size, e.mtime_ns, e.ctime_ns), e.path, e.sha256)
            for e in record.files}
