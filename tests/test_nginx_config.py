"""The shipped nginx site config, run in Debian's nginx in front of a tiny asyncio
upstream: it must stream request bodies (the upstream sees bytes while the client is
still sending), stream responses, keep upstream connections alive, and forward the
headers tusd-py relies on with ``behind_proxy = true``.

nginx (Debian package ``nginx``) is required in CI (CI=true): there a missing binary
fails the tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import nginx_support
import pytest
from nginx_support import RunningNginx, check_config, run_nginx, write_config

MiB = 1024 * 1024
CHUNK = 64 * 1024
# Stages of the streamed PATCH: the first part is sent, then the rest only once the
# upstream has seen body bytes. A buffering proxy never forwards before the end, so the
# wait would time out.
FIRST_PART = 1 * MiB
TOTAL = 5 * MiB
STAGE_TIMEOUT = 10.0

pytestmark = pytest.mark.usefixtures("nginx_installed")


@dataclass
class SeenRequest:
    method: str
    target: str
    http_version: str
    headers: dict[str, str]
    connection: int
    body_length: int = 0
    body_sha256: str = ""


@dataclass
class Upstream:
    """An HTTP/1.1 server (h11) standing in for tusd-py. PATCH: consume the body,
    answer 204 with ``Upload-Offset``. GET: send a first part, wait until the test says
    the client got it, then the rest."""

    first_body_bytes: asyncio.Event = field(default_factory=asyncio.Event)
    client_finished: asyncio.Event = field(default_factory=asyncio.Event)
    client_got_first_part: asyncio.Event = field(default_factory=asyncio.Event)
    bytes_before_client_finished: int = 0
    requests: list[SeenRequest] = field(default_factory=list)
    connections: int = 0
    download_first: bytes = b"a" * 1000
    download_rest: bytes = b"b" * (2 * MiB)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self._writers.add(writer)
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next_event(connection, reader)
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request)
                seen = SeenRequest(
                    event.method.decode(),
                    event.target.decode(),
                    event.http_version.decode(),
                    {name.decode(): value.decode() for name, value in event.headers},
                    number,
                )
                self.requests.append(seen)
                digest = hashlib.sha256()
                while True:
                    event = await self._next_event(connection, reader)
                    if isinstance(event, h11.Data):
                        if not self.first_body_bytes.is_set():
                            self.first_body_bytes.set()
                        if not self.client_finished.is_set():
                            self.bytes_before_client_finished += len(event.data)
                        seen.body_length += len(event.data)
                        digest.update(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                seen.body_sha256 = digest.hexdigest()
                if seen.method == "GET":
                    await self._send_download(connection, writer)
                else:
                    headers = [("Upload-Offset", str(seen.body_length)), ("Tus-Resumable", "1.0.0")]
                    writer.write(connection.send(h11.Response(status_code=204, headers=headers)) or b"")
                    writer.write(connection.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                connection.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _send_download(self, connection: h11.Connection, writer: asyncio.StreamWriter) -> None:
        length = len(self.download_first) + len(self.download_rest)
        response = h11.Response(status_code=200, headers=[("Content-Length", str(length))])
        writer.write(connection.send(response) or b"")
        writer.write(connection.send(h11.Data(data=self.download_first)) or b"")
        await writer.drain()
        # A buffering proxy holds the small first part until more arrives: the client
        # would never get it and this wait would time out.
        async with asyncio.timeout(STAGE_TIMEOUT):
            await self.client_got_first_part.wait()
        writer.write(connection.send(h11.Data(data=self.download_rest)) or b"")
        writer.write(connection.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    @staticmethod
    async def _next_event(connection: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = connection.next_event()
            if event is not h11.NEED_DATA:
                return event
            connection.receive_data(await reader.read(CHUNK))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def proxied(upstream: Upstream) -> Iterator[RunningNginx]:
    assert upstream._server is not None
    port = upstream._server.sockets[0].getsockname()[1]
    with run_nginx([f"127.0.0.1:{port}"]) as nginx:
        yield nginx


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one response (Content-Length or chunked) with h11."""
    connection = h11.Connection(h11.CLIENT)
    # h11 must have sent a request before it parses a response.
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    connection.send(h11.EndOfMessage())
    status, headers, body = 0, {}, bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(CHUNK))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {name.decode(): value.decode() for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, bytes(body)
        else:
            raise AssertionError(f"unexpected {event!r}")


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_generated_config_passes_nginx_t(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["127.0.0.1:1080", "127.0.0.1:1081"], 8080)
    result = check_config(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    site = (tmp_path / "site.conf").read_text()
    assert "server 127.0.0.1:1080;" in site and "server 127.0.0.1:1081;" in site
    assert re.findall(r"(?m)^\s*listen\s+(\S+);", site) == ["127.0.0.1:8080"]


def test_site_config_has_the_streaming_settings() -> None:
    site = nginx_support.SITE_CONFIG.read_text()
    directives = {line.strip() for line in site.splitlines() if not line.strip().startswith("#")}
    for directive in (
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "client_max_body_size 0;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $tusd_py_forwarded_proto;",
        "proxy_set_header X-Forwarded-Host $http_host;",
        "proxy_set_header X-Request-ID $tusd_py_request_id;",
    ):
        assert directive in directives, directive
    assert re.search(r"(?m)^\s*keepalive \d+;", site)


async def test_patch_body_streams_through(upstream: Upstream, proxied: RunningNginx) -> None:
    payload = os.urandom(TOTAL)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxied.port)
    try:
        writer.write(
            f"PATCH /files/abc HTTP/1.1\r\nHost: localhost:{proxied.port}\r\nTus-Resumable: 1.0.0\r\n"
            "Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
            "Transfer-Encoding: chunked\r\nX-Request-ID: test-request-1\r\n"
            "X-Forwarded-For: 203.0.113.66\r\n\r\n".encode()
        )
        for start in range(0, FIRST_PART, CHUNK):
            writer.write(chunk(payload[start : start + CHUNK]))
        await writer.drain()
        try:
            async with asyncio.timeout(STAGE_TIMEOUT):
                await upstream.first_body_bytes.wait()
        except TimeoutError:
            pytest.fail("the upstream saw no body byte while the client was sending: nginx buffers the body")
        for start in range(FIRST_PART, TOTAL, CHUNK):
            writer.write(chunk(payload[start : start + CHUNK]))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        upstream.client_finished.set()
        async with asyncio.timeout(STAGE_TIMEOUT):
            status, headers, _ = await read_response(reader)
    finally:
        writer.close()

    assert status == 204
    assert headers["upload-offset"] == str(TOTAL)
    [seen] = upstream.requests
    assert 0 < upstream.bytes_before_client_finished < TOTAL
    assert (seen.method, seen.target, seen.http_version) == ("PATCH", "/files/abc", "1.1")
    assert seen.body_length == TOTAL
    assert seen.body_sha256 == hashlib.sha256(payload).hexdigest()
    # Streamed to the upstream as chunks (no Content-Length known in advance).
    assert seen.headers.get("transfer-encoding") == "chunked"
    assert seen.headers["host"] == "localhost"
    assert seen.headers["x-forwarded-host"] == f"localhost:{proxied.port}"
    assert seen.headers["x-forwarded-proto"] == "http"
    assert seen.headers["x-forwarded-for"] == "203.0.113.66, 127.0.0.1"
    assert seen.headers["x-request-id"] == "test-request-1"
    assert seen.headers["tus-resumable"] == "1.0.0"
    assert seen.headers["upload-offset"] == "0"
    # Keep-alive to the upstream: nginx's "Connection: close" is replaced by nothing.
    assert "connection" not in seen.headers


async def test_download_streams_and_upstream_connection_is_reused(
    upstream: Upstream, proxied: RunningNginx
) -> None:
    for attempt in range(2):
        upstream.client_got_first_part.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxied.port)
        try:
            writer.write(f"GET /files/abc HTTP/1.1\r\nHost: 127.0.0.1:{proxied.port}\r\n\r\n".encode())
            await writer.drain()
            received = bytearray()
            async with asyncio.timeout(STAGE_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                while len(received) < len(upstream.download_first):
                    data = await reader.read(CHUNK)
                    assert data, "nginx closed the connection early"
                    received += data
                upstream.client_got_first_part.set()
                expected = len(upstream.download_first) + len(upstream.download_rest)
                while len(received) < expected:
                    data = await reader.read(CHUNK)
                    assert data, "nginx closed the connection early"
                    received += data
        finally:
            writer.close()
        assert bytes(received) == upstream.download_first + upstream.download_rest, attempt

    assert [request.method for request in upstream.requests] == ["GET", "GET"]
    # Without a client X-Request-ID, nginx generates one (32 hex digits).
    assert all(re.fullmatch(r"[0-9a-f]{32}", request.headers["x-request-id"]) for request in upstream.requests)
    assert upstream.requests[0].headers["x-forwarded-for"] == "127.0.0.1"
    assert upstream.requests[0].headers["x-forwarded-host"] == f"127.0.0.1:{proxied.port}"
    # Both requests went over one kept-alive upstream connection.
    assert upstream.connections == 1
