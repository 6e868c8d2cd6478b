"""Offline checks of the container files: Dockerfile, .dockerignore, docker/compose.yaml and
scripts/container_smoke.sh. No image is built here (scripts/container_smoke.sh does that,
under KVCLIP_CONTAINER=1 bash .ci/run)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from kvclip.service.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
SMOKE = ROOT / "scripts" / "container_smoke.sh"

# Variables kvclip reads that are not ServerConfig fields.
EXTRA_ENV = {"KVCLIP_API_KEYS"}
SERVER_ENV = {"KVCLIP_" + f.name.upper() for f in fields(ServerConfig)} | EXTRA_ENV


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def stages(instrs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instrs:
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.fixture(scope="module")
def instrs():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(instrs):
    return stages(instrs)[-1]


def test_parser_sees_continuations():
    parsed = parse_dockerfile("FROM a AS b\n# c\nRUN x \\\n    && y\nCMD [\"z\"]\n")
    assert parsed == [("FROM", "a AS b"), ("RUN", "x && y"), ("CMD", '["z"]')]


def test_base_is_a_build_arg_defaulting_to_python_slim(instrs):
    first_from = next(i for i, (w, _) in enumerate(instrs) if w == "FROM")
    global_args = dict(a.partition("=")[::2] for w, a in instrs[:first_from] if w == "ARG")
    assert global_args.get("BASE") == "python:3.11-slim"
    assert instrs[first_from][1].split()[0] == "${BASE}"


def test_build_args(instrs):
    args = {a.partition("=")[0] for w, a in instrs if w == "ARG"}
    assert {"BASE", "FLAVOR", "TORCH_INDEX_URL", "WHEELHOUSE", "PIP_EXTRA", "MODEL_WEIGHTS"} <= args
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text  # the CPU flavour's torch index
    assert "faiss-gpu" in text and "faiss-cpu" in text


def test_multi_stage_final_copies_the_venv_and_has_no_build_tools(instrs, final):
    assert len(stages(instrs)) >= 3
    copies = [a for w, a in final if w == "COPY"]
    assert any(a.startswith("--from=builder") and "/opt/venv" in a for a in copies)
    final_runs = " ".join(a for w, a in final if w == "RUN")
    for tool in ("gcc", "build-essential", "pip install", "g++", "curl"):
        assert tool not in final_runs, f"{tool} in the final stage"


def test_final_stage_runs_as_non_root(final):
    users = [a for w, a in final if w == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    if user.isdigit():  # the numeric user is the one the stage creates
        assert any(w == "RUN" and f"--uid {user}" in a for w, a in final)


def test_healthcheck_probes_healthz_without_curl(final):
    checks = [a for w, a in final if w == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0] and "urllib" in checks[0] and "curl" not in checks[0]
    cmd = checks[0][checks[0].index("CMD") + 3:].strip()
    assert json.loads(cmd)[0].startswith("python")  # exec form


def test_port_volume_env_entrypoint(final):
    assert ("EXPOSE", "8000") in final
    assert ("VOLUME", "/caches") in final
    env = " ".join(a for w, a in final if w == "ENV")
    assert re.search(r"\bKVCLIP_CACHES=/caches\b", env)
    assert re.search(r"\bKVCLIP_HOST=0\.0\.0\.0\b", env)
    for name in re.findall(r"\b(KVCLIP_[A-Z_]+)=", env):
        assert name in SERVER_ENV, f"{name} is not a kvclip setting"
    assert [json.loads(a) for w, a in final if w == "ENTRYPOINT"] == [["kvclip"]]
    assert [json.loads(a) for w, a in final if w == "CMD"] == [["serve"]]


def test_model_weights_bake_fails_loudly():
    text = DOCKERFILE.read_text()
    bake = text[text.index("ARG MODEL_WEIGHTS"):]
    assert "exit 1" in bake and "could not be downloaded" in bake


def test_copied_sources_exist_and_are_not_ignored(instrs):
    ignored = {
        line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for w, a in instrs:
        if w != "COPY" or a.startswith("--from"):
            continue
        *sources, _dest = a.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.rstrip("/") not in ignored, f"{src} is copied but .dockerignore drops it"
    assert {".git", ".venv", "caches", "demo-data", ".cache"} <= ignored
    assert ".wheels" not in ignored  # the optional wheelhouse must reach the build
    assert "/.wheels/" in (ROOT / ".gitignore").read_text().split()


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_server(compose):
    server = compose["services"]["server"]
    assert server["build"]["context"] == ".." and (COMPOSE.parent / ".." / "Dockerfile").exists()
    assert "caches:/caches" in server["volumes"]
    assert "caches" in compose["volumes"]
    assert server["restart"] in ("unless-stopped", "always", "on-failure")
    hc = server["healthcheck"]
    assert hc["test"][0] == "CMD" and any("/healthz" in part for part in hc["test"])
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "8000" in str(server["ports"][0])
    env = server["environment"]
    assert env["KVCLIP_CACHES"] == "/caches" and "KVCLIP_MODEL" in env
    for name in env:
        assert name in SERVER_ENV, f"{name} is not a kvclip setting"
    assert "profiles" not in server  # starts with a plain `up`


def compose_schema() -> dict:
    """The compose file JSON schema shipped in the docker-compose 1.29 wheel, which
    scripts/fetch_test_data.sh keeps in .cache/test-data (read, never installed)."""
    import json
    import zipfile

    wheels = sorted((ROOT / ".cache" / "test-data").glob("docker_compose-*.whl"))
    assert wheels, "no docker-compose wheel in .cache/test-data: run scripts/fetch_test_data.sh"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        schema = json.loads(wheel.read("compose/config/compose_spec.json"))
    # The spec gained a top-level project `name` after 1.29; everything else is checked as is.
    schema["properties"]["name"] = {"type": "string"}
    return schema


def test_compose_file_matches_the_compose_schema(compose):
    import jsonschema

    validator = jsonschema.Draft7Validator(compose_schema())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = {**compose, "services": {**compose["services"],
                                      "server": {**compose["services"]["server"], "helthcheck": {}}}}
    assert any("helthcheck" in e.message for e in validator.iter_errors(broken))


def test_compose_build_job(compose):
    job = compose["services"]["build"]
    assert job["profiles"] == ["build"]
    assert job["command"][0] == "build" and "--out" in job["command"]
    out = job["command"][job["command"].index("--out") + 1]
    assert out.startswith("/caches/")
    assert "caches:/caches" in job["volumes"]
    assert job["image"] == compose["services"]["server"]["image"]
    assert job["restart"] == "no"


def test_smoke_script_is_valid_bash():
    bash = shutil.which("bash")
    subprocess.run([bash, "-n", str(SMOKE)], check=True)
    text = SMOKE.read_text()
    assert "container-smoke.sh" in text and "kvclip_http_requests_total" in text
    assert "/readyz" in text and " build " in text
