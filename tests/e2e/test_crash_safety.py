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
from kvclip.service.jobs import INTERRUPTED
from tests.server_process import REPO, base_env, kvclip_cmd, serve_process

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


def test_kill_9_of_kvclip_build_at_three_points(fashion_train, tmp_path):
    cache = tmp_path / "caches" / "pets"
    subprocess.run(kvclip_cmd("build", str(fashion_train), "--out", str(cache), *FAST), cwd=REPO,
                   env=base_env(), check=True, capture_output=True, timeout=TIMEOUT_S)
    script = tmp_path / "paused_build.py"
    script.write_text(PAUSED_BUILD)
    for point in ("encoding", "staged", "renamed"):
        here = tmp_path / f"at-{point}"
        proc = subprocess.Popen([sys.executable, str(script), point, str(here), "build", str(fashion_train),
                                 "--out", str(cache), *FAST, "--seed", "7"],
                                cwd=REPO, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(here.exists, f"the build to reach {point}", proc)
        finally:
            proc.kill()
            proc.wait(30)
        assert store.load_cache(cache).version == "v0001"  # CURRENT loads right after the kill
        # the next build cleans what the killed one left and publishes the next version
        subprocess.run(kvclip_cmd("build", str(fashion_train), "--out", str(cache), *FAST, "--no-activate"),
                       cwd=REPO, env=base_env(), check=True, capture_output=True, timeout=TIMEOUT_S)
        assert_clean(cache, ["v0001", "v0002"])
        store.delete_version(cache, "v0002")


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


KILL_POINTS = {
    "loading the model": lambda job: job["state"] == "running" and job["step"] == "starting",
    "building": lambda job: job["state"] == "running" and job["step"] not in (None, "starting"),
    "late": lambda job: job["step"] in ("tuning", "indexing", "publishing", "activating")
    or job["state"] not in ("queued", "running"),
}


def job_when(url: str, job_id: str, reached):
    """A condition: the job's JSON once `reached(job)` holds, else None."""
    def check():
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        return job if reached(job) else None
    return check


def test_kill_9_of_the_server_mid_job_three_times(served_caches, fashion_train, tmp_path):
    caches = tmp_path / "caches"
    shutil.copytree(served_caches, caches)
    cache = caches / "fashion"
    before = store.list_versions(cache)
    upload = zipped(fashion_train)
    options = json.dumps({"shots": 2, "views": 2, "captioner": "none"})
    interrupted: list[str] = []
    server = serve_process(caches, tmp_path / "run0")
    srv = server.__enter__()
    try:
        for number, (name, reached) in enumerate(KILL_POINTS.items(), start=1):
            response = httpx.post(f"{srv.url}/v1/caches/fashion/builds", data={"options": options},
                                  files={"data": ("data.zip", upload, "application/zip")}, timeout=60)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            job = wait_for(job_when(srv.url, job_id, reached), f"the job {name}", srv.proc)
            srv.proc.kill()  # kill -9, the worker with it
            srv.proc.wait(30)
            server.__exit__(None, None, None)
            server = serve_process(caches, tmp_path / f"run{number}")
            srv = server.__enter__()
            after = httpx.get(f"{srv.url}/v1/jobs/{job_id}", timeout=30).json()
            if job["state"] in ("queued", "running"):
                assert after["state"] == "failed" and after["error"] == INTERRUPTED, after
                interrupted.append(job_id)
            else:  # it ended before the kill landed: reported as it ended
                assert after["state"] == job["state"]
            assert [p.name for p in (caches / ".jobs").iterdir()] == ["records"]
            expected = before + ([after["version"]] if after["state"] == "succeeded" else [])
            assert_clean(cache, expected)
            before = expected
        assert interrupted, "no kill landed while a job ran"
        # every interrupted job is still reported after yet another start
        listed = {j["id"]: j for j in httpx.get(f"{srv.url}/v1/jobs", timeout=30).json()["jobs"]}
        assert all(listed[i]["error"] == INTERRUPTED for i in interrupted)
    finally:
        server.__exit__(None, None, None)
