"""`kvclip classify`, `kvclip caches ...` and `kvclip jobs ...`: the HTTP client on the command line.

The API key comes from $KVCLIP_API_KEY or --api-key-file, never from a flag value (which
`ps` would show to every user of the machine).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kvclip.clients import render
from kvclip.clients.client import DEFAULT_RETRIES, DEFAULT_TIMEOUT, KvclipClient
from kvclip.clients.errors import ApiError, InputError, KvclipClientError
from kvclip.clients.http import API_KEY_ENV, DEFAULT_SERVER, SERVER_ENV
from kvclip.clients.models import Job
from kvclip.clients.operations import DEFAULT_CHUNK
from kvclip.clients.progress import JobProgress
from kvclip.vocabulary import (
    CAPTIONERS,
    DEFAULT_CAPTIONER,
    DEFAULT_GUIDANCE,
    DEFAULT_POOL_PER_CLASS,
    DEFAULT_SD_MODEL,
    DEFAULT_SD_STEPS,
    DEFAULT_SHOTS,
    DEFAULT_TOP_K,
    DEFAULT_VIEWS,
    JOB_ID_RE,
    REQUEST_METHODS,
    SUPPORT_KINDS,
    captioner_spec,
)

Handler = Callable[[argparse.Namespace], int]

T = TypeVar("T")
CAPTION_KEY_ENV = "OPENAI_API_KEY"  # as kvclip build reads it for openai:URL


def add_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", help=f"server URL (default: ${SERVER_ENV}, else {DEFAULT_SERVER})")
    common.add_argument("--api-key-file", type=Path,
                        help=f"file holding the API key (default: ${API_KEY_ENV})")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds per HTTP request (default {DEFAULT_TIMEOUT:g})")
    common.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help=f"retries after 503 or a failed connection (default {DEFAULT_RETRIES})")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the server's answer as JSON")

    p = sub.add_parser("classify", parents=[common, as_json], help="classify images with a served cache",
                       description="Classify images against a cache on a kvclip server.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--cache", required=True, help="cache name")
    p.add_argument("--top-k", type=int, help=f"labels per image (server default {DEFAULT_TOP_K})")
    p.add_argument("--method", choices=REQUEST_METHODS)
    p.add_argument("--explain", action="store_true", help="also show the nearest support items")
    p.add_argument("--partial", action="store_true", help="report unreadable images instead of failing")
    p.add_argument("--min-score", type=float, help="abstain below this top score (default: the cache's)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                   help=f"images per request, at most the server's --max-images (default {DEFAULT_CHUNK})")
    p.set_defaults(run=_guarded(_classify))

    caches = sub.add_parser("caches", help="list, show, activate, delete, reload and build caches on a server")
    csub = caches.add_subparsers(dest="caches_command", required=True, metavar="{list,show,activate,delete,reload,build}")
    p = csub.add_parser("list", parents=[common, as_json], help="the served caches")
    p.set_defaults(run=_guarded(_caches_list))
    p = csub.add_parser("show", parents=[common, as_json], help="one cache: versions, labels, methods")
    p.add_argument("name")
    p.set_defaults(run=_guarded(_caches_show))
    p = csub.add_parser("activate", parents=[common, as_json], help="serve a version and make it CURRENT")
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(run=_guarded(_caches_activate))
    p = csub.add_parser("delete", parents=[common], help="delete a version that is not served")
    p.add_argument("name")
    p.add_argument("version")
    p.set_defaults(run=_guarded(_caches_delete))
    p = csub.add_parser("reload", parents=[common, as_json], help="load caches changed on the server's disk")
    p.set_defaults(run=_guarded(_caches_reload))
    _add_build(csub, common, as_json)

    jobs = sub.add_parser("jobs", help="list, show and cancel cache builds on a server")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="{list,show,cancel}")
    p = jsub.add_parser("list", parents=[common, as_json], help="recent build jobs")
    p.set_defaults(run=_guarded(_jobs_list))
    p = jsub.add_parser("show", parents=[common, as_json], help="one build job")
    p.add_argument("job_id", type=_job_id)
    p.set_defaults(run=_guarded(_jobs_show))
    p = jsub.add_parser("cancel", parents=[common, as_json], help="stop a build job")
    p.add_argument("job_id", type=_job_id)
    p.set_defaults(run=_guarded(_jobs_cancel))


def _add_build(csub: argparse._SubParsersAction, *parents: argparse.ArgumentParser) -> None:
    p = csub.add_parser(
        "build", parents=list(parents), help="build a new cache version on the server",
        description="Upload DATA/<label>/<image> (zipped on the fly; <image>.txt captions ride along) "
        "or an archive of it, build a new version of cache NAME on the server and follow the job. "
        "Without --data, --labels alone builds a zero-shot cache (optionally with a --pool).")
    p.add_argument("name", help="cache name")
    p.add_argument("--data", type=Path, help="local DATA/<label>/<image> folder, or a .zip/.tar/.tar.gz of one")
    p.add_argument("--labels", type=Path, help="labels file, one per line (label set and order)")
    p.add_argument("--pool", type=Path, help="local folder or archive of unlabelled images")
    p.add_argument("--remote-data", metavar="DIR", help="a data folder on the server (under its --build-roots)")
    p.add_argument("--remote-pool", metavar="DIR", help="a pool folder on the server (under its --build-roots)")
    p.add_argument("--shots", help=f"support images per class, or 'all' (server default {DEFAULT_SHOTS})")
    p.add_argument("--views", type=int, help=f"augmented views per image key (server default {DEFAULT_VIEWS})")
    p.add_argument("--captioner", type=captioner_spec, metavar="CAPTIONER",
                   help=f"{', '.join(CAPTIONERS)}, hf:NAME (a model folder under the server's --models-dir) or "
                        f"openai:URL (server default {DEFAULT_CAPTIONER})")
    p.add_argument("--captioner-model", help="CoCa model for coca/auto; the endpoint's model name for openai:URL")
    p.add_argument("--caption-prompt", help="openai:URL: the instruction sent with each image")
    p.add_argument("--caption-concurrency", type=int, help="openai:URL: requests in flight (server default 4)")
    p.add_argument("--caption-api-key-file", type=Path,
                   help=f"openai:URL: file holding the endpoint's key (default: ${CAPTION_KEY_ENV}, if set); "
                        "sent to the server, never shown in its jobs")
    p.add_argument("--synthesize", type=int, metavar="K",
                   help="render K Stable Diffusion images per class as support items")
    p.add_argument("--sd-model", help="with --synthesize: a model folder under the server's --models-dir "
                                      f"(server default {DEFAULT_SD_MODEL})")
    p.add_argument("--guidance", type=float, help=f"with --synthesize: guidance scale (server default {DEFAULT_GUIDANCE})")
    p.add_argument("--steps", type=int, help=f"with --synthesize: denoising steps (server default {DEFAULT_SD_STEPS})")
    p.add_argument("--support", choices=SUPPORT_KINDS, help="with --synthesize: real, synthetic or both (server default both)")
    p.add_argument("--seed", type=int)
    p.add_argument("--templates", type=Path, help="JSON list or one template per line, each with {}")
    p.add_argument("--descriptions", type=Path, help="JSON {label: [sentences]}")
    p.add_argument("--pool-per-class", type=int,
                   help=f"pool images kept per class (server default {DEFAULT_POOL_PER_CLASS})")
    p.add_argument("--no-activate", action="store_true", help="publish the version without serving it")
    p.add_argument("--no-wait", action="store_true", help="print the job and return without following it")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between job polls")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_guarded(_caches_build))


def _guarded(handler: Handler) -> Handler:
    """Client errors become one line on stderr: exit status 2 for a local input or argument
    the command cannot use (InputError), 1 for what the server or the network answered."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except KvclipClientError as exc:
            message = " ".join(str(exc).split())
            if isinstance(exc, ApiError) and exc.status == 401:
                # The server's advice names HTTP headers; on the command line the key comes from here.
                message = (f"{exc.message.split(':')[0]}: set ${API_KEY_ENV} or pass --api-key-file FILE "
                           f"(HTTP 401 {exc.code})")
            print(f"kvclip: error: {message}", file=sys.stderr)
            return 2 if isinstance(exc, InputError) else 1

    return run


def _job_id(text: str) -> str:
    """A job id as `kvclip jobs list` shows it, checked here so a typo is not answered by a regex."""
    if not JOB_ID_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id (hexadecimal, as `kvclip jobs list` shows)")
    return text


def _read_key(path: Path, what: str) -> str:
    """The first non-empty line of a key file."""
    try:
        key = next((line.strip() for line in path.read_text().splitlines() if line.strip()), "")
    except OSError as exc:
        raise InputError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
    if not key:
        raise InputError(f"{what} file {path} is empty")
    return key


def _client(args: argparse.Namespace) -> KvclipClient:
    api_key = None if args.api_key_file is None else _read_key(args.api_key_file, "API key")
    return KvclipClient(args.server, api_key=api_key, timeout=args.timeout, retries=args.retries)


def _caption_key(args: argparse.Namespace) -> str | None:
    """The openai: endpoint's key, for openai:URL builds only (another captioner refuses one)."""
    if args.caption_api_key_file is not None:
        return _read_key(args.caption_api_key_file, "caption API key")
    if (args.captioner or "").startswith("openai:"):
        return os.environ.get(CAPTION_KEY_ENV) or None
    return None


def _print_call(args: argparse.Namespace, call: Callable[[KvclipClient], T],
                text: Callable[[T], str]) -> int:
    """Run one client call; print its result as JSON (--json) or as `text` renders it."""
    with _client(args) as client:
        result = call(client)
    print(render.to_json(result) if args.json else text(result))
    return 0


def _classify(args: argparse.Namespace) -> int:
    return _print_call(args, lambda c: c.classify(args.images, args.cache, top_k=args.top_k, method=args.method,
                                                  explain=args.explain, partial=args.partial,
                                                  chunk_size=args.chunk_size, min_score=args.min_score),
                       render.classification)


def _caches_list(args: argparse.Namespace) -> int:
    return _print_call(args, lambda c: c.caches(), render.caches)


def _caches_show(args: argparse.Namespace) -> int:
    return _print_call(args, lambda c: c.cache(args.name), render.cache_detail)


def _caches_activate(args: argparse.Namespace) -> int:
    return _print_call(args, lambda c: c.activate(args.name, args.version),
                       lambda info: f"cache {info.name} now serves {info.version}")


def _caches_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_version(args.name, args.version)
    print(f"deleted {args.name} {args.version}")
    return 0


def _caches_reload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = client.reload()
    if args.json:
        print(render.to_json(report))
        return 0
    for name, version in sorted(report.loaded.items()):
        print(f"loaded     {name} {version}")
    for name in report.removed:
        print(f"removed    {name}")
    for name, reason in sorted(report.failed.items()):
        print(f"failed     {name}: {reason}")
    print(f"unchanged  {len(report.unchanged)} cache(s)")
    return 1 if report.failed else 0


def _caches_build(args: argparse.Namespace) -> int:
    if args.data is None and args.labels is None and args.remote_data is None:
        raise InputError("caches build needs --data DIR (or an archive), --remote-data DIR or --labels FILE")
    watch = None if args.quiet or args.no_wait else JobProgress()
    latest: list[Job] = []

    def progress(job: Job) -> None:
        latest[:] = [job]  # remembered so an interrupt can say which job goes on
        if watch is not None:
            watch(job)

    try:
        with _client(args) as client:
            job = client.build_cache(
                args.name, data=args.data, labels=args.labels, pool=args.pool, templates=args.templates,
                descriptions=args.descriptions, shots=args.shots, views=args.views, captioner=args.captioner,
                activate=not args.no_activate, data_dir=args.remote_data, pool_dir=args.remote_pool,
                wait=not args.no_wait, progress=progress, poll_interval=args.poll_interval,
                seed=args.seed, pool_per_class=args.pool_per_class, captioner_model=args.captioner_model,
                caption_prompt=args.caption_prompt, caption_concurrency=args.caption_concurrency,
                caption_api_key=_caption_key(args), synthesize=args.synthesize, sd_model=args.sd_model,
                guidance=args.guidance, steps=args.steps, support=args.support)
    except KeyboardInterrupt:
        if watch is not None:
            watch.close()
        if latest:
            job_id = latest[0].id
            print(f"kvclip: interrupted; job {job_id} goes on on the server "
                  f"(`kvclip jobs cancel {job_id}` stops it)", file=sys.stderr)
        return 130
    finally:
        if watch is not None:
            watch.close()
    print(render.to_json(job) if args.json else render.job(job))
    return 0


def _jobs_list(args: argparse.Namespace) -> int:
    return _print_call(args, lambda c: c.jobs(), render.jobs)


def _jobs_show(args: argparse.Namespace) -> int:
    return _print_call(args, lambda c: c.job(args.job_id), render.job)


def _jobs_cancel(args: argparse.Namespace) -> int:
    return _print_call(args, lambda c: c.cancel_job(args.job_id), render.cancelled_job)


def main(argv: list[str] | None = None) -> int:
    """The client commands alone (`python -m kvclip.clients.cli`), without the builder's and server's imports."""
    parser = argparse.ArgumentParser(prog="kvclip", description=__doc__)
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
