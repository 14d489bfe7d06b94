"""A minimal raw-socket HTTP/1.1 client for tus load generation.

Why not aiohttp or requests: the client shares two cores with the server under test,
so it must cost as little CPU per byte as possible and add no buffering of its own.
Request bodies are sent with ``loop.sock_sendall`` straight from one preallocated
buffer (``memoryview`` slices, no copies in Python), and responses are read into a
preallocated buffer. Only what the tus benchmarks need is implemented: keep-alive,
``Content-Length`` and chunked response bodies, and skipping 1xx responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

TUS_VERSION = "1.0.0"

# Largest response head we accept; tus responses are a few hundred bytes.
_MAX_HEAD_BYTES = 64 * 1024
# A paced body goes out in this many pieces a second: smooth enough to look like a slow
# link to the server, few enough that pacing 100 uploads costs the client little.
_PACED_PIECES_PER_SECOND = 10


class HTTPError(RuntimeError):
    """The server answered something the benchmark did not expect, or hung up."""


@dataclass
class Response:
    """One HTTP response: status, headers (names lower-cased) and body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str:
        """The value of a header the benchmark needs; raises ``HTTPError`` when missing."""
        try:
            return self.headers[name.lower()]
        except KeyError:
            raise HTTPError(f"response {self.status} has no {name} header: {self.headers}") from None


class RawConnection:
    """One keep-alive HTTP/1.1 connection; requests are sent one after the other.

    If the server closes the connection between requests, the next request opens a new
    one; ``reconnects`` counts those (it stays 0 against a keep-alive server).
    """

    def __init__(self, host: str, port: int, *, timeout: float = 600.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connections_opened = 0
        self._sock: socket.socket | None = None
        self._recv_buffer = bytearray(_MAX_HEAD_BYTES)
        self._pending = bytearray()  # received bytes not yet consumed by a response
        self._host_header = f"{host}:{port}"

    async def connect(self) -> None:
        """Open the TCP connection (done lazily by ``request`` too)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        # Headers and a body are separate sends; without NODELAY a small header segment
        # could wait for the delayed ACK of the previous one.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._pending.clear()
        self.connections_opened += 1

    @property
    def reconnects(self) -> int:
        """Connections opened after the first one (the server closed a connection)."""
        return max(0, self.connections_opened - 1)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> RawConnection:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: memoryview | None = None,
        body_length: int = 0,
        bytes_per_second: float | None = None,
    ) -> Response:
        """Send one request and return its final (non-1xx) response.

        The body is ``body_length`` bytes taken from ``body`` over and over: the buffer is
        sent whole as many times as fits and then a prefix of it. So a 1 GiB body needs
        only a buffer of, say, 16 MiB, and the bytes sent never pass through Python code.
        With ``bytes_per_second`` the body is sent at that rate (a slow client on a
        mobile link), in ten pieces a second.
        """
        if self._sock is None:
            await self.connect()
        async with asyncio.timeout(self.timeout):
            return await self._exchange(method, target, headers or {}, body, body_length, bytes_per_second)

    async def _exchange(
        self, method: str, target: str, headers: dict[str, str], body: memoryview | None, body_length: int,
        bytes_per_second: float | None = None,
    ) -> Response:
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body_length or method in {"POST", "PATCH", "PUT"}:
            lines.append(f"Content-Length: {body_length}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        # Read the response while the body is being sent: a server that rejects the
        # request answers early (and may close), and we want its answer, not EPIPE.
        reader = asyncio.ensure_future(self._read_response(method))
        sender = asyncio.ensure_future(self._send(loop, sock, head, body, body_length, bytes_per_second))
        reusable = False
        try:
            done, _ = await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done and sender.exception() is None:
                response = await reader
                reusable = response.headers.get("connection", "").lower() != "close"
                return response
            if sender in done:
                # Sending failed; the server may have said why before it hung up.
                answer: Response | None = None
                with contextlib.suppress(TimeoutError, HTTPError, OSError):
                    answer = await asyncio.wait_for(reader, 1.0)
                raise HTTPError(f"{method} {target}: sending failed ({sender.exception()!r}); "
                                f"response: {answer.status if answer else None}")
            early = reader.result()  # raises when reading failed
            raise HTTPError(f"{method} {target}: early response {early.status} before the body was sent: "
                            f"{early.body[:200]!r}")
        finally:
            for task in (reader, sender):
                if not task.done():
                    task.cancel()
            # Let cancelled socket operations unregister from the selector before the
            # socket is closed: a registration left behind would be inherited by the
            # next socket that gets the same descriptor number.
            await asyncio.wait({reader, sender})
            if not reusable:
                self.close()

    @staticmethod
    async def _send(
        loop: asyncio.AbstractEventLoop, sock: socket.socket, head: bytes, body: memoryview | None, body_length: int,
        bytes_per_second: float | None = None,
    ) -> None:
        await loop.sock_sendall(sock, head)
        if not body_length:
            return
        assert body is not None and len(body) > 0, "a body needs a buffer"
        piece_size = len(body)
        if bytes_per_second is not None:
            piece_size = max(1, min(piece_size, int(bytes_per_second / _PACED_PIECES_PER_SECOND)))
        start = loop.time()
        sent = 0
        while sent < body_length:
            piece = body[: min(piece_size, body_length - sent)]
            await loop.sock_sendall(sock, piece)
            sent += len(piece)
            if bytes_per_second is not None and sent < body_length:
                # Sleep until the schedule allows the next piece; an absolute schedule
                # keeps the average rate exact even when a sleep runs late.
                await asyncio.sleep(max(0.0, start + sent / bytes_per_second - loop.time()))

    async def _fill(self) -> None:
        """Append at least one received byte to ``_pending``; raise on EOF."""
        sock = self._sock
        if sock is None:
            raise HTTPError("connection closed")
        count = await asyncio.get_running_loop().sock_recv_into(sock, self._recv_buffer)
        if count == 0:
            raise HTTPError("server closed the connection")
        self._pending += memoryview(self._recv_buffer)[:count]

    async def _read_line(self) -> bytes:
        while (end := self._pending.find(b"\r\n")) < 0:
            if len(self._pending) > _MAX_HEAD_BYTES:
                raise HTTPError("response line too long")
            await self._fill()
        line = bytes(self._pending[:end])
        del self._pending[: end + 2]
        return line

    async def _read_exactly(self, count: int) -> bytes:
        while len(self._pending) < count:
            await self._fill()
        data = bytes(self._pending[:count])
        del self._pending[:count]
        return data

    async def _read_response(self, method: str) -> Response:
        while True:
            while (end := self._pending.find(b"\r\n\r\n")) < 0:
                if len(self._pending) > _MAX_HEAD_BYTES:
                    raise HTTPError("response head too large")
                await self._fill()
            head = bytes(self._pending[:end]).decode("latin-1")
            del self._pending[: end + 4]
            status_line, *header_lines = head.split("\r\n")
            # "HTTP/1.1 201 Created", or "HTTP/1.1 201 " with an empty reason (Node).
            parts = status_line.split(maxsplit=2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise HTTPError(f"bad status line {status_line!r}")
            status = int(parts[1])
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:
                continue  # 100 Continue, 104 Upload Resumption Supported: not final
            break
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        elif "content-length" in headers:
            body = await self._read_exactly(int(headers["content-length"]))
        else:
            raise HTTPError(f"response {status} has neither Content-Length nor chunked framing")
        return Response(status, headers, body)

    async def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int((await self._read_line()).split(b";")[0], 16)
            if size == 0:
                while await self._read_line():  # trailers end with an empty line
                    pass
                return b"".join(chunks)
            chunks.append(await self._read_exactly(size))
            await self._read_line()


# --- tus operations ------------------------------------------------------------------------

async def create_upload(connection: RawConnection, base_path: str, length: int) -> str:
    """POST an upload of ``length`` bytes; return the upload's URL path."""
    response = await connection.request(
        "POST", base_path, {"Tus-Resumable": TUS_VERSION, "Upload-Length": str(length)},
    )
    if response.status != 201:
        raise HTTPError(f"POST {base_path}: expected 201, got {response.status}: {response.body[:200]!r}")
    # Location may be absolute (http://host:port/files/id) or a path.
    return urlsplit(response.header("Location")).path


async def patch_upload(
    connection: RawConnection, upload_path: str, offset: int, length: int, buffer: memoryview,
) -> int:
    """PATCH ``length`` bytes at ``offset``; return the server's new ``Upload-Offset``,
    which must be ``offset + length``."""
    response = await connection.request(
        "PATCH", upload_path,
        {
            "Tus-Resumable": TUS_VERSION,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
        },
        body=buffer, body_length=length,
    )
    if response.status != 204:
        raise HTTPError(f"PATCH {upload_path} at {offset}: expected 204, got {response.status}: "
                        f"{response.body[:200]!r}")
    new_offset = int(response.header("Upload-Offset"))
    if new_offset != offset + length:
        raise HTTPError(f"PATCH {upload_path} at {offset}: Upload-Offset {new_offset}, expected {offset + length}")
    return new_offset


async def upload_offset(connection: RawConnection, upload_path: str) -> int:
    """HEAD the upload; return its ``Upload-Offset``."""
    response = await connection.request("HEAD", upload_path, {"Tus-Resumable": TUS_VERSION})
    if response.status != 200:
        raise HTTPError(f"HEAD {upload_path}: expected 200, got {response.status}")
    return int(response.header("Upload-Offset"))
