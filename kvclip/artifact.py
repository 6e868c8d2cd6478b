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
        key_log_partitions.npy N    class_image_sums.npy C x D    class_caption_sums.npy C x D (with caption keys)
        class_log_partition_sums.npy C
                           the blend's derived terms (kvclip.blend.derived_arrays at the manifest's
                           derived_temperature), so a server reads them instead of computing them;
                           versions published before them lack them and compute them at load
      .staging-PID-*/      a version being written; never read (its .writing file is locked while it is)
      .pending-v0002       a version renamed into versions/ whose build has not finished yet

A zero-shot cache (built from labels only, with no synthetic images) has N = 0: its key arrays are 0 x D, items.jsonl
is empty, there are no .faiss files nor derived arrays (nothing to save computing), and it serves the
zero-shot method only.

Publishing writes a whole version into a staging folder, fsyncs it, renames it into
versions/ and only then points CURRENT at it. A crash at any moment leaves either the old
CURRENT or the new one, each naming a complete folder.

A version is renamed into versions/ before CURRENT points at it, so a crash in between would
leave a version no build finished. A `.pending-VERSION` marker, written before the rename and
removed once the build is done with it, tells such orphans apart: `recover` removes versions
whose marker is not locked by a live publisher. A server build (`owner` = its job id) keeps the
marker until the server has activated the version (`settle_version`), so the server's job
records decide about those (kvclip/service/jobs.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from kvclip import index as key_index
from kvclip.blend import DERIVED_ARRAYS, BlendParams, CacheTensors, check_method
from kvclip.calibration import ScoreMap, served
from kvclip.digests import DigestRecord
from kvclip.errors import ArtifactError, ModelLoadError
from kvclip.hashing import sha256_file
from kvclip.heap import release_free_heap
from kvclip.jsonlines import JsonLines
from kvclip.manifest import SCHEMA_VERSION, Manifest
from kvclip.vocabulary import CACHE_NAME_RE, METHODS, VERSION_RE, version_name

CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "items.jsonl"
_ARRAYS = ("text_weights", "image_keys", "caption_keys", "label_ids", "query_features")
_WRITING = ".writing"  # inside a staging folder, locked by its writer
_PENDING = ".pending-"
_INDEXES = {"image_index": "image_keys.faiss", "caption_index": "caption_keys.faiss"}


@dataclass
class CacheArtifact:
    """One version of a cache, in memory."""

    labels: list[str]
    text_weights: np.ndarray  # D x C float32
    image_keys: np.ndarray  # N x D float32
    label_ids: np.ndarray  # N int64
    query_features: np.ndarray | None  # N x D float32: support images, plain preprocess (None: not loaded)
    manifest: Manifest
    caption_keys: np.ndarray | None = None  # N x D float32
    # {"path", "label", "caption", "origin", ...}: a list when built, a JsonLines (parsed on access) when loaded
    items: Sequence[dict] = field(default_factory=list)
    image_index: object | None = None  # faiss.Index
    caption_index: object | None = None
    version: str | None = None
    path: Path | None = None
    # DERIVED_ARRAYS as loaded (None: not stored or not read); publish computes them afresh, never copies these
    key_log_partitions: np.ndarray | None = None  # N float32
    class_image_sums: np.ndarray | None = None  # C x D float32
    class_caption_sums: np.ndarray | None = None  # C x D float32
    class_log_partition_sums: np.ndarray | None = None  # C float32

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

    def score_temperature(self, method: str) -> float:
        """The calibration temperature of `method`'s served scores (1 for older manifests)."""
        calibration = self.manifest.calibration
        return 1.0 if calibration is None else calibration.temperature(method)

    def score_transform(self, method: str) -> str:
        """What the temperature divides for `method`: "logit", "log-gap" or "log-mix" (kvclip/calibration.py)."""
        calibration = self.manifest.calibration
        return "logit" if calibration is None else calibration.transform(method)

    def score_map(self, method: str) -> ScoreMap:
        """`method`'s fitted score map: transform, temperature and log-mix share (T = 1 logits for older manifests)."""
        calibration = self.manifest.calibration
        mix = 0.0 if calibration is None else calibration.mix(method)
        return ScoreMap(self.score_transform(method), self.score_temperature(method), mix)

    def calibrated(self, logits: torch.Tensor, method: str) -> torch.Tensor:
        """The served scores of `method`'s raw logits: kvclip.calibration.served with the build's map."""
        return served(logits, self.score_map(method))

    def default_min_score(self, method: str) -> float | None:
        """The build's abstention threshold for `method` (None: the build set no target precision)."""
        calibration = self.manifest.calibration
        return None if calibration is None else calibration.min_score.get(method)

    def tensors(self, device: torch.device | str | None = None, key_dtype: torch.dtype = torch.float32) -> CacheTensors:
        """The blend's tensors. On the CPU they share memory with the arrays (memory-mapped ones
        included: nothing is copied) but for keys cast to a `key_dtype` other than float32; on a
        GPU they are copies. The derived terms come from the version's files when it has them at
        this temperature, and are computed otherwise (from the float32 keys, before any cast)."""
        derived = self._stored_derived()
        tensors = CacheTensors.build(
            _tensor(self.text_weights),
            _tensor(self.image_keys),
            _tensor(self.label_ids),
            None if self.caption_keys is None else _tensor(self.caption_keys),
            temperature=self.temperature,
            device=device,
            derived=derived,
            key_dtype=key_dtype,
        )
        if derived is None:
            release_free_heap()  # the build's float64 temporaries would stay resident (kvclip/heap.py)
        return tensors

    def _stored_derived(self) -> dict[str, torch.Tensor] | None:
        # Computed at another temperature they are wrong values, not stale ones: compute afresh.
        if self.manifest.derived_temperature != self.temperature:
            return None
        names = [n for n in DERIVED_ARRAYS if n != "class_caption_sums" or self.caption_keys is not None]
        arrays = {name: getattr(self, name) for name in names}
        if any(array is None for array in arrays.values()):
            return None
        return {name: _tensor(array) for name, array in arrays.items()}


def _tensor(array: np.ndarray) -> torch.Tensor:
    if not array.flags.writeable:  # memory-mapped read-only; the blend never writes to it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)
    return torch.from_numpy(array)


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


def publish(cache_dir: str | Path, artifact: CacheArtifact, activate: bool = True,
            owner: str | None = None) -> str:
    """Write `artifact` as the next version of the cache; returns the version name.

    With an `owner` (a server job id) the version stays pending after publish: the owner
    activates or deletes it and then calls `settle_version`."""
    cache_dir = Path(cache_dir)
    (cache_dir / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
    recover(cache_dir)
    staging = cache_dir / f".staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as held:
        with _locked(cache_dir):  # recover() looks under the same lock: never sees an unlocked new folder
            staging.mkdir()
            held.enter_context(_held_lock(staging / _WRITING))
        try:
            _write_files(staging, artifact)
            with _locked(cache_dir):
                version = _next_version(cache_dir)
                files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.name != _WRITING}
                derived = {"derived_temperature": artifact.temperature if artifact.num_items else None}
                manifest = artifact.manifest.model_copy(update={"version": version, "files": files, **derived})
                _write_json(staging / MANIFEST_FILE, manifest.to_json())
                marker = _pending(cache_dir, version)
                held.enter_context(_held_lock(marker, {"owner": owner, "pid": os.getpid()}))
                (staging / _WRITING).unlink()
                _fsync_dir(staging)
                os.rename(staging, cache_dir / VERSIONS_DIR / version)
                _fsync_dir(cache_dir / VERSIONS_DIR)
                if activate:
                    set_current(cache_dir, version)
                if owner is None:
                    marker.unlink()
                    _fsync_dir(cache_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    artifact.manifest, artifact.version, artifact.path = manifest, version, cache_dir / VERSIONS_DIR / version
    return version


def settle_version(cache_dir: str | Path, version: str) -> None:
    """The owner of a pending version is done with it (activated, kept or deleted it)."""
    _pending(Path(cache_dir), version).unlink(missing_ok=True)


def pending_versions(cache_dir: str | Path) -> dict[str, str | None]:
    """Versions whose build has not settled them: version -> owner (None: a `kvclip build`)."""
    found = {}
    for marker in Path(cache_dir).glob(f"{_PENDING}*"):
        found[marker.name[len(_PENDING):]] = _read_owner(marker)
    return found


def recover(cache_dir: str | Path, orphaned: Callable[[str], bool] = lambda owner: False) -> list[str]:
    """Remove what dead builders left: staging folders nobody writes, trash of deletions, and
    pending versions whose publisher died (no owner) or whose owner `orphaned(owner)` says
    will never finish them. Returns the versions removed."""
    cache_dir = Path(cache_dir)
    removed: list[str] = []
    if not cache_dir.is_dir():
        return removed
    with _locked(cache_dir):
        for path in cache_dir.glob(".staging-*"):
            if path.is_dir() and not _is_locked(path / _WRITING):
                shutil.rmtree(path, ignore_errors=True)
        for path in cache_dir.glob(".deleted-*"):
            shutil.rmtree(path, ignore_errors=True)
        for marker in cache_dir.glob(f"{_PENDING}*"):
            if _is_locked(marker):
                continue  # its publisher is still at work
            owner, version = _read_owner(marker), marker.name[len(_PENDING):]
            folder = cache_dir / VERSIONS_DIR / version
            if owner is not None and not orphaned(owner) and folder.is_dir():
                continue
            if VERSION_RE.match(version) and current_version(cache_dir) != version and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(version)
            marker.unlink(missing_ok=True)
        _fsync_dir(cache_dir)
    return removed


SERVING_ARRAYS = ("text_weights", "image_keys", "caption_keys", "label_ids", *DERIVED_ARRAYS)


def load_cache(
    cache_dir: str | Path,
    version: str | None = None,
    verify: bool = True,
    indexes: bool = True,
    arrays: tuple[str, ...] = (*_ARRAYS, *DERIVED_ARRAYS),
    mmap: bool = False,
    index_min_items: int = 0,
    digests: DigestRecord | None = None,
) -> CacheArtifact:
    """Read one version (CURRENT by default), checking its files against the manifest.

    `arrays` names the arrays to read (a server needs SERVING_ARRAYS, not the tuner's query
    features); `mmap` maps them read-only instead of reading them, so processes serving the
    same version share the pages; `indexes=False` skips the FAISS indexes, and so does a cache
    of at most `index_min_items` items (a server searches them only above its dense limit).

    Without `digests` every file of the version is hashed. With a record (kvclip/digests.py),
    mode "changed" checks the files this load reads and hashes only those whose identity the
    record does not know; mode "full" hashes every file of the version.
    """
    cache_dir = Path(cache_dir)
    version = version or current_version(cache_dir)
    if version is None:
        raise ArtifactError(f"{cache_dir}: not a kvclip cache (no {CURRENT_FILE}); build one with 'kvclip build'")
    folder = cache_dir / VERSIONS_DIR / version
    manifest = read_manifest(folder)
    files = manifest.files
    try:
        items = JsonLines((folder / ITEMS_FILE).read_bytes())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{folder / ITEMS_FILE}: missing") from exc
    read_arrays = [name for name in arrays if f"{name}.npy" in files]
    read_indexes = {attr: fname for attr, fname in _INDEXES.items()
                    if indexes and fname in files and len(items) > index_min_items}
    if verify:
        checked = files if digests is None or digests.full else {
            name: files[name] for name in (*(f"{a}.npy" for a in read_arrays), ITEMS_FILE, *read_indexes.values())
            if name in files}
        sha256 = sha256_file if digests is None else digests.sha256
        for name, digest in checked.items():
            path = folder / name
            if not path.is_file() or sha256(path) != digest:
                raise ArtifactError(f"{path}: missing or corrupt (checksum mismatch)")
    loaded_arrays: dict[str, Any] = {name: None for name in (*_ARRAYS, *DERIVED_ARRAYS) if name not in read_arrays}
    loaded_arrays.update({
        name: _load_array(folder / f"{name}.npy", mmap) for name in read_arrays
    })
    loaded: dict[str, Any] = {attr: key_index.read_index(folder / fname) for attr, fname in read_indexes.items()}
    return CacheArtifact(
        labels=list(manifest.labels),
        items=items,
        manifest=manifest,
        version=version,
        path=folder,
        **loaded_arrays,
        **loaded,
    )


# numpy parses every .npy header with ast.literal_eval, and CPython 3.11's AST constructor is
# not thread-safe: caches loading in parallel (service/registry.py) failed a server start with
# "SystemError: AST constructor recursion depth mismatch". One header at a time; memory-mapped
# loads hold the lock for the header only.
_NPY_LOCK = threading.Lock()


def _load_array(path: Path, mmap: bool) -> np.ndarray:
    with _NPY_LOCK:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


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
    written = {name: np.ascontiguousarray(getattr(artifact, name)) for name in _ARRAYS
               if getattr(artifact, name) is not None}
    if artifact.num_items:
        written.update(_derived_files(written, artifact.temperature))
    for name, array in written.items():
        with open(folder / f"{name}.npy", "wb") as fh:
            np.save(fh, array, allow_pickle=False)
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


def _derived_files(written: dict[str, np.ndarray], temperature: float) -> dict[str, np.ndarray]:
    """DERIVED_ARRAYS from the bytes being written, through CacheTensors.build on the CPU, as
    CacheArtifact.tensors("cpu") would compute them at load: the same values, bit for bit."""
    built = CacheTensors.build(
        _tensor(written["text_weights"]), _tensor(written["image_keys"]), _tensor(written["label_ids"]),
        None if "caption_keys" not in written else _tensor(written["caption_keys"]),
        temperature=temperature, device="cpu")
    derived = {name: getattr(built, name) for name in DERIVED_ARRAYS if getattr(built, name) is not None}
    del built
    release_free_heap()  # the float64 temporaries (kvclip/heap.py)
    return {name: tensor.numpy() for name, tensor in derived.items()}


def _next_version(cache_dir: Path) -> str:
    root = cache_dir / VERSIONS_DIR
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := VERSION_RE.match(p.name))]
    return version_name(max(numbers, default=0) + 1)


def _pending(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"{_PENDING}{version}"


def _read_owner(marker: Path) -> str | None:
    try:
        owner = json.loads(marker.read_text() or "{}").get("owner")
    except (OSError, ValueError, AttributeError):
        return None
    return owner if isinstance(owner, str) else None


@contextlib.contextmanager
def _held_lock(path: Path, content: dict | None = None):
    """Create `path` and hold an exclusive lock on it: a lock the kernel drops when the process dies."""
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if content is not None:
            fh.truncate(0)
            fh.write(json.dumps(content))
            _flush(fh)
        yield


def _is_locked(path: Path) -> bool:
    """Whether a live process holds `path`'s lock (a missing file is not locked)."""
    try:
        fh = open(path)
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


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
