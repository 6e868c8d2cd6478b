"""Unpack an uploaded build archive (zip or tar) safely: no paths outside the target, no
links or devices, and limits on file count and unpacked bytes (zip bombs)."""
from __future__ import annotations

import errno
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from kvclip.errors import DataError

_CHUNK = 1 << 20


class ArchiveError(DataError):
    """The archive is not usable; the message says why (answered 400)."""


class ArchiveTooLarge(ArchiveError):
    """The archive holds too many files or unpacks to too many bytes (answered 413)."""


Charge = Callable[[int], None]  # told each chunk's size as it is written; raises to stop


def extract_archive(src: Path, dest: Path, max_files: int, max_bytes: int, charge: Charge | None = None) -> Path:
    """Unpack `src` into `dest`; returns the data root (a lone top-level folder is unwrapped,
    so an archive of `pets/cat/...` reads like one of `cat/...`). `charge` sees every chunk
    written (a budget shared with other uploads, free disk space)."""
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(max_files, max_bytes, charge)
    if zipfile.is_zipfile(src):
        _extract_zip(src, dest, budget)
    elif _is_tar(src):
        _extract_tar(src, dest, budget)
    else:
        raise ArchiveError("the upload is neither a zip nor a tar archive (.zip, .tar, .tar.gz, .tgz)")
    return _data_root(dest)


def _is_tar(src: Path) -> bool:
    try:
        return tarfile.is_tarfile(src)
    except OSError:
        return False


def _safe_relative(name: str) -> PurePosixPath | None:
    """The member's path inside the archive, or None for entries to ignore (folders, macOS
    resource forks); refuses absolute paths and '..'."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"archive member {name!r} points outside the archive")
    if not path.parts or "__MACOSX" in path.parts or path.name.startswith("._"):
        return None
    return path


class _Budget:
    def __init__(self, max_files: int, max_bytes: int, charge: Charge | None = None) -> None:
        self.files, self.bytes = 0, 0
        self.max_files, self.max_bytes, self.charge = max_files, max_bytes, charge

    def add_file(self) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise ArchiveTooLarge(f"the archive holds more than {self.max_files} files")

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise ArchiveTooLarge(f"the archive unpacks to more than {self.max_bytes} bytes")
        if self.charge is not None:
            self.charge(n)


def _copy_limited(src, target: Path, budget: _Budget, name: str) -> None:
    # Count bytes as written: a member's declared size can lie.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            while chunk := src.read(_CHUNK):
                budget.add_bytes(len(chunk))
                out.write(chunk)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArchiveTooLarge("the server has no disk space left to unpack the archive") from exc
        # A name too long for the file system, a file and a folder of the same name, ...
        raise ArchiveError(f"archive member {name!r} cannot be unpacked: {exc.strerror or exc}") from exc


def _extract_zip(src: Path, dest: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(src) as archive:
            for info in archive.infolist():
                rel = _safe_relative(info.filename)
                if rel is None or info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ArchiveError(f"archive member {info.filename!r} is a symbolic link")
                budget.add_file()
                if info.flag_bits & 0x1:
                    raise ArchiveError(f"archive member {info.filename!r} is encrypted; upload an unencrypted archive")
                with archive.open(info) as member:
                    _copy_limited(member, dest / rel, budget, info.filename)
    # zipfile raises NotImplementedError for compression methods it cannot read, RuntimeError
    # for encryption it was not given a password for.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
        raise ArchiveError(f"the zip archive is unreadable: {exc}") from exc


def _extract_tar(src: Path, dest: Path, budget: _Budget) -> None:
    try:
        with tarfile.open(src) as archive:
            for member in archive:
                rel = _safe_relative(member.name)
                if rel is None or member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveError(f"archive member {member.name!r} is a link or device, not a file")
                budget.add_file()
                source = archive.extractfile(member)
                if source is not None:
                    _copy_limited(source, dest / rel, budget, member.name)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"the tar archive is unreadable: {exc}") from exc


def _data_root(dest: Path) -> Path:
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if not p.name.startswith(".")]
        if inner and all(p.is_dir() for p in inner):
            return entries[0]
    return dest
