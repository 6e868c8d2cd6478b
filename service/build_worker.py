"""The build worker: runs kvclip.cache_builder.build_cache at low CPU priority and reports
progress over a pipe.

Why a process and not a thread of the server: the OS scheduler then gives online requests
the CPU first (the worker is niced), a build's Python work (decoding, augmenting, tuning)
never holds the server's GIL, a crash or out-of-memory kill takes only the build down, and
cancelling can always end it. The worker has its own copy of the model; it publishes the
version without activating it, and the server activates it (service/jobs.py).

Two entry points:
- `run`: one job, then the process (or thread) ends (service/jobs.py ProcessRunner, ThreadRunner).
- `serve`: the warm worker (WarmRunner): one long-lived process that imported torch once,
  keeps the last model it loaded (the server's, loaded when it starts), and runs jobs one after
  another, so a job starts building at once instead of after 10+ s of imports and loading. It
  exits after an unexpected error, so the next job gets a fresh process.

Messages sent (tuples): ("progress", step, done, total), ("done", version, report as JSON),
("cancelled",), ("error", message[, EXITING]). The warm worker receives ("job", number, spec) and
("stop",); job `number` is cancelled when the shared `cancelled` value equals it.
"""
from __future__ import annotations

import functools
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvclip.cache_builder.build import BuildConfig

if TYPE_CHECKING:
    from kvclip.models import Encoder

log = logging.getLogger("kvclip.build_worker")
EXITING = "exiting"  # last element of a warm worker's error after which it ends itself
ModelKey = tuple[str, "str | None", "str | None"]  # (model name, device, model cache folder)


@dataclass
class WorkerSpec:
    config: BuildConfig  # activate False, no monitor (set up in the child); labels and prompts as values
    nice: int
    threads: int
    uploads: dict[Path, str] = field(default_factory=dict)  # work folder -> upload name, for error wording


def _die_with_parent() -> Callable[[], bool]:
    """A worker must not outlive a server killed with -9: it would publish into a cache whose
    records already say the job failed. Linux kills it with the parent (PR_SET_PDEATHSIG);
    elsewhere the returned check, polled with the cancel event, stops it at the next step."""
    parent = os.getppid()
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return lambda: os.getppid() != parent


def _log_setup() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s build-worker %(name)s: %(message)s")


def _build(spec: WorkerSpec, send: Callable[[tuple], None], cancelled: Callable[[], bool],
           loader: Callable[[BuildConfig], Encoder] | None = None, *, warm: bool = False) -> bool:
    """Run one job, sending its messages. False after an unexpected error: the process may be
    in a bad state, so a warm worker says it is exiting (in the error message) and does."""
    import torch

    from kvclip.cache_builder.build import build_cache
    from kvclip.cache_builder.progress import BuildCancelled, CallbackMonitor
    from kvclip.errors import KvclipError
    from kvclip.service.build_messages import for_http

    torch.set_num_threads(spec.threads)

    def progress(step: str, done: int, total: int) -> None:
        send(("progress", step, done, total))

    config = spec.config
    config.monitor = CallbackMonitor(on_progress=progress, cancelled=cancelled)
    try:
        result = build_cache(config, loader=loader)
        # The job's report names the captioner too: what `auto` did shows without the manifest.
        report = {**result.report.model_dump(mode="json"),
                  "captioner": result.manifest.captioner.model_dump(mode="json")}
        send(("done", result.version, report))
    except BuildCancelled:
        send(("cancelled",))
    except KvclipError as exc:
        send(("error", for_http(str(exc), spec.uploads)))
    except Exception as exc:
        traceback.print_exc()
        send(("error", f"{type(exc).__name__}: {exc}", *([EXITING] if warm else [])))
        return False
    return True


def run(spec: WorkerSpec, conn, cancel_event) -> None:
    """One job in a process (spawned) or thread of its own."""
    orphaned = _die_with_parent()
    _log_setup()
    if spec.nice:
        os.nice(spec.nice)
    try:
        _build(spec, conn.send, lambda: cancel_event.is_set() or orphaned())
    finally:
        conn.close()


class LastEncoder:
    """The encoder of the last model a build used, kept for the next build (one model's memory)."""

    def __init__(self) -> None:
        self.key: ModelKey | None = None
        self.encoder: Encoder | None = None

    def get(self, key: ModelKey) -> Encoder:
        if key != self.key or self.encoder is None:
            from kvclip.models import load_encoder

            self.encoder, self.key = None, None  # free the old model before loading the next one
            self.encoder, self.key = load_encoder(*key), key
        return self.encoder

    def for_build(self, config: BuildConfig) -> Encoder:
        return self.get((config.model, config.device, config.model_cache_dir))


def _job_cancelled(cancelled, number: int, orphaned: Callable[[], bool]) -> bool:
    return cancelled.value == number or orphaned()


def serve(conn, cancelled, preload: ModelKey | None) -> None:
    """The warm worker's process (spawned): jobs one at a time over `conn` until it closes."""
    orphaned = _die_with_parent()
    _log_setup()
    encoders = LastEncoder()
    if preload is not None:
        try:
            encoders.get(preload)
        except Exception as exc:  # a build naming this model reports the error itself
            log.warning("could not preload %s: %s", preload[0], exc)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        if message[0] != "job":
            return
        _, number, spec = message
        if spec.nice > os.nice(0):  # nice(2) only adds: apply what an earlier job has not
            os.nice(spec.nice - os.nice(0))
        healthy = _build(spec, conn.send, functools.partial(_job_cancelled, cancelled, number, orphaned),
                         encoders.for_build, warm=True)
        if not healthy:
            conn.close()
            return
