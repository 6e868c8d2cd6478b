"""kill -9 at chosen points of a `kvclip build` and of a server running a build job: CURRENT
still loads, and after the next start nothing is half-written, no work folder, staging folder
or never-activated version is left, and the restarted server reports the job as failed.

Kill points are conditions (a file the paused builder writes, the job's step), never sleeps. The
server killed late in a job (tuning to publishing) is a slow test (`-m slow`)."""
from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kvclip import artifact as store
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.service.jobs import INTERRUPTED
from tests.server_process import start_server, stop_server, wait_ready
from tests.service_helpers import make_config, running_app

FAST = ["--model", "tiny-random", "--shots", "2", "--views", "2", "--captioner", "none"]
TIMEOUT_S = 240

def paused_build(point: str, here: Path, argv: list[str]) -> None:
    """`kvclip build ARGV` in a forked child, except that at `point` it says so in a file and
    stops there, so the test kills it (-9) exactly at that point.

    Forked from the test process, torch already imported: the kill, not the interpreter's
    start, is what the test is about."""
    import threading

    import torch

    import kvclip.cache_builder.build as build
    from kvclip.cli import main

    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork; one thread needs none

    def pause(*args, **kwargs):
        here.write_text(point)
        threading.Event().wait()  # killed here

    def after(original):
        def run(*args, **kwargs):
            result = original(*args, **kwargs)
            pause()
            return result
        return run

    if point == "encoding":
        build.encode_items = lambda *a, **k: (pause(), None)[1]
    elif point == "staged":  # every file of the version written, nothing renamed yet
        store._write_files = after(store._write_files)
    elif point == "renamed":  # the version is in versions/, CURRENT not yet moved
        store.set_current = pause
    os._exit(main(argv))


def wait_for(condition, what: str, alive: Callable[[], bool] = lambda: True, timeout: float = TIMEOUT_S):
    """condition()'s first true value; fails once `alive()` (the process that should get there) is false."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if not alive():
            raise AssertionError(f"the process ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_clean(cache_dir: Path, versions: list[str]) -> None:
    assert store.list_versions(cache_dir) == versions
    assert not list(cache_dir.glob(".staging-*")) and not store.pending_versions(cache_dir)
    assert store.load_cache(cache_dir).version == store.current_version(cache_dir)


def next_build(cache: Path, data: Path, encoder) -> None:
    """What the next `kvclip build` does (in-process: the cleanup is not about the process)."""
    build_cache(BuildConfig(out=cache, data_dir=data, model="tiny-random", shots=2, views=2, captioner="none",
                            activate=False, progress=False), encoder)


def test_kill_9_of_kvclip_build_at_three_points(served_caches, fashion_train, tiny_encoder, tmp_path):
    points = ("encoding", "staged", "renamed")
    caches, procs = {}, {}
    fork = multiprocessing.get_context("fork")
    try:
        for point in points:  # three builds, each of its own copy of a cache, killed at once
            caches[point] = shutil.copytree(served_caches / "fashion", tmp_path / point / "fashion")
            argv = ["build", str(fashion_train), "--out", str(caches[point]), *FAST, "--seed", "7"]
            procs[point] = fork.Process(target=paused_build, args=(point, tmp_path / f"at-{point}", argv))
            procs[point].start()
        for point in points:
            wait_for((tmp_path / f"at-{point}").exists, f"the build to reach {point}", procs[point].is_alive)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.join(30)
    for point in points:
        cache = caches[point]
        before = store.list_versions(served_caches / "fashion")
        assert store.load_cache(cache).version == store.current_version(served_caches / "fashion"), point
        # the next build cleans what the killed one left and publishes the next version
        next_build(cache, fashion_train, tiny_encoder)
        assert_clean(cache, [*before, f"v{len(before) + 1:04d}"])


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


# kill point -> (the condition it waits for, the server's build worker). Each condition holds
# once the job is past its point, ended included (warm workers are quick). A second job, queued
# behind the first, is killed while it waits. The default suite's server builds in a warm
# worker, whose process must die with the server; the slow test's builds on a thread.
KILL_POINTS = {
    "building": (lambda job: job["step"] not in (None, "starting") or job["state"] not in ("queued", "running"),
                 "warm"),
    "late": (lambda job: job["step"] in ("tuning", "indexing", "publishing", "activating")
             or job["state"] not in ("queued", "running"), "thread"),
}


def child_pids(pid: int) -> list[int]:
    return [int(child) for children in Path(f"/proc/{pid}/task").glob("*/children")
            for child in children.read_text().split()]


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child that nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def job_when(url: str, job_id: str, reached):
    """A condition: the job's JSON once `reached(job)` holds, else None."""
    def check():
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        return job if reached(job) else None
    return check


async def restarted(caches: Path, seen: list[dict], before: list[str]) -> list[bool]:
    """Start the server again, in-process (the restart's recovery is not about the process), on
    what the kill left; for each job (as `seen` just before the kill) whether the kill
    interrupted it."""
    async with running_app(make_config(caches)) as (_, client):
        after = [(await client.get(f"/v1/jobs/{job['id']}")).json() for job in seen]
    interrupted = [job["state"] in ("queued", "running") for job in seen]
    for was, now, cut in zip(seen, after, interrupted):
        if cut:
            assert now["state"] == "failed" and now["error"] == INTERRUPTED, now
        else:  # it ended before the kill landed: reported as it ended
            assert now["state"] == was["state"], now
    assert [p.name for p in (caches / ".jobs").iterdir()] == ["records"]
    assert_clean(caches / "fashion", before + [job["version"] for job in after if job["state"] == "succeeded"])
    return interrupted


def kill_servers_mid_job(points: list[str], served_caches: Path, fashion_train: Path,
                         tmp_path: Path) -> dict[str, list[bool]]:
    """Servers side by side, one per kill point, each with its own copy of the caches, killed at
    that point of a build job with a second job queued behind it; then each restarted on what
    the kill left. Returns, per point, whether the kill interrupted each of its two jobs (the
    first may have ended already)."""
    upload = zipped(fashion_train)
    options = json.dumps({"shots": 16, "views": 16, "captioner": "none"})  # a few encoder batches
    folders = {name: shutil.copytree(served_caches, tmp_path / name / "caches") for name in points}
    before = store.list_versions(served_caches / "fashion")
    servers = {name: start_server(folders[name], folders[name].parent / "run0", build_worker=KILL_POINTS[name][1])
               for name in points}
    seen: dict[str, list[dict]] = {}
    workers: list[int] = []
    try:
        for name in points:
            srv = wait_ready(servers[name])
            jobs = []
            for _ in range(2):
                response = httpx.post(f"{srv.url}/v1/caches/fashion/builds", data={"options": options},
                                      files={"data": ("data.zip", upload, "application/zip")}, timeout=60)
                assert response.status_code == 202, response.text
                jobs.append(response.json()["id"])
            waiting = httpx.get(f"{srv.url}/v1/jobs/{jobs[1]}", timeout=30).json()  # queued (or, once the first ends, running)
            first = wait_for(job_when(srv.url, jobs[0], KILL_POINTS[name][0]), f"the job {name}",
                             lambda proc=srv.proc: proc.poll() is None)
            seen[name] = [first, waiting]
            workers += child_pids(srv.proc.pid)
            srv.proc.kill()  # kill -9, its build worker with it
            srv.proc.wait(30)
    finally:
        for srv in servers.values():
            stop_server(srv)
    if any(KILL_POINTS[name][1] == "warm" for name in points):
        assert workers, "the warm server had no build worker"
    wait_for(lambda: not any(map(running, workers)), "the killed servers' build workers to exit")
    return {name: asyncio.run(restarted(folders[name], seen[name], before)) for name in points}


def test_kill_9_of_the_server_mid_job(served_caches, fashion_train, tmp_path):
    """Killed while it builds in a warm worker, a second job queued behind."""
    interrupted = kill_servers_mid_job(["building"], served_caches, fashion_train, tmp_path)["building"]
    assert interrupted[1], "the kill did not land while the second job waited"


@pytest.mark.slow
def test_kill_9_of_the_server_late_in_a_job(served_caches, fashion_train, tmp_path):
    """Killed while it tunes, indexes or publishes (or, on a fast machine, once it has ended)."""
    interrupted = kill_servers_mid_job(["late"], served_caches, fashion_train, tmp_path)["late"]
    assert interrupted[1], "the kill did not land while the second job waited"
