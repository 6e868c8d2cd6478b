"""KvclipClient (blocking) and AsyncKvclipClient (asyncio): the same methods, the same results.

Both only send calls and sleep; what each method sends and how answers are read lives in
clients/operations.py, retry decisions in clients/http.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx

from kvclip.clients import operations as ops
from kvclip.clients.errors import KvclipClientError
from kvclip.clients.http import (
    Call,
    RetryPolicy,
    Sleep,
    default_headers,
    parse_response,
    resolve_api_key,
    resolve_base_url,
    unreachable,
)
from kvclip.clients.images import ImageInput
from kvclip.clients.models import CacheInfo, Classification, Job, Readiness, ReloadResult
from kvclip.vocabulary import VERSION

T = TypeVar("T")
USER_AGENT = f"kvclip-client/{VERSION}"
DEFAULT_TIMEOUT = 60.0  # seconds per request
DEFAULT_RETRIES = 3  # after a 503 or a failed connection


def _advance(op: ops.Operation[T], value: Any, error: Exception | None) -> tuple[bool, Any]:
    """Run an operation to its next step: (False, step), or (True, result) once it returns.

    StopIteration is caught here: it cannot travel through a thread's future (async client).
    """
    try:
        return False, (op.throw(error) if error is not None else op.send(value))
    except StopIteration as stop:
        return True, stop.value


class _Settings:
    """Constructor arguments shared by both clients."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, backoff: float = 0.5, *, max_backoff: float = 30.0,
                 headers: dict[str, str] | None = None) -> None:
        """
        base_url: the server (default: $KVCLIP_SERVER, else http://127.0.0.1:8000).
        api_key: sent as `Authorization: Bearer KEY` (default: $KVCLIP_API_KEY).
        timeout: seconds per request (connect, read, write each).
        retries: retries after a 503 or a failed connection (4xx answers are never retried).
        backoff: first retry delay in seconds, doubled each retry up to max_backoff;
            a Retry-After header from the server takes precedence.
        """
        self.base_url = resolve_base_url(base_url)
        self.retry_policy = RetryPolicy(retries=retries, backoff=backoff, max_delay=max_backoff)
        self._http_options: dict[str, Any] = {
            "base_url": self.base_url, "timeout": timeout,
            "headers": default_headers(resolve_api_key(api_key), USER_AGENT) | (headers or {}),
        }


class KvclipClient(_Settings):
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, backoff: float = 0.5, *, max_backoff: float = 30.0,
                 headers: dict[str, str] | None = None, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """See _Settings; `transport` and `sleep` replace the network and the clock (tests)."""
        super().__init__(base_url, api_key, timeout, retries, backoff, max_backoff=max_backoff, headers=headers)
        self._http = httpx.Client(transport=transport, **self._http_options)
        self._sleep = sleep

    # --- classification -------------------------------------------------------------------
    def classify(self, images: ImageInput | Sequence[ImageInput], cache: str, top_k: int | None = None,
                 method: str | None = None, explain: bool = False, partial: bool = False,
                 chunk_size: int = ops.DEFAULT_CHUNK, min_score: float | None = None) -> Classification:
        """Classify one image or a list (paths, bytes, PIL images, numpy arrays, binary files).

        Results are in request order. `method`: auto (default), zeroshot, tip, tipx, caps.
        `partial=True` marks unreadable images in their result instead of failing with 400.
        A longer list than `chunk_size` (the server's --max-images) goes in several requests.
        A result whose top score is below `min_score` (default: the cache's own threshold, if it
        has one) has `abstained=True`, its labels still given.
        """
        return self._run(ops.classify(images, cache, top_k, method, explain, partial, chunk_size, min_score))

    # --- caches -----------------------------------------------------------------------------
    def caches(self) -> list[CacheInfo]:
        """The caches the server serves."""
        return self._run(ops.caches())

    def cache(self, name: str) -> CacheInfo:
        """One cache with its labels, versions on disk, tuned parameters and build report."""
        return self._run(ops.cache(name))

    def activate(self, name: str, version: str) -> CacheInfo:
        """Serve `version` of the cache and make it CURRENT (admin)."""
        return self._run(ops.activate(name, version))

    def reload(self) -> ReloadResult:
        """Load caches whose CURRENT changed on disk, new caches; drop removed ones (admin)."""
        return self._run(ops.reload())

    def delete_version(self, name: str, version: str) -> None:
        """Delete a version that is neither current nor served (admin)."""
        return self._run(ops.delete_version(name, version))

    # --- builds -----------------------------------------------------------------------------
    def build_cache(self, name: str, data: ops.PathLike | None = None,
                    labels: Sequence[str] | ops.PathLike | None = None, pool: ops.PathLike | None = None,
                    templates: Sequence[str] | ops.PathLike | None = None,
                    descriptions: dict[str, list[str]] | ops.PathLike | None = None,
                    shots: int | str | None = None, views: int | None = None, captioner: str | None = None,
                    activate: bool = True, data_dir: str | None = None, pool_dir: str | None = None,
                    wait: bool = True, progress: Callable[[Job], None] | None = None,
                    poll_interval: float = 1.0, *, seed: int | None = None,
                    pool_per_class: int | None = None, **generative: Any) -> Job:
        """Build a new version of cache `name` on the server (admin).

        data: a local DATA/<label>/<image> folder (zipped on the fly) or a .zip/.tar/.tar.gz
        archive of one; pool: the same for unlabelled images. labels, templates: lists or
        files; descriptions: a dict or a JSON file. data_dir/pool_dir: folders on the
        server. `generative`: the captioner and synthesis options of ops.build_options
        (captioner_model, caption_prompt, caption_concurrency, caption_api_key, synthesize,
        sd_model, guidance, steps, support). With wait=True, polls the job every
        poll_interval seconds, calls progress(job) after each poll, and returns the finished
        job or raises JobFailed.
        """
        return self._run(ops.build_cache(
            name, data=data, pool=pool, wait=wait, progress=progress, poll_interval=poll_interval,
            labels=labels, templates=templates, descriptions=descriptions, shots=shots, views=views,
            captioner=captioner, seed=seed, pool_per_class=pool_per_class, activate=activate,
            data_dir=data_dir, pool_dir=pool_dir, **generative))

    def job(self, job_id: str) -> Job:
        return self._run(ops.job(job_id))

    def jobs(self) -> list[Job]:
        return self._run(ops.jobs())

    def cancel_job(self, job_id: str) -> Job:
        """Ask the server to stop a build; the job reads 'cancelled' once its worker stops."""
        return self._run(ops.cancel_job(job_id))

    # --- probes -----------------------------------------------------------------------------
    def health(self) -> bool:
        """True when the server process answers /healthz with 200; raises ServerUnreachable."""
        return self._run(ops.health())

    def ready(self) -> Readiness:
        """The server's /readyz answer, ready or not (a 503 here is an answer, not an error)."""
        return self._run(ops.ready())

    # --- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KvclipClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, op: ops.Operation[T]) -> T:
        value, error = None, None
        try:
            while True:
                done, step = _advance(op, value, error)
                if done:
                    return step
                value, error = None, None
                try:
                    value = self._step(step)
                except KvclipClientError as exc:  # the operation may handle it (health does)
                    error = exc
        finally:
            op.close()  # runs the operation's cleanups (temporary archives) on any exit

    def _step(self, step: Call | Sleep) -> Any:
        if isinstance(step, Sleep):
            return self._sleep(step.seconds)
        attempt = 0
        while True:
            try:
                response = self._http.request(**step.request_kwargs())
            except httpx.TransportError as exc:
                delay = self.retry_policy.after_error(step, attempt, exc)
                if delay is None:
                    raise unreachable(self.base_url, exc) from exc
            else:
                delay = self.retry_policy.after_response(step, attempt, response)
                if delay is None:
                    return parse_response(step, response)
            self._sleep(delay)
            attempt += 1


class AsyncKvclipClient(_Settings):
    """asyncio client with KvclipClient's methods as coroutines. Use `async with`, or aclose()."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, backoff: float = 0.5, *, max_backoff: float = 30.0,
                 headers: dict[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__(base_url, api_key, timeout, retries, backoff, max_backoff=max_backoff, headers=headers)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options)
        self._sleep = sleep

    async def classify(self, images: ImageInput | Sequence[ImageInput], cache: str, top_k: int | None = None,
                       method: str | None = None, explain: bool = False, partial: bool = False,
                       chunk_size: int = ops.DEFAULT_CHUNK, min_score: float | None = None) -> Classification:
        """See KvclipClient.classify."""
        return await self._run(ops.classify(images, cache, top_k, method, explain, partial, chunk_size,
                                            min_score))

    async def caches(self) -> list[CacheInfo]:
        return await self._run(ops.caches())

    async def cache(self, name: str) -> CacheInfo:
        return await self._run(ops.cache(name))

    async def activate(self, name: str, version: str) -> CacheInfo:
        return await self._run(ops.activate(name, version))

    async def reload(self) -> ReloadResult:
        return await self._run(ops.reload())

    async def delete_version(self, name: str, version: str) -> None:
        return await self._run(ops.delete_version(name, version))

    async def build_cache(self, name: str, data: ops.PathLike | None = None,
                          labels: Sequence[str] | ops.PathLike | None = None, pool: ops.PathLike | None = None,
                          templates: Sequence[str] | ops.PathLike | None = None,
                          descriptions: dict[str, list[str]] | ops.PathLike | None = None,
                          shots: int | str | None = None, views: int | None = None, captioner: str | None = None,
                          activate: bool = True, data_dir: str | None = None, pool_dir: str | None = None,
                          wait: bool = True, progress: Callable[[Job], None] | None = None,
                          poll_interval: float = 1.0, *, seed: int | None = None,
                          pool_per_class: int | None = None, **generative: Any) -> Job:
        """See KvclipClient.build_cache. `progress` is a plain function; like the rest of an
        operation's local work it runs in a worker thread, so it must not touch asyncio objects
        directly (use loop.call_soon_threadsafe)."""
        return await self._run(ops.build_cache(
            name, data=data, pool=pool, wait=wait, progress=progress, poll_interval=poll_interval,
            labels=labels, templates=templates, descriptions=descriptions, shots=shots, views=views,
            captioner=captioner, seed=seed, pool_per_class=pool_per_class, activate=activate,
            data_dir=data_dir, pool_dir=pool_dir, **generative))

    async def job(self, job_id: str) -> Job:
        return await self._run(ops.job(job_id))

    async def jobs(self) -> list[Job]:
        return await self._run(ops.jobs())

    async def cancel_job(self, job_id: str) -> Job:
        return await self._run(ops.cancel_job(job_id))

    async def health(self) -> bool:
        return await self._run(ops.health())

    async def ready(self) -> Readiness:
        return await self._run(ops.ready())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncKvclipClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, op: ops.Operation[T]) -> T:
        value, error = None, None
        try:
            while True:
                # Off the event loop: between calls an operation encodes images to PNG or zips
                # a data folder, CPU and disk work that would stall every other task.
                done, step = await asyncio.to_thread(_advance, op, value, error)
                if done:
                    return step
                value, error = None, None
                try:
                    value = await self._step(step)
                except KvclipClientError as exc:
                    error = exc
        finally:
            # Cancelled while a thread still advances it, the operation cannot be closed
            # here; it closes itself (and its temporary files) when it is garbage-collected.
            with contextlib.suppress(ValueError):
                op.close()

    async def _step(self, step: Call | Sleep) -> Any:
        if isinstance(step, Sleep):
            return await self._sleep(step.seconds)
        attempt = 0
        while True:
            try:
                response = await self._http.request(**step.request_kwargs())
            except httpx.TransportError as exc:
                delay = self.retry_policy.after_error(step, attempt, exc)
                if delay is None:
                    raise unreachable(self.base_url, exc) from exc
            else:
                delay = self.retry_policy.after_response(step, attempt, response)
                if delay is None:
                    return parse_response(step, response)
            await self._sleep(delay)
            attempt += 1
