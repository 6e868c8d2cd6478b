"""kill -9 at chosen points of a `kvclip build` and of a server running a build job: CURRENT
still loads, and after the next start nothing is half-written, no work folder, staging folder
or never-activated version is left, and the restarted server reports the job as failed.

Kill points are conditions (a file the paused builder writes, the job's step), never sleeps."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import httpx

from kvclip import artifact as store
from kvclip.cache_builder.build import BuildConfig, build_cache
from kvclip.service.jobs import INTERRUPTED
from tests.server_process import REPO, base_env, start_server, stop_server, wait_ready

FAST = ["--model", "tiny-random", "--shots", "2", "--views", "2", "--captioner", "none"]
TIMEOUT_S = 240

# The builder runs as `kvclip build`, except that at `point` it says so in a file and stops
# there, so the test kills it exactly at that point.
PAUSED_BUILD = textwrap.dedent("""
    import pathlib, sys, threading
    from kvclip import artifact as store
    import kvclip.cache_builder.build as build
    point, here = sys.argv[1], pathlib.Path(sys.argv[2])

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
    from kvclip.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}")
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
    script = tmp_path / "paused_build.py"
    script.write_text(PAUSED_BUILD)
    points = ("encoding", "staged", "renamed")
    caches, procs = {}, {}
    try:
        for point in points:  # three builds, each of its own copy of a cache, killed at once
            caches[point] = shutil.copytree(served_caches / "fashion", tmp_path / point / "fashion")
            procs[point] = subprocess.Popen(
                [sys.executable, str(script), point, str(tmp_path / f"at-{point}"), "build", str(fashion_train),
                 "--out", str(caches[point]), *FAST, "--seed", "7"],
                cwd=REPO, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for point in points:
            wait_for((tmp_path / f"at-{point}").exists, f"the build to reach {point}", procs[point])
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(30)
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


KILL_POINTS = {  # each holds once the job is past its point, ended included (warm workers are quick)
    "at once": lambda job: True,  # queued, or the worker just starting
    "building": lambda job: job["step"] not in (None, "starting") or job["state"] not in ("queued", "running"),
    "late": lambda job: job["step"] in ("tuning", "indexing", "publishing", "activating")
    or job["state"] not in ("queued", "running"),
}


def job_when(url: str, job_id: str, reached):
    """A condition: the job's JSON once `reached(job)` holds, else None."""
    def check():
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        return job if reached(job) else None
    return check


def test_kill_9_of_the_server_mid_job_at_three_points(served_caches, fashion_train, tmp_path):
    """Three servers side by side, each with its own copy of the caches, killed at one point
    of a build job each; then each restarted on what the kill left."""
    upload = zipped(fashion_train)
    options = json.dumps({"shots": 16, "views": 16, "captioner": "none"})  # a few encoder batches
    folders = {name: shutil.copytree(served_caches, tmp_path / name.replace(" ", "-") / "caches")
               for name in KILL_POINTS}
    before = store.list_versions(served_caches / "fashion")
    servers = {name: start_server(folders[name], folders[name].parent / "run0", build_worker="warm") for name in KILL_POINTS}
    seen, jobs = {}, {}
    try:
        for name, reached in KILL_POINTS.items():
            srv = wait_ready(servers[name])
            response = httpx.post(f"{srv.url}/v1/caches/fashion/builds", data={"options": options},
                                  files={"data": ("data.zip", upload, "application/zip")}, timeout=60)
            assert response.status_code == 202, response.text
            jobs[name] = response.json()["id"]
            seen[name] = wait_for(job_when(srv.url, jobs[name], reached), f"the job {name}", srv.proc)
            srv.proc.kill()  # kill -9, its build worker with it
            srv.proc.wait(30)
        servers = {name: start_server(folders[name], folders[name].parent / "run1") for name in KILL_POINTS}
        interrupted = []
        for name in KILL_POINTS:
            srv, caches = wait_ready(servers[name]), folders[name]
            after = httpx.get(f"{srv.url}/v1/jobs/{jobs[name]}", timeout=30).json()
            if seen[name]["state"] in ("queued", "running"):
                assert after["state"] == "failed" and after["error"] == INTERRUPTED, (name, after)
                interrupted.append(name)
            else:  # it ended before the kill landed: reported as it ended
                assert after["state"] == seen[name]["state"], (name, after)
            assert [p.name for p in (caches / ".jobs").iterdir()] == ["records"], name
            assert_clean(caches / "fashion", before + ([after["version"]] if after["state"] == "succeeded" else []))
        assert interrupted, "no kill landed while a job ran"
    finally:
        for srv in servers.values():
            stop_server(srv)
