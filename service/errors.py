"""JSON errors: every failure answers {"error": {"code", "message", "details"?}}.

Routes raise domain errors (CacheNotFound, Overloaded, ...) and let them propagate;
ERROR_TABLE below is the one place that says which status and code each one answers.
HttpError is for what only the HTTP edge knows (a body that does not parse, a limit).
The Ray Serve app (deploy/ray/app.py) answers through the same table.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvclip.errors import DataError
from kvclip.service.admission import ClientDisconnected, DecodeWorkerLost
from kvclip.service.archives import ArchiveError, ArchiveTooLarge
from kvclip.service.batcher import Overloaded, RequestTooLarge, Stopped
from kvclip.service.jobs import JobNotFound
from kvclip.service.middleware import BodyTooLarge
from kvclip.service.registry import CacheNotFound, VersionConflict, VersionNotFound, VersionNotLoadable
from kvclip.service.schemas import ErrorResponse
from kvclip.service.security import Forbidden, Unauthorized
from kvclip.service.state import NotReady

# Domain error -> (status, code). An error answers as the nearest class in its MRO that is
# listed (VersionNotFound is a CacheNotFound; ArchiveError is a DataError); errors not
# listed are bugs and answer 500 (service/middleware.py sends that body).
ERROR_TABLE: dict[type[Exception], tuple[int, str]] = {
    CacheNotFound: (404, "unknown_cache"),
    VersionNotFound: (404, "unknown_version"),
    VersionConflict: (409, "version_in_use"),
    VersionNotLoadable: (409, "version_not_loadable"),
    JobNotFound: (404, "unknown_job"),
    DataError: (422, "invalid_parameters"),
    ArchiveError: (400, "bad_archive"),
    ArchiveTooLarge: (413, "too_large"),
    BodyTooLarge: (413, "too_large"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    NotReady: (503, "not_ready"),
    Overloaded: (503, "overloaded"),
    Stopped: (503, "shutting_down"),
    DecodeWorkerLost: (503, "decode_worker_lost"),
    RequestTooLarge: (413, "too_large"),
    ClientDisconnected: (499, "client_disconnected"),  # nginx's code: the answer reaches nobody
}


class HttpError(Exception):
    """An error the client can act on; `details` names the images or fields at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers

    def as_dict(self) -> dict:
        """Plain data that HttpError(**d) rebuilds (Ray replicas return errors, not raise them)."""
        return {"status": self.status, "code": self.code, "message": self.message,
                "details": self.details, "headers": self.headers}


def http_error(exc: BaseException, retry_after_s: float) -> HttpError | None:
    """`exc` as the API answers it: an HttpError as is, a domain error by ERROR_TABLE, None
    for anything else. A 503 says when to retry; a 401 which scheme to use."""
    if isinstance(exc, HttpError):
        return exc
    listed = next((cls for cls in type(exc).__mro__ if cls in ERROR_TABLE), None)
    if listed is None:
        return None
    status, code = ERROR_TABLE[listed]
    headers = ({"Retry-After": str(retry_after_s)} if status == 503
               else {"WWW-Authenticate": "Bearer"} if status == 401 else None)
    return HttpError(status, code, str(exc), headers=headers)


# What each status means in the OpenAPI document, unless a route says more.
_DESCRIPTIONS = {
    400: "a body or an image that cannot be read", 401: "API key missing or invalid",
    403: "API key lacks the scope", 404: "unknown cache, version or job", 408: "the request was not received in time",
    409: "conflict with the server's state", 413: "body or upload too large",
    415: "unsupported content type", 422: "invalid parameters",
    503: "not ready, overloaded or shutting down (see Retry-After)",
}


def error_responses(*statuses: int, described: dict[int, str] | None = None) -> dict[int | str, dict]:
    """`responses=` for a route: the JSON error body under each status (FastAPI's own 422
    schema is replaced: the handlers below answer every error with ErrorResponse)."""
    descriptions = {s: _DESCRIPTIONS[s] for s in statuses} | (described or {})
    return {s: {"model": ErrorResponse, "description": d} for s, d in sorted(descriptions.items())}


def error_response(
    status: int, code: str, message: str, details: list | None = None, headers: dict | None = None
) -> JSONResponse:
    body: dict = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def invalid(what: str, exc) -> HttpError:
    """422 naming each invalid field of a pydantic ValidationError."""
    details = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    return HttpError(422, "invalid_parameters", f"{what}: {summary}", details)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "too_large",
                 415: "unsupported_media_type", 422: "invalid_parameters", 503: "unavailable"}


def install_handlers(app: FastAPI) -> None:
    """JSON answers for HttpError, every ERROR_TABLE class, and FastAPI's own errors.
    The app's state (`app.state.kv`) gives the Retry-After seconds."""

    async def _http_error(request: Request, exc: Exception) -> JSONResponse:
        error = http_error(exc, request.app.state.kv.config.retry_after_s)
        assert error is not None  # registered only for the classes http_error knows
        return error_response(error.status, error.code, error.message, error.details, error.headers)

    for cls in (HttpError, *ERROR_TABLE):
        app.add_exception_handler(cls, _http_error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid("invalid request", exc)
        return error_response(error.status, error.code, error.message, error.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))
