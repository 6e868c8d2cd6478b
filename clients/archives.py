"""Local build inputs: data folders zipped for upload, existing archives, label/template files."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from kvclip.clients.errors import InputError
from kvclip.textfiles import parse_labels, parse_templates

_ARCHIVE_TYPES = {".zip": "application/zip", ".tar": "application/x-tar",
                  ".tar.gz": "application/gzip", ".tgz": "application/gzip"}
# Already compressed: deflating them again costs CPU and saves nothing.
_STORED = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".zip", ".gz"}


def archive_type(path: Path) -> str | None:
    """The content type of a supported archive name, else None."""
    name = path.name.lower()
    for suffix, content_type in _ARCHIVE_TYPES.items():
        if name.endswith(suffix):
            return content_type
    return None


@contextlib.contextmanager
def open_upload(source: str | os.PathLike, what: str) -> Iterator[tuple[str, BinaryIO, str]]:
    """(file name, open binary file, content type) for a folder or an existing archive.

    A folder is written to an anonymous temporary zip, so the upload streams from disk
    instead of holding the whole data set in memory; the file disappears when closed.
    """
    path = Path(source)
    if path.is_dir():
        with tempfile.TemporaryFile(prefix="kvclip-upload-", suffix=".zip") as tmp:
            zip_folder(path, tmp, what)
            tmp.seek(0)
            yield f"{path.resolve().name or what}.zip", tmp, "application/zip"
    elif path.is_file():
        content_type = archive_type(path)
        if content_type is None:
            raise InputError(f"{what} {path} is neither a folder nor a .zip, .tar, .tar.gz or .tgz archive")
        with open(path, "rb") as file:
            yield path.name, file, content_type
    else:
        raise InputError(f"{what} {path} does not exist")


def zip_folder(folder: Path, out: BinaryIO, what: str = "folder") -> int:
    """Zip every file under folder (paths relative to it, hidden files skipped); returns the count.

    The archive holds <label>/<image> (and <image>.txt captions) at its root.
    """
    count = 0
    with zipfile.ZipFile(out, "w") as archive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = Path(root) / name
                compression = zipfile.ZIP_STORED if path.suffix.lower() in _STORED else zipfile.ZIP_DEFLATED
                archive.write(path, path.relative_to(folder).as_posix(), compress_type=compression)
                count += 1
    if count == 0:
        raise InputError(f"{what} {folder} holds no files")
    return count


def read_labels(labels: Sequence[str] | str | os.PathLike) -> list[str]:
    """A list as given, or a labels file: one label per line, blank lines skipped."""
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        found = parse_labels(_read_text(path, "labels file"))
        if not found:
            raise InputError(f"labels file {path} lists no labels")
        return found
    return list(labels)


def read_templates(templates: Sequence[str] | str | os.PathLike) -> list[str]:
    """A list as given, or a file read as `kvclip build --templates` reads it (JSON list, or one
    template per line; '#' lines are comments)."""
    if isinstance(templates, (str, os.PathLike)):
        text = _read_text(Path(templates), "templates file")
        try:
            return list(parse_templates(text))
        except json.JSONDecodeError as exc:
            raise InputError(f"{templates} is not valid JSON: {exc}") from exc
    return list(templates)


def read_descriptions(descriptions: dict[str, list[str]] | str | os.PathLike) -> dict[str, list[str]]:
    """A dict as given, or a JSON file {label: [sentence, ...]}."""
    if isinstance(descriptions, (str, os.PathLike)):
        return dict(_json(_read_text(Path(descriptions), "descriptions file"), descriptions))
    return dict(descriptions)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _json(text: str, source: object):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is not valid JSON: {exc}") from exc
