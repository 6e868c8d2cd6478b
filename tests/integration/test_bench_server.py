"""scripts/bench_server.py's helpers and scripts/serving.py's process control (the benchmark
itself is never run here: it takes many minutes and needs LitServe from PyPI)."""
from __future__ import annotations

import asyncio
import importlib
import itertools
import os
import signal
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import pytest

from kvclip.errors import ImageDecodeError
from kvclip.service.app import create_app
from tests.live_server import live_server
from tests.service_helpers import make_config

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("bench_server")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def jpegs(bench) -> list[bytes]:
    return [bench.photo_jpeg(80, 60, seed) for seed in range(3)]


def test_each_system_goes_first_once_in_as_many_rounds(bench):
    orders = [bench.rotated(["A", "kvclip", "litserve"], r) for r in range(3)]
    assert orders == [["A", "kvclip", "litserve"], ["kvclip", "litserve", "A"], ["litserve", "A", "kvclip"]]
    assert bench.rotated(["A", "kvclip"], 4) == ["A", "kvclip"]


def test_ratios_are_taken_within_each_round(bench):
    rounds = [{"kvclip": 2.0, "A": 4.0}, {"kvclip": 3.0, "A": 3.0}, {"kvclip": 9.0, "A": 10.0}]
    spread = bench.ratio_spread(rounds, "kvclip", "A")
    # 0.5, 1.0, 0.9 per round; the ratio of the medians (3 / 4) would hide the slow round's load
    assert (spread.median, spread.low, spread.high) == (0.9, 0.5, 1.0)
    assert str(spread) == "0.90 (0.50–1.00)"


def test_table_gives_medians_ratios_and_kvclips_batch(bench):
    def figures(rate: float, cpu: float, batch: float | None = None) -> dict:
        return {"images_per_s": rate, "cpu_ms": cpu, "p50_ms": 1000 / rate, "p95_ms": 2000 / rate, "mean_batch": batch}

    results = {8: [{"A": figures(10, 100), "kvclip": figures(9, 110, 4.0), "litserve": figures(10, 105)},
                   {"A": figures(12, 90), "kvclip": figures(12, 100, 6.0), "litserve": figures(6, 150)}]}
    systems = ["A", "kvclip", "litserve"]
    head, _, row = bench.table(results, systems, "images_per_s")
    assert head.split(" | ")[1:4] == ["A images/s", "kvclip images/s", "litserve images/s"]
    cells = row.strip("| ").split(" | ")
    assert cells[:4] == ["8", "11.0", "10.5", "8.0"]
    assert cells[4:7] == ["0.95 (0.90–1.00)", "0.75 (0.50–1.00)", "1.45 (0.90–2.00)"]
    assert cells[7:] == ["97/194", "133/267", "5.0"]  # the servers' p50/p95 ms, kvclip's mean batch
    _, _, cpu_row = bench.table(results, systems, "cpu_ms")
    assert cpu_row.strip("| ").split(" | ")[1:5] == ["95", "105", "128", "1.11 (1.10–1.11)"]


def test_the_raw_baseline_decodes_what_it_encodes(bench, tiny_encoder, jpegs):
    row = bench.raw_rate(tiny_encoder, jpegs, 4, seconds=0.0)  # one batch of 4
    assert row["concurrency"] == 4 and row["images_per_s"] > 0 and row["cpu_ms"] >= 0
    with pytest.raises(ImageDecodeError):
        bench.raw_rate(tiny_encoder, [b"not a jpeg"], 1, seconds=0.0)


def test_load_run_classifies_over_http_and_reads_the_batches(bench, served_caches, tiny_encoder, jpegs):
    app = create_app(make_config(served_caches), tiny_encoder)
    clock = itertools.count(0.0, 0.5)  # the server's CPU seconds, as the callable reads them
    with live_server(app) as url:
        row = asyncio.run(bench.load_run(url, jpegs, 2, 0.2, params={"cache": "fashion", "top_k": 3},
                                         cpu=lambda: next(clock)))
        assert row["requests"] >= 2 and row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["mean_batch"] is not None and 1.0 <= row["mean_batch"] <= 2.0
        assert row["cpu_ms"] == pytest.approx(500 / row["requests"])
        with pytest.raises(SystemExit, match="404"):  # a failing request ends the benchmark
            asyncio.run(bench.load_run(url, jpegs, 1, 0.0, params={"cache": "nope"}))


def test_client_processes_and_several_images_per_request_count_images(bench, served_caches, tiny_encoder, jpegs):
    app = create_app(make_config(served_caches), tiny_encoder)
    with live_server(app) as url:
        one = asyncio.run(bench.load_run(url, jpegs, 3, 0.0, params={"cache": "fashion"}, per_request=2))
        split = asyncio.run(bench.load_run(url, jpegs, 3, 0.0, params={"cache": "fashion"}, per_request=2,
                                           processes=2))
        # seconds=0: each of the 3 clients sends exactly one request of 2 images, wherever it runs
        for row in (one, split):
            assert row["requests"] == 3 and row["mean_batch"] is not None and row["mean_batch"] >= 2.0
            assert row["images_per_s"] > 0
        with pytest.raises(SystemExit, match="404"):  # a failure in a client process ends the benchmark too
            asyncio.run(bench.load_run(url, jpegs, 2, 0.0, params={"cache": "nope"}, processes=2))


def test_clients_split_over_processes_send_different_images(bench):
    import load_clients

    sent: list[list[str]] = []

    async def handler(request):
        parts = [part for part in request.content.split(b"\r\n--") if b'filename="' in part]
        sent.append([part.split(b"\r\n\r\n", 1)[1].decode() for part in parts])  # each file's bytes
        return httpx.Response(200, json={})

    images = [b"a", b"b", b"c", b"d", b"e", b"f"]

    async def run(first: int) -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            await load_clients.closed_loop(client, images, 1, 0.0, path="/", params={}, per_request=2,
                                           first=first, stride=3)

    for first in range(3):  # three processes of one client each, as ClientProcesses starts them
        asyncio.run(run(first))
    assert sent == [["a", "b"], ["c", "d"], ["e", "f"]]  # client (first + k) sends images 2i and 2i + 1


def test_the_litserve_venv_sees_the_project_venvs_packages_through_their_pth_files(bench, tmp_path):
    project = tmp_path / "project-site"
    chained = tmp_path / "chained-site"  # reached only through a .pth in `project`, as a worktree venv is
    project.mkdir()
    chained.mkdir()
    (project / "project_module.py").write_text("X = 1\n")
    (chained / "chained_module.py").write_text("Y = 2\n")
    (project / "chain.pth").write_text(f"{chained}\n")
    venv.create(tmp_path / "venv", with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    bench.write_site_link(Path(purelib), project)
    done = subprocess.run([python, "-c", "import project_module, chained_module, sys; print(sys.path.index("
                           f"{purelib!r}) < sys.path.index({str(project)!r}))"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # the venv's own packages (LitServe) win
    assert bench.project_site_packages() == Path(sysconfig.get_paths()["purelib"])


def test_a_paused_process_group_stops_on_sigterm_and_its_cpu_is_counted(bench, tmp_path):
    import serving

    # A group of its own that spins 0.3 s of CPU, then idles: measuring this test's own group
    # would count the other test processes' children too (pytest-xdist), which end at any time.
    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n" \
           "print('spun', flush=True)\ntime.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", spin], preexec_fn=os.setpgrp, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "spun"
        assert serving.group_cpu_seconds(proc.pid) >= 0.25  # clock ticks are 10 ms
        serving.pause_process(proc, True)
        serving.stop_process(proc, timeout_s=60)
        assert proc.returncode == -signal.SIGTERM  # not the SIGKILL after the timeout
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_wait_idle_returns_once_the_group_has_stopped_using_cpu(bench):
    import serving

    # Spins 0.5 s of CPU, then idles, in a group of its own: as a server that is ready while
    # its warm build worker still imports torch, then waits.
    spin = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", spin], preexec_fn=os.setpgrp)
    try:
        serving.wait_idle(proc.pid, timeout_s=120)
        assert serving.group_cpu_seconds(proc.pid) >= 0.45  # the spin had ended: idle means idle
    finally:
        proc.kill()
        proc.wait(10)
