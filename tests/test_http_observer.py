"""The HTTP layer's observer (what feeds the metrics): connections, finished requests
and body bytes, driven by raw bytes on real sockets."""

from __future__ import annotations

import asyncio

import pytest

from tests.rawhttp import RawConnection
from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.http.types import Request, Response

pytestmark = pytest.mark.both_loops

WAIT = 10.0


class Recorder:
    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.requests: list[tuple[str, int]] = []
        self.received = 0
        self.sent = 0
        self.finished = asyncio.Event()
        self.all_closed = asyncio.Event()

    def connection_opened(self) -> None:
        self.opened += 1
        self.all_closed.clear()

    def connection_closed(self) -> None:
        self.closed += 1
        if self.closed == self.opened:
            self.all_closed.set()

    def request_finished(self, method: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.requests.append((method, status))
        self.finished.set()

    def bytes_received(self, count: int) -> None:
        self.received += count

    def bytes_sent(self, count: int) -> None:
        self.sent += count


async def handler(request: Request) -> Response:
    if request.method == "PUT":
        return Response(403)  # early answer: the body is drained, not handed over
    total = 0
    async for chunk in request.body:
        total += len(chunk)
    return Response(200, [], b"x" * total)


async def test_observer_counts_connections_requests_and_bytes() -> None:
    recorder = Recorder()
    server = HTTPServer(handler, HTTPLimits(), observer=recorder)
    port = await server.start("127.0.0.1", 0)
    try:
        connection = await RawConnection.open(port)
        await connection.send_request("POST", "/a", body=b"y" * 1000)
        assert (await connection.read_response("POST")).body == b"x" * 1000
        await connection.send(
            b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        assert (await connection.read_response("POST")).status == 200
        # An early answer: the body sent after it is drained, never handed over.
        await connection.send(b"PUT /c HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n")
        assert (await connection.read_response("PUT")).status == 403
        await connection.send(b"z" * 500)
        await connection.send_request("POST", "/d", body=b"y" * 10)
        assert (await connection.read_response("POST")).body == b"x" * 10
        await connection.close()

        malformed = await RawConnection.open(port)
        await malformed.send(b"NOT HTTP\r\n\r\n")
        assert (await malformed.read_response("GET")).status == 400
        await malformed.close()

        async with asyncio.timeout(WAIT):
            await recorder.all_closed.wait()
    finally:
        await server.stop(1.0)

    assert recorder.opened == recorder.closed == 2
    assert sorted(recorder.requests) == sorted([("POST", 200)] * 3 + [("PUT", 403), ("-", 400)])
    assert recorder.received == 1000 + 8 + 10
    assert recorder.sent == 1000 + 8 + 10
