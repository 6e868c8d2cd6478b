"""What one HTTP call is, when to retry it, and how its answer becomes data or an ApiError.

Shared by the sync and the async client: they differ only in how they send and sleep.
"""
from __future__ import annotations

import email.utils
import os
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvclip.clients.errors import ApiError, ServerUnreachable

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "KVCLIP_SERVER"
API_KEY_ENV = "KVCLIP_API_KEY"


@dataclass
class Call:
    """One request. `idempotent=False` marks calls that must not be sent twice when the
    server may have acted on the first one (a build upload): those retry only when the
    request provably never reached the server (refused connection) or was refused (503)."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    data: dict[str, str] | None = None
    files: list[tuple[str, tuple]] | None = None
    idempotent: bool = True
    answers: tuple[int, ...] = ()  # non-2xx statuses whose body is an answer (readyz's 503), not retried

    def request_kwargs(self) -> dict[str, Any]:
        # Rewind streamed files: a retry must send them from the start.
        for _, part in self.files or ():
            if hasattr(part[1], "seek"):
                part[1].seek(0)
        params = {k: v for k, v in (self.params or {}).items() if v is not None}
        kwargs: dict[str, Any] = {"method": self.method, "url": self.path, "params": params or None}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.files is not None:
            kwargs["files"] = self.files
        if self.data is not None:
            kwargs["data"] = self.data
        return kwargs


@dataclass(frozen=True)
class Sleep:
    """A pause an operation asks for (between job polls)."""

    seconds: float


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: backoff * 2**attempt seconds, capped; a Retry-After header wins."""

    retries: int = 3  # retries after the first attempt
    backoff: float = 0.5
    max_delay: float = 30.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({503}))

    def after_response(self, call: Call, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before retrying, or None to take this answer (errors included)."""
        if response.status_code not in self.retry_statuses or response.status_code in call.answers:
            return None
        if attempt >= self.retries:
            return None
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return min(self.max_delay, retry_after if retry_after is not None else self._backoff(attempt))

    def after_error(self, call: Call, attempt: int, error: httpx.TransportError) -> float | None:
        """Seconds to wait before retrying after no answer, or None to give up."""
        if attempt >= self.retries:
            return None
        never_sent = isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout))
        if not (call.idempotent or never_sent):
            return None
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        return min(self.max_delay, self.backoff * (2 ** attempt))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_response(call: Call, response: httpx.Response) -> Any:
    """The JSON body of a success (None when empty), else raise the server's ApiError."""
    if response.is_success or response.status_code in call.answers:
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "bad_response",
                           f"{call.method} {call.path}: the server's answer is not JSON") from exc
    raise api_error(response)


def api_error(response: httpx.Response) -> ApiError:
    request_id = response.headers.get("x-request-id")
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error.get("code", "error")), str(error.get("message", "")),
                        error.get("details"), request_id)
    except (ValueError, KeyError, TypeError, AttributeError):
        # Not kvclip's JSON error (a proxy's HTML page, say): keep a short excerpt.
        text = " ".join(response.text.split())[:200] or response.reason_phrase
        return ApiError(response.status_code, "http_error", text, None, request_id)


def unreachable(base_url: str, error: httpx.TransportError) -> ServerUnreachable:
    if isinstance(error, httpx.ConnectError):
        reason = str(error) or "connection failed"
        if "refused" in reason.lower():
            reason = "connection refused (is `kvclip serve` running there?)"
    elif isinstance(error, httpx.TimeoutException):
        reason = f"timed out ({type(error).__name__}); raise the client's timeout for slow requests"
    else:
        reason = str(error) or type(error).__name__
    return ServerUnreachable(f"cannot reach the kvclip server at {base_url}: {reason}")


def resolve_base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def default_headers(api_key: str | None, user_agent: str) -> dict[str, str]:
    headers = {"User-Agent": user_agent, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
