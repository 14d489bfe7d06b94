"""Writing responses onto a connection: h11 framing, headers every response
carries, and waiting while the transport's buffer is full (a slow reader cannot make
the server buffer a whole response)."""

from __future__ import annotations

import asyncio
import http
import logging
import re
import time
from collections.abc import AsyncIterable, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Final, cast

import h11

from tusd_py.http.types import Response

if TYPE_CHECKING:
    from tusd_py.http.cycle import RequestCycle

__all__ = ["ConnectionGone", "ResponseWriter", "close_body", "text_response"]

log = logging.getLogger("tusd_py.http")

_SERVER_HEADER: Final = (b"server", b"tusd-py")

_NOT_TOKEN: Final = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z\n]")
_NOT_PLAIN_VALUE: Final = re.compile(rb"[^\t\n\x20-\x7e\x80-\xff]|(?:^|\n)[ \t]|[ \t](?:\n|$)")


def _plainly_valid(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether every header passes h11's checks, tested with one search over all names
    and one over all values (h11 runs two regular expressions per header) and a little
    stricter: non-empty token names; values of visible ASCII, obs-text and inner spaces
    or tabs (no other control byte, no newline, no space or tab at either end). A head
    that passes goes to h11 as already checked; any other goes through h11's checks."""
    names = b"\n".join(name for name, _ in headers)
    values = b"\n".join(value for _, value in headers)
    joints = len(headers) - 1
    return (
        names.count(b"\n") == joints and values.count(b"\n") == joints
        and all(name for name, _ in headers)
        and _NOT_TOKEN.search(names) is None and _NOT_PLAIN_VALUE.search(values) is None
    )

_REASONS: Final[dict[int, bytes]] = {status.value: status.phrase.encode("ascii") for status in http.HTTPStatus}
# Not in http.HTTPStatus: the interim response the IETF resumable-upload draft
# registers as an HTTP status code.
_REASONS[104] = b"Upload Resumption Supported"

_NO_BODY_STATUSES: Final = frozenset({204, 304})


_FRAMING_HEADERS: Final = frozenset({"transfer-encoding", "connection"})
_PLAIN_REASON: Final = re.compile(rb"[\x20-\x7e]*")


class _Plain:
    """``_head``'s answer for a response written without h11."""


_PLAIN: Final = _Plain()


def _plain_allowed(cycle: RequestCycle, response: Response) -> bool:
    """Whether ``response`` may be written without h11: the common answer to a
    request whose body the connection framed (PATCH, POST with a body) or whose head
    h11 never saw (``head.py``). Its h11 connection is replaced after the response or
    never learnt of the request, so h11 need not follow it; h11 would write the same
    bytes: an HTTP/1.1 client that keeps the connection open (no ``Connection:
    close``), a final response with a bytes body (Content-Length added here, none
    from the application, no Transfer-Encoding or Connection; no body for HEAD) and
    the connection staying open. Anything else goes through h11."""
    if not cycle.framed_here or cycle.close_after:
        return False
    if not isinstance(response.body, bytes) or not 200 <= response.status <= 999:
        return False
    request = cycle.request
    if request.http_version != "1.1":
        return False
    connection = request.headers.get_all("connection")
    return not connection or all(
        token.strip().lower() != "close" for value in connection for token in value.split(",")
    )


class ConnectionGone(Exception):
    """The transport closed while a response was being written."""


class _HttpDate:
    """The Date header value, formatted at most once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value


_http_date = _HttpDate()


class ResponseWriter:
    """Writes one connection's responses to its transport (the h11 connection that
    frames them is passed per call: the connection replaces it between requests)."""

    __slots__ = ("_loop", "_transport", "_count_sent", "_paused", "_closed", "_writable", "_plain_head")

    def __init__(self, loop: asyncio.AbstractEventLoop, count_sent: Callable[[int], None] | None) -> None:
        """``count_sent(n)`` (optional) is told about every response body chunk."""
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._count_sent = count_sent
        self._paused = False
        self._closed = False
        self._writable: asyncio.Future[None] | None = None
        self._plain_head = b""
        """The head ``_head`` serialized for ``_send_plain``."""

    def attach(self, transport: asyncio.Transport) -> None:
        """Write to ``transport`` from now on."""
        self._transport = transport

    def pause(self) -> None:
        """The transport's buffer is full (``pause_writing``)."""
        self._paused = True

    def resume(self) -> None:
        """The transport wants more data (``resume_writing``)."""
        self._paused = False
        self._wake()

    def lost(self) -> None:
        """The transport is closed: a waiting write ends with ``ConnectionGone``."""
        self._closed = True
        self._wake()

    def write(self, data: bytes) -> None:
        """Write ``data`` unless the transport is gone."""
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    def write_informational(self, conn: h11.Connection, status: int, headers: list[tuple[str, str]]) -> None:
        """Write a 1xx response (without waiting for the transport)."""
        event = h11.InformationalResponse(
            status_code=status, headers=_encode_headers(headers), reason=_REASONS.get(status, b"")
        )
        self.write(conn.send(event))

    async def drain(self) -> None:
        """Wait while the transport's buffer is full; raises ``ConnectionGone`` when
        the transport closed meanwhile."""
        if not self._paused:
            return
        while self._paused and not self._closed:
            writable: asyncio.Future[None] = self._loop.create_future()
            self._writable = writable
            try:
                await writable
            finally:
                self._writable = None
        if self._closed:
            raise ConnectionGone

    async def send_response(self, cycle: RequestCycle, response: Response) -> None:
        """Write ``response`` to ``cycle``'s request, body included (none for HEAD,
        204 and 304). An invalid status or header from the application becomes a
        500 (nothing of it is written). Raises ``ConnectionGone``."""
        try:
            head = self._head(cycle, response)
        except (h11.LocalProtocolError, ValueError) as error:
            # Nothing is written yet (building the event validates it): answer 500.
            log.error("invalid response from the handler: %s", error, extra={"request_id": cycle.request.request_id})
            await close_body(response.body)
            response = text_response(500)
            head = self._head(cycle, response)
        if self._closed:
            # Nothing goes out: the exchange keeps status 0 in the log and metrics.
            await close_body(response.body)
            raise ConnectionGone
        cycle.response_started = True
        cycle.status = response.status
        if head is _PLAIN:
            self._send_plain(cycle, response)
            await self.drain()
            return
        assert isinstance(head, h11.Response)
        conn = cycle.h11_connection()
        self.write(conn.send(head))
        body = response.body
        with_body = cycle.method != "HEAD" and response.status not in _NO_BODY_STATUSES
        if isinstance(body, bytes):
            if body and with_body:
                self._send_data(conn, cycle, body)
        elif not with_body:
            await close_body(body)
        else:
            await self._stream(conn, cycle, body)
        self.write(conn.send(h11.EndOfMessage()))
        cycle.keep_alive = conn.our_state is h11.DONE
        await self.drain()

    def reject(self, conn: h11.Connection, status: int, request_id: str) -> int:
        """Answer a request that never became one (malformed, too large, too slow)
        with a short text response; the body bytes written (0 when h11 refused)."""
        body = cast(bytes, text_response(status).body)
        headers = [
            _SERVER_HEADER,
            (b"date", _http_date()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode("ascii")),
        ]
        try:
            # h11 lets a server answer from IDLE (and after a RemoteProtocolError).
            data = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return 0
        self.write(data)
        return len(body)

    def _head(self, cycle: RequestCycle, response: Response) -> h11.Response | _Plain:
        """The h11 response head, or ``_PLAIN`` when the response may be written
        without h11 (``_plain_allowed``; the head is then kept serialized for
        ``_send_plain``); raises on an invalid status or header."""
        status = response.status
        headers = [_SERVER_HEADER, (b"date", _http_date())]
        has_length = has_request_id = framing = False
        for name, value in response.headers:
            lower = name.lower()
            if lower == "content-length":
                has_length = True
            elif lower == "x-request-id":
                has_request_id = True
            elif lower in _FRAMING_HEADERS:
                framing = True
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        if not has_request_id:
            headers.append((b"x-request-id", cycle.request.request_id.encode("ascii")))
        body = response.body
        if not has_length and isinstance(body, bytes) and status not in _NO_BODY_STATUSES:
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        if cycle.close_after:
            headers.append((b"connection", b"close"))
        reason = response.reason.encode("ascii") if response.reason else _REASONS.get(status, b"")
        if not _plainly_valid(headers):
            return h11.Response(status_code=status, headers=headers, reason=reason)  # h11 says what is wrong
        if not (has_length or framing) and _plain_allowed(cycle, response) and _PLAIN_REASON.fullmatch(reason):
            self._plain_head = b"HTTP/1.1 %d %s\r\n%s\r\n" % (
                status, reason, b"".join([b"%s: %s\r\n" % header for header in headers])
            )
            return _PLAIN
        return h11.Response(status_code=status, headers=headers, reason=reason, http_version=b"1.1", _parsed=True)

    def _send_plain(self, cycle: RequestCycle, response: Response) -> None:
        """Write a response ``_head`` found plain, in one write with its body."""
        head, self._plain_head = self._plain_head, b""
        body = response.body
        assert isinstance(body, bytes)
        if response.status in _NO_BODY_STATUSES or not body or cycle.method == "HEAD":
            self.write(head)
        else:
            self.write(head + body)
            cycle.bytes_out += len(body)
            if self._count_sent is not None:
                self._count_sent(len(body))
        cycle.keep_alive = True

    def _send_data(self, conn: h11.Connection, cycle: RequestCycle, data: bytes) -> None:
        # The passthrough variant writes the application's bytes object itself
        # (h11's plain send() would join it with the framing into a copy).
        pieces = conn.send_with_data_passthrough(h11.Data(data=data))
        if pieces is not None and not self._closed and self._transport is not None:
            for piece in pieces:
                self._transport.write(piece)
        cycle.bytes_out += len(data)
        if self._count_sent is not None:
            self._count_sent(len(data))

    async def _stream(self, conn: h11.Connection, cycle: RequestCycle, body: AsyncIterable[bytes]) -> None:
        try:
            async for chunk in body:
                if self._closed:
                    raise ConnectionGone
                if chunk:
                    self._send_data(conn, cycle, chunk)
                    await self.drain()
        finally:
            await close_body(body)

    def _wake(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def text_response(status: int) -> Response:
    """A short plain-text response saying ``status`` and its phrase."""
    reason = _REASONS.get(status, b"Error").decode("ascii")
    return Response(
        status,
        [("content-type", "text/plain; charset=utf-8")],
        f"{status} {reason}\n".encode("ascii"),
    )


async def close_body(body: bytes | AsyncIterable[bytes]) -> None:
    """Close an async generator body that will not be (fully) iterated."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
