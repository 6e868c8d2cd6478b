"""Every API operation, written once for both clients ("sans-I/O").

An operation is a generator: it yields a `Call` and receives its parsed JSON body, or
yields a `Sleep` and receives None, then returns a typed result. KvclipClient drives it
with blocking I/O, AsyncKvclipClient with await; request building, response parsing and
the build job's polling loop therefore exist only here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from kvclip.clients.archives import open_upload, read_descriptions, read_labels, read_templates
from kvclip.clients.errors import ApiError, InputError, JobFailed, KvclipClientError
from kvclip.clients.http import Call, Sleep
from kvclip.clients.images import ImageInput, image_file
from kvclip.clients.models import CacheInfo, Classification, Job, Readiness, ReloadResult

T = TypeVar("T")
Operation = Generator[Call | Sleep, Any, T]
PathLike = str | os.PathLike


def _seg(value: str) -> str:
    """A path segment, escaped: a name can never step into another route."""
    return quote(str(value), safe="")


# The server's default --max-images; a server configured lower answers 413 and says its limit.
DEFAULT_CHUNK = 64


def classify(images: ImageInput | Sequence[ImageInput], cache: str, top_k: int | None = None,
             method: str | None = None, explain: bool = False, partial: bool = False,
             chunk_size: int = DEFAULT_CHUNK, min_score: float | None = None) -> Operation[Classification]:
    """Up to `chunk_size` images per request, reading one chunk's files at a time. All chunks
    must be answered by one cache version: after a swap mid-way the whole list is sent again
    (once), so the results never mix versions."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InputError("no images given")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, not {chunk_size}")
    params = {"cache": cache, "top_k": top_k, "method": method,
              "explain": "true" if explain else None, "partial": "true" if partial else None,
              "min_score": min_score}
    for _attempt in range(2):
        answers: list[Classification] = []
        for start in range(0, len(items), chunk_size):
            chunk = items[start:start + chunk_size]
            files = [("file", image_file(item, start + i).multipart()) for i, item in enumerate(chunk)]
            try:
                body = yield Call("POST", "/v1/classify", params=params, files=files)
            except ApiError as exc:
                raise _shifted(exc, start) from None
            answers.append(Classification.from_json(body))
        versions = sorted({a.version for a in answers})
        if len(versions) == 1:
            first = answers[0]
            results = [dataclasses.replace(r, index=r.index + start)
                       for start, a in zip(range(0, len(items), chunk_size), answers) for r in a.results]
            return dataclasses.replace(first, results=results)
    raise KvclipClientError(f"cache {cache!r} changed version while {len(items)} images were classified "
                            f"in {len(answers)} requests ({', '.join(versions)}), twice; try again")


def _shifted(error: ApiError, start: int) -> ApiError:
    """A chunk's error with its image positions counted from the start of the whole list."""
    if not start:
        return error
    details = [{**d, "index": d["index"] + start} if isinstance(d, dict) and isinstance(d.get("index"), int) else d
               for d in error.details]
    return ApiError(error.status, error.code, f"{error.message} (in the request for images {start}+)",
                    details, error.request_id)


def caches() -> Operation[list[CacheInfo]]:
    body = yield Call("GET", "/v1/caches")
    return [CacheInfo.from_json(item) for item in body]


def cache(name: str) -> Operation[CacheInfo]:
    body = yield Call("GET", f"/v1/caches/{_seg(name)}")
    return CacheInfo.from_json(body)


def activate(name: str, version: str) -> Operation[CacheInfo]:
    body = yield Call("POST", f"/v1/caches/{_seg(name)}/activate", json={"version": version})
    return CacheInfo.from_json(body)


def reload() -> Operation[ReloadResult]:
    body = yield Call("POST", "/v1/caches/reload")
    return ReloadResult.from_json(body)


def delete_version(name: str, version: str) -> Operation[None]:
    # Not idempotent: resent after a lost answer, it would report the deleted version as unknown.
    yield Call("DELETE", f"/v1/caches/{_seg(name)}/versions/{_seg(version)}", idempotent=False)


def job(job_id: str) -> Operation[Job]:
    body = yield Call("GET", f"/v1/jobs/{_seg(job_id)}")
    return Job.from_json(body)


def jobs() -> Operation[list[Job]]:
    body = yield Call("GET", "/v1/jobs")
    return [Job.from_json(item) for item in body["jobs"]]


def cancel_job(job_id: str) -> Operation[Job]:
    body = yield Call("DELETE", f"/v1/jobs/{_seg(job_id)}")
    return Job.from_json(body)


def health() -> Operation[bool]:
    try:
        yield Call("GET", "/healthz")
    except ApiError:
        return False
    return True


def ready() -> Operation[Readiness]:
    body = yield Call("GET", "/readyz", answers=(503,))
    return Readiness.from_json(body)


def build_options(*, labels: Sequence[str] | PathLike | None = None, templates: Sequence[str] | PathLike | None = None,
                  descriptions: dict[str, list[str]] | PathLike | None = None, shots: int | str | None = None,
                  views: int | None = None, captioner: str | None = None, seed: int | None = None,
                  pool_per_class: int | None = None, activate: bool = True, data_dir: str | None = None,
                  pool_dir: str | None = None, captioner_model: str | None = None,
                  caption_prompt: str | None = None, caption_concurrency: int | None = None,
                  caption_api_key: str | None = None, synthesize: int | None = None,
                  sd_model: str | None = None, guidance: float | None = None, steps: int | None = None,
                  support: str | None = None) -> dict[str, Any]:
    """The BuildOptions JSON; options left None are left to the server's defaults.
    caption_api_key goes to the server in the request body only (the server never echoes it)."""
    if isinstance(shots, str) and shots != "all":
        if not shots.isdigit():
            raise InputError(f"shots must be a number or 'all', not {shots!r}")
        shots = int(shots)
    options: dict[str, Any] = {
        "labels": None if labels is None else read_labels(labels),
        "templates": None if templates is None else read_templates(templates),
        "descriptions": None if descriptions is None else read_descriptions(descriptions),
        "shots": shots, "views": views, "captioner": captioner, "seed": seed,
        "pool_per_class": pool_per_class, "data_dir": data_dir, "pool_dir": pool_dir,
        "activate": activate, "captioner_model": captioner_model, "caption_prompt": caption_prompt,
        "caption_concurrency": caption_concurrency, "caption_api_key": caption_api_key,
        "synthesize": synthesize, "sd_model": sd_model, "guidance": guidance, "steps": steps, "support": support,
    }
    return {k: v for k, v in options.items() if v is not None}


def build_cache(name: str, *, data: PathLike | None = None, pool: PathLike | None = None,
                wait: bool = True, progress: Callable[[Job], None] | None = None,
                poll_interval: float = 1.0, **options: Any) -> Operation[Job]:
    """Upload (or name) the build inputs, start the build job, then poll it until it ends."""
    options = build_options(**options)
    if data is None and "data_dir" not in options and "labels" not in options:
        raise InputError("a build needs data (a folder or archive), a server-side data_dir, or labels")
    path = f"/v1/caches/{_seg(name)}/builds"
    with contextlib.ExitStack() as uploads:
        files = [(field, uploads.enter_context(open_upload(source, what)))
                 for field, source, what in (("data", data, "data"), ("pool", pool, "pool")) if source is not None]
        if files:
            call = Call("POST", path, data={"options": json.dumps(options)}, files=files, idempotent=False)
        else:
            call = Call("POST", path, json=options, idempotent=False)
        current = Job.from_json((yield call))
    # The temporary zip is gone by now; only polling is left.
    if not wait:
        return current
    while True:
        if progress is not None:
            progress(current)
        if current.finished:
            break
        yield Sleep(poll_interval)
        current = Job.from_json((yield Call("GET", f"/v1/jobs/{_seg(current.id)}")))
    if not current.succeeded:
        raise JobFailed(current)
    return current
