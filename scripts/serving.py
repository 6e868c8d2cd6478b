"""Starting a `kvclip serve` process for the benchmark scripts (imported by them; not a test)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(caches: Path, port: int, *args: str, env: dict[str, str] | None = None,
                 timeout_s: float = 300, cwd: Path = REPO, interval_s: float = 0.2,
                 quiet: bool = False) -> subprocess.Popen:
    """`kvclip serve --caches CACHES --port PORT ARGS...`, returned once /readyz answers 200.
    `cwd` (with PYTHONPATH in `env`) runs another checkout's code; `quiet` drops its log."""
    output = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen([sys.executable, "-m", "kvclip.cli", "serve", "--caches", str(caches),
                             "--port", str(port), *args], cwd=cwd, stdout=output, stderr=output,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    proc.kill()
    raise SystemExit(f"the server did not become ready in {timeout_s:.0f} s")
