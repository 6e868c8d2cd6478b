"""Starting server processes for the benchmark scripts (imported by them; not a test)."""
from __future__ import annotations

import contextlib
import os
import signal
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
                 unset: tuple[str, ...] = (), timeout_s: float = 300, cwd: Path = REPO, interval_s: float = 0.2,
                 quiet: bool = False) -> subprocess.Popen:
    """`kvclip serve --caches CACHES --port PORT ARGS...`, returned once /readyz answers 200;
    `env` added to this process's environment, the variables in `unset` left out of it. `cwd`
    (with PYTHONPATH in `env`) runs another checkout's code; `quiet` drops its log."""
    environ = {name: value for name, value in os.environ.items() if name not in unset}
    return start_process([sys.executable, "-m", "kvclip.cli", "serve", "--caches", str(caches), "--port", str(port),
                          *args], f"http://127.0.0.1:{port}/readyz", env={**environ, **(env or {})},
                         timeout_s=timeout_s, cwd=cwd, interval_s=interval_s, quiet=quiet)


def start_process(command: list[str], ready_url: str, env: dict[str, str] | None = None,
                  timeout_s: float = 300, cwd: Path = REPO, interval_s: float = 0.2,
                  quiet: bool = False) -> subprocess.Popen:
    """Run `command` in its own process group (stop_process ends its children too), returned
    once `ready_url` answers 200 (polled every `interval_s`). `env`: its whole environment
    (default: this one's); either way HF_HUB_OFFLINE=1. `quiet` drops its output.

    A process group, not a session: Linux's autogroup scheduler shares the CPU fairly between
    sessions, so a server in a session of its own would get a share of a busy machine as large
    as this whole process's, and beat an in-process baseline for that reason alone."""
    output = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(command, cwd=cwd, preexec_fn=os.setpgrp,  # process_group=0 from Python 3.11
                            stdout=output, stderr=output,
                            env={**(os.environ if env is None else env), "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command[0]} exited with {proc.returncode}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    stop_process(proc, timeout_s=0)
    raise SystemExit(f"{' '.join(command[:4])} did not become ready in {timeout_s:.0f} s")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by the live processes of group `pgid`."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ..., utime, stime
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_idle(pgid: int, busy_below: float = 0.05, window_s: float = 1.0, timeout_s: float = 300) -> float:
    """Wait until process group `pgid` uses less than `busy_below` of a core over `window_s`
    (a server that is ready may still be starting a warm build worker, which imports torch and
    loads the model: CPU that a measurement would count and compete with); returns the seconds
    waited. Gives up after `timeout_s` and says so."""
    start = time.monotonic()
    before = group_cpu_seconds(pgid)
    while time.monotonic() - start < timeout_s:
        time.sleep(window_s)
        now = group_cpu_seconds(pgid)
        if now - before < busy_below * window_s:
            return time.monotonic() - start
        before = now
    print(f"# process group {pgid} still busy after {timeout_s:g} s; measuring anyway", file=sys.stderr)
    return time.monotonic() - start


def pause_process(proc: subprocess.Popen, paused: bool) -> None:
    """SIGSTOP (or SIGCONT) the process group start_process made: an idle server that polls
    takes no CPU from the system being measured."""
    os.killpg(proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)


def stop_process(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM to the process group start_process made, SIGKILL after `timeout_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)  # a paused group handles no SIGTERM
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue
