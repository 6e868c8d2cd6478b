"""Slow clients against a real server (the app under uvicorn with kvclip's protocol, on a
socket, in a thread of the test process): a request whose headers or
body trickle in past --header-timeout-s / --body-timeout-s gets a 408 and its connection is
closed, instead of holding it (and a --max-concurrency slot) for ever. A connection idle
between requests is closed by the keep-alive timeout only, and not before clients' pools
drop it themselves.

Each case waits on one of the server's timeouts (14 s in all, idle), so the four run side by
side from the module's start and each test awaits its own (`started`); the two that take the
one --max-concurrency slot run one after the other."""
from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from concurrent import futures
from urllib.parse import urlsplit

import httpx
import pytest

from tests.live_server import serve_in_thread

TRICKLE_S = 0.5  # one byte every half second, as in the issue
GIVE_UP_S = 60.0  # the test fails, rather than hangs, if the server never closes
HEADER_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(served_caches, tmp_path_factory, tiny_encoder):
    with serve_in_thread(served_caches, tmp_path_factory.mktemp("slow"), encoder=tiny_encoder,
                         header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=2.0, max_concurrency=1) as srv:
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


def headers_that_trickle(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with connect(server) as sock:
        answer = trickle_until_closed(sock, request)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"request_timeout"' in answer


def a_body_that_trickles(server):
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


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body (what /healthz and JSON errors send)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    assert len(body) == length, f"more than one response: {data!r}"
    return head


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent on an idle connection (b"" for a close) within `seconds`, or None.

    A lower bound, never a speed: a slow server closes later, not sooner."""
    readable, _, _ = select.select([sock], [], [], seconds)
    if not readable:
        return None
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def an_idle_keep_alive_connection(server):
    # A client drops a pooled connection idle for keepalive_expiry (httpx: 5 s); a server that
    # closes it as soon as that races the client's next request on it: the request meets the
    # close and the client sees a reset (httpx.ReadError), which is what the load run saw.
    client_expiry = httpx.Limits().keepalive_expiry
    assert client_expiry is not None
    with connect(server) as sock:
        sock.sendall(HEALTHZ)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert closed_within(sock, client_expiry + 1) is None, "the server closed an idle connection first"
        sock.sendall(HEALTHZ)  # the client may still reuse it
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def a_body_sent_after_an_early_answer(server):
    # 404 comes before the body is read; the body arrives after it. The connection is then
    # idle, so --header-timeout-s must not fire on it (it would write a 408 no request asked for).
    body = b'{"x": 1}'
    with connect(server) as sock:
        sock.sendall(b"POST /no-such-route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 404")
        sock.sendall(body)
        assert closed_within(sock, HEADER_TIMEOUT_S + 2) is None, "the idle connection was timed out"
        sock.sendall(HEALTHZ)
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def after(first: futures.Future, case: Callable[[object], None], server) -> None:
    futures.wait([first])
    case(server)


@pytest.fixture(scope="module")
def started(server):
    """Every case started at once, on threads: case name -> its Future."""
    with futures.ThreadPoolExecutor(4, thread_name_prefix="slow-client") as pool:
        body = pool.submit(a_body_that_trickles, server)
        yield {
            "headers": pool.submit(headers_that_trickle, server),
            "body": body,
            "keep-alive": pool.submit(an_idle_keep_alive_connection, server),
            "early answer": pool.submit(after, body, a_body_sent_after_an_early_answer, server),  # a slot too
        }


def test_headers_that_trickle_get_408_and_a_closed_connection(started):
    started["headers"].result(timeout=4 * GIVE_UP_S)


def test_a_body_that_trickles_gets_408_and_a_closed_connection(started):
    started["body"].result(timeout=4 * GIVE_UP_S)


def test_an_idle_keep_alive_connection_outlives_the_client_pool_s_expiry(started):
    started["keep-alive"].result(timeout=4 * GIVE_UP_S)


def test_a_body_sent_after_an_early_answer_leaves_the_connection_idle_not_timed_out(started):
    started["early answer"].result(timeout=4 * GIVE_UP_S)
