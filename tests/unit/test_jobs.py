"""The job manager's protocol with its worker, on a thread running a scripted worker function.

The messages are those of service/build_worker.py; the real worker is exercised through
HTTP in tests/integration/test_service_builds.py.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvclip.service.jobs import TERMINAL, BuildJob, JobManager, ThreadRunner
from kvclip.service.metrics import Metrics
from tests.waiting import wait_until


class ScriptedRunner(ThreadRunner):
    """Runs `worker(conn, cancel)` on a thread in place of the build worker."""

    def __init__(self, worker) -> None:
        super().__init__(lambda _spec, conn, cancel: worker(conn, cancel))


@pytest.fixture
def calls() -> list[tuple]:
    return []


def manager(calls: list[tuple], worker) -> JobManager:
    jobs = JobManager(activate=lambda cache, version: calls.append(("activate", cache, version)),
                      delete_version=lambda cache, version: calls.append(("delete", cache, version)),
                      runner=ScriptedRunner(worker))
    jobs.start()
    return jobs


def submit(jobs: JobManager, tmp_path: Path) -> BuildJob:
    return jobs.submit(JobManager.new_job("pets", {}, tmp_path))


def test_progress_eta_then_activation(calls, tmp_path):
    release = threading.Event()

    def worker(conn, cancel):
        conn.send(("progress", "encoding", 0, 10))
        conn.send(("progress", "encoding", 5, 10))
        release.wait(30)
        conn.send(("done", "v0003", {"used": 10}))
        conn.close()

    jobs = manager(calls, worker)
    try:
        job = submit(jobs, tmp_path)
        wait_until(lambda: job.done == 5)
        assert job.state == "running" and job.step == "encoding" and job.total == 10
        job.step_started -= 10  # as if the 5 done had taken 10 s: 5 more take about as long
        assert job.eta_s() == pytest.approx(10, abs=5)
        release.set()
        wait_until(lambda: job.state == "succeeded")
        assert job.version == "v0003" and job.activated and job.report == {"used": 10} and job.eta_s() is None
        assert calls == [("activate", "pets", "v0003")]
    finally:
        jobs.stop()


def test_cancel_reaches_the_worker(calls, tmp_path):
    seen = threading.Event()

    def worker(conn, cancel):
        conn.send(("progress", "encoding", 0, 10))
        if cancel.wait(30):
            seen.set()
        conn.send(("cancelled",))
        conn.close()

    jobs = manager(calls, worker)
    try:
        job = submit(jobs, tmp_path)
        # Past the model's load: before it (step "starting") a cancel ends the worker without asking it.
        wait_until(lambda: job.step == "encoding")
        assert jobs.cancel(job.id).cancel_requested
        wait_until(lambda: job.state == "cancelled")
        assert seen.wait(30) and calls == [] and job.version is None
    finally:
        jobs.stop()


def test_a_version_published_after_the_cancel_is_deleted(calls, tmp_path):
    def worker(conn, cancel):
        conn.send(("progress", "publishing", 0, 1))
        assert cancel.wait(30)
        conn.send(("done", "v0002", {}))  # too late to stop: publishing had begun
        conn.close()

    jobs = manager(calls, worker)
    try:
        job = submit(jobs, tmp_path)
        # Still "starting", the manager ends the worker without asking it (nothing to lose yet).
        wait_until(lambda: job.step == "publishing")
        jobs.cancel(job.id)
        wait_until(lambda: job.state == "cancelled")
        assert calls == [("delete", "pets", "v0002")] and job.version is None and not job.activated
    finally:
        jobs.stop()


def test_a_worker_that_ends_without_a_result_fails_its_job_only(calls, tmp_path):
    results = iter([None, ("done", "v0001", {})])

    def worker(conn, cancel):
        result = next(results)
        if result is not None:
            conn.send(result)
        conn.close()

    jobs = manager(calls, worker)
    try:
        lost, next_one = submit(jobs, tmp_path), submit(jobs, tmp_path)
        wait_until(lambda: next_one.state == "succeeded")
        assert lost.state == "failed" and "without a result" in lost.error
        assert calls == [("activate", "pets", "v0001")]
    finally:
        jobs.stop()


def test_a_job_cancelled_while_queued_never_starts(calls, tmp_path):
    release, ran = threading.Event(), []

    def worker(conn, cancel):
        ran.append(1)
        release.wait(30)
        conn.send(("done", f"v000{len(ran)}", {}))
        conn.close()

    jobs = manager(calls, worker)
    try:
        first, queued = submit(jobs, tmp_path), submit(jobs, tmp_path)
        wait_until(lambda: first.state == "running")
        assert jobs.cancel(queued.id).state == "cancelled"
        release.set()
        wait_until(lambda: first.state == "succeeded")
        assert ran == [1] and queued.started is None
    finally:
        jobs.stop()


@pytest.mark.parametrize("outcome", ["done", "error", "died"])
def test_a_job_is_counted_in_the_metrics_before_it_reads_as_ended(calls, tmp_path, outcome):
    """A client that sees the job ended and then reads /metrics finds it counted and not running."""
    metrics = Metrics()
    seen: list[tuple[str, float, float]] = []

    class WatchedJob(BuildJob):
        def __setattr__(self, name, value):
            if name == "state" and value in TERMINAL:
                read = metrics.registry.get_sample_value
                seen.append((value, read("kvclip_build_jobs_total", {"state": value}),
                             read("kvclip_build_jobs_running")))
            super().__setattr__(name, value)

    def worker(conn, cancel):
        if outcome == "done":
            conn.send(("done", "v0001", {}))
        elif outcome == "error":
            conn.send(("error", "no images"))
        conn.close()

    jobs = JobManager(activate=lambda cache, version: None, delete_version=lambda cache, version: None,
                      runner=ScriptedRunner(worker), metrics=metrics)
    jobs.start()
    try:
        job = jobs.submit(WatchedJob(id="j1", cache="pets", options={}, workdir=tmp_path / "j1"))
        wait_until(lambda: job.state in TERMINAL)
        state = "succeeded" if outcome == "done" else "failed"
        assert seen == [(state, 1.0, 0.0)]
    finally:
        jobs.stop()
