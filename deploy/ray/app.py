"""kvclip on Ray Serve: classification replicas spread over a cluster, caches routed by name.

    serve run kvclip.deploy.ray.app:build_app caches=/shared/caches model=ViT-B-32:openai num_replicas=4 num_gpus=0.5

Two deployments:

- `KvclipIngress` (FastAPI via @serve.ingress): POST /v1/classify and
  POST /v1/caches/{name}/activate, with the plain server's request parsing and limits
  (kvclip.service.parsing), API keys, error table (kvclip.service.errors) and response shape.
  It holds no model; it calls the classifier through a handle with the cache name as the
  multiplexed model id.
- `KvclipClassifier`: one encoder per replica (`num_gpus` may be a fraction). Images from
  concurrent requests share encoder calls through @serve.batch (preprocessed pixels and
  their Scoring in, results out, sized in images), injected into the plain server's
  ClassifyPipeline in place of its Batcher; the batch function runs the Batcher's own
  BatchJob, so a batch's blends are grouped by cache snapshot, method and options as there.
  Caches are @serve.multiplexed by name, so Serve routes a cache's requests to replicas
  that already hold it; each replica checks the cache's CURRENT file
  at most every `refresh_interval_s` and swaps in a new version when it changed, so an
  activation written by any replica (or by `kvclip.artifact.set_current`, a build, or a
  plain server sharing the folder) reaches every replica. A request takes its snapshot
  once and finishes on it.

Nothing here re-implements the classify path: decode, preprocess, blend and the response
are kvclip.service.classify.ClassifyPipeline; cache loading is
kvclip.service.registry.load_version (artifact checksums and the model check).
"""

import argparse
import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from kvclip import artifact as store
from kvclip.device_decode import DeviceJpegDecoder
from kvclip.errors import KvclipError
from kvclip.heap import freeze_start_up_objects
from kvclip.models import load_encoder
from kvclip.service.admission import BoundedDecoder
from kvclip.service.api_caches import CacheName, summary
from kvclip.service.api_classify import BODY_DOC, ERROR_DOC, OPENAPI_SCHEMAS, classify_query
from kvclip.service.app import add_openapi_schemas
from kvclip.service.batcher import BatchJob, Failed, Scoring
from kvclip.service.classify import ClassifyPipeline
from kvclip.service.config import ENV_PREFIX, ServerConfig, from_namespace
from kvclip.service.deps import require
from kvclip.service.errors import HttpError, http_error, install_handlers
from kvclip.service.parsing import ClassifyRequest, read_classify_request
from kvclip.service.registry import CacheNotFound, LoadedCache, activate_version, cache_path, load_version
from kvclip.service.schemas import ActivateRequest, CacheSummary, ClassifyResponse
from kvclip.service.search_path import SearchPolicy
from kvclip.service.security import ENV_VAR, ApiKeys
from kvclip.vocabulary import VERSION

log = logging.getLogger("kvclip.ray")

REPLICA_HEADER = "X-Kvclip-Replica"  # which classifier replica answered
BATCH_HEADER = "X-Kvclip-Batch-Images"  # images in the largest encoder batch the request rode in
VERSION_HEADER = "X-Kvclip-Version"


class RayOptions(BaseModel):
    """Ray-specific settings; every other `build_app` argument is a ServerConfig field."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, description="classifier replicas (each loads the model once)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per classifier replica; 0.5 puts two on a GPU")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per classifier replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a classifier replica takes at once")
    max_caches_per_replica: int = Field(4, ge=1, description="caches a replica keeps loaded (LRU)")
    refresh_interval_s: float = Field(2.0, ge=0, description="how often a replica re-reads CURRENT (0: every request)")
    torch_threads: int = Field(0, ge=0, description="torch threads per replica (0: torch's default)")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.25, ge=0)


def parse_args(args: dict) -> tuple[RayOptions, ServerConfig]:
    """`serve run ... key=value` arguments (or a config file's `args`) -> (RayOptions, ServerConfig).

    ServerConfig fields fall back to their KVCLIP_* variables, as for `kvclip serve`.
    """
    ray_keys = set(RayOptions.model_fields)
    server_keys = {f.name for f in fields(ServerConfig)}
    unknown = set(args) - ray_keys - server_keys
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}; expected ServerConfig "
                         f"fields or {', '.join(sorted(ray_keys))}")
    options = RayOptions.model_validate({k: v for k, v in args.items() if k in ray_keys})
    server = {name: os.environ.get(ENV_PREFIX + name.upper()) for name in server_keys}
    server.update({k: (str(v) if isinstance(v, Path) else v) for k, v in args.items() if k in server_keys})
    missing = [k for k in ("caches", "model") if server.get(k) is None]
    if missing:
        raise ValueError(f"missing argument(s): {', '.join(missing)} (e.g. caches=/shared/caches model=tiny-random)")
    config = from_namespace(argparse.Namespace(**server))
    if config.decode_processes:  # replicas decode on their threads; a setting that did nothing would mislead
        raise ValueError("decode_processes is for kvclip serve only: a replica decodes on its decode_workers threads")
    return options, config


def build_app(args: dict) -> serve.Application:
    """The Serve application: ingress -> classifier replicas (see the module docstring)."""
    options, config = parse_args(dict(args))
    classifier = KvclipClassifier.options(
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": options.num_cpus},
    ).bind(config, options)
    return KvclipIngress.options(
        num_replicas=options.ingress_replicas,
        ray_actor_options={"num_cpus": options.ingress_num_cpus},
    ).bind(classifier, config)


# Classifier replicas ---------------------------------------------------------------------

def _images_in(jobs: list[tuple[torch.Tensor, Scoring]]) -> int:
    """@serve.batch sizes batches in images, not requests."""
    return sum(pixels.shape[0] for pixels, _ in jobs)


class CacheSlot:
    """One cache on one replica: the served snapshot, refreshed from CURRENT on disk."""

    def __init__(self, name: str, cache_dir: Path, loaded: LoadedCache) -> None:
        self.name, self.cache_dir, self.loaded = name, cache_dir, loaded
        self.checked_at = time.monotonic()
        self.failed_version: str | None = None  # a version on disk that did not load
        self.lock = asyncio.Lock()

    async def current(self, encoder, interval_s: float, search: SearchPolicy) -> LoadedCache:
        """The snapshot to serve; re-reads CURRENT when `interval_s` has passed since the last look."""
        if time.monotonic() - self.checked_at < interval_s:
            return self.loaded
        async with self.lock:
            if time.monotonic() - self.checked_at < interval_s:  # checked while we waited
                return self.loaded
            version = store.current_version(self.cache_dir)  # one small file read
            if version is None:
                raise CacheNotFound(f"unknown cache {self.name!r} (no CURRENT version on disk)")
            if version not in (self.loaded.version, self.failed_version):
                try:
                    self.loaded = await asyncio.to_thread(load_version, self.cache_dir, self.name, version, encoder,
                                                          search)
                    self.failed_version = None
                except KvclipError as exc:  # corrupt or other model: keep serving what we have
                    self.failed_version = version
                    log.error("cache %s %s not loaded, still serving %s: %s",
                              self.name, version, self.loaded.version, exc)
            self.checked_at = time.monotonic()
            return self.loaded

    async def install(self, loaded: LoadedCache) -> None:
        async with self.lock:
            self.loaded, self.failed_version, self.checked_at = loaded, None, time.monotonic()


# Helpers used inside the deployments sit above them: Serve pickles a deployment's class when
# it is decorated, and names defined after that point would be missing in the replicas.
def _unwrap(outcome: dict, response: Response) -> dict:
    if "error" in outcome:
        raise HttpError(**outcome["error"])
    response.headers[REPLICA_HEADER] = outcome["replica"]
    return outcome["response"]


class ReplicaEncoding:
    """The pipeline's ImageEncoding on a replica, for one request: the replica's @serve.batch
    batch job (encode, then blend per cache snapshot and options, on its device thread, as the
    plain server's Batcher does); remembers the largest batch the request rode in."""

    def __init__(self, run_batch, max_batch: int) -> None:
        self.run_batch, self.max_batch = run_batch, max_batch
        self.batch_images = 0

    async def score_images(self, pixels: torch.Tensor, scoring: Scoring) -> list:
        # Chunks of at most max_batch join other requests' batches.
        parts = await asyncio.gather(*(self.run_batch((chunk, scoring)) for chunk in pixels.split(self.max_batch)))
        self.batch_images = max(n for _, n in parts)
        for outcome, _ in parts:
            if isinstance(outcome, Failed):
                raise outcome.error
        return [result for outcome, _ in parts for result in outcome]


@serve.deployment(name="KvclipClassifier")
class KvclipClassifier:
    def __init__(self, config: ServerConfig, options: RayOptions) -> None:
        if options.torch_threads:
            torch.set_num_threads(options.torch_threads)
        self.config, self.options = config, options
        self.root = Path(config.caches)
        self.encoder = load_encoder(config.model, config.device, config.model_cache_dir)
        self.search = SearchPolicy.from_config(config)  # each replica measures its caches on its own device
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvclip-device")
        self._decoder = BoundedDecoder(ThreadPoolExecutor(max_workers=config.decode_workers,
                                                          thread_name_prefix="kvclip-decode"),
                                       config.max_decode_backlog)
        self._batch_job = BatchJob(self.encoder.encode_images, self.encoder.pixel_batch)
        self._run_batch.set_max_batch_size(config.max_batch)
        self._run_batch.set_batch_wait_timeout_s(config.max_wait_ms / 1000.0)

        self._opened: set[str] = set()  # caches this replica has loaded at least once

        async def open_slot(name: str) -> CacheSlot:
            return await self._open_slot(name)

        # Wired here so that max_caches_per_replica is a setting (Serve detects it on the instance).
        self._slot = serve.multiplexed(max_num_models_per_replica=options.max_caches_per_replica)(open_slot)
        log.info("classifier replica %s: model %s on %s", self.replica, self.encoder.model_id, self.encoder.device)
        freeze_start_up_objects()  # a replica is a process of its own (kvclip/heap.py)

    # Called by the ingress through a handle with multiplexed_model_id=<cache name>. Errors
    # come back as data (the error table's answer), not as Ray exceptions.
    async def classify(self, request: ClassifyRequest) -> dict:
        try:
            cache = await self._snapshot(request.params.cache)
            encoding = ReplicaEncoding(self._run_batch, self.config.max_batch)
            pipeline = ClassifyPipeline(self.config, self.encoder.preprocess, self._decoder, encoding,
                                        decode_size=self.encoder.image_size,
                                        jpeg_decoder=DeviceJpegDecoder.for_encoder(self.encoder))
            response = await pipeline.run(cache, request)
        except Exception as exc:
            return self._error(exc)
        return {"response": response.model_dump(mode="json"), "replica": self.replica,
                "batch_images": encoding.batch_images}

    async def activate(self, version: str) -> dict:
        try:
            return await self._activate(serve.get_multiplexed_model_id(), version)
        except Exception as exc:
            return self._error(exc)

    # Internals ---------------------------------------------------------------------------
    def _error(self, exc: Exception) -> dict:
        error = http_error(exc, self.config.retry_after_s)
        if error is None:
            raise exc
        return {"error": error.as_dict(), "replica": self.replica}

    async def _snapshot(self, name: str) -> LoadedCache:
        # Unknown names are refused before the multiplexer, which would evict a hot cache
        # (LRU) to make room before trying to load one.
        if name not in self._opened and store.current_version(cache_path(self.root, name)) is None:
            raise CacheNotFound(f"unknown cache {name!r}")
        slot = await self._slot(name)
        return await slot.current(self.encoder, self.options.refresh_interval_s, self.search)

    async def _open_slot(self, name: str) -> CacheSlot:
        """Multiplexed loader: the cache's CURRENT version (model checked), on first use here."""
        cache_dir = cache_path(self.root, name)
        version = store.current_version(cache_dir) if cache_dir.is_dir() else None
        if version is None:
            raise CacheNotFound(f"unknown cache {name!r}")
        try:
            loaded = await asyncio.to_thread(load_version, cache_dir, name, version, self.encoder, self.search)
        except KvclipError as exc:
            raise CacheNotFound(f"cache {name!r} {version} could not be loaded: {exc}") from exc
        self._opened.add(name)
        return CacheSlot(name, cache_dir, loaded)

    async def _activate(self, name: str, version: str) -> dict:
        """Load and check `version` here, then write CURRENT; the other replicas follow it.
        VersionNotFound (404) or VersionNotLoadable (409, CURRENT untouched) otherwise."""
        cache_dir = cache_path(self.root, name)
        if not cache_dir.is_dir():
            raise CacheNotFound(f"unknown cache {name!r}")
        loaded = await asyncio.to_thread(activate_version, cache_dir, name, version, self.encoder, self.search)
        try:
            slot = await self._slot(name)
        except CacheNotFound:
            slot = None
        if slot is not None:
            await slot.install(loaded)
        return {"response": summary(loaded), "replica": self.replica}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def _run_batch(self, jobs: list[tuple[torch.Tensor, Scoring]]) -> list[tuple[Any, int]]:
        """(each job's results or Failed, the batch's images): the plain server's batch job."""
        outcomes = await asyncio.get_running_loop().run_in_executor(self._device, self._batch_job, jobs)
        return [(outcome, _images_in(jobs)) for outcome in outcomes]


# HTTP ingress ----------------------------------------------------------------------------

app = FastAPI(title="kvclip (Ray Serve)", version=VERSION)
install_handlers(app)
add_openapi_schemas(app, OPENAPI_SCHEMAS)


# Ray pickles the app to the replicas: closures such as kvclip.service.deps.require's travel by value,
# without the module globals their string annotations name, so FastAPI would read `request` as
# a query parameter. These top-level functions travel by reference and call the same check.
async def _read_scope(request: Request) -> None:
    await require("read").dependency(request)


async def _admin_scope(request: Request) -> None:
    await require("admin").dependency(request)


@serve.deployment(name="KvclipIngress")
@serve.ingress(app)
class KvclipIngress:
    def __init__(self, classifier, config: ServerConfig) -> None:
        self.classifier = classifier
        self.config = config
        # What kvclip.service.deps.require and the error handlers read from the plain server's state.
        self.state = SimpleNamespace(config=config, api_keys=ApiKeys.load(os.environ.get(ENV_VAR),
                                                                           config.api_keys_file))
        app.state.kv = self.state

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=BODY_DOC, responses=ERROR_DOC,
              dependencies=[Depends(_read_scope)])
    async def classify(self, request: Request, response: Response,
                       query: dict = Depends(classify_query)) -> ClassifyResponse:
        parsed = await read_classify_request(request, query, self.config)
        handle = self.classifier.options(multiplexed_model_id=parsed.params.cache)
        outcome = await handle.classify.remote(parsed)
        body = _unwrap(outcome, response)
        response.headers[BATCH_HEADER] = str(outcome.get("batch_images", 0))
        response.headers[VERSION_HEADER] = body["version"]
        return ClassifyResponse.model_validate(body)

    @app.post("/v1/caches/{name}/activate", response_model=CacheSummary, dependencies=[Depends(_admin_scope)])
    async def activate(self, body: ActivateRequest, response: Response, name: str = CacheName) -> dict:
        """Load and check the version on one replica, write CURRENT; every replica follows
        within refresh_interval_s (requests in flight finish on their snapshot)."""
        outcome = await self.classifier.options(multiplexed_model_id=name).activate.remote(body.version)
        return _unwrap(outcome, response)
