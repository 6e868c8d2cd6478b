"""Server configuration: one dataclass, set by CLI flags or KVCLIP_* environment variables.

Every field `foo_bar` is the flag `--foo-bar` and the variable `KVCLIP_FOO_BAR`; a flag
wins over the variable, the variable over the default (12-factor). API keys are secrets and
are never flags (flags show in `ps`): they come from KVCLIP_API_KEYS or --api-keys-file.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from kvclip.vocabulary import DEFAULT_FAISS_K, DIGESTS_FILE, MAX_PIXELS, VERIFY_MODES

ENV_PREFIX = "KVCLIP_"
SEARCH_PATHS = ("auto", "dense", "faiss")  # --search-path; service/search_path.py
KEY_PRECISIONS = ("auto", "float32", "float16")  # --key-precision; service/registry.py key_dtype
# Why these defaults: docs/server.md "Search path".
DEFAULT_DENSE_MAX_KEYS = 2**21
DEFAULT_PROBE_MIN_KEYS = 16_384
DEFAULT_MIN_AGREEMENT = 0.99


def _opt(help: str, default=MISSING, **kw):
    meta = {"help": help, **kw}
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerConfig:
    caches: Path = _opt("folder whose subfolders are caches (each built by 'kvclip build')")
    model: str = _opt("model name: ARCH:TAG (e.g. ViT-B-32:openai), ARCH:/path/ckpt, hf-hub:ORG/REPO, "
                      "local-dir:/path, tiny-random")
    device: str | None = _opt("torch device (default: cuda when available, else cpu)", None)
    model_cache_dir: str | None = _opt("where model weights are looked up and downloaded", None)
    host: str = _opt("address to listen on", "127.0.0.1")
    port: int = _opt("port to listen on", 8000)
    max_batch: int = _opt("most images in one encoder batch", 32)
    max_wait_ms: float = _opt("Ray Serve only: how long @serve.batch waits for more images after its first "
                                "(kvclip serve never waits: an idle device starts a batch at once)", 5.0)
    max_queue: int = _opt("most images waiting for the encoder; beyond it requests get 503", 512)
    max_queue_wait_s: float = _opt("most seconds a request waits for the encoder before its 503", 30.0)
    decode_workers: int = _opt("threads decoding and preprocessing images", 2)
    max_decode_backlog: int = _opt("most images being or waiting to be decoded; beyond it requests get 503", 256)
    decode_processes: int = _opt("worker processes decoding and preprocessing images instead of the threads, off "
                                 "the GIL the device thread needs (GPU hosts); 0: the threads", 0)
    max_concurrency: int = _opt("most requests in flight before the JSON 503 with Retry-After (0: no limit)", 0)
    header_timeout_s: float = _opt("most seconds a client may take to send a request's line and headers; "
                                   "then the connection is closed with 408 (0: no limit)", 10.0)
    keep_alive_timeout_s: float = _opt("most seconds an idle keep-alive connection is kept open; longer than "
                                       "clients and proxies keep idle pooled connections (httpx 5 s, "
                                       "ingress-nginx 60 s), so that they, not the server, close them", 75.0)
    body_timeout_s: float = _opt("most seconds a client may take to send a request's body; then 408 (0: no limit)",
                                 120.0)
    max_body_bytes: int = _opt("largest request body", 64 * 2**20)
    max_image_bytes: int = _opt("largest single image (encoded bytes)", 16 * 2**20)
    max_images: int = _opt("most images in one request", 64)
    max_pixels: int = _opt("most pixels in one decoded image (decompression bombs)", MAX_PIXELS)
    search_path: str = _opt("how caches blend: auto (dense, unless FAISS candidates are measured faster on this "
                            "device at batch 1 and --max-batch and agree with dense at least --faiss-min-agreement), "
                            "dense (every key, exact), faiss (a cache's FAISS candidates whenever it has an index)",
                            "auto", choices=SEARCH_PATHS)
    dense_max_keys: int = _opt("auto: caches with more keys never blend densely (memory: dense scans every key and "
                               "holds max-batch x keys intermediates); they use their FAISS index",
                               DEFAULT_DENSE_MAX_KEYS)
    probe_min_keys: int = _opt("auto: caches with fewer keys blend densely without being measured",
                               DEFAULT_PROBE_MIN_KEYS)
    faiss_min_agreement: float = _opt("auto: the least top-1 agreement with the dense blend for which FAISS "
                                      "candidates may serve", DEFAULT_MIN_AGREEMENT)
    faiss_k: int = _opt("FAISS candidates per query on the FAISS search path", DEFAULT_FAISS_K)
    key_precision: str = _opt("dtype of each cache's key matrices on the serving device: auto (float16 on CUDA, half "
                              "the memory; float32 on a CPU, where float16 matmuls are slow), float32, float16",
                              "auto", choices=KEY_PRECISIONS)
    explain_k: int = _opt("nearest support items returned with explain=true", 5)
    verify_files: str = _opt("checksums of cache files and the model checkpoint at load: changed (hash the files "
                             "whose device, inode, size, mtime or ctime the record CACHES/.digests.json does not "
                             "know; each cache's files that serving reads) or full (hash every file of every "
                             "version loaded, and the checkpoint, again)", "changed", choices=VERIFY_MODES)
    reload_interval_s: float = _opt("poll the caches folder for new versions every N s (0: off)", 0.0)
    retry_after_s: int = _opt("Retry-After seconds sent with 503", 1)
    api_keys_file: Path | None = _opt("file of API keys, one 'KEY SCOPE[,SCOPE]' per line", None)
    jobs_dir: Path | None = _opt("work folder of build jobs (default: CACHES/.jobs)", None)
    build_roots: str | None = _opt("server folders builds may read, ':'-separated (default: none)", None)
    models_dir: Path | None = _opt("folder of Hugging Face models that builds over HTTP may name: captioner "
                                   "hf:NAME and sd_model NAME are folders under it (default: none, so HTTP builds "
                                   "cannot caption with hf: or synthesize)", None)
    max_build_bytes: int = _opt("largest build upload (archive of images)", 2 * 2**30)
    max_archive_files: int = _opt("most files in a build archive", 200_000)
    max_extracted_bytes: int = _opt("most bytes a build archive may unpack to (zip bombs)", 2 * 2**30)
    max_unpacked_total_bytes: int = _opt("most bytes the uploads of all queued and running builds may "
                                         "unpack to together", 4 * 2**30)
    min_free_disk_bytes: int = _opt("free disk space an unpacking upload leaves in the job area; "
                                    "below it the upload gets 413", 2**30)
    build_worker: str = _opt("where build jobs run: warm (one worker process kept with the model loaded: jobs start "
                             "at once, one more copy of the model in memory), process (a fresh process per job: "
                             "10+ s to start each), thread (inside the server: no isolation, for embedding)",
                             "warm", choices=("warm", "process", "thread"))
    build_nice: int = _opt("niceness of build worker processes (0-19; higher yields more CPU)", 15)
    build_threads: int = _opt("torch threads of a build worker process", 1)
    max_jobs_kept: int = _opt("finished build jobs remembered for GET /v1/jobs", 100)
    log_format: str = _opt("log format", "text", choices=("text", "json"))
    log_level: str = _opt("log level", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        # argparse checks choices for flags only; values from the environment land here.
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        for name in ("max_batch", "max_queue", "decode_workers", "max_decode_backlog", "max_body_bytes", "max_image_bytes",
                     "max_images", "max_pixels", "faiss_k", "explain_k", "max_build_bytes",
                     "max_archive_files", "max_extracted_bytes", "max_unpacked_total_bytes", "build_threads",
                     "max_jobs_kept"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_wait_ms < 0 or self.reload_interval_s < 0 or self.header_timeout_s < 0 or self.body_timeout_s < 0:
            raise ValueError("max_wait_ms, reload_interval_s, header_timeout_s and body_timeout_s cannot be negative")
        if self.max_queue_wait_s <= 0 or self.keep_alive_timeout_s <= 0:
            raise ValueError("max_queue_wait_s and keep_alive_timeout_s must be positive")
        if self.max_images > self.max_queue:  # such a request could never be admitted
            raise ValueError(f"max_images ({self.max_images}) cannot exceed max_queue ({self.max_queue})")
        if self.max_images > self.max_decode_backlog:
            raise ValueError(f"max_images ({self.max_images}) cannot exceed max_decode_backlog "
                             f"({self.max_decode_backlog})")
        if not 0.0 <= self.faiss_min_agreement <= 1.0:
            raise ValueError("faiss_min_agreement must lie in 0..1")
        if self.dense_max_keys < 0 or self.probe_min_keys < 0:
            raise ValueError("dense_max_keys and probe_min_keys cannot be negative")
        if self.min_free_disk_bytes < 0:
            raise ValueError("min_free_disk_bytes cannot be negative")
        if not 0 <= self.build_nice <= 19:
            raise ValueError("build_nice must lie in 0..19")
        if self.decode_processes < 0:
            raise ValueError("decode_processes cannot be negative")

    @property
    def jobs_root(self) -> Path:
        return self.jobs_dir if self.jobs_dir is not None else Path(self.caches) / ".jobs"

    @property
    def digests_path(self) -> Path:
        """The record of verified file digests (kvclip/digests.py)."""
        return Path(self.caches) / DIGESTS_FILE

    @property
    def build_root_paths(self) -> list[Path]:
        return [Path(p).resolve() for p in (self.build_roots or "").split(":") if p.strip()]

    def describe(self) -> dict:
        """Every setting, as printed at start (no secrets live in this object)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def _convert(f, raw: str):
    if raw is None:
        return None
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"{f.name} must be a number, not {raw!r}") from None
    if kind.startswith("Path"):
        return Path(raw)
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults come from the environment, then the dataclass."""
    for f in fields(ServerConfig):
        env = ENV_PREFIX + f.name.upper()
        default = os.environ.get(env)
        required = f.default is MISSING and default is None
        kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=default,
            required=required,
            help=f"{f.metadata['help']} [env {env}]",
            **kw,
        )


def from_namespace(args: argparse.Namespace) -> ServerConfig:
    values = {}
    for f in fields(ServerConfig):
        raw = getattr(args, f.name, None)
        if raw is not None:
            values[f.name] = _convert(f, raw) if isinstance(raw, str) else raw
    return ServerConfig(**values)
