"""Loaded caches, one immutable snapshot per cache, swapped atomically.

A request takes its cache's LoadedCache once, at the start, and uses only that object; a
swap replaces the registry's dict with a new one, so requests in flight finish on the
version they started with and new ones see the new version. Loading (checksums, tensors
to the device) happens before the swap, off the event loop; a version that fails to load
is never swapped in and the previous one keeps serving.

A reload loads the caches that changed in parallel, on a few threads (hashing, numpy and torch
release the GIL), and swaps all of them in with one assignment once every load has finished
or failed; a cache that fails is reported and the others are loaded all the same. File
digests go through the registry's DigestRecord (kvclip/digests.py), saved once per reload.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvclip import artifact as store
from kvclip.artifact import SERVING_ARRAYS, CacheArtifact, check_model_matches, load_cache
from kvclip.blend import BlendParams, CacheTensors
from kvclip.digests import DigestRecord
from kvclip.errors import ArtifactError, KvclipError
from kvclip.models import Encoder
from kvclip.service.search_path import DENSE_ONLY, SearchDecision, SearchPolicy, decide
from kvclip.threads import cpu_quota

log = logging.getLogger("kvclip.registry")


class CacheNotFound(KvclipError):
    """No such cache (answered 404 unknown_cache)."""


class VersionNotFound(CacheNotFound):
    """The cache has no such version (404 unknown_version)."""


class VersionConflict(KvclipError):
    """The version is in use, e.g. served or CURRENT, and cannot be deleted (409 version_in_use)."""


class VersionNotLoadable(KvclipError):
    """The version is corrupt or was built with another model; nothing changed (409)."""


@dataclass(frozen=True)
class LoadedCache:
    name: str
    version: str
    artifact: CacheArtifact
    tensors: CacheTensors  # resident on the encoder's device
    search: SearchDecision = DENSE_ONLY  # dense or FAISS candidates, chosen at load
    loaded_at: float = field(default_factory=time.time)

    @property
    def labels(self) -> list[str]:
        return self.artifact.labels

    @property
    def model_id(self) -> str:
        return self.artifact.manifest.model.id

    @property
    def num_classes(self) -> int:
        return len(self.artifact.labels)

    @property
    def num_items(self) -> int:
        return self.artifact.num_items

    @property
    def key_precision(self) -> str:
        """The dtype of the resident key matrices: "float16" or "float32" (--key-precision)."""
        return str(self.tensors.key_dtype).removeprefix("torch.")

    def params(self, method: str) -> BlendParams:
        return self.artifact.params(method).for_method(method)


@dataclass
class ReloadReport:
    loaded: dict[str, str] = field(default_factory=dict)  # name -> version newly loaded
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> error

    def as_dict(self) -> dict:
        return {"loaded": self.loaded, "unchanged": self.unchanged, "removed": self.removed,
                "failed": self.failed}


# Twice the cores: part of each load waits (page faults, hashing a file, single-threaded torch
# kernels), so more threads than cores help; measured on 2 cores, 4 caches: 4 threads 0.62x
# of a serial reload, 2 threads 0.85x. Bounded: each thread holds its load's temporaries.
MAX_LOAD_WORKERS = 8


class CacheRegistry:
    def __init__(self, root: Path, encoder: Encoder, on_change=None, search: SearchPolicy | None = None,
                 digests: DigestRecord | None = None, load_workers: int | None = None) -> None:
        self.root = Path(root)
        self.encoder = encoder
        self.search = search or SearchPolicy()  # how each loaded cache's search path is chosen
        self.digests = digests if digests is not None else DigestRecord(None)  # in memory only by default
        self.load_workers = load_workers or min(MAX_LOAD_WORKERS, 2 * cpu_quota())
        self._caches: dict[str, LoadedCache] = {}
        self.errors: dict[str, str] = {}  # cache -> why its latest load failed
        self._mutate = threading.Lock()  # one load/swap at a time; readers never lock
        self._on_change = on_change

    # Readers -------------------------------------------------------------------------
    def get(self, name: str) -> LoadedCache:
        loaded = self._caches.get(name)
        if loaded is None:
            known = ", ".join(sorted(self._caches)) or "none loaded"
            raise CacheNotFound(f"unknown cache {name!r} (caches: {known})")
        return loaded

    def snapshot(self) -> dict[str, LoadedCache]:
        return self._caches

    def cache_dir(self, name: str) -> Path:
        return cache_path(self.root, name)

    # Mutations -----------------------------------------------------------------------
    def reload(self) -> ReloadReport:
        """Load every cache whose CURRENT differs from what is served; drop removed ones."""
        report = ReloadReport()
        with self._mutate:
            on_disk = self._scan()
            caches = dict(self._caches)
            for name in sorted(set(caches) - set(on_disk)):
                del caches[name]
                report.removed.append(name)
            changed = {}
            for name, version in on_disk.items():
                if name in caches and caches[name].version == version:
                    report.unchanged.append(name)
                else:
                    changed[name] = version
            for name, future in self._load_all(changed).items():
                try:
                    caches[name] = future.result()
                    report.loaded[name] = changed[name]
                    self.errors.pop(name, None)
                except KvclipError as exc:
                    report.failed[name] = str(exc)
                    self.errors[name] = str(exc)
                    log.error("cache %s %s not loaded: %s", name, changed[name], exc)
            self.digests.save()
            self._swap(caches)
        return report

    def activate(self, name: str, version: str) -> LoadedCache:
        """Load `version`, point CURRENT at it and swap it in; on failure nothing changes."""
        cache_dir = self.cache_dir(name)
        with self._mutate:
            if name not in self._caches and not cache_dir.is_dir():
                raise CacheNotFound(f"unknown cache {name!r}")
            try:
                loaded = activate_version(cache_dir, name, version, self.encoder, self.search, self.digests)
            finally:
                self.digests.save()
            self._swap({**self._caches, name: loaded})
            self.errors.pop(name, None)
            return loaded

    def delete_version(self, name: str, version: str) -> None:
        cache_dir = self.cache_dir(name)
        with self._mutate:
            if not cache_dir.is_dir():
                raise CacheNotFound(f"unknown cache {name!r}")
            served = self._caches.get(name)
            if served is not None and served.version == version:
                raise VersionConflict(f"{name} {version} is being served; activate another version first")
            if version not in store.list_versions(cache_dir):
                raise VersionNotFound(f"cache {name!r} has no version {version!r}")
            try:
                store.delete_version(cache_dir, version)
            except ArtifactError as exc:
                raise VersionConflict(str(exc)) from exc

    # Internals -----------------------------------------------------------------------
    def _scan(self) -> dict[str, str]:
        found = {}
        if not self.root.is_dir():
            return found
        for path in sorted(self.root.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                version = store.current_version(path)
                if version is not None:
                    found[path.name] = version
        return found

    def _load_all(self, versions: dict[str, str]) -> dict[str, Future[LoadedCache]]:
        """Load each name's version on a bounded pool; returns once every load has ended."""
        if not versions:
            return {}
        with ThreadPoolExecutor(min(self.load_workers, len(versions)), thread_name_prefix="kvclip-load") as pool:
            return {name: pool.submit(self._load, name, version) for name, version in versions.items()}

    def _load(self, name: str, version: str) -> LoadedCache:
        return load_version(self.cache_dir(name), name, version, self.encoder, self.search, self.digests)

    def _swap(self, caches: dict[str, LoadedCache]) -> None:
        self._caches = caches  # one reference assignment: readers see old or new, never a mix
        if self._on_change:
            self._on_change(caches)


def cache_path(root: Path, name: str) -> Path:
    """root/name for a valid cache name; CacheNotFound for any other name (none leaves root)."""
    try:
        store.validate_cache_name(name)
    except ArtifactError as exc:
        raise CacheNotFound(f"unknown cache {name!r}: {exc}") from exc
    return Path(root) / name


def load_version(
    cache_dir: Path, name: str, version: str, encoder: Encoder, search: SearchPolicy | None = None,
    digests: DigestRecord | None = None,
) -> LoadedCache:
    """Load one version and check it was built with `encoder`'s model; tensors go to its device.

    Only what serving reads is loaded: no tuner query features, and the FAISS indexes only for
    caches that `search` may serve from them; service/search_path.py then chooses the cache's
    search path on this device and drops the indexes when dense wins. The arrays are
    memory-mapped, so processes serving one version share its pages and a GPU server keeps no
    host copy resident. Files are checked through `digests` (kvclip.artifact.load_cache; without
    one, every file is hashed). Also used by the Ray Serve replicas (deploy/ray/app.py), which
    keep caches per replica.
    """
    start = time.perf_counter()
    search = search or SearchPolicy()
    artifact = load_cache(cache_dir, version, arrays=SERVING_ARRAYS, mmap=True,
                          index_min_items=search.index_min_items, digests=digests)
    check_model_matches(encoder, artifact)
    tensors = artifact.tensors(encoder.device, key_dtype(search.key_precision, encoder.device))
    if encoder.device.type == "cuda":
        torch.cuda.synchronize(encoder.device)
    artifact, decision = decide(name, artifact, tensors, search)
    log.info("loaded cache %s %s: %d classes, %d items in %.2f s", name, version,
             len(artifact.labels), len(artifact.label_ids), time.perf_counter() - start)
    return LoadedCache(name, version, artifact, tensors, decision)


def key_dtype(precision: str, device: torch.device) -> torch.dtype:
    """--key-precision on `device`: auto is float16 on CUDA (half the keys' memory; the encoder's
    features are fp16 there anyway) and float32 elsewhere (a CPU's float16 matmuls are slow)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16}[precision]


def activate_version(
    cache_dir: Path, name: str, version: str, encoder: Encoder, search: SearchPolicy | None = None,
    digests: DigestRecord | None = None,
) -> LoadedCache:
    """Load and check `version`, then point CURRENT at it. A version that is missing
    (VersionNotFound), corrupt or built with another model (VersionNotLoadable) leaves
    CURRENT untouched.

    Also used by the Ray Serve replicas, whose peers follow CURRENT.
    """
    versions = store.list_versions(cache_dir)
    if version not in versions:
        raise VersionNotFound(f"cache {name!r} has no version {version!r} "
                              f"(versions: {', '.join(versions) or 'none'})")
    try:
        loaded = load_version(cache_dir, name, version, encoder, search, digests)
        store.set_current(cache_dir, version)
    except KvclipError as exc:
        raise VersionNotLoadable(f"{name} {version} not activated: {exc}") from exc
    return loaded
