"""A build job's own process: runs kvclip.cache_builder.build_cache at low CPU priority and reports
progress over a pipe.

Why a process and not a thread of the server: the OS scheduler then gives online requests
the CPU first (the worker is niced), a build's Python work (decoding, augmenting, tuning)
never holds the server's GIL, a crash or out-of-memory kill takes only the build down, and
cancelling can always end it. The worker loads its own copy of the model; it publishes the
version without activating it, and the server activates it (service/jobs.py).

Messages sent (tuples): ("progress", step, done, total), ("done", version, report as JSON),
("cancelled",), ("error", message).
"""
from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvclip.cache_builder.build import BuildConfig


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


def run(spec: WorkerSpec, conn, cancel_event) -> None:
    """Process entry point (spawned)."""
    orphaned = _die_with_parent()
    import torch

    from kvclip.cache_builder.build import build_cache
    from kvclip.cache_builder.progress import BuildCancelled, CallbackMonitor
    from kvclip.errors import KvclipError
    from kvclip.service.build_messages import for_http

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s build-worker %(name)s: %(message)s")
    if spec.nice:
        os.nice(spec.nice)
    torch.set_num_threads(spec.threads)

    def progress(step: str, done: int, total: int) -> None:
        conn.send(("progress", step, done, total))

    config = spec.config
    config.monitor = CallbackMonitor(on_progress=progress, cancelled=lambda: cancel_event.is_set() or orphaned())
    try:
        result = build_cache(config)
        # The job's report names the captioner too: what `auto` did shows without the manifest.
        report = {**result.report.model_dump(mode="json"),
                  "captioner": result.manifest.captioner.model_dump(mode="json")}
        conn.send(("done", result.version, report))
    except BuildCancelled:
        conn.send(("cancelled",))
    except KvclipError as exc:
        conn.send(("error", for_http(str(exc), spec.uploads)))
    except Exception as exc:
        traceback.print_exc()
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
