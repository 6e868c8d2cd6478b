"""The cache artifact: what a cache holds, and the only code that writes and reads versions.

On disk, one folder per cache:

    CACHE_DIR/
      CURRENT              name of the version readers load (replaced atomically)
      versions/v0001/      one immutable folder per published version
        manifest.json      kvclip.manifest.Manifest: schema, model, labels, prompts, counts, parameters, reports,
                           and the sha256 of every other file (written last)
        text_weights.npy   D x C      image_keys.npy    N x D     caption_keys.npy  N x D
        label_ids.npy      N          query_features.npy N x D (support images, plain view)
        image_keys.faiss   caption_keys.faiss              items.jsonl (path, label, caption, origin; prompt when synthetic)
      .staging-PID-*/      a version being written; never read

A zero-shot cache (built from labels only, with no synthetic images) has N = 0: its key arrays are 0 x D, items.jsonl
is empty, there are no .faiss files, and it serves the zero-shot method only.

Publishing writes a whole version into a staging folder, fsyncs it, renames it into
versions/ and only then points CURRENT at it. A crash at any moment leaves either the old
CURRENT or the new one, each naming a complete folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pydantic import ValidationError

from kvclip import index as key_index
from kvclip.blend import BlendParams, CacheTensors, check_method
from kvclip.errors import ArtifactError, ModelLoadError
from kvclip.hashing import sha256_file
from kvclip.manifest import SCHEMA_VERSION, Manifest
from kvclip.vocabulary import CACHE_NAME_RE, METHODS, VERSION_RE, version_name
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "items.jsonl"
_ARRAYS = ("text_weights", "image_keys", "caption_keys", "label_ids", "query_features")
_INDEXES = {"image_index": "image_keys.faiss", "caption_index": "caption_keys.faiss"}


@dataclass
class CacheArtifact:
    """One version of a cache, in memory."""

    labels: list[str]
    text_weights: np.ndarray  # D x C float32
    image_keys: np.ndarray  # N x D float32
    label_ids: np.ndarray  # N int64
    query_features: np.ndarray  # N x D float32: support images through the plain preprocess
    manifest: Manifest
    caption_keys: np.ndarray | None = None  # N x D float32
    items: list[dict] = field(default_factory=list)  # {"path", "label", "caption"}
    image_index: object | None = None  # faiss.Index
    caption_index: object | None = None
    version: str | None = None
    path: Path | None = None

    @property
    def temperature(self) -> float:
        return self.manifest.temperature

    @property
    def num_items(self) -> int:
        return int(self.label_ids.shape[0])

    @property
    def best_method(self) -> str:
        best = self.manifest.params.best_method
        return best if best in self.methods else "zeroshot"

    @property
    def methods(self) -> list[str]:
        """Methods this cache can serve: zero-shot only without support items; caps needs caption keys."""
        if self.num_items == 0:
            return ["zeroshot"]
        return [m for m in METHODS if m != "caps" or self.caption_keys is not None]

    def params(self, method: str) -> BlendParams:
        check_method(method)
        tuned = self.manifest.params.methods.get(method)
        return tuned.blend_params() if tuned else BlendParams()

    def tensors(self, device: torch.device | str | None = None) -> CacheTensors:
        return CacheTensors.build(
            torch.from_numpy(self.text_weights),
            torch.from_numpy(self.image_keys),
            torch.from_numpy(self.label_ids),
            None if self.caption_keys is None else torch.from_numpy(self.caption_keys),
            temperature=self.temperature,
            device=device,
        )


def validate_cache_name(name: str) -> str:
    if not CACHE_NAME_RE.match(name):
        raise ArtifactError(
            f"invalid cache name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return name


def list_versions(cache_dir: str | Path) -> list[str]:
    root = Path(cache_dir) / VERSIONS_DIR
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if VERSION_RE.match(p.name) and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda v: int(v[1:]))


def current_version(cache_dir: str | Path) -> str | None:
    try:
        name = (Path(cache_dir) / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def set_current(cache_dir: str | Path, version: str) -> None:
    """Point CURRENT at an existing, complete version (atomic rename)."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / VERSIONS_DIR / version / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{cache_dir}: no complete version {version!r}")
    tmp = cache_dir / f".{CURRENT_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(version + "\n")
    _fsync_file(tmp)
    os.replace(tmp, cache_dir / CURRENT_FILE)
    _fsync_dir(cache_dir)


def publish(cache_dir: str | Path, artifact: CacheArtifact, activate: bool = True) -> str:
    """Write `artifact` as the next version of the cache; returns the version name."""
    cache_dir = Path(cache_dir)
    (cache_dir / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(cache_dir)
    staging = cache_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_files(staging, artifact)
        with _locked(cache_dir):
            version = _next_version(cache_dir)
            files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
            manifest = artifact.manifest.model_copy(update={"version": version, "files": files})
            _write_json(staging / MANIFEST_FILE, manifest.to_json())
            _fsync_dir(staging)
            os.rename(staging, cache_dir / VERSIONS_DIR / version)
            _fsync_dir(cache_dir / VERSIONS_DIR)
            if activate:
                set_current(cache_dir, version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    artifact.manifest, artifact.version, artifact.path = manifest, version, cache_dir / VERSIONS_DIR / version
    return version


def load_cache(
    cache_dir: str | Path, version: str | None = None, verify: bool = True, indexes: bool = True
) -> CacheArtifact:
    """Read one version (CURRENT by default), checking every file against the manifest."""
    cache_dir = Path(cache_dir)
    version = version or current_version(cache_dir)
    if version is None:
        raise ArtifactError(f"{cache_dir}: not a kvclip cache (no {CURRENT_FILE}); build one with 'kvclip build'")
    folder = cache_dir / VERSIONS_DIR / version
    manifest = read_manifest(folder)
    files = manifest.files
    if verify:
        for name, digest in files.items():
            path = folder / name
            if not path.is_file() or sha256_file(path) != digest:
                raise ArtifactError(f"{path}: missing or corrupt (checksum mismatch)")
    arrays = {
        name: np.load(folder / f"{name}.npy", allow_pickle=False)
        for name in _ARRAYS
        if f"{name}.npy" in files
    }
    items = [json.loads(line) for line in (folder / ITEMS_FILE).read_text().splitlines() if line]
    loaded: dict[str, Any] = {
        attr: key_index.read_index(folder / fname)
        for attr, fname in _INDEXES.items()
        if indexes and fname in files
    }
    return CacheArtifact(
        labels=list(manifest.labels),
        items=items,
        manifest=manifest,
        version=version,
        path=folder,
        **arrays,
        **loaded,
    )


def read_manifest(folder: str | Path) -> Manifest:
    """A version folder's manifest.json, validated; an unknown schema version is an error."""
    folder = Path(folder)
    try:
        raw = json.loads((folder / MANIFEST_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{folder}: missing or unreadable {MANIFEST_FILE} ({exc})") from exc
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    if found != SCHEMA_VERSION:
        raise ArtifactError(f"{folder}: schema version {found} is not {SCHEMA_VERSION}; rebuild the cache")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{folder}: {MANIFEST_FILE} is not a valid cache manifest: {exc}") from exc


def delete_version(cache_dir: str | Path, version: str) -> None:
    """Remove one version's folder; the version CURRENT names is never removed."""
    cache_dir = Path(cache_dir)
    if not VERSION_RE.match(version):
        raise ArtifactError(f"invalid version name {version!r}: expected v0001, v0002, ...")
    folder = cache_dir / VERSIONS_DIR / version
    with _locked(cache_dir):
        if current_version(cache_dir) == version:
            raise ArtifactError(f"{cache_dir}: {version} is the current version; activate another one first")
        if not folder.is_dir():
            raise ArtifactError(f"{cache_dir}: no version {version!r}")
        # Rename first so a reader never sees a half-deleted version folder.
        trash = cache_dir / f".deleted-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(folder, trash)
        _fsync_dir(cache_dir / VERSIONS_DIR)
    shutil.rmtree(trash, ignore_errors=True)


def check_model_matches(encoder, artifact: CacheArtifact) -> None:
    """Features from another model are meaningless against this cache's keys.

    `encoder` is a kvclip.models.Encoder. Weights are compared by sha256 when both sides
    have one, otherwise by model name.
    """
    built = artifact.manifest.model
    ours, theirs = encoder.weights_sha256, built.weights_sha256
    if ours and theirs:
        if ours != theirs:
            raise ModelLoadError(
                f"cache {artifact.path} was built with {built.id} (weights sha256 "
                f"{theirs[:12]}…), not with {encoder.model_id} ({ours[:12]}…); "
                "use the same model or rebuild the cache"
            )
    elif built.id != encoder.model_id:
        raise ModelLoadError(
            f"cache {artifact.path} was built with {built.id}, not with {encoder.model_id}; "
            "use the same model or rebuild the cache"
        )


def _write_files(folder: Path, artifact: CacheArtifact) -> None:
    for name in _ARRAYS:
        array = getattr(artifact, name)
        if array is not None:
            with open(folder / f"{name}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
                _flush(fh)
    with open(folder / ITEMS_FILE, "w", encoding="utf-8") as fh:
        for item in artifact.items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        _flush(fh)
    for attr, fname in _INDEXES.items():
        index = getattr(artifact, attr)
        if index is not None:
            key_index.write_index(index, folder / fname)
            _fsync_file(folder / fname)


def _next_version(cache_dir: Path) -> str:
    root = cache_dir / VERSIONS_DIR
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := VERSION_RE.match(p.name))]
    return version_name(max(numbers, default=0) + 1)


def _remove_dead_staging(cache_dir: Path) -> None:
    """Staging folders of builders that died (their pid is gone) are garbage."""
    for path in cache_dir.glob(".staging-*"):
        try:
            pid = int(path.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


@contextlib.contextmanager
def _locked(cache_dir: Path):
    with open(cache_dir / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        _flush(fh)


def _flush(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)
