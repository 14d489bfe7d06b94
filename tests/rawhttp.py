"""A minimal raw-socket HTTP/1.1 client for tests: exact bytes in, parsed response out.

Used where a real client would hide what is being tested: interrupted bodies, stalled
sockets, malformed requests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class RawConnection:
    """One TCP connection; send bytes, read responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"", host: str = "localhost"
    ) -> None:
        all_headers = {"Host": host, "Tus-Resumable": "1.0.0"}
        all_headers.update(headers or {})
        if body and "Content-Length" not in all_headers and "Transfer-Encoding" not in all_headers:
            all_headers["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items()) + "\r\n"
        await self.send(head.encode("latin-1") + body)

    async def read_response(self, method: str = "GET", timeout: float = 30.0) -> RawResponse:
        return await asyncio.wait_for(self._read_response(method), timeout)

    async def _read_response(self, method: str) -> RawResponse:
        while True:
            status_line = await self.reader.readuntil(b"\r\n")
            version, status, *reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            assert version.startswith("HTTP/1."), status_line
            headers: dict[str, str] = {}
            while True:
                line = await self.reader.readuntil(b"\r\n")
                if line == b"\r\n":
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            code = int(status)
            if 100 <= code < 200:
                continue  # informational: the caller reads those with read_informational
            break
        body = b""
        if method != "HEAD" and code not in (204, 304):
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await self._read_chunked()
        return RawResponse(code, reason[0] if reason else "", headers, body)

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def read_informational(self, timeout: float = 10.0) -> RawResponse:
        """Read one informational (1xx) response head."""
        status_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
        _, status, *reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return RawResponse(int(status), reason[0] if reason else "", headers)

    async def is_closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True when the server closed the connection (EOF) within ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (ConnectionResetError, BrokenPipeError):
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass

    def abort(self) -> None:
        """Close abruptly (RST), as a crashed client would."""
        transport = self.writer.transport
        transport.abort()


async def request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> RawResponse:
    """One request on a fresh connection."""
    connection = await RawConnection.open(port)
    try:
        await connection.send_request(method, path, headers, body)
        return await connection.read_response(method)
    finally:
        await connection.close()
