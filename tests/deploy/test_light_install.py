"""The light install for real: kvclip's wheel in a fresh venv with its base dependencies only
(no torch, open_clip, faiss, fastapi), classifying over HTTP against the
server (its app under uvicorn in a thread of the test process).

No network: the wheel is built from a copy of the sources (`pip wheel --no-deps`), and the
base dependencies (httpx, tqdm and theirs) come from this machine's local package index
(LOCAL_INDEX), never from a remote one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from kvclip.vocabulary import VERSION
from tests.live_server import serve_in_thread
from tests.server_process import base_env
from tests.service_helpers import copy_caches

REPO = Path(__file__).resolve().parents[2]
# What the Dockerfile copies: the packaged sources and nothing else.
SOURCES = ("pyproject.toml", "README.md", "kvclip", "cache_builder", "service", "clients", "deploy")
LOCAL_INDEX = Path(os.environ.get("KVCLIP_LOCAL_INDEX", "/opt/pypi/simple"))


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheels")
    done = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "-q", "-w", str(out), str(src)])
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("kvclip-*.whl")
    return built


@pytest.fixture(scope="module")
def light_venv(wheel, tmp_path_factory) -> Path:
    if not LOCAL_INDEX.is_dir():
        pytest.skip(f"no local package index at {LOCAL_INDEX} (set KVCLIP_LOCAL_INDEX) to install httpx and tqdm "
                    "from without the network")
    root = tmp_path_factory.mktemp("light") / "venv"
    # No pip inside (ensurepip costs 5 s of CPU): this environment's pip installs into it.
    venv.EnvBuilder(with_pip=False).create(root)
    # Only the local index: no remote index, no find-links with other wheels, no constraints.
    done = pip(root, "install", "-q", "--index-url", LOCAL_INDEX.resolve().as_uri(), str(wheel))
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def pip(venv_root: Path, *args: str) -> subprocess.CompletedProcess:
    """`pip ARGS` acting on the venv at venv_root, with no pip configuration of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return run([sys.executable, "-m", "pip", "--python", str(venv_root / "bin" / "python"), *args], env=env)


def light(venv_root: Path, *args: str) -> subprocess.CompletedProcess:
    """`kvclip ARGS` from the light venv, run outside the repository so it cannot import the checkout."""
    return run([str(venv_root / "bin" / "kvclip"), *args], cwd=venv_root, env=base_env())


def test_wheel_top_level_is_kvclip_alone(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (top_level,) = [n for n in zf.namelist() if n.endswith(".dist-info/top_level.txt")]
        assert zf.read(top_level).decode().split() == ["kvclip"]
        assert {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")} == {"kvclip"}


def test_light_install_has_no_torch_and_its_dependencies_are_met(light_venv):
    python = str(light_venv / "bin" / "python")
    for module in ("torch", "open_clip", "faiss", "fastapi", "numpy", "PIL"):
        done = run([python, "-c", f"import {module}"], cwd=light_venv)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, module
    done = pip(light_venv, "check")
    assert done.returncode == 0, done.stdout + done.stderr
    done = run([python, "-c", "import kvclip, kvclip.clients; print(kvclip.__file__, kvclip.__version__)"],
               cwd=light_venv)
    location, version = done.stdout.split()
    assert Path(location).is_relative_to(light_venv) and version == VERSION


def test_light_help_and_client_help(light_venv):
    for args in (["--help"], ["classify", "--help"], ["caches", "build", "--help"], ["jobs", "list", "--help"]):
        done = light(light_venv, *args)
        assert done.returncode == 0, (args, done.stderr)
        assert "usage: kvclip" in done.stdout
    assert light(light_venv, "--version").stdout.strip() == f"kvclip {VERSION}"


@pytest.mark.parametrize("args", [["serve", "--caches", "c", "--model", "tiny-random"],
                                  ["build", "--labels", "labels.txt", "--out", "c"],
                                  ["eval", "--cache", "c", "--data", "d"]])
def test_light_server_commands_name_the_extra_in_one_line(light_venv, args):
    done = light(light_venv, *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"`kvclip {args[0]}` needs the server extra" in done.stderr
    assert "pip install 'kvclip[server]'" in done.stderr


def test_light_client_classifies_against_a_served_cache(light_venv, served_caches, fashion_test, tmp_path,
                                                       tiny_encoder):
    images = sorted(fashion_test.rglob("*.png"))[:2]
    caches = copy_caches(served_caches, tmp_path / "caches")
    with serve_in_thread(caches, tmp_path, encoder=tiny_encoder) as server:
        done = light(light_venv, "classify", *map(str, images), "--cache", "fashion", "--top-k", "2",
                     "--server", server.url, "--json")
        assert done.returncode == 0, done.stderr
        listed = light(light_venv, "caches", "list", "--server", server.url)
    answer = json.loads(done.stdout)
    assert answer["cache"] == "fashion"
    assert [r["name"] for r in answer["results"]] == [p.name for p in images]
    assert all(len(r["labels"]) == 2 for r in answer["results"])
    assert listed.returncode == 0 and "fashion" in listed.stdout
