"""What the app holds while it runs, and its start and stop.

The model loads in a background thread so /healthz answers at once and /readyz says 503
until the model and the first scan of the caches folder are done. `kvclip serve` loads
the model before starting the server instead, so a bad model name fails the command.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kvclip import artifact as store
from kvclip.digests import DigestRecord
from kvclip.models import Encoder, load_encoder
from kvclip.service.admission import BoundedDecoder
from kvclip.service.batcher import Batcher
from kvclip.service.config import ServerConfig
from kvclip.service.decode_pool import ProcessDecodePool
from kvclip.service.jobs import JobManager, ProcessRunner, Runner, ThreadRunner, WarmRunner
from kvclip.service.metrics import Metrics
from kvclip.service.registry import CacheRegistry
from kvclip.service.search_path import SearchPolicy
from kvclip.service.security import ENV_VAR, ApiKeys
from kvclip.service.unpack_budget import UnpackBudget

log = logging.getLogger("kvclip.service")


def open_digests(config: ServerConfig) -> DigestRecord:
    """The server's record of verified file digests, in --verify-files mode."""
    return DigestRecord(config.digests_path, config.verify_files)


class NotReady(Exception):
    """The model or the caches are still loading, or loading failed (503 with Retry-After)."""


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    api_keys: ApiKeys | None = None
    encoder: Encoder | None = None
    registry: CacheRegistry | None = None
    batcher: Batcher | None = None
    jobs: JobManager | None = None
    decode_pool: ThreadPoolExecutor | None = None
    decode_processes: ProcessDecodePool | None = None  # --decode-processes N > 0, once the model is loaded
    decoder: BoundedDecoder | None = None  # the decode pool(s) with the --max-decode-backlog bound
    ready: bool = False
    load_error: str | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.api_keys is None:
            self.api_keys = ApiKeys.load(os.environ.get(ENV_VAR), self.config.api_keys_file)

    def _build_runner(self) -> Runner:
        config = self.config
        if config.build_worker == "thread":
            return ThreadRunner()
        if config.build_worker == "process":
            return ProcessRunner()
        return WarmRunner(preload=(config.model, config.device, config.model_cache_dir))

    async def start(self) -> None:
        self.decode_pool = ThreadPoolExecutor(self.config.decode_workers, thread_name_prefix="kvclip-decode")
        self.decoder = BoundedDecoder(self.decode_pool, self.config.max_decode_backlog)
        self._tasks.append(asyncio.create_task(self._load(), name="kvclip-load"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.jobs is not None:
            await asyncio.to_thread(self.jobs.stop)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.decode_processes is not None:  # joined: no worker outlives the server
            await asyncio.to_thread(self.decode_processes.shutdown, wait=True, cancel_futures=True)
        self.ready = False
        self.metrics.ready.set(0)

    def _batcher_failed(self, exc: BaseException) -> None:
        """No request can be encoded any more: /readyz says so (and why), so traffic moves away."""
        self.ready = False
        self.load_error = f"the encoder queue stopped: {exc!r}"
        self.metrics.ready.set(0)

    async def _load(self) -> None:
        try:
            digests = await asyncio.to_thread(open_digests, self.config)
            if self.encoder is None:
                self.encoder = await asyncio.to_thread(
                    load_encoder, self.config.model, self.config.device, self.config.model_cache_dir, digests
                )
            self.metrics.model.info({
                "model": self.encoder.model_id, "device": str(self.encoder.device),
                "precision": str(self.encoder.dtype).replace("torch.", ""),
                "weights_sha256": self.encoder.weights_sha256 or "",
            })
            warm = self._start_processes() if self.config.decode_processes else None
            self.registry = CacheRegistry(self.config.caches, self.encoder, self.metrics.set_caches,
                                          search=SearchPolicy.from_config(self.config), digests=digests)
            self.jobs = JobManager(
                self.registry.activate, self.registry.delete_version, self.metrics, self.config.max_jobs_kept,
                jobs_root=self.config.jobs_root,
                settle=lambda cache, version: store.settle_version(self.registry.cache_dir(cache), version),
                budget=UnpackBudget(self.config.max_unpacked_total_bytes, self.config.min_free_disk_bytes),
                runner=self._build_runner(),
            )
            await asyncio.to_thread(self._recover_builds)
            report = await asyncio.to_thread(self.registry.reload)
            log.info("caches loaded: %s; files hashed: %d (--verify-files %s)", report.as_dict(), digests.hashed,
                     digests.mode)
            self.batcher = Batcher(
                self.encoder.encode_images, self.config.max_batch, self.config.max_queue, self.metrics,
                max_queue_wait_s=self.config.max_queue_wait_s, on_failure=self._batcher_failed,
                collate=self.encoder.pixel_batch,  # uint8, pinned on CUDA
            )
            await self.batcher.start()
            self.jobs.start()
            if warm is not None:  # not ready before the decode processes are
                pids = await warm
                log.info("decode processes started: %s", ", ".join(map(str, pids)))
                self.decoder = BoundedDecoder(self.decode_processes, self.config.max_decode_backlog,
                                              batch_pool=self.decode_pool)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("server not ready: %s", self.load_error)
            return
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: model %s on %s", self.encoder.model_id, self.encoder.device)
        if self.config.reload_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._poll(), name="kvclip-reload"))

    def _start_processes(self) -> asyncio.Task:
        """Start the decode worker processes; the task warming them (their imports, while the
        caches load) answers their pids. Stopping the server stops them."""
        self.decode_processes = ProcessDecodePool(self.config.decode_processes, self.encoder.preprocess)
        task = asyncio.create_task(asyncio.to_thread(self.decode_processes.warm), name="kvclip-decode-warm")
        self._tasks.append(task)
        return task

    def _recover_builds(self) -> None:
        """Saved job records back, interrupted jobs failed, their work folders and the versions
        no build will finish removed (kvclip.artifact.recover)."""
        interrupted = self.jobs.restore()
        if interrupted:
            log.warning("build jobs interrupted by the restart: %s", ", ".join(j.id for j in interrupted))
        root = Path(self.config.caches)
        for cache_dir in sorted(root.iterdir()) if root.is_dir() else ():
            if cache_dir.is_dir() and not cache_dir.name.startswith("."):
                removed = store.recover(cache_dir, self.jobs.abandoned)
                if removed:
                    log.warning("removed versions of %s no build finished: %s", cache_dir.name, ", ".join(removed))

    async def _poll(self) -> None:
        """Pick up versions other processes published (e.g. replicas sharing a volume)."""
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            try:
                report = await asyncio.to_thread(self.registry.reload)
                if report.loaded or report.removed or report.failed:
                    log.info("reload: %s", report.as_dict())
            except Exception:  # keep polling; the current caches keep serving
                log.exception("periodic reload failed")
