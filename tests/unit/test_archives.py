"""Malformed upload archives are refused with a reason (400 bad_archive at the HTTP edge), never a crash."""
from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from kvclip.service.archives import ArchiveError, ArchiveTooLarge, extract_archive

PNG = b"\x89PNG\r\n\x1a\n"  # contents do not matter to unpacking


def make_zip(path: Path, members: list[tuple[str, bytes]], encrypt: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data)
    if encrypt:  # zipfile cannot encrypt: set the "encrypted" flag bit in the local and central headers
        raw = bytearray(path.read_bytes())
        for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = raw.find(signature)
            raw[at + offset] |= 0x1
        path.write_bytes(bytes(raw))
    return path


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def unpack(src: Path, tmp_path: Path) -> Path:
    return extract_archive(src, tmp_path / "out", max_files=100, max_bytes=1 << 20)


LONG = "cat/" + "x" * 300 + ".png"  # one path component over the 255-byte limit of every common file system
CASES = {
    "long member name": [(LONG, PNG)],
    "file then folder of the same name": [("cat", PNG), ("cat/a.png", PNG)],
    "folder then file of the same name": [("cat/a.png", PNG), ("cat", PNG)],
}


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_unpackable_members_are_archive_errors(tmp_path, kind, case):
    maker = make_zip if kind == "zip" else make_tar
    src = maker(tmp_path / f"upload.{kind}", CASES[case])
    with pytest.raises(ArchiveError, match="cannot be unpacked") as info:
        unpack(src, tmp_path)
    assert not isinstance(info.value, ArchiveTooLarge)


def test_an_encrypted_zip_is_refused_by_name(tmp_path):
    src = make_zip(tmp_path / "secret.zip", [("cat/a.png", PNG)], encrypt=True)
    with pytest.raises(ArchiveError, match="'cat/a.png' is encrypted"):
        unpack(src, tmp_path)


def test_a_good_archive_still_unpacks(tmp_path):
    src = make_zip(tmp_path / "ok.zip", [("pets/cat/a.png", PNG), ("pets/dog/b.png", PNG)])
    root = unpack(src, tmp_path)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == ["cat/a.png", "dog/b.png"]
