"""Requests the HTTP layer must refuse or record truthfully, over real sockets: an
HTTP version it does not speak, conflicting Content-Length headers, and a client that
hangs up in the middle of a body."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from tests.test_http_observer import Recorder
from tests.test_http_server import WAIT, connect, echo_length, running
from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.http.types import ClientDisconnected, Request, Response

pytestmark = pytest.mark.both_loops


@pytest.mark.parametrize("version", [b"HTTP/7.3", b"HTTP/2.0", b"HTTP/0.9"])
async def test_an_http_version_other_than_1_x_gets_505(version: bytes) -> None:
    async with running(echo_length) as (_, port):
        async with connect(port) as client:
            await client.send(b"GET /v " + version + b"\r\nHost: x\r\n\r\n")
            status, headers, body = await client.read_response()
            assert status == b"HTTP/1.1 505 HTTP Version Not Supported"
            assert headers["connection"] == "close"
            assert body == b"505 HTTP Version Not Supported\n"
            assert await client.at_eof()
        async with connect(port) as client:  # the server lives on
            await client.send(b"GET /ok HTTP/1.0\r\n\r\n")
            assert (await client.read_response())[2] == b"GET /ok 0"


async def test_a_higher_minor_version_is_served_as_1_1() -> None:
    """RFC 9110, 2.5: a minor version above ours is processed as the highest we speak."""
    async with running(echo_length) as (_, port), connect(port) as client:
        await client.send(b"GET /minor HTTP/1.7\r\nHost: x\r\n\r\n")
        status, _, body = await client.read_response()
        assert (status, body) == (b"HTTP/1.1 200 OK", b"GET /minor 0")


async def test_conflicting_content_lengths_get_400_before_the_handler_runs() -> None:
    """h11 refuses two different Content-Length values (RFC 9112, 6.3: a request
    smuggling vector); identical repeats count once."""
    called: list[str] = []

    async def handler(request: Request) -> Response:
        called.append(request.target)
        return await echo_length(request)

    async with running(handler) as (_, port):
        async with connect(port) as client:
            await client.send(b"PATCH /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde")
            status, headers, _ = await client.read_response()
            assert status == b"HTTP/1.1 400 Bad Request"
            assert headers["connection"] == "close"
            assert await client.at_eof()
        async with connect(port) as client:
            await client.send(b"PATCH /same HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc")
            assert (await client.read_response())[2] == b"PATCH /same 3"
    assert called == ["/same"]


@pytest.fixture
def access_records() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    collect = Collect()
    access = logging.getLogger("tusd_py.access")
    level = access.level
    access.addHandler(collect)
    access.setLevel(logging.INFO)
    yield records
    access.removeHandler(collect)
    access.setLevel(level)


async def test_a_body_cut_off_by_the_client_is_logged_and_counted_as_aborted(
    access_records: list[logging.LogRecord],
) -> None:
    """The handler still stores what arrived and answers 204, but nobody reads that
    answer: the access log and the metrics say status 0, as the README promises."""
    stored: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(request: Request) -> Response:
        got = b""
        try:
            async for chunk in request.body:
                got += chunk
        except ClientDisconnected:
            stored.set_result(got)
        return Response(204, [("Upload-Offset", str(len(got)))])

    recorder = Recorder()
    server = HTTPServer(handler, HTTPLimits(), observer=recorder)
    port = await server.start("127.0.0.1", 0)
    try:
        async with connect(port) as client:
            await client.send(b"PATCH /files/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"y" * 500)
            client.close()
        assert await asyncio.wait_for(stored, WAIT) == b"y" * 500
        async with asyncio.timeout(WAIT):
            await recorder.finished.wait()
        # A complete PATCH on a new connection is still counted with its status.
        recorder.finished.clear()
        async with connect(port) as client:
            await client.send(b"PATCH /files/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert (await client.read_response())[0] == b"HTTP/1.1 204 No Content"
        async with asyncio.timeout(WAIT):
            await recorder.finished.wait()
    finally:
        await server.stop(1.0)
    assert recorder.requests == [("PATCH", 0), ("PATCH", 204)]
    assert [(record.path, record.status) for record in access_records] == [  # type: ignore[attr-defined]
        ("/files/a", 0),
        ("/files/b", 204),
    ]
    assert access_records[0].bytes_in == 500  # type: ignore[attr-defined]
