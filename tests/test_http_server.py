"""The HTTP layer over real sockets: raw request bytes in, exact response bytes out.

Each test starts an ``HTTPServer`` on port 0 with a small handler. Timeouts are made
small (0.2 s) where a server-side timer must fire; nothing synchronises with sleeps:
tests wait for bytes on the socket, or for futures the handler resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import h11
import pytest

from tusd_py.http.body import RequestBody
from tusd_py.http.protocol import BODY_READ_SIZE, READ_SIZE, HTTPProtocol
from tusd_py.http.response import _plainly_valid
from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.http.types import BodyTimeout, ClientDisconnected, Request, Response

Handler = Callable[[Request], Awaitable[Response]]
WAIT = 5.0  # seconds: a generous bound so a broken server fails the test instead of hanging it

MiB = 1024 * 1024
KiB = 1024


# -- helpers ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(handler: Handler, **limits: Any) -> AsyncIterator[tuple[HTTPServer, int]]:
    server = HTTPServer(handler, HTTPLimits(**limits))
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.stop(1.0)


class Client:
    """A raw-bytes client on a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self) -> tuple[bytes, dict[str, str]]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        status, *lines = head[:-4].split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.decode().lower()] = value.strip().decode()
        return status, headers

    async def read_response(self, *, head_request: bool = False) -> tuple[bytes, dict[str, str], bytes]:
        status, headers = await self.read_head()
        if head_request or status.split(b" ")[1] in (b"204", b"304") or status.startswith(b"HTTP/1.1 1"):
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(await asyncio.wait_for(self.reader.readuntil(b"\r\n"), WAIT), 16)
                chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), WAIT)
                if size == 0:
                    return status, headers, body
                body += chunk[:-2]
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])), WAIT)
        return status, headers, body

    async def read_raw(self, size: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), WAIT)

    async def at_eof(self) -> bool:
        """True once the server closed the connection (EOF or reset)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), WAIT)
        except ConnectionResetError:
            return True
        return rest == b""

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(reader, writer)
    try:
        yield client
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def normalized(raw: bytes) -> bytes:
    """Response bytes with the varying Date value replaced."""
    return re.sub(rb"date: [^\r]+\r\n", b"date: DATE\r\n", raw)


async def read_body(request: Request) -> bytes:
    return b"".join([chunk async for chunk in request.body])


async def echo_length(request: Request) -> Response:
    """Reads the whole body; answers with its length and the request line."""
    body = await read_body(request)
    text = f"{request.method} {request.target} {len(body)}"
    return Response(200, [("content-type", "text/plain")], text.encode())


# -- basics -------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_get_exact_response_bytes() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [("content-type", "text/plain")], b"hello")

    async with running(handler) as (_, port), connect(port) as client:
        request = b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc-1\r\n\r\n"
        await client.send(request)
        expected = (
            b"HTTP/1.1 200 OK\r\nserver: tusd-py\r\ndate: DATE\r\ncontent-type: text/plain\r\n"
            b"x-request-id: abc-1\r\ncontent-length: 5\r\n\r\nhello"
        )
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), WAIT)
        assert normalized(head + await client.read_raw(5)) == expected


@pytest.mark.both_loops
async def test_head_has_no_body_but_keeps_content_length() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [("content-length", "1000"), ("upload-offset", "7")], b"")

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"HEAD /files/a HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await client.read_response(head_request=True)
        assert status == b"HTTP/1.1 200 OK"
        assert headers["content-length"] == "1000"
        assert headers["upload-offset"] == "7"
        # No body bytes follow: the next thing on the wire is the next response.
        status, _ = await client.read_head()
        assert status == b"HTTP/1.1 200 OK"


@pytest.mark.both_loops
async def test_patch_body_is_streamed_to_the_handler() -> None:
    async with running(echo_length) as (_, port), connect(port) as client:
        body = bytes(range(256)) * 1000
        await client.send(b"PATCH /files/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 256000\r\n\r\n" + body)
        status, headers, text = await client.read_response()
        assert status == b"HTTP/1.1 200 OK"
        assert text == b"PATCH /files/abc 256000"
        assert headers["server"] == "tusd-py"
        assert "date" in headers


@pytest.mark.both_loops
async def test_body_bytes_arrive_intact() -> None:
    seen: list[bytes] = []

    async def handler(request: Request) -> Response:
        seen.append(await read_body(request))
        assert request.body.received == len(seen[0]) and request.body.length == len(seen[0])
        return Response(204)

    payload = bytes(range(251)) * 4177  # ~1 MiB, not a multiple of the read size
    async with running(handler) as (_, port), connect(port) as client:
        head = b"PATCH /f HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
        await client.send(head + payload)
        status, _, _ = await client.read_response()
        assert status == b"HTTP/1.1 204 No Content"
    assert seen == [payload]


@pytest.mark.both_loops
async def test_large_bodies_on_two_connections_with_pipelined_requests() -> None:
    # Bodies are read BODY_READ_SIZE at a time through one buffer shared by all
    # connections; each handler must still get exactly its own bytes, and a read
    # must never take the pipelined request that follows a body.
    seen: dict[str, bytes] = {}

    async def handler(request: Request) -> Response:
        seen[request.target] = await read_body(request)
        return Response(200, [("content-type", "text/plain")], request.target.encode())

    payloads = [bytes([n]) * 7 + bytes(range(256)) * (3 * BODY_READ_SIZE // 256) for n in (1, 2)]
    async with running(handler) as (_, port), connect(port) as first, connect(port) as second:
        for name, client, payload in (("a", first, payload_a := payloads[0]), ("b", second, payloads[1])):
            client.writer.write(
                b"PATCH /%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (name.encode(), len(payload))
            )
            client.writer.write(payload + b"GET /%s-next HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
        for name, client in (("a", first), ("b", second)):
            assert (await client.read_response())[2] == b"/" + name.encode()
            assert (await client.read_response())[2] == b"/" + name.encode() + b"-next"
    assert seen == {"/a": payload_a, "/b": payloads[1], "/a-next": b"", "/b-next": b""}


@pytest.mark.both_loops
async def test_keep_alive_serves_two_requests() -> None:
    async with running(echo_length) as (server, port), connect(port) as client:
        await client.send(b"PATCH /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert (await client.read_response())[2] == b"PATCH /a 3"
        await client.send(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.read_response())[2] == b"GET /b 0"
        assert server.open_connections == 1


@pytest.mark.both_loops
async def test_pipelined_requests_in_one_write_are_answered_in_order() -> None:
    async with running(echo_length) as (_, port), connect(port) as client:
        await client.send(
            b"PATCH /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd"
            b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"PATCH /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
            b"PATCH /4 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nzz"
        )
        bodies = [(await client.read_response())[2] for _ in range(4)]
        assert bodies == [b"PATCH /1 4", b"GET /2 0", b"PATCH /3 2", b"PATCH /4 2"]


@pytest.mark.both_loops
async def test_chunked_request_body() -> None:
    lengths: list[int | None] = []

    async def handler(request: Request) -> Response:
        lengths.append(request.body.length)
        return await echo_length(request)

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"PATCH /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await client.send(b"6\r\n world\r\n0\r\n\r\n")
        assert (await client.read_response())[2] == b"PATCH /c 11"
    assert lengths == [None]


@pytest.mark.both_loops
async def test_streamed_responses_chunked_or_with_length() -> None:
    async def handler(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            yield b"abc"
            yield b""
            yield b"def"

        headers = [("content-length", "6")] if request.target == "/sized" else []
        return Response(200, headers, parts())

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await client.read_response()
        assert (headers["transfer-encoding"], body) == ("chunked", b"abcdef")
        await client.send(b"GET /sized HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await client.read_response()
        assert (headers["content-length"], body) == ("6", b"abcdef")
        assert "transfer-encoding" not in headers


# -- 100-continue, early responses, informational responses ------------------------


@pytest.mark.both_loops
async def test_100_continue_is_sent_when_the_body_is_first_read() -> None:
    async def handler(request: Request) -> Response:
        # A marker on the wire before the first read: a 100 sent at request arrival
        # would come before it.
        await request.send_informational(103, [("link", "</style.css>; rel=preload")])
        return await echo_length(request)

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"PATCH /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
        assert await client.read_raw(len(interim)) == interim
        await client.send(b"hello")
        status, headers, body = await client.read_response()
        assert (status, body) == (b"HTTP/1.1 200 OK", b"PATCH /e 5")
        assert "connection" not in headers


@pytest.mark.both_loops
async def test_no_100_continue_when_the_handler_answers_early() -> None:
    async def handler(request: Request) -> Response:
        return Response(413, [], b"too big")

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"PATCH /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = await client.read_response()
        assert status == b"HTTP/1.1 413 Request Entity Too Large"
        assert body == b"too big"
        # The client may or may not send the announced body now: never reuse.
        assert headers["connection"] == "close"
        assert await client.at_eof()


@pytest.mark.both_loops
async def test_early_response_drains_a_small_body_and_keeps_the_connection() -> None:
    async def handler(request: Request) -> Response:
        if request.target == "/early":
            return Response(409, [], b"conflict")
        return await echo_length(request)

    async with running(handler, drain_limit=64 * 1024) as (_, port), connect(port) as client:
        await client.send(b"PATCH /early HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n")
        status, headers, _ = await client.read_response()
        assert status == b"HTTP/1.1 409 Conflict"
        assert "connection" not in headers
        await client.send(b"x" * 50000 + b"PATCH /next HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        assert (await client.read_response())[2] == b"PATCH /next 2"


@pytest.mark.both_loops
async def test_early_response_with_a_body_over_the_drain_limit_closes() -> None:
    async def handler(request: Request) -> Response:
        return Response(409, [], b"conflict")

    async with running(handler, drain_limit=1024) as (_, port), connect(port) as client:
        await client.send(b"PATCH /early HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1000)
        status, headers, _ = await client.read_response()
        assert status == b"HTTP/1.1 409 Conflict"
        assert headers["connection"] == "close"
        assert await client.at_eof()


@pytest.mark.both_loops
async def test_chunked_body_over_the_drain_limit_closes() -> None:
    async def handler(request: Request) -> Response:
        return Response(409, [], b"conflict")

    async with running(handler, drain_limit=1024) as (_, port), connect(port) as client:
        await client.send(b"PATCH /early HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, _, _ = await client.read_response()
        assert status == b"HTTP/1.1 409 Conflict"
        with contextlib.suppress(ConnectionError):
            await client.send(b"800\r\n" + b"y" * 0x800 + b"\r\n")
        assert await client.at_eof()


@pytest.mark.both_loops
async def test_informational_104_before_the_final_response() -> None:
    async def handler(request: Request) -> Response:
        await request.send_informational(104, [("upload-draft-interop-version", "6"), ("location", "/files/u")])
        body = await read_body(request)
        return Response(201, [("location", "/files/u")], body)

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"POST /files HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        interim = (
            b"HTTP/1.1 104 Upload Resumption Supported\r\nupload-draft-interop-version: 6\r\nlocation: /files/u\r\n\r\n"
        )
        assert await client.read_raw(len(interim)) == interim
        status, headers, body = await client.read_response()
        assert (status, headers["location"], body) == (b"HTTP/1.1 201 Created", "/files/u", b"hi")


# -- malformed input and timeouts ---------------------------------------------------


@pytest.mark.both_loops
async def test_oversized_header_gets_431() -> None:
    async with running(echo_length) as (_, port), connect(port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
        status, headers, body = await client.read_response()
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert headers["connection"] == "close"
        assert body == b"431 Request Header Fields Too Large\n"
        assert await client.at_eof()


@pytest.mark.both_loops
async def test_garbage_request_line_gets_400_and_the_server_lives_on() -> None:
    async with running(echo_length) as (_, port):
        async with connect(port) as client:
            await client.send(b"THIS IS NOT HTTP\r\n\r\n")
            status, _, body = await client.read_response()
            assert status == b"HTTP/1.1 400 Bad Request"
            assert body == b"400 Bad Request\n"
            assert await client.at_eof()
        async with connect(port) as client:
            await client.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client.read_response())[2] == b"GET /ok 0"


@pytest.mark.both_loops
async def test_bad_chunk_framing_fails_the_body_and_closes() -> None:
    errors: list[BaseException] = []

    async def handler(request: Request) -> Response:
        try:
            await read_body(request)
        except ClientDisconnected as error:
            errors.append(error)
        return Response(400, [], b"bad")

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"PATCH /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnope\r\n")
        status, headers, _ = await client.read_response()
        assert status == b"HTTP/1.1 400 Bad Request"
        assert headers["connection"] == "close"
        assert await client.at_eof()
    assert len(errors) == 1


@pytest.mark.both_loops
async def test_header_timeout_gets_408() -> None:
    async with running(echo_length, header_timeout=0.2) as (_, port), connect(port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        status, headers, _ = await client.read_response()
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert headers["connection"] == "close"
        assert await client.at_eof()


async def test_idle_keep_alive_connection_is_closed() -> None:
    async with running(echo_length, keepalive_timeout=0.2) as (server, port), connect(port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.read_response())[0] == b"HTTP/1.1 200 OK"
        assert await client.at_eof()


async def test_body_timeout_raises_in_the_handler() -> None:
    outcome: list[tuple[bytes, type[BaseException]]] = []

    async def handler(request: Request) -> Response:
        got = b""
        try:
            async for chunk in request.body:
                got += chunk
        except BodyTimeout as error:
            outcome.append((got, type(error)))
            return Response(400, [], b"timeout")
        return Response(204)

    async with running(handler, body_timeout=0.2) as (_, port), connect(port) as client:
        await client.send(b"PATCH /t HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        status, headers, _ = await client.read_response()
        assert status == b"HTTP/1.1 400 Bad Request"
        assert headers["connection"] == "close"
    assert outcome == [(b"abc", BodyTimeout)]


@pytest.mark.both_loops
async def test_client_disconnect_mid_body_raises_in_the_handler() -> None:
    outcome: asyncio.Future[tuple[bytes, BaseException]] = asyncio.get_running_loop().create_future()

    async def handler(request: Request) -> Response:
        got = b""
        try:
            async for chunk in request.body:
                got += chunk
        except Exception as error:
            outcome.set_result((got, error))
        return Response(204)

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"PATCH /d HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        client.close()
        got, error = await asyncio.wait_for(outcome, WAIT)
    assert got == b"0123456789"
    assert isinstance(error, ClientDisconnected)


@pytest.mark.both_loops
async def test_handler_exception_gives_500(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: Request) -> Response:
        if request.target == "/boom":
            raise RuntimeError("kaboom")
        return await echo_length(request)

    caplog.set_level(logging.ERROR, logger="tusd_py.http")
    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = await client.read_response()
        assert (status, body) == (b"HTTP/1.1 500 Internal Server Error", b"500 Internal Server Error\n")
        # The request had no body, so the connection is still usable.
        await client.send(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.read_response())[2] == b"GET /fine 0"
        # With a body in an unknown state, it is not.
        await client.send(b"PATCH /boom HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        status, headers, _ = await client.read_response()
        assert status == b"HTTP/1.1 500 Internal Server Error"
        assert headers["connection"] == "close"
        assert await client.at_eof()
    failures = [record for record in caplog.records if record.getMessage() == "request handler failed"]
    assert len(failures) == 2 and failures[0].exc_info is not None


# -- flow control and cancellation --------------------------------------------------


@pytest.mark.both_loops
async def test_backpressure_keeps_the_body_buffer_near_the_high_mark() -> None:
    loop = asyncio.get_running_loop()
    paused = loop.create_future()
    reading = False
    buffered_at_pause: list[int] = []
    total = 8 * MiB

    def observe(connection: HTTPProtocol, is_paused: bool) -> None:
        if is_paused and reading:
            buffered_at_pause.append(connection.buffered_body_bytes)
            if not paused.done():
                paused.set_result(None)

    async def handler(request: Request) -> Response:
        nonlocal reading
        chunks = aiter(request.body)
        reading = True
        first = await anext(chunks)  # the body is read from here on
        await paused  # read nothing more until the server had to stop reading
        rest = b"".join([chunk async for chunk in chunks])
        return Response(200, [], b"PATCH /bp %d" % (len(first) + len(rest)))

    async with running(handler) as (server, port), connect(port) as client:
        server.flow_observer = observe
        limits = server.limits
        client.writer.write(b"PATCH /bp HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
        client.writer.write(b"z" * total)
        status, _, body = await client.read_response()
        assert body == b"PATCH /bp %d" % total
    assert buffered_at_pause, "reading was never paused"
    # Reading pauses after the read that crossed the mark: at most one body read more.
    assert max(buffered_at_pause) <= limits.body_high_water + BODY_READ_SIZE
    assert buffered_at_pause[0] > limits.body_high_water


def test_an_unread_body_holds_at_most_a_quarter_mib_more_than_one_read() -> None:
    # What each upload waiting for its store holds (see the test above for where
    # reading pauses): 16 uploads to the S3 store held 2 MiB each with a 1 MiB mark.
    assert HTTPLimits().body_high_water + BODY_READ_SIZE <= BODY_READ_SIZE + 256 * KiB


@pytest.mark.both_loops
async def test_a_framed_body_is_not_read_before_the_application_asks() -> None:
    """Body bytes stay in the kernel until the application first reads: a store that
    splices gets them all from the socket, and nothing is buffered for a request that
    waits (e.g. for a lock) before it reads."""
    loop = asyncio.get_running_loop()
    waiting = loop.create_future()
    go = loop.create_future()
    buffered_while_waiting: list[int] = []
    connections: list[HTTPProtocol] = []

    def observe(connection: HTTPProtocol, is_paused: bool) -> None:
        connections.append(connection)

    async def handler(request: Request) -> Response:
        if request.target == "/x":
            return Response(200, [], b"ok")
        waiting.set_result(None)
        await go
        return await echo_length(request)

    async with running(handler) as (server, port), connect(port) as client:
        server.flow_observer = observe
        total = 4 * MiB
        client.writer.write(b"PATCH /lazy HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
        await waiting
        client.writer.write(b"q" * total)
        # A round trip on a second connection: the server's loop has seen the first
        # connection's bytes become readable by the time it answers.
        async with connect(port) as other:
            other.writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            await other.read_response()
        assert connections and connections[0].reading_paused
        buffered_while_waiting.append(connections[0].buffered_body_bytes)
        go.set_result(None)
        _, _, body = await client.read_response()
        assert body == b"PATCH /lazy %d" % total
    assert buffered_while_waiting == [0]


@pytest.mark.both_loops
async def test_slow_reader_suspends_a_streamed_response() -> None:
    loop = asyncio.get_running_loop()
    paused = loop.create_future()
    produced = [0]
    chunk = b"r" * READ_SIZE
    total = 256 * MiB

    async def handler(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            while produced[0] < total:
                produced[0] += len(chunk)
                yield chunk

        return Response(200, [("content-length", str(total))], parts())

    original = HTTPProtocol.pause_writing

    def pause_writing(self: HTTPProtocol) -> None:
        original(self)
        if not paused.done():
            paused.set_result(produced[0])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HTTPProtocol, "pause_writing", pause_writing)
        async with running(handler) as (_, port), connect(port) as client:
            await client.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            at_pause = await asyncio.wait_for(paused, WAIT)
            for _ in range(20):  # let a misbehaving writer run on
                await asyncio.sleep(0)
            assert produced[0] - at_pause <= len(chunk)
            assert produced[0] < 64 * MiB  # socket buffers plus one chunk, not the response


@pytest.mark.both_loops
async def test_cancelled_read_loses_no_byte() -> None:
    loop = asyncio.get_running_loop()
    cancelled = loop.create_future()

    async def handler(request: Request) -> Response:
        chunks = request.body.__aiter__()
        first = await chunks.__anext__()
        # Nothing more is on its way, so this read is pending when it is cancelled.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await chunks.__anext__()
        cancelled.set_result(None)
        rest = b"".join([chunk async for chunk in chunks])
        return Response(200, [], first + rest)

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"PATCH /c HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabcd")
        await asyncio.wait_for(cancelled, WAIT)
        await client.send(b"efghij")
        assert (await client.read_response())[2] == b"abcdefghij"


async def test_cancel_racing_with_arriving_data_loses_no_byte() -> None:
    class Flow:
        def body_first_read(self) -> None: ...
        def body_consumed(self, buffered: int) -> None: ...
        def body_timed_out(self) -> None: ...

    body = RequestBody(Flow(), asyncio.get_running_loop(), 2, timeout=5.0)
    read = asyncio.ensure_future(body.__anext__())
    await asyncio.sleep(0)  # one loop turn: the read is now waiting
    body.feed(b"a")  # wakes the read ...
    read.cancel()  # ... which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await read
    assert await body.__anext__() == b"a"
    body.feed(b"b")
    body.finish()
    assert [chunk async for chunk in body] == [b"b"]
    assert body.received == 2


# -- request ids and access log -----------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_request_id_and_access_log_line() -> None:
    ids: list[str] = []

    async def handler(request: Request) -> Response:
        ids.append(request.request_id)
        await read_body(request)
        return Response(204)

    records = _Records()
    access = logging.getLogger("tusd_py.access")
    access.addHandler(records)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        async with running(handler) as (_, port), connect(port) as client:
            await client.send(b"PATCH /files/abc?token=s HTTP/1.1\r\nHost: x\r\nX-Request-ID: a b/c<>\r\n")
            await client.send(b"Content-Length: 3\r\n\r\nxyz")
            _, headers, _ = await client.read_response()
            assert headers["x-request-id"] == "abc"
            await client.send(b"GET /x HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + b"!" * 10 + b"\r\n\r\n")
            _, headers, _ = await client.read_response()
            assert re.fullmatch(r"[0-9a-f]{16}", headers["x-request-id"])
    finally:
        access.removeHandler(records)
        access.setLevel(level)
    assert ids[0] == "abc" and ids[1] == headers["x-request-id"]
    record = records.records[0]
    assert record.getMessage() == "PATCH /files/abc 204"
    fields = {key: getattr(record, key) for key in ("method", "path", "status", "bytes_in", "request_id")}
    assert fields == {"method": "PATCH", "path": "/files/abc", "status": 204, "bytes_in": 3, "request_id": "abc"}
    assert record.client.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    assert record.duration_ms >= 0 and record.bytes_out == 0  # type: ignore[attr-defined]


# -- connection limits and shutdown -------------------------------------------------


@pytest.mark.both_loops
async def test_connections_beyond_the_maximum_are_closed_at_accept() -> None:
    async with running(echo_length, max_connections=1) as (server, port), connect(port) as first:
        await first.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await first.read_response())[2] == b"GET /1 0"
        async with connect(port) as second:
            assert await second.at_eof()
        await first.send(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await first.read_response())[2] == b"GET /2 0"
        assert server.open_connections == 1


@pytest.mark.both_loops
async def test_stop_waits_for_in_flight_requests_and_closes_idle_ones() -> None:
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.target == "/slow":
            started.set_result(None)
            await release.wait()
        return await echo_length(request)

    async with running(handler) as (server, port), connect(port) as idle, connect(port) as busy:
        await idle.send(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await idle.read_response())[0] == b"HTTP/1.1 200 OK"
        await busy.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(started, WAIT)
        stopping = asyncio.ensure_future(server.stop(WAIT))
        assert await idle.at_eof()
        assert not stopping.done()
        release.set()
        status, headers, body = await busy.read_response()
        assert (status, body, headers["connection"]) == (b"HTTP/1.1 200 OK", b"GET /slow 0", "close")
        assert await busy.at_eof()
        await asyncio.wait_for(stopping, WAIT)
        assert server.open_connections == 0
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_stop_aborts_requests_still_running_after_the_timeout() -> None:
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    cancelled = loop.create_future()

    async def handler(request: Request) -> Response:
        started.set_result(None)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set_result(None)
            raise
        return Response(200)

    async with running(handler) as (server, port), connect(port) as busy:
        await busy.send(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(started, WAIT)
        await asyncio.wait_for(server.stop(0.2), WAIT)
        assert cancelled.done()
        assert await busy.at_eof()
        assert server.open_connections == 0


# -- response heads -------------------------------------------------------------------


def test_heads_passed_as_checked_are_ones_h11_accepts() -> None:
    """``_plainly_valid`` lets a head skip h11's checks: every head it passes must be
    one h11 would accept, with the same bytes on the wire."""
    rng = random.Random(7)
    plain = [b"a", b"Z", b"0", b"-", b"=", b",", b"\xe9", b" ", b"\t"]
    hostile = [b"\r", b"\n", b"\x00", b"\x01", b"\x7f", b":", b"(", b"\x0b"]

    def text(most: int) -> bytes:
        return b"".join(rng.choice(hostile if rng.random() < 0.1 else plain) for _ in range(rng.randint(0, most)))

    passed = 0
    for _ in range(5000):
        headers = [(text(4), text(6)) for _ in range(rng.randint(1, 3))]
        if not _plainly_valid(headers):
            continue
        passed += 1
        checked = h11.Response(status_code=200, headers=headers, reason=b"OK")
        trusted = h11.Response(status_code=200, headers=headers, reason=b"OK", http_version=b"1.1", _parsed=True)
        assert checked == trusted, headers
    assert passed > 100


@pytest.mark.parametrize("value", ["a\r\nset-cookie: x=1", "a\nb", "a\rb", " padded", "nul\x00"])
async def test_a_header_value_that_would_split_the_head_gets_500(value: str) -> None:
    async def handler(request: Request) -> Response:
        return Response(200, [("x-echo", value)], b"hello")

    async with running(handler) as (_, port), connect(port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await client.read_response()
        assert status.startswith(b"HTTP/1.1 500") and "x-echo" not in headers and "set-cookie" not in headers
