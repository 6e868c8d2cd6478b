"""Job records survive a restart; cancelled and interrupted jobs leave no work folder; the
unpack budget is shared by every job's uploads. No worker process is started here."""
from __future__ import annotations

import threading

import pytest

from kvclip.service import jobs as jobs_module
from kvclip.service.archives import ArchiveTooLarge
from kvclip.service.jobs import INTERRUPTED, JobManager, WorkerHandle
from kvclip.service.unpack_budget import UnpackBudget


def manager(root, **kw) -> JobManager:
    return JobManager(lambda cache, version: None, lambda cache, version: None, jobs_root=root, **kw)


def queued_job(mgr: JobManager, cache: str = "pets"):
    job = mgr.new_job(cache, {"shots": 2}, mgr.jobs_root)
    (job.workdir / "data" / "cat").mkdir(parents=True)
    (job.workdir / "data" / "cat" / "a.png").write_bytes(b"x")
    return mgr.submit(job)


def test_a_job_cancelled_while_queued_drops_its_upload(tmp_path):
    mgr = manager(tmp_path / "jobs")
    job = queued_job(mgr)
    mgr.cancel(job.id)
    assert job.state == "cancelled" and not job.workdir.exists()


def test_records_survive_a_restart_and_interrupted_jobs_fail(tmp_path):
    root = tmp_path / "jobs"
    first = manager(root)
    done, waiting = queued_job(first), queued_job(first)
    first.cancel(done.id)
    (root / "stray-work-folder").mkdir()
    # the server dies here: `waiting` is still queued, its upload on disk
    second = manager(root)
    interrupted = second.restore()
    assert [j.id for j in interrupted] == [waiting.id]
    again = second.get(waiting.id)
    assert again.state == "failed" and again.error == INTERRUPTED and again.finished is not None
    assert second.get(done.id).state == "cancelled"
    assert second.get(done.id).as_dict()["options"] == {"shots": 2}
    assert [p.name for p in root.iterdir()] == ["records"]  # every work folder is gone
    assert second.abandoned(waiting.id) and not second.abandoned("unknown")
    # and a third start reads the same
    third = manager(root)
    assert third.restore() == [] and third.get(waiting.id).error == INTERRUPTED


def test_only_the_last_max_kept_records_are_kept(tmp_path):
    root = tmp_path / "jobs"
    mgr = manager(root, max_kept=2)
    ids = []
    for _ in range(4):
        job = queued_job(mgr)
        mgr.cancel(job.id)
        ids.append(job.id)
    last = queued_job(mgr)  # submitting prunes
    assert len(list((root / "records").glob("*.json"))) == 3  # the two last finished, and the queued one
    restored = manager(root, max_kept=2)
    restored.restore()  # the queued one is failed now: the last two finished are it and ids[-1]
    assert {j.id for j in restored.list()} == {ids[-1], last.id}
    assert len(list((root / "records").glob("*.json"))) == 2


def test_a_cancel_while_the_worker_loads_the_model_ends_it_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_module, "_CANCEL_GRACE_S", 1e9)  # the old grace would wait forever

    class LoadingForever:  # a worker still importing torch: alive, silent
        terminated = False

        def is_alive(self):
            return not self.terminated

        def terminate(self):
            self.terminated = True

    class Silent:
        def poll(self, timeout=0):
            return False

    mgr = manager(tmp_path / "jobs")
    job = mgr.new_job("pets", {}, mgr.jobs_root)
    job.state = "running"
    job.progress("starting", 0, 0)
    cancel, process, outcome = threading.Event(), LoadingForever(), []
    cancel.set()
    worker = WorkerHandle(Silent(), cancel, process)
    runner = threading.Thread(target=lambda: outcome.append(mgr._follow(job, worker)),
                              daemon=True)
    runner.start()
    runner.join(60)
    assert outcome == [("cancelled",)] and process.terminated


def test_the_unpack_budget_is_shared_by_all_jobs(tmp_path):
    budget = UnpackBudget(max_total_bytes=100, min_free_bytes=0)
    budget.charge("a", 60, tmp_path)
    with pytest.raises(ArchiveTooLarge, match="queued and running builds"):
        budget.charge("b", 50, tmp_path)
    budget.release("a")
    budget.charge("b", 50, tmp_path)
    assert budget.total == 50


def test_unpacking_stops_when_the_disk_would_fill(tmp_path):
    budget = UnpackBudget(max_total_bytes=2**62, min_free_bytes=2**62)  # more free space than any disk has
    with pytest.raises(ArchiveTooLarge, match="bytes free"):
        budget.check_disk(tmp_path / "not-yet" / "made")
    with pytest.raises(ArchiveTooLarge, match="bytes free"):
        budget.charge("a", 1, tmp_path)  # a job's first bytes look at the disk
