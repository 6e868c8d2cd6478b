"""Serving throughput side by side: the raw encoder, kvclip and LitServe (a benchmark, not a test).

    python scripts/bench_server.py --images small,photo --concurrency 1,8,32 --rounds 8 --seconds 10

Every system runs the same model — a seeded, randomly initialised --arch checkpoint (timing does
not depend on the weights; kvclip never invents random weights, so it is saved to a file and
loaded through the normal ARCH:/path route) — with kvclip's decode (kvclip.images.decode_image,
reduced DCT scale for large JPEGs) and preprocessing (Encoder.preprocess):

  A         the raw encoder in this process: decode + preprocess c images one after another, then
            encode them as one batch of c; no HTTP, no server.
  kvclip    `kvclip serve` with its own defaults (no flags but --model and --log-level, its thread
            defaults left to it), POST /v1/classify against a small cache built from the foolbox
            wheel's 20 CIFAR-10 images.
  litserve  scripts/litserve_app.py on LitServe (max batch --litserve-max-batch, timeout
            --litserve-timeout-ms), in its own venv .venv-litserve: made on first use, with
            LitServe from PyPI and torch, open_clip and kvclip from this venv. It runs with the
            thread settings kvclip would choose (kvclip/threads.py), as A does, so the comparison
            is of serving, not of OpenMP settings.

The servers get one JPEG per request (multipart; --images-per-request), from a closed loop of c clients on this
machine. Image sets: `small` = the 20 ImageNet 512x512 JPEGs of the foolbox wheel
(scripts/fetch_test_data.sh); `photo` = --photos seeded 4000x3000 photo-like JPEGs (quality 90,
bench_decode.photo_jpeg), made in memory. Each round runs every system at every concurrency for
--seconds, the systems in an order that rotates per round; the tables give per-system images/s
and CPU ms per image (medians over rounds) and the median (min–max) of the per-round ratios.
The servers are paused (SIGSTOP) while another system is measured: LitServe's workers poll
when idle.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kvclip.threads import cpu_thread_defaults  # noqa: E402

# A runs in this process with the thread settings `kvclip serve` gives itself; set before torch
# loads (imported by a process that has torch already, e.g. the tests, it changes nothing).
THREAD_DEFAULTS = cpu_thread_defaults() if "torch" not in sys.modules else {}
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
from bench_decode import photo_jpeg  # noqa: E402
from load_clients import LoopResult, client_limits, closed_loop  # noqa: E402
from serving import free_port, group_cpu_seconds, pause_process, start_process, stop_process, wait_idle  # noqa: E402
from serving import start_server as serve  # noqa: E402

from kvclip.cache_builder.build import BuildConfig, build_cache  # noqa: E402
from kvclip.images import decode_image  # noqa: E402
from kvclip.models import Encoder, default_device, load_encoder  # noqa: E402
from kvclip.service.metrics import metric_value  # noqa: E402
from tests.foolbox_data import CIFAR10_LABELS, export_foolbox, read_foolbox_images  # noqa: E402

SYSTEMS = ("A", "kvclip", "litserve")
LITSERVE_VENV = REPO / ".venv-litserve"
LITSERVE_APP = REPO / "scripts" / "litserve_app.py"
RATIOS = (("kvclip", "A"), ("litserve", "A"), ("kvclip", "litserve"))


def random_checkpoint(arch: str, folder: Path) -> str:
    """A seeded random-weights open_clip checkpoint file; returns the model name for it."""
    path = folder / f"{arch}-random.pt"
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save(model.state_dict(), path)
    return f"{arch}:{path}"


def bench_cache(arch: str, tmp: Path, device) -> str:
    """A random `arch` checkpoint and a small cache `bench` under tmp/caches (the foolbox wheel's
    20 CIFAR-10 images, so that it needs nothing but that wheel: a GPU host may lack Debian's
    Fashion-MNIST); returns the model name."""
    print(f"# making a random {arch} checkpoint and a cache ...", file=sys.stderr)
    model = random_checkpoint(arch, tmp)
    export_foolbox(tmp / "support", "cifar10", CIFAR10_LABELS)
    build_cache(BuildConfig(out=tmp / "caches" / "bench", data_dir=tmp / "support", model=model,
                            shots=2, views=1, captioner="none", device=str(device), progress=False))
    return model


def start_server(model: str, caches: Path, port: int, args) -> subprocess.Popen:
    """`kvclip serve` with its defaults: only the model, quiet logs, and --max-batch/--device/--kvclip-args when given."""
    flags = ["--model", model, "--log-level", "WARNING",
             *(["--max-batch", str(args.max_batch)] if getattr(args, "max_batch", None) else []),
             *(["--device", args.device] if args.device else []), *shlex.split(getattr(args, "kvclip_args", ""))]
    # Its own thread defaults, not the ones this process set for A (the same values, chosen by it).
    return serve(caches, port, *flags, unset=tuple(THREAD_DEFAULTS))


def litserve_python(folder: Path = LITSERVE_VENV) -> Path:
    """The Python of a venv with LitServe that sees this venv's packages; made on first use."""
    python = folder / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import litserve, kvclip"], capture_output=True).returncode == 0:
        return python
    print(f"# making {folder} (LitServe from PyPI, the rest from {sys.prefix}) ...", file=sys.stderr)
    venv.create(folder, with_pip=True, clear=True)
    site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    write_site_link(Path(site_packages), project_site_packages())
    subprocess.run([python, "-m", "pip", "install", "-q", "litserve"], check=True)
    return python


def project_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def write_site_link(site_packages: Path, target: Path) -> Path:
    """A .pth that adds `target` with site.addsitedir, so its own .pth files (an editable
    install, a chained venv) are processed too; the venv's own packages still come first."""
    path = site_packages / "zz_project_venv.pth"
    path.write_text(f"import site; site.addsitedir({str(target)!r})\n")
    return path


def start_litserve(model: str, cache: Path, port: int, args) -> subprocess.Popen:
    command = [str(litserve_python()), str(LITSERVE_APP), "--model", model, "--cache", str(cache), "--port", str(port),
               "--max-batch", str(args.litserve_max_batch), "--batch-timeout-ms", str(args.litserve_timeout_ms),
               *(["--device", args.device] if args.device else [])]
    return start_process(command, f"http://127.0.0.1:{port}/health")


def small_jpegs() -> list[bytes]:
    return [img.data for img in read_foolbox_images("imagenet")]


def photo_jpegs(count: int) -> list[bytes]:
    print(f"# making {count} photo-like 4000x3000 JPEGs ...", file=sys.stderr)
    return [photo_jpeg(4000, 3000, seed) for seed in range(count)]


async def load_run(url: str, images: list[bytes], concurrency: int, seconds: float,
                   path: str = "/v1/classify", params: dict | None = None, metrics: bool = True,
                   cpu: Callable[[], float] | None = None, per_request: int = 1, processes: int = 1) -> dict:
    """Closed loop (load_clients.closed_loop): `concurrency` clients, each sending its next
    request (`per_request` JPEGs) when the last returns, until `seconds` have passed, in this
    process or split over `processes` client processes. With `metrics`, the mean encoder batch
    kvclip formed meanwhile (its /metrics); with `cpu` (the server's CPU seconds so far), its CPU
    milliseconds per image."""
    params = {"cache": "bench", "top_k": 5} if params is None else params
    async with httpx.AsyncClient(base_url=url, limits=client_limits(concurrency), timeout=300) as client, \
            contextlib.AsyncExitStack() as stack:
        if processes > 1:  # started (connections open) before the measurement begins
            group = stack.enter_context(ClientProcesses(url, images, concurrency, processes, seconds, path, params,
                                                        per_request))
            loop = functools.partial(asyncio.get_running_loop().run_in_executor, None, group.run)
        else:
            loop = functools.partial(closed_loop, client, images, concurrency, seconds, path=path, params=params,
                                     per_request=per_request)
        before = (await client.get("/metrics")).text if metrics else ""
        cpu0 = cpu() if cpu else 0.0
        result = await loop()
        cpu_s = cpu() - cpu0 if cpu else None
        after = (await client.get("/metrics")).text if metrics else ""
    if result.errors:
        raise SystemExit(f"{url}{path}: requests failed, the first: {result.errors[0]}")
    batches = metric_value(after, "kvclip_batch_images_count") - metric_value(before, "kvclip_batch_images_count")
    batch_images = metric_value(after, "kvclip_batch_images_sum") - metric_value(before, "kvclip_batch_images_sum")
    return {"concurrency": concurrency, "requests": result.requests, "images_per_s": result.images / result.wall_s,
            **percentiles_ms(result.latencies_s),
            "cpu_ms": None if cpu_s is None else cpu_s / result.images * 1000,
            "mean_batch": batch_images / batches if batches else None}


class ClientProcesses:
    """`processes` runs of scripts/load_clients.py sharing `concurrency` clients, started, each
    with its connections open, before run() lets them all go at once."""

    def __init__(self, url: str, images: list[bytes], concurrency: int, processes: int, seconds: float,
                 path: str, params: dict, per_request: int) -> None:
        self._dir = tempfile.TemporaryDirectory()
        for k, data in enumerate(images):
            (Path(self._dir.name) / f"{k:05d}.jpg").write_bytes(data)
        shares = [concurrency // processes + (p < concurrency % processes) for p in range(processes)]
        firsts = [sum(shares[:p]) for p in range(processes)]
        self._procs = [subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "load_clients.py"), url, self._dir.name,
             "--concurrency", str(share), "--seconds", str(seconds), "--path", path, "--params", json.dumps(params),
             "--per-request", str(per_request), "--first", str(first), "--stride", str(concurrency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for share, first in zip(shares, firsts) if share]
        try:
            for proc in self._procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":
                    raise SystemExit(f"a client process exited with {proc.wait()}")
        except BaseException:
            self.__exit__()
            raise

    def run(self) -> LoopResult:
        """Start every process at once; their results merged (wall: the longest process's)."""
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        merged = LoopResult()
        for proc in self._procs:
            assert proc.stdout is not None
            part = LoopResult(**json.loads(proc.stdout.readline()))
            merged.requests += part.requests
            merged.images += part.images
            merged.wall_s = max(merged.wall_s, part.wall_s)
            merged.latencies_s += part.latencies_s
            merged.errors += part.errors
        return merged

    def __enter__(self) -> ClientProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._dir.cleanup()


def percentiles_ms(latencies: list[float]) -> dict[str, float]:
    """p50 and p95 of latencies in seconds, in milliseconds."""
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [latencies[0]] * 19
    return {"p50_ms": q[9] * 1000, "p95_ms": q[18] * 1000}


def raw_rate(encoder: Encoder, images: list[bytes], batch: int, seconds: float) -> dict:
    """A: images/s of decode + preprocess `batch` images in turn, then one encoder batch, in this
    process (at least one batch, then batches until `seconds` have passed)."""
    n, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while n == 0 or time.perf_counter() - start < seconds:
        chunk = [images[(n + k) % len(images)] for k in range(batch)]
        pixels = torch.stack([encoder.preprocess(decode_image(data, min_size=encoder.image_size)) for data in chunk])
        encoder.encode_images(pixels)
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        n += batch
    wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu0
    return {"concurrency": batch, "images_per_s": n / wall, "cpu_ms": cpu_s / n * 1000}


@dataclass(frozen=True)
class Contenders:
    encoder: Encoder | None  # A's, in this process
    servers: dict[str, tuple[subprocess.Popen, str]]  # each server's process and base URL; paused while idle
    per_request: int = 1  # JPEGs per request; A encodes c x per_request at once
    client_processes: int = 1

    def run(self, system: str, c: int, *, images: list[bytes], seconds: float) -> dict:
        """One measurement of `system` at concurrency c."""
        if system == "A":
            assert self.encoder is not None
            return {**raw_rate(self.encoder, images, c * self.per_request, seconds), "concurrency": c}
        proc, url = self.servers[system]
        pause_process(proc, False)
        try:
            cpu = functools.partial(group_cpu_seconds, proc.pid)
            load = functools.partial(load_run, url, images, c, seconds, cpu=cpu, per_request=self.per_request,
                                     processes=min(self.client_processes, c))
            if system == "kvclip":
                return asyncio.run(load())
            return asyncio.run(load(path="/predict", params={}, metrics=False))
        finally:
            pause_process(proc, True)


def rotated(systems: Sequence[str], round_index: int) -> list[str]:
    """The systems in the order round `round_index` runs them: each goes first in turn."""
    k = round_index % len(systems)
    return [*systems[k:], *systems[:k]]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}–{self.high:.2f})"


def ratio_spread(rounds: list[dict[str, float]], top: str, bottom: str) -> Spread:
    """Median, min and max over rounds of rounds[i][top] / rounds[i][bottom] (the same round's figures)."""
    ratios = [r[top] / r[bottom] for r in rounds]
    return Spread(statistics.median(ratios), min(ratios), max(ratios))


def measure(run: Callable[[str, int], dict], systems: Sequence[str], levels: Sequence[int], rounds: int,
            label: str) -> dict[int, list[dict[str, dict]]]:
    """{concurrency: one {system: figures} per round}; `run(system, c)` measures once."""
    results: dict[int, list[dict[str, dict]]] = {c: [] for c in levels}
    for r in range(rounds):
        for c in levels:
            row = {system: run(system, c) for system in rotated(systems, r)}
            results[c].append(row)
            print(f"# {label} round {r + 1}/{rounds} c={c}: "
                  + "  ".join(f"{s} {row[s]['images_per_s']:.2f}" for s in systems) + " images/s", file=sys.stderr)
    return results


def table(results: dict[int, list[dict[str, dict]]], systems: Sequence[str], key: str) -> list[str]:
    """Markdown rows for one figure (`images_per_s` or `cpu_ms`): its per-system median and the
    median (min–max) of the per-round ratios; for throughput also the p50s and kvclip's mean batch."""
    ratios = [(top, bottom) for top, bottom in RATIOS if top in systems and bottom in systems]
    servers = [s for s in systems if s != "A"]
    extra = key == "images_per_s"
    unit = "images/s" if extra else "CPU ms/image"
    head = ["c", *(f"{s} {unit}" for s in systems), *(f"{top} ÷ {bottom}" for top, bottom in ratios)]
    if extra:
        head += [*(f"{s} p50/p95 ms" for s in servers), *(["kvclip mean batch"] if "kvclip" in systems else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, rows in results.items():
        figures = [{s: row[s][key] for s in systems} for row in rows]
        cells = [str(c), *(f"{statistics.median(f[s] for f in figures):.{1 if extra else 0}f}" for s in systems),
                 *(str(ratio_spread(figures, top, bottom)) for top, bottom in ratios)]
        if extra:
            cells += [f"{statistics.median(row[s]['p50_ms'] for row in rows):.0f}/"
                      f"{statistics.median(row[s]['p95_ms'] for row in rows):.0f}" for s in servers]
            if "kvclip" in systems:
                batches = [row["kvclip"]["mean_batch"] for row in rows if row["kvclip"]["mean_batch"] is not None]
                cells.append(f"{statistics.median(batches):.1f}" if batches else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    ap.add_argument("--images", default="small,photo", help="comma-separated: small, photo")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0, help="per system, concurrency and round")
    ap.add_argument("--photos", type=int, default=8, help="distinct 4000x3000 JPEGs in the photo set")
    ap.add_argument("--max-batch", type=int, default=None, help="kvclip's --max-batch (default: the server's)")
    ap.add_argument("--litserve-max-batch", type=int, default=32)
    ap.add_argument("--litserve-timeout-ms", type=float, default=10.0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--kvclip-args", default="", help="more `kvclip serve` flags, one string (e.g. "
                    "'--max-queue 4096 --max-decode-backlog 2048' for thousands of images in flight)")
    ap.add_argument("--images-per-request", type=int, default=1,
                    help="JPEGs per request (A then encodes c x this many at once)")
    ap.add_argument("--client-processes", type=int, default=1,
                    help="split the c clients over this many processes (scripts/load_clients.py): one "
                         "Python event loop cannot send a GPU server thousands of images/s")
    args = ap.parse_args()
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    image_sets = args.images.split(",")
    if unknown or not systems or not set(image_sets) <= {"small", "photo"}:
        ap.error(f"--systems takes {', '.join(SYSTEMS)}; --images takes small, photo")
    levels = [int(c) for c in args.concurrency.split(",")]
    device = torch.device(args.device) if args.device else default_device()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = bench_cache(args.arch, tmp, device)
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            if "kvclip" in systems:
                port = free_port()
                servers["kvclip"] = start_server(model, tmp / "caches", port, args), f"http://127.0.0.1:{port}"
            if "litserve" in systems:
                port = free_port()
                servers["litserve"] = (start_litserve(model, tmp / "caches" / "bench", port, args),
                                       f"http://127.0.0.1:{port}")
            for name, (proc, _) in servers.items():
                if name == "kvclip":  # its warm build worker starts after /readyz (LitServe's workers never idle)
                    print(f"# kvclip ready; settled {wait_idle(proc.pid):.0f} s later", file=sys.stderr)
                pause_process(proc, True)
            contenders = Contenders(load_encoder(model, device) if "A" in systems else None, servers,
                                    args.images_per_request, args.client_processes)
            out = []
            for image_set in image_sets:
                images = small_jpegs() if image_set == "small" else photo_jpegs(args.photos)
                for c in (min(levels), max(levels)):  # warm-up: first requests, the largest batch
                    for system in systems:
                        contenders.run(system, c, images=images, seconds=2.0)
                run = functools.partial(contenders.run, images=images, seconds=args.seconds)
                out.append((image_set, images, measure(run, systems, levels, args.rounds, image_set)))
        finally:
            for proc, _ in servers.values():
                stop_process(proc)

    print(f"arch {args.arch} (random weights)  device {device}  torch threads {torch.get_num_threads()}  "
          f"cores {os.cpu_count()}  thread defaults {THREAD_DEFAULTS or 'set by the caller'}  "
          f"LitServe max batch {args.litserve_max_batch}, timeout {args.litserve_timeout_ms:g} ms  "
          f"{args.rounds} rounds x {args.seconds:g} s per system and concurrency, {args.images_per_request} JPEG(s) "
          f"per request, clients in {args.client_processes} process(es)")
    for image_set, images, results in out:
        kind = ("512x512 ImageNet JPEGs" if image_set == "small" else "4000x3000 photo-like JPEGs")
        print(f"\n{image_set}: {len(images)} {kind}, {sum(map(len, images)) / len(images) / 1e3:.0f} kB each on average")
        print("\n".join(table(results, systems, "images_per_s")))
        print("\nCPU per image (a server: its process group; A: this process; the clients' CPU not counted):")
        print("\n".join(table(results, systems, "cpu_ms")))


if __name__ == "__main__":
    main()
