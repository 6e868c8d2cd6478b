"""Slow clients: a bound on the time to send a request's headers and its body.

Without one, a client sending a byte every half second holds its connection (and, once the
headers are in, a --max-concurrency slot) for as long as it likes. uvicorn bounds only idle
keep-alive connections (timeout_keep_alive, --keep-alive-timeout-s), so:

- `header_timeout_protocol(s)` is uvicorn's httptools protocol (its C parser costs less per
  request than h11's pure Python) with a timer from the first byte of a request (or from the
  connection's start) to the end of its headers; when it fires the connection gets a 408
  and is closed. Pass it as `uvicorn.Config(http=...)`. A connection idle between requests
  is the keep-alive timeout's alone: a 408 written there would race the client's next
  request on that connection.
- `BodyTimeoutMiddleware` bounds the time from the app's first read of the body to its last
  chunk; past it the request is answered 408 and the connection closed.
"""
from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kvclip.service.middleware import send_json

_TIMEOUT_BODY = {"code": "request_timeout", "message": "the request was not received in time ({what}, {limit:g} s)"}


def _timeout_payload(what: str, limit: float) -> dict:
    return {"error": {k: v.format(what=what, limit=limit) for k, v in _TIMEOUT_BODY.items()}}


def header_timeout_protocol(timeout_s: float) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol subclass closing connections whose request line and headers take
    longer than `timeout_s` (0: uvicorn's own protocol, no limit)."""
    if not timeout_s:
        return HttpToolsProtocol
    body = json.dumps(_timeout_payload("request headers, --header-timeout-s", timeout_s)).encode()
    response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        """The parser says when a request begins (its first byte) and when its headers are in."""

        _header_timer: asyncio.TimerHandle | None = None
        _in_request = False  # from a request's first byte to its last

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if (self._in_request and self._header_timer is None and self.cycle is not None
                    and self.cycle.response_complete):
                # The rest of a body the app answered early (404, 413 before reading it): nobody
                # reads it, and uvicorn cancelled its keep-alive timer on these bytes.
                self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_request = True
            if self._header_timer is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_request = False
            if self.cycle is not None and self.cycle.response_complete and not self.pipeline:
                # Answered before its body was in, idle now: uvicorn re-arms its keep-alive
                # timer only when a response completes, so the connection would have none.
                self._disarm()
                if self.timeout_keep_alive_task is None:
                    self.timeout_keep_alive_task = self.loop.call_later(
                        self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                # Written raw: the parser lets a server answer only a request it has parsed.
                self.transport.write(response)
                self.transport.close()

    return HeaderTimeoutProtocol


class BodyTimeout(Exception):
    pass


class BodyTimeoutMiddleware:
    """408 (and Connection: close) when the body takes over `timeout_s` from the app's first read."""

    def __init__(self, app, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        body_done = False
        started = False

        async def timed_receive():
            nonlocal deadline, body_done
            if body_done:  # afterwards only http.disconnect comes, whenever it comes
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise BodyTimeout() from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except BodyTimeout:
            if not started:
                await send_json(send, 408, _timeout_payload("request body, --body-timeout-s", self.timeout_s),
                                headers=[(b"connection", b"close")])
