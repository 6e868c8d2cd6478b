"""A real `kvclip serve` process on 127.0.0.1 for tests (uvicorn, sockets, signals)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180  # generous: importing torch on a loaded machine takes a while


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any KVCLIP_* setting, hub switched off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCLIP_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def kvclip_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvclip.cli", *args]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    caches: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line being written right now
        return records

    def wait_for_record(self, predicate, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for record in self.log_records():
                if predicate(record):
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching log record; log tail:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)


def _wait_http(server: Server, path: str, deadline: float) -> None:
    last = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"kvclip serve exited with {server.proc.returncode} before {path} "
                                 f"answered 200; stderr:\n{server.log_text()[-6000:]}")
        try:
            response = httpx.get(server.url + path, timeout=2)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:500]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(f"{path} not 200 after {START_TIMEOUT_S} s (last: {last}); "
                         f"stderr:\n{server.log_text()[-6000:]}")


def start_server(caches: Path, workdir: Path, *args: str, env: dict[str, str] | None = None,
                 model: str = "tiny-random", build_worker: str = "process") -> Server:
    """Start `kvclip serve` on a free port without waiting for it (see wait_ready).

    Output (stdout and stderr) goes to workdir/server.log; `args` are extra CLI flags. Builds
    get a process per job unless `build_worker` says "warm" (the default of `kvclip serve`):
    a server that builds nothing then starts no warm worker to load a second model.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    port = free_port()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            kvclip_cmd("serve", "--caches", str(caches), "--model", model, "--device", "cpu",
                       "--port", str(port), "--build-worker", build_worker, *args),
            cwd=REPO, env=base_env(**(env or {})), stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Server(f"http://127.0.0.1:{port}", proc, log_path, caches)


def wait_ready(server: Server) -> Server:
    """Wait for /healthz, then /readyz, to answer 200."""
    deadline = time.monotonic() + START_TIMEOUT_S
    _wait_http(server, "/healthz", deadline)
    _wait_http(server, "/readyz", deadline)
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(timeout=10)


@contextlib.contextmanager
def serve_process(caches: Path, workdir: Path, *args: str, env: dict[str, str] | None = None,
                  model: str = "tiny-random", build_worker: str = "process"):
    """Start `kvclip serve` on a free port, wait for /healthz and /readyz, kill it on exit."""
    srv = start_server(caches, workdir, *args, env=env, model=model, build_worker=build_worker)
    try:
        yield wait_ready(srv)
    finally:
        stop_server(srv)
