"""Responses to requests whose body the connection framed, or whose plain head h11
never saw, written without h11.

Over real sockets: the bytes on the wire must be exactly what h11 writes for the same
response (checked against h11 itself), the connection must serve the next request,
and whatever h11 decides differently (a client that asks to close, HTTP/1.0, an
application's own framing headers, a head h11 parsed) must still go through h11.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import h11
import pytest

from tests.rawhttp import RawConnection
from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.http.types import Request, Response

WAIT = 10.0


class Answering:
    """Reads the request body, then answers ``make(body)``."""

    def __init__(self, make: Callable[[bytes], Response]) -> None:
        self.make = make

    async def __call__(self, request: Request) -> Response:
        body = b"".join([chunk async for chunk in request.body])
        return self.make(body)


@contextlib.asynccontextmanager
async def running(handler: Answering) -> AsyncIterator[int]:
    server = HTTPServer(handler, HTTPLimits())
    port = await server.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.stop(1.0)


@pytest.fixture
def h11_sends(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """The events the server (not the test) hands to ``h11.Connection.send``."""
    sent: list[type] = []
    real_send = h11.Connection.send

    def spy(self: h11.Connection, event: Any) -> bytes | None:
        if sys._getframe(1).f_globals.get("__name__", "").startswith("tusd_py"):
            sent.append(type(event))
        return real_send(self, event)

    monkeypatch.setattr(h11.Connection, "send", spy)
    return sent


def h11_bytes(request_head: bytes, response: h11.Response, body: bytes) -> bytes:
    """What h11 writes for ``response`` (and ``body``) to the request ``request_head``."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request_head)
    assert type(conn.next_event()) is h11.Request
    data = conn.send(response) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


async def read_exactly_response(connection: RawConnection, with_body: bool = True) -> bytes:
    head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), WAIT)
    if not with_body:
        return head
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head + await connection.reader.readexactly(length)


def header_value(response: bytes, name: bytes) -> bytes:
    for line in response.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.lower() == name:
            return value.strip()
    raise AssertionError(f"no {name!r} in {response!r}")


@pytest.mark.both_loops
@pytest.mark.parametrize(
    "request_bytes",
    [
        b"PATCH /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        # Plain heads without a body are parsed without h11 (``http/head.py``).
        b"HEAD /u HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n\r\n",
        b"POST /u HTTP/1.1\r\nhost: x\r\nConnection: keep-alive\r\nUpload-Length: 3\r\n\r\n",
    ],
    ids=["PATCH", "HEAD", "POST"],
)
@pytest.mark.parametrize(
    ("status", "headers", "body", "reason"),
    [
        (204, [("Upload-Offset", "5"), ("Tus-Resumable", "1.0.0")], b"", ""),
        (201, [("Location", "http://x/files/abc")], b"", ""),
        (409, [("Content-Type", "text/plain")], b"offset mismatch\n", ""),
        (299, [], b"odd", "Custom Reason"),
    ],
)
async def test_same_bytes_as_h11_without_h11(
    h11_sends: list[type], request_bytes: bytes, status: int, headers: list[tuple[str, str]], body: bytes,
    reason: str
) -> None:
    handler = Answering(lambda _: Response(status, list(headers), body, reason))
    request_head = request_bytes[:request_bytes.index(b"\r\n\r\n") + 4]
    is_head = request_bytes.startswith(b"HEAD ")
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            for _ in range(2):  # and the connection serves the next request
                await connection.send(request_bytes)
                written = await read_exactly_response(connection, with_body=not is_head)
                request_id = header_value(written, b"x-request-id")
                date = header_value(written, b"date")
                expected_headers = [(b"server", b"tusd-py"), (b"date", date)]
                expected_headers += [(name.encode(), value.encode()) for name, value in headers]
                expected_headers.append((b"x-request-id", request_id))
                if status != 204:
                    expected_headers.append((b"content-length", str(len(body)).encode()))
                expected = h11.Response(status_code=status, headers=expected_headers, reason=reason.encode()
                                        or h11_reason(status))
                assert written == h11_bytes(request_head, expected, b"" if status == 204 or is_head else body)
        finally:
            await connection.close()
    assert h11_sends == []  # neither response went through h11


def h11_reason(status: int) -> bytes:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


@pytest.mark.parametrize(
    ("request_head", "headers"),
    [
        # The client asks to close: h11 adds "Connection: close" and closes.
        (b"PATCH /u HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\nContent-Length: 5\r\n\r\n", []),
        # HTTP/1.0: h11 closes after the response.
        (b"PATCH /u HTTP/1.0\r\nHost: x\r\nContent-Length: 5\r\n\r\n", []),
        # The application frames the response itself: h11 checks it.
        (b"PATCH /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", [("Content-Length", "2")]),
        (b"PATCH /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", [("Connection", "close")]),
    ],
)
async def test_what_h11_decides_goes_through_h11(
    h11_sends: list[type], request_head: bytes, headers: list[tuple[str, str]]
) -> None:
    handler = Answering(lambda _: Response(200, list(headers), b"ok"))
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(request_head + b"hello")
            written = await read_exactly_response(connection)
            assert written.startswith(b"HTTP/1.1 200 OK\r\n") and written.endswith(b"\r\n\r\nok")
            if headers != [("Content-Length", "2")]:
                assert header_value(written, b"connection") == b"close"
                assert await connection.is_closed_by_peer(WAIT)
        finally:
            await connection.close()
    assert h11.Response in h11_sends


@pytest.mark.parametrize(
    ("plain_head", "through_h11"),
    [
        (b"HEAD /u HTTP/1.1\r\nHost: x\r\n\r\n", 0),
        # Not plain (``http/head.py``): h11 parses the head, so it must see the response.
        (b"HEAD /u HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n", 2),
        (b"HEAD /u HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-foo\r\n\r\n", 2),
    ],
)
async def test_a_request_without_a_body_goes_through_h11_unless_its_head_is_plain(
    h11_sends: list[type], plain_head: bytes, through_h11: int
) -> None:
    """Its h11 connection goes on to the next request: h11 must see the response to a
    head it parsed, and must not see one to a head it never saw."""
    handler = Answering(lambda _: Response(204, [("Upload-Offset", "0")]))
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            # Both requests in one write: the second waits (pipelined) for the first.
            await connection.send(plain_head * 2)
            for _ in range(2):
                written = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), WAIT)
                assert written.startswith(b"HTTP/1.1 204 No Content\r\n")
        finally:
            await connection.close()
    assert h11_sends.count(h11.Response) == through_h11
