"""The README's "Your own images, start to finish" blocks, run as written on a plain image
folder without captions: build, serve, classify, an HTTP build with curl, `kvclip caches
build`, and the Python client's build_cache. Only the model (tiny-random) and the port are
substituted, so the README cannot drift from what works."""
from __future__ import annotations

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

from tests.conftest import write_images
from tests.server_process import REPO, START_TIMEOUT_S, base_env, free_port

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


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "kvclip serve exited"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server never became ready")


def wait_job(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("zip") is None, reason="needs curl and zip")
def test_readme_first_hour_on_plain_images(tmp_path):
    for label, seed in (("cat", 0), ("dog", 1)):
        for i, path in enumerate(write_images(tmp_path / "photos" / label, 3, seed=seed, suffix=".jpg"), 1):
            path.rename(path.with_name(f"{i}.jpg"))  # photos/cat/1.jpg, as the README names it
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The client commands' default server is port 8000; the test's port is given the same way.
    env = base_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", KVCLIP_SERVER=url)
    outputs, server = [], None
    try:
        for command in commands(substituted(marked_block("first-hour"), port)):
            if command.endswith("&"):
                log = open(tmp_path / "server.log", "wb")
                server = subprocess.Popen(shlex.split(command[:-1]), cwd=tmp_path, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                wait_ready(url, server)
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
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
