"""Slow clients against a real `kvclip serve` (uvicorn, sockets): a request whose headers or
body trickle in past --header-timeout-s / --body-timeout-s gets a 408 and its connection is
closed, instead of holding it (and a --max-concurrency slot) for ever."""
from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.server_process import serve_process

TRICKLE_S = 0.5  # one byte every half second, as in the issue
GIVE_UP_S = 60.0  # the test fails, rather than hangs, if the server never closes


@pytest.fixture(scope="module")
def server(served_caches, tmp_path_factory):
    with serve_process(served_caches, tmp_path_factory.mktemp("slow"), "--header-timeout-s", "2",
                       "--body-timeout-s", "2", "--max-concurrency", "1") as srv:
        yield srv


def connect(server) -> socket.socket:
    url = urlsplit(server.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=GIVE_UP_S)
    return sock


def trickle_until_closed(sock: socket.socket, data: bytes) -> bytes:
    """Send `data` a byte at a time; return what the server answered once it closed."""
    deadline = time.monotonic() + GIVE_UP_S
    sock.settimeout(TRICKLE_S)
    answer = b""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        answer += chunk
        assert time.monotonic() < deadline, "the server never closed the connection"
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


def test_headers_that_trickle_get_408_and_a_closed_connection(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with connect(server) as sock:
        answer = trickle_until_closed(sock, request)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"request_timeout"' in answer


def test_a_body_that_trickles_gets_408_and_a_closed_connection(server):
    body = b'{"images": [{"data": "' + b"A" * 200 + b'"}]}'
    head = (b"POST /v1/classify?cache=fashion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with connect(server) as sock:
        sock.sendall(head)
        answer = trickle_until_closed(sock, body)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"request_timeout"' in answer and b"connection: close" in answer.lower()
    # --max-concurrency 1: had the slow body kept its slot, this would be 503.
    assert httpx.get(server.url + "/v1/caches", timeout=30).status_code == 200
