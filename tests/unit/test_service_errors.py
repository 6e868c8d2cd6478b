"""The error table (service/errors.py): which status and code each domain error answers."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvclip.errors import DataError, KvclipError, ModelLoadError
from kvclip.service.admission import ClientDisconnected, DecodeWorkerLost
from kvclip.service.archives import ArchiveError, ArchiveTooLarge
from kvclip.service.batcher import Overloaded, RequestTooLarge, Stopped
from kvclip.service.errors import ERROR_TABLE, HttpError, http_error
from kvclip.service.jobs import JobNotFound
from kvclip.service.middleware import BodyTooLarge
from kvclip.service.registry import CacheNotFound, VersionConflict, VersionNotFound, VersionNotLoadable
from kvclip.service.security import Forbidden, Unauthorized
from kvclip.service.state import NotReady

RAY_APP = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "app.py"


CASES = [
    (CacheNotFound("unknown cache 'x'"), 404, "unknown_cache"),
    (VersionNotFound("no version v0009"), 404, "unknown_version"),  # a CacheNotFound: the nearer class wins
    (VersionConflict("v0001 is being served"), 409, "version_in_use"),
    (VersionNotLoadable("x v0002 not activated: corrupt"), 409, "version_not_loadable"),
    (JobNotFound("unknown job 'abc'"), 404, "unknown_job"),
    (DataError("labels must be unique"), 422, "invalid_parameters"),
    (ArchiveError("not a zip"), 400, "bad_archive"),  # a DataError
    (ArchiveTooLarge("more than 10 files"), 413, "too_large"),
    (BodyTooLarge("body too large"), 413, "too_large"),
    (Unauthorized("an API key is required"), 401, "unauthorized"),
    (Forbidden("lacks the 'admin' scope"), 403, "forbidden"),
    (NotReady("server not ready"), 503, "not_ready"),
    (Overloaded("server overloaded; retry later"), 503, "overloaded"),
    (Stopped("shutting down"), 503, "shutting_down"),
    (RequestTooLarge("9 images exceed the encoder queue of 8"), 413, "too_large"),
    (ClientDisconnected("the client closed the connection"), 499, "client_disconnected"),
    (DecodeWorkerLost("a decode worker process died; retry"), 503, "decode_worker_lost"),
]


@pytest.mark.parametrize("error, status, code", CASES)
def test_domain_errors_answer_their_status_and_code(error, status, code):
    answer = http_error(error, retry_after_s=7)
    assert (answer.status, answer.code, answer.message) == (status, code, str(error))
    if status == 503:
        assert answer.headers == {"Retry-After": "7"}
    elif status == 401:
        assert answer.headers == {"WWW-Authenticate": "Bearer"}
    else:
        assert answer.headers is None


def test_every_listed_error_is_tested():
    assert {type(error) for error, _, _ in CASES} == set(ERROR_TABLE)


def test_unlisted_errors_are_not_answered_and_http_errors_pass_through():
    # A generic KvclipError, or a model error outside an activation, is a bug: the 500 handler's.
    for error in (KvclipError("x"), ModelLoadError("x"), RuntimeError("boom"), KeyError("k")):
        assert http_error(error, 1) is None
    given = HttpError(415, "unsupported_media_type", "send images", [{"index": 0}], {"X": "y"})
    assert http_error(given, 1) is given
    assert HttpError(**given.as_dict()).as_dict() == given.as_dict()  # what Ray replicas send back


def test_ray_app_imports_only_public_names():
    """deploy/ray/app.py reuses the server through public names only (no `_private` imports)."""
    tree = ast.parse(RAY_APP.read_text())
    imported = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("kvclip") for alias in node.names]
    assert imported, "the Ray app imports nothing from kvclip?"
    private = [f"{module}.{name}" for module, name in imported if name.startswith("_")]
    assert not private, private
