"""Build jobs: a queue, one worker process at a time, progress, cancel, publish and activate.

A job runs service/build_worker.py in a spawned process. The worker publishes the new
version without activating it; when it succeeds, the manager activates it through the
registry (an atomic swap, like POST /activate). A job that fails or is cancelled leaves the
served version untouched, and a version published by a cancelled build is deleted, so
nothing half-done is ever visible. Jobs run one at a time: builds of one cache must not race
for version numbers, and one build already uses the CPU the server leaves spare.

Where the worker runs is the manager's `runner`: WarmRunner (the server's default) keeps one
spawned worker process alive between jobs with the model loaded; ProcessRunner spawns a fresh
process per job (less memory while idle, 10+ s more per job); ThreadRunner runs the same
worker function on a thread over the same pipe and cancel protocol, for tests and embedding,
without the process's isolation.

Worker processes are spawned, not forked from a forkserver that imported torch once: a forked
worker starts sooner, but the forkserver stays resident for the server's life, and the spawn is
paid once per server, or per job only where the user chose `process` to hold nothing while
idle (figures: docs/server.md "How a job runs"). `context` takes another start method (the
tests fork theirs).

Job records are saved on every change of state (service/job_records.py). At start,
`restore` reads them back: a job that was queued or running is marked failed ("interrupted
by a server restart"), the whole work area is emptied, and `abandoned` tells
kvclip.artifact.recover which pending versions no job will ever finish.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from kvclip.service.build_worker import EXITING, ModelKey, WorkerSpec
from kvclip.service.build_worker import run as run_worker
from kvclip.service.build_worker import serve as serve_worker
from kvclip.service.job_records import RECORDS_DIR, JobRecords
from kvclip.service.metrics import Metrics
from kvclip.service.unpack_budget import UnpackBudget
from kvclip.vocabulary import TERMINAL_JOB_STATES as TERMINAL

log = logging.getLogger("kvclip.jobs")
_CANCEL_GRACE_S = 10.0  # a cancelled worker that does not stop by itself is terminated
_LOADING_STEP = "starting"  # the worker imports torch and loads the model: nothing to lose yet
INTERRUPTED = "interrupted by a server restart"
_NOT_SAVED = ("workdir", "spec")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


@dataclass
class BuildJob:
    id: str
    cache: str
    options: dict
    workdir: Path
    spec: WorkerSpec | None = None
    state: str = "queued"
    step: str | None = None
    done: int = 0
    total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step_started: float | None = None
    cancel_requested: bool = False
    version: str | None = None
    activated: bool = False
    error: str | None = None
    report: dict | None = None

    def progress(self, step: str, done: int, total: int) -> None:
        if step != self.step:
            self.step, self.step_started = step, time.monotonic()
        self.done, self.total = done, total

    def eta_s(self) -> float | None:
        if self.state != "running" or not self.done or not self.total or self.step_started is None:
            return None
        rate = self.done / max(time.monotonic() - self.step_started, 1e-9)
        return round(max(self.total - self.done, 0) / rate, 1)

    def as_dict(self) -> dict:
        end = self.finished or time.time()
        return {
            "id": self.id, "cache": self.cache, "state": self.state, "step": self.step,
            "done": self.done, "total": self.total,
            "elapsed_s": round(end - (self.started or end), 3), "eta_s": self.eta_s(),
            "created_at": _iso(self.created), "finished_at": _iso(self.finished),
            "cancel_requested": self.cancel_requested, "version": self.version,
            "activated": self.activated, "error": self.error, "report": self.report,
            "options": self.options,
        }

    def record(self) -> dict:
        """What is saved on disk: every field but the work folder and the worker spec."""
        return {k: v for k, v in asdict(self).items() if k not in _NOT_SAVED}

    @classmethod
    def from_record(cls, record: dict, jobs_root: Path) -> BuildJob:
        known = {f.name for f in fields(cls)} - set(_NOT_SAVED)
        return cls(workdir=Path(jobs_root) / record["id"], **{k: v for k, v in record.items() if k in known})


class JobNotFound(LookupError):
    pass


class WorkerHandle:
    """One job's worker as the manager sees it: messages on `conn`, `cancel` to stop it, and
    the process or thread it runs on (`owned`: ends with the job; a warm worker lives on)."""

    def __init__(self, conn, cancel, worker, owned: bool = True) -> None:
        self.conn, self.cancel, self.worker, self.owned = conn, cancel, worker, owned

    def is_alive(self) -> bool:
        return self.worker.is_alive()

    def terminate(self) -> None:
        self.worker.terminate()

    def finish(self, outcome: tuple) -> int | None:
        """After the job: wait for a worker that ends with it; the exit code if it has ended."""
        if self.owned or not self.worker.is_alive():
            self.worker.join(5)
            self.conn.close()
        return self.worker.exitcode


class ProcessRunner:
    """Each job in a fresh spawned process: niced, isolated, killable if it ignores a cancel,
    and 10+ s of importing torch and loading the model before it builds."""

    def __init__(self, context: multiprocessing.context.BaseContext | None = None) -> None:
        self._context = context or multiprocessing.get_context("spawn")  # no forked torch/CUDA state

    def launch(self, spec: WorkerSpec, name: str) -> WorkerHandle:
        parent, child = self._context.Pipe(duplex=False)
        cancel = self._context.Event()
        process = self._context.Process(target=run_worker, args=(spec, child, cancel), name=name, daemon=True)
        process.start()
        child.close()  # the child holds its own copy: the parent then sees EOF when the child dies
        return WorkerHandle(parent, cancel, process)

    def warm(self) -> None:
        """Nothing to prepare: every job starts its own process."""

    def close(self) -> None:
        """Nothing lives between jobs."""


class _JobCancel:
    """The cancel of warm-worker job `number`: the worker stops when the shared value equals it,
    so a late cancel of an earlier job can never stop a later one."""

    def __init__(self, shared, number: int) -> None:
        self._shared, self._number = shared, number

    def set(self) -> None:
        self._shared.value = self._number

    def is_set(self) -> bool:
        return self._shared.value == self._number


class WarmRunner:
    """One long-lived spawned worker process for all jobs (service/build_worker.serve): torch
    imported once and the server's model loaded before the first job, so a job builds at once.
    Same isolation as ProcessRunner; a worker that dies, is terminated or fails unexpectedly is
    replaced by a fresh one, started at once so the next job finds it warm. Costs one more copy
    of the model's memory while the server runs."""

    NAME = "kvclip-build-worker"

    def __init__(self, preload: ModelKey | None = None,
                 context: multiprocessing.context.BaseContext | None = None) -> None:
        self._context = context or multiprocessing.get_context("spawn")
        self._cancelled = self._context.Value("q", 0)
        self._preload = preload
        self._jobs = 0
        self._process = None
        self._conn = None
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Start the worker now (at server start), unless one is alive."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        if self._conn is not None:
            self._conn.close()
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(target=serve_worker, args=(child, self._cancelled, self._preload),
                                        name=self.NAME, daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        log.info("build worker process %s started", process.pid)

    def launch(self, spec: WorkerSpec, name: str) -> WorkerHandle:
        with self._lock:
            self._ensure()
            self._jobs += 1
            try:
                self._conn.send(("job", self._jobs, spec))
            except OSError:  # it died while idle: one fresh try
                self._process.join(5)
                self._ensure()
                self._conn.send(("job", self._jobs, spec))
            return _WarmHandle(self, self._conn, _JobCancel(self._cancelled, self._jobs), self._process)

    def replace_if_dead(self) -> None:
        with self._lock:
            if self._process is not None and not self._process.is_alive():
                self._process.join(5)
                self._ensure()

    def close(self) -> None:
        """Stop the worker. Idle, it has nothing to lose: terminated, not asked to wind down."""
        with self._lock:
            process, conn, self._process, self._conn = self._process, self._conn, None, None
        if process is None:
            return
        process.terminate()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        conn.close()


class _WarmHandle(WorkerHandle):
    def __init__(self, runner: WarmRunner, conn, cancel, process) -> None:
        super().__init__(conn, cancel, process, owned=False)
        self._runner = runner

    def terminate(self) -> None:
        self.worker.terminate()
        self.worker.join(5)  # gone before the next job is sent to a worker
        if self.worker.is_alive():
            self.worker.kill()
            self.worker.join(5)

    def finish(self, outcome: tuple) -> int | None:
        if outcome[0] == "died" or outcome[-1] == EXITING:  # it is ending (or failed and ends itself)
            self.worker.join(30)  # reaped, so its exit code is known and a fresh one replaces it
        if self.worker.is_alive():
            return None
        self.worker.join(5)
        self._runner.replace_if_dead()  # the next job finds a warm worker again
        return self.worker.exitcode


class _WorkerThread(threading.Thread):
    exitcode: int | None = None  # what a process handle reports; a thread has none

    def terminate(self) -> None:
        """A thread cannot be killed: the job reads as cancelled and the thread runs to its end."""


class ThreadRunner:
    """The worker function on a thread of this process, same pipe and cancel protocol.

    No isolation: the worker's nice and torch threads apply to this process (configure
    build_nice 0 and this process's thread count), and its crash is this process's.
    `target(spec, conn, cancel)` is the worker function (tests script their own).
    """

    def __init__(self, target: Callable = run_worker) -> None:
        self.target = target

    def launch(self, spec: WorkerSpec, name: str) -> WorkerHandle:
        parent, child = multiprocessing.Pipe(duplex=False)
        cancel = threading.Event()
        thread = _WorkerThread(target=self.target, args=(spec, child, cancel), name=name, daemon=True)
        thread.start()
        return WorkerHandle(parent, cancel, thread)

    def warm(self) -> None:
        """Nothing to prepare."""

    def close(self) -> None:
        """Threads end with their jobs."""


Runner = ProcessRunner | WarmRunner | ThreadRunner


class JobManager:
    """Queues jobs and runs them one at a time on a background thread."""

    def __init__(
        self,
        activate: Callable[[str, str], object],
        delete_version: Callable[[str, str], None],
        metrics: Metrics | None = None,
        max_kept: int = 100,
        runner: Runner | None = None,
        jobs_root: Path | None = None,
        settle: Callable[[str, str], None] = lambda cache, version: None,
        budget: UnpackBudget | None = None,
    ) -> None:
        self._activate = activate
        self._delete_version = delete_version
        self._settle = settle  # the job is done with the version it published (kvclip.artifact.settle_version)
        self.jobs_root = jobs_root
        self._records = JobRecords(jobs_root) if jobs_root is not None else None
        self.budget = budget
        self.metrics = metrics
        self.max_kept = max_kept
        self._jobs: dict[str, BuildJob] = {}
        self._queue: queue.Queue[BuildJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._cancel_events: dict[str, object] = {}
        self.runner = runner or ProcessRunner()  # read per job: may be swapped between jobs
        self._thread: threading.Thread | None = None

    # API -------------------------------------------------------------------------------
    @staticmethod
    def new_job(cache: str, options: dict, jobs_root: Path) -> BuildJob:
        job_id = uuid.uuid4().hex[:12]
        return BuildJob(id=job_id, cache=cache, options=options, workdir=Path(jobs_root) / job_id)

    def restore(self) -> list[BuildJob]:
        """Read the saved records back (before `start`); jobs that were queued or running when
        the server stopped are failed now. Empties the work area. Returns the interrupted jobs."""
        if self._records is None:
            return []
        interrupted = []
        with self._lock:
            for record in self._records.load():
                job = BuildJob.from_record(record, self.jobs_root)
                self._jobs[job.id] = job
                if job.state not in TERMINAL:
                    job.state, job.finished, job.error = "failed", time.time(), INTERRUPTED
                    self._save(job)
                    interrupted.append(job)
            self._forget_old()
        for path in (self.jobs_root.iterdir() if self.jobs_root.is_dir() else ()):
            if path.name == RECORDS_DIR:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return interrupted

    def abandoned(self, job_id: str) -> bool:
        """Whether the version a job published will never be activated or kept by it."""
        job = self._jobs.get(job_id)
        return job is not None and job.state in ("failed", "cancelled")

    def discard_workdir(self, job: BuildJob) -> None:
        """Remove the job's unpacked uploads and free their share of the unpack budget."""
        shutil.rmtree(job.workdir, ignore_errors=True)
        if self.budget is not None:
            self.budget.release(job.id)

    def submit(self, job: BuildJob) -> BuildJob:
        with self._lock:
            self._jobs[job.id] = job
            self._save(job)
            self._forget_old()
        self._count("queued")
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> BuildJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"unknown job {job_id!r}")
        return job

    def list(self) -> list[BuildJob]:
        return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def cancel(self, job_id: str) -> BuildJob:
        job = self.get(job_id)
        with self._lock:
            if job.state in TERMINAL:
                return job
            job.cancel_requested = True
            queued = job.state == "queued"
            if queued:
                self._finish(job, "cancelled", "cancelled before it started")
            event = self._cancel_events.get(job.id)
        if queued:
            self.discard_workdir(job)
        if event is not None:
            event.set()
        return job

    def start(self) -> None:
        self.runner.warm()
        self._thread = threading.Thread(target=self._run, name="kvclip-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel every job (the running one included) and wait for the runner."""
        for job in list(self._jobs.values()):
            if job.state not in TERMINAL:
                self.cancel(job.id)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self.runner.close()

    # Runner ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.state != "queued":
                continue  # cancelled while it waited
            try:
                self._run_job(job)
            except Exception as exc:  # one job's failure never stops the runner
                log.exception("build job %s failed", job.id)
                with self._lock:
                    if job.state not in TERMINAL:
                        self._finish(job, "failed", f"{type(exc).__name__}: {exc}")
            finally:
                self.discard_workdir(job)

    def _run_job(self, job: BuildJob) -> None:
        with self._lock:
            if job.state != "queued":
                return
            job.state, job.started = "running", time.time()
            job.progress(_LOADING_STEP, 0, 0)  # the worker imports torch and loads the model (unless warm)
            self._save(job)
        self._gauge()
        log.info("build job %s for cache %s started", job.id, job.cache)
        worker = self.runner.launch(job.spec, f"kvclip-build-{job.id}")
        with self._lock:
            self._cancel_events[job.id] = worker.cancel
            if job.cancel_requested:  # asked for while the worker was being launched
                worker.cancel.set()
        outcome = self._follow(job, worker)
        exitcode = worker.finish(outcome)
        self.discard_workdir(job)  # before the job reads as ended: no leftovers once it has
        with self._lock:
            self._cancel_events.pop(job.id, None)
        self._conclude(job, outcome, exitcode)
        self._gauge()

    def _follow(self, job: BuildJob, worker: WorkerHandle) -> tuple:
        """Read the worker's messages until it reports an outcome or dies."""
        cancel, conn = worker.cancel, worker.conn
        cancel_deadline = None
        while True:
            if cancel.is_set() and job.step == _LOADING_STEP and worker.is_alive():
                # Still loading the model, the worker checks no cancel yet: nothing to lose
                worker.terminate()
                return ("cancelled",)
            if cancel.is_set() and cancel_deadline is None:
                cancel_deadline = time.monotonic() + _CANCEL_GRACE_S
            if cancel_deadline is not None and time.monotonic() > cancel_deadline and worker.is_alive():
                log.warning("build job %s ignored its cancel; terminating it", job.id)
                worker.terminate()
                return ("cancelled",)
            try:
                ready = conn.poll(0.2)
                message = conn.recv() if ready else None
            except (EOFError, OSError):
                return ("died",)
            if message is None:
                if not worker.is_alive() and not conn.poll(0):
                    return ("died",)
                continue
            if message[0] == "progress":
                with self._lock:
                    job.progress(*message[1:])
                continue
            return message

    def _conclude(self, job: BuildJob, outcome: tuple, exitcode: int | None) -> None:
        kind = outcome[0]
        if kind == "done":
            version, report = outcome[1], outcome[2]
            with self._lock:
                job.version, job.report = version, report
                self._save(job)
            if job.cancel_requested:
                self._discard(job, version)
                self._finish(job, "cancelled", "cancelled; the version it published was removed")
                return
            if job.options.get("activate", True):
                with self._lock:
                    job.progress("activating", 0, 1)
                try:
                    self._activate(job.cache, version)
                    job.activated = True
                    with self._lock:
                        job.progress("activating", 1, 1)  # a succeeded job reads done, not 0/1
                except Exception as exc:
                    self._discard(job, version)
                    self._finish(job, "failed", f"built {version} but could not activate it: {exc}")
                    return
            self._finish(job, "succeeded")
            self._settle_quietly(job.cache, version)
        elif kind == "cancelled":
            self._finish(job, "cancelled", "cancelled")
        elif kind == "error":
            self._finish(job, "failed", outcome[1])
        else:
            self._finish(job, "failed", f"the build worker exited with code {exitcode} without a result "
                                        "(killed, or out of memory?)")

    def _discard(self, job: BuildJob, version: str) -> None:
        try:
            self._delete_version(job.cache, version)
        except Exception:  # logged; an inactive version is harmless, and its marker stays pending
            log.exception("could not delete %s %s of job %s", job.cache, version, job.id)
        else:
            self._settle_quietly(job.cache, version)
        job.version = None

    def _settle_quietly(self, cache: str, version: str) -> None:
        try:
            self._settle(cache, version)
        except OSError:
            log.exception("could not settle %s %s", cache, version)

    def _finish(self, job: BuildJob, state: str, error: str | None = None) -> None:
        # Metrics first: a client that sees the job ended must find it counted in /metrics.
        self._count(state)
        self._gauge(ending=job)
        job.error = None if state == "succeeded" else error
        job.state, job.finished = state, time.time()
        self._save(job)
        log.info("build job %s for cache %s %s%s", job.id, job.cache, state, f": {error}" if error else "")

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in TERMINAL]
        for job in sorted(finished, key=lambda j: j.created)[: max(len(finished) - self.max_kept, 0)]:
            del self._jobs[job.id]
            if self._records is not None:
                self._records.remove(job.id)

    def _save(self, job: BuildJob) -> None:
        if self._records is None:
            return
        try:
            self._records.save(job.record())
        except OSError:  # a full disk must not stop the job; GET /v1/jobs still answers from memory
            log.exception("could not save the record of build job %s", job.id)

    def _count(self, state: str) -> None:
        if self.metrics:
            self.metrics.build_jobs.labels(state).inc()

    def _gauge(self, ending: BuildJob | None = None) -> None:
        if self.metrics:
            running = sum(1 for j in self._jobs.values() if j.state == "running" and j is not ending)
            self.metrics.build_running.set(running)
