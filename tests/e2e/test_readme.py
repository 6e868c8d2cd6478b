"""The README's "Your own images, start to finish" blocks, run as written on a plain image
folder without captions: build, serve, classify, an HTTP build with curl, `kvclip caches
build`, and the Python client's build_cache. Only the model (tiny-random) and the port are
substituted, so the README cannot drift from what works.

The client commands, zip, curl and the Python block run as processes; `kvclip build` and
`kvclip serve` go through the same `kvclip` entry point in-process (the server on a thread,
building on a thread): what this checks is the README, not the processes, and two torch
processes plus a warm build worker cost 20 s of CPU. `kvclip serve` as a process:
tests/e2e/test_service_uvicorn.py; builds in the warm worker: tests/integration/test_service_builds.py."""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.client_fakes import run_cli
from tests.conftest import write_images
from tests.live_server import serving
from tests.server_process import REPO, base_env, free_port
from tests.service_helpers import run_serve

README = REPO / "README.md"


def marked_block(name: str) -> str:
    """The fenced code block right after `<!-- readme-test: NAME -->` in the README."""
    match = re.search(rf"<!-- readme-test: {re.escape(name)} -->\s*```\w+\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no block marked readme-test: {name}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """One command per line; trailing `# comments` dropped (no command here quotes a '#')."""
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def substituted(text: str, port: int) -> str:
    return text.replace("ViT-B-32:openai", "tiny-random").replace("8000", str(port))


def wait_job(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("zip") is None, reason="needs curl and zip")
def test_readme_first_hour_on_plain_images(tmp_path, monkeypatch, capsys):
    for label, seed in (("cat", 0), ("dog", 1)):
        for i, path in enumerate(write_images(tmp_path / "photos" / label, 3, seed=seed, suffix=".jpg"), 1):
            path.rename(path.with_name(f"{i}.jpg"))  # photos/cat/1.jpg, as the README names it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The client commands' default server is port 8000; the test's port is given the same way.
    env = base_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", KVCLIP_SERVER=url)
    monkeypatch.chdir(tmp_path)  # the commands' relative paths (photos, caches/pets)
    outputs = []
    with contextlib.ExitStack() as server:
        for command in commands(substituted(marked_block("first-hour"), port)):
            argv = shlex.split(command.removesuffix("&"))
            if argv[:2] == ["kvclip", "serve"]:
                assert command.endswith("&")
                with pytest.MonkeyPatch.context() as patch:  # its recorder of uvicorn.Server ends here
                    code, err, config = run_serve(patch, capsys, *argv[2:], env={"KVCLIP_BUILD_WORKER": "thread"})
                assert code == 0 and config is not None, err
                server.enter_context(serving(config))
                continue
            if argv[:2] == ["kvclip", "build"]:
                code, out, err = run_cli(capsys, *argv[1:])
                assert code == 0, (command, out, err)
                outputs.append((command, out))
                continue
            done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            outputs.append((command, done.stdout))

        build_out = outputs[0][1]
        assert "captions: auto, 0 from caption files, 0 generated, 6 without" in build_out
        assert "warning: fewer support images than asked for in cat (3), dog (3)" in build_out
        assert "method auto serves" in build_out
        served = httpx.get(f"{url}/v1/caches/pets", timeout=10).json()
        assert "caps" not in served["methods"] and {"zeroshot", "tip", "tipx"} <= set(served["methods"])
        assert "cat" in outputs[1][1]  # the classify table lists the labels

        curl_answer = outputs[3][1]  # the HTTP build's 202 answer holds the job id
        job = wait_job(url, httpx.Response(202, content=curl_answer).json()["id"])
        assert job["state"] == "succeeded", job
        assert (job["step"], job["done"], job["total"]) == ("activating", 1, 1)
        assert job["report"]["source"] == "uploaded archive photos.zip"
        assert job["report"]["captioner"]["name"] == "auto" and job["report"]["captioner"]["uncaptioned"] == 6
        client_build = outputs[4][1]
        assert "succeeded" in client_build and "captions: auto" in client_build and "warning: fewer" in client_build

        python = substituted(marked_block("first-hour-python"), port)
        done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        version, label = done.stdout.split()
        assert re.fullmatch(r"v\d{4}", version) and label in ("cat", "dog")
