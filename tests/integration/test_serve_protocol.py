"""`kvclip serve` runs uvicorn on uvloop with the httptools parser, whose protocol carries the
header timeout (service/timeouts.py; tests/e2e/test_http_timeouts.py checks it on sockets)."""
from __future__ import annotations

import sys

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tests.service_helpers import run_serve


@pytest.mark.skipif(sys.platform == "win32", reason="no uvloop on Windows")
def test_kvclip_serve_runs_uvloop_and_httptools(monkeypatch, capsys, tmp_path):
    args = ("--caches", str(tmp_path), "--model", "tiny-random", "--device", "cpu")
    code, err, served = run_serve(monkeypatch, capsys, *args)
    assert code == 0, err
    assert served.loop == "uvloop"
    assert served.http is not HttpToolsProtocol and issubclass(served.http, HttpToolsProtocol)  # the timeout's
    served.load()  # uvicorn accepts both (uvloop and httptools are importable)
    assert served.http_protocol_class is served.http
    code, err, served = run_serve(monkeypatch, capsys, *args, "--header-timeout-s", "0")
    assert code == 0, err
    assert served.http is HttpToolsProtocol  # no timeout: uvicorn's own protocol
