"""The client's exceptions: one base class, so callers can catch everything the client raises."""
from __future__ import annotations

from typing import Any


class KvclipClientError(Exception):
    """Base of every error the kvclip client raises."""


class ApiError(KvclipClientError):
    """The server answered with an error: `{"error": {"code", "message", "details"?}}`.

    `details` names the images or fields at fault; `request_id` is the server's
    X-Request-ID, which tags the server's log lines for this request.
    """

    def __init__(self, status: int, code: str, message: str, details: list[Any] | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or []
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status} {self.code})"


class ServerUnreachable(KvclipClientError):
    """No answer: connection refused, DNS failure, timeout, connection dropped (after retries)."""


class InputError(KvclipClientError, ValueError):
    """A local input the client cannot send: unreadable image, unsupported array, missing folder."""


class JobFailed(KvclipClientError):
    """A build job ended failed or cancelled; `job` is its final state."""

    def __init__(self, job: Any) -> None:
        reason = job.error or ("cancelled" if job.state == "cancelled" else "no reason given")
        super().__init__(f"build of cache {job.cache!r} {job.state} (job {job.id}): {reason}")
        self.job = job
