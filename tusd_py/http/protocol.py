"""One asyncio protocol per connection: HTTP/1.1 over h11 with streamed bodies.

Reading. ``get_buffer`` hands the transport one preallocated 64 KiB buffer, so a
read allocates nothing and h11 is never fed more than 64 KiB at once (larger feeds
cross glibc's mmap threshold and make h11 ~10x slower). h11 parses every request
head and chunked bodies. A body with a Content-Length is framed here instead: once
h11 has parsed the head, the next ``length`` bytes are the body, and handing them to
the application straight from the read buffer saves h11's three copies and its
per-event overhead -- the difference between ~2 GB/s and the wire speed of loopback.
Such a body is read ``BODY_READ_SIZE`` (1 MiB) at a time into a buffer shared by the
thread's connections, never past its last byte, so what follows it still goes to
h11 in 64 KiB reads. After such a request a fresh h11 connection parses what follows.

Flow control. Unread body bytes pause the transport above ``body_high_water`` and
resume it below ``body_low_water``; pipelined bytes that arrive while a request is
in flight pause it until the response is out (requests are handled one at a time,
in order). Writes wait for ``resume_writing`` when the transport's buffer is full.

Timeouts. One timer per connection covers the idle phases: ``header_timeout`` from
accept or from the first byte of a request head (-> 408), ``keepalive_timeout``
between requests (-> close), ``drain_timeout`` while discarding an unread body.
``body_timeout`` lives in the body object.
"""

from __future__ import annotations

import asyncio
import fcntl
import http
import logging
import os
import random
import re
import secrets
import struct
import termios
import threading
import time
from collections.abc import AsyncIterable, Callable, Sequence
from concurrent.futures import Executor
from email.utils import formatdate
from typing import Final, cast

import h11

from tusd_py.http import splice as _splice
from tusd_py.http.body import RequestBody
from tusd_py.http.limits import HTTPLimits, KiB, MiB
from tusd_py.http.loop import pause_reading_is_strict
from tusd_py.http.types import (
    ClientDisconnected,
    Handler,
    Headers,
    Request,
    Response,
    ServerObserver,
    SpliceStop,
)

__all__ = ["BODY_READ_SIZE", "READ_SIZE", "HTTPProtocol", "ServerContext"]

log = logging.getLogger("tusd_py.http")
access_log = logging.getLogger("tusd_py.access")

READ_SIZE: Final = 64 * KiB
"""Bytes per socket read, and so the most h11 is ever fed at once (see module doc)."""

BODY_READ_SIZE: Final = 1 * MiB
"""Bytes per socket read of a body framed here (never fed to h11). Every read costs a
round of Python (copy out, queue, wake the reader, the store's bookkeeping); 1 MiB
reads make that 16x rarer than 64 KiB ones (measured on the ingest benchmark: the
event loop's CPU per GiB down by about a sixth, ~0.7 -> ~0.58 s/GiB)."""


SPLICE_MIN_WAITING: Final = 256 * KiB
"""Body bytes that must wait in the socket before a splice is started: a client that
sends this fast is worth a worker thread; a slower one is read on the event loop
(never a thread per slow client)."""

SPLICE_IDLE_SECONDS: Final = 0.05
"""A splice hands the socket back to the event loop after this long without data."""


class _BodyReadBuffer(threading.local):
    """One ``BODY_READ_SIZE`` buffer per thread (so per event loop), shared by all its
    connections: ``buffer_updated`` copies a framed body's bytes out before it returns,
    and a transport calls ``get_buffer`` and ``buffer_updated`` back to back, so no
    connection holds the buffer between reads. Memory stays 1 MiB, not 1 MiB per
    upload. Allocated on first use."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(BODY_READ_SIZE))


_body_read_buffer = _BodyReadBuffer()

_SERVER_HEADER: Final = (b"server", b"tusd-py")
_REQUEST_ID_MAX = 128
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")

_REASONS: Final[dict[int, bytes]] = {status.value: status.phrase.encode("ascii") for status in http.HTTPStatus}
# Not in http.HTTPStatus: the IETF resumable-upload draft's interim response.
_REASONS[104] = b"Upload Resumption Supported"
_REASONS[460] = b"Checksum Mismatch"  # tus checksum extension

_NO_BODY_STATUSES: Final = frozenset({204, 304})

# Idle timer kinds (one timer per connection; see the module docstring).
_HEADER = "header"
_KEEPALIVE = "keepalive"
_DRAIN = "drain"
_LINGER = "linger"


class _ConnectionGone(Exception):
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


def request_id_from(header: str | None) -> str:
    """The request id: the client's ``X-Request-ID`` reduced to ``[A-Za-z0-9._-]`` and
    128 characters (it ends up in logs and headers), or a random one."""
    if header:
        cleaned = _REQUEST_ID_UNSAFE.sub("", header)[:_REQUEST_ID_MAX]
        if cleaned:
            return cleaned
    return _new_request_id()


_request_ids = random.Random(secrets.randbits(64))
# Forked workers must not repeat each other's ids.
os.register_at_fork(after_in_child=lambda: _request_ids.seed(secrets.randbits(64)))


def _new_request_id() -> str:
    """16 random hex digits. A request id only correlates log lines, so it needs no
    cryptographic randomness: a PRNG seeded from ``secrets`` once avoids a
    ``getrandom`` system call per request."""
    return f"{_request_ids.getrandbits(64):016x}"


class ServerContext:
    """State the server shares with its connections."""

    __slots__ = ("handler", "limits", "observer", "connections", "stopping", "flow_observer", "_empty")

    def __init__(self, handler: Handler, limits: HTTPLimits, observer: ServerObserver | None = None) -> None:
        self.handler = handler
        self.limits = limits
        self.observer = observer
        """Told about connections, finished requests and body bytes (metrics)."""
        self.connections: set[HTTPProtocol] = set()
        self.stopping = False
        """Set by ``HTTPServer.stop``: connections close after their current response."""
        self.flow_observer: Callable[[HTTPProtocol, bool], None] | None = None
        """Called with (connection, paused) whenever a connection pauses or resumes
        reading; an introspection hook for tests and metrics."""
        self._empty: asyncio.Event | None = None

    def add(self, connection: HTTPProtocol) -> None:
        self.connections.add(connection)
        if self.observer is not None:
            self.observer.connection_opened()

    def discard(self, connection: HTTPProtocol) -> None:
        if connection not in self.connections:
            return
        self.connections.remove(connection)
        if self.observer is not None:
            self.observer.connection_closed()
        if not self.connections and self._empty is not None:
            self._empty.set()

    async def wait_empty(self) -> None:
        """Return once no connection is open (or still running a handler)."""
        if not self.connections:
            return
        if self._empty is None:
            self._empty = asyncio.Event()
        self._empty.clear()
        await self._empty.wait()


class _Cycle:
    """One request/response exchange on a connection."""

    __slots__ = (
        "protocol",
        "request",
        "body",
        "method",
        "target",
        "started",
        "expect_continue",
        "continue_sent",
        "framed_here",
        "response_started",
        "response_done",
        "close_after",
        "draining",
        "drained",
        "bytes_in",
        "bytes_out",
        "status",
    )

    def __init__(self, protocol: HTTPProtocol, method: str, target: str, expect_continue: bool) -> None:
        self.protocol = protocol
        self.method = method
        self.target = target
        self.started = time.perf_counter()
        self.expect_continue = expect_continue
        self.continue_sent = False
        self.framed_here = False
        """The body has a Content-Length and is framed by the protocol, not h11."""
        self.response_started = False
        self.response_done = False
        self.close_after = False
        """The connection cannot be reused after this response."""
        self.draining = False
        self.drained = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.request: Request
        self.body: RequestBody

    # BodyFlow: the body reports to its own cycle, so a body kept past its cycle
    # cannot disturb the next request on the connection.
    def body_first_read(self) -> None:
        self.protocol._on_first_read(self)

    def body_consumed(self, buffered: int) -> None:
        protocol = self.protocol
        if protocol._body_backpressure and buffered <= protocol._limits.body_low_water and protocol._cycle is self:
            protocol._body_backpressure = False
            protocol._update_reading()

    def body_timed_out(self) -> None:
        self.close_after = True

    def body_can_splice(self) -> bool:
        return self.framed_here and self.protocol._socket_fd is not None

    def body_splice_hold(self, hold: bool) -> None:
        self.protocol._splice_hold(self, hold)

    def body_splice_ready(self) -> bool:
        return self.protocol._splice_ready(self)

    async def body_splice(
        self,
        fd: int,
        offset: int,
        max_bytes: int,
        stop: SpliceStop | None,
        executor: Executor | None,
        first: Sequence[bytes | memoryview] = (),
    ) -> _splice.SpliceResult:
        return await self.protocol._splice_body(self, fd, offset, max_bytes, stop, executor, first)

    async def send_informational(self, status: int, headers: list[tuple[str, str]]) -> None:
        await self.protocol._send_informational(self, status, headers)


class HTTPProtocol(asyncio.BufferedProtocol):
    """An HTTP/1.1 server connection (see the module docstring)."""

    def __init__(self, context: ServerContext) -> None:
        self._context = context
        self._limits = context.limits
        self._loop = asyncio.get_running_loop()
        self._conn = self._new_h11()
        self._buffer = bytearray(READ_SIZE)
        self._view = memoryview(self._buffer)
        self._read_view = self._view
        """What the last ``get_buffer`` returned."""
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._client_text = "-"
        self._rejected = False
        self._closing = False
        """We closed (or are closing) the transport: process nothing more."""
        self._closed = False
        """``connection_lost`` was called."""
        self._cycle: _Cycle | None = None
        self._task: asyncio.Task[None] | None = None
        self._processing = False
        self._raw_remaining = 0
        """Body bytes still expected for a body framed here (Content-Length)."""
        self._pending = b""
        """Bytes after a body framed here, kept for the next request."""
        self._idle_bytes = 0
        """Bytes of a next request head received while no request is in flight."""
        # Reading is paused while any of these holds.
        self._body_backpressure = False
        self._pipeline_paused = False
        self._reading_stopped = False
        self._splice_paused = False
        # A framed body is not read from the socket before the application first
        # asks for it: a store that splices the body into a file then gets all of it
        # from the kernel instead of its first MiB through the read buffer (measured:
        # ~1 ms of loop time per PATCH), and a request answered early leaves its body
        # unread in the kernel for the drain logic.
        self._awaiting_first_read = False
        """A splice owns the socket (or is about to): the transport must not read."""
        self._splice_wanted = False
        self._splice_release_scheduled = False
        self._splice_abort: threading.Event | None = None
        """Set when the connection is lost while a splice thread runs."""
        self._socket_fd: int | None = None
        """The socket, when body bytes may be spliced from it (see ``_splice_usable``)."""
        self._reading_paused = False
        self._writing_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        observer = context.observer
        # Bound once: called per body chunk, so no attribute lookups on the hot path.
        self._count_received: Callable[[int], None] | None = observer.bytes_received if observer else None
        self._count_sent: Callable[[int], None] | None = observer.bytes_sent if observer else None

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_size)

    # -- introspection -------------------------------------------------------------

    @property
    def reading_paused(self) -> bool:
        """Whether reading from the socket is paused (flow control)."""
        return self._reading_paused

    @property
    def buffered_body_bytes(self) -> int:
        """Received body bytes of the current request the application has not read."""
        cycle = self._cycle
        return cycle.body.buffered if cycle is not None else 0

    @property
    def idle(self) -> bool:
        """No request is in flight on this connection (its handler may still be
        finishing up, but the response is complete)."""
        return self._cycle is None

    # -- asyncio.BufferedProtocol callbacks -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._client = (str(peer[0]), int(peer[1]))
            self._client_text = f"{peer[0]}:{peer[1]}"
        context = self._context
        if context.stopping or len(context.connections) >= self._limits.max_connections:
            # Closing at accept is the cheapest answer under overload; a client that
            # retries later gets through.
            self._rejected = self._closing = True
            log.warning(
                "connection refused: %d connections open",
                len(context.connections),
                extra={"client": self._client_text},
            )
            self._transport.abort()
            return
        context.add(self)
        self._socket_fd = _splice_usable(self._loop, self._transport)
        self._set_timer(_HEADER, self._limits.header_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        remaining = self._raw_remaining
        if remaining > READ_SIZE:
            # Inside a body framed here: read large, but never past its end, so the
            # bytes of a pipelined next request still go through the 64 KiB buffer.
            view = _body_read_buffer.view
            self._read_view = view if remaining >= BODY_READ_SIZE else view[:remaining]
        else:
            self._read_view = self._view
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self._splice_abort is not None:
            # A splice thread reads this socket: bytes read here would be out of
            # order. The loop must not read a paused transport; if it ever does,
            # dropping the connection is the only safe answer.
            log.error("the transport read while a splice was running; closing the connection")
            self.abort()
            return
        cycle = self._cycle
        if cycle is not None and cycle.framed_here:
            self._on_framed_bytes(cycle, self._read_view[:nbytes])
            return
        if cycle is None:
            self._idle_bytes += nbytes
        # h11 copies the bytes into its own buffer, so the view can be passed as is.
        self._conn.receive_data(cast(bytes, self._view[:nbytes]))
        self._process_events()

    def eof_received(self) -> bool:
        cycle = self._cycle
        if self._closing or cycle is None or cycle.response_done:
            # Idle, or discarding a body that will now never end: let asyncio close.
            self._closing = True
            return False
        cycle.close_after = True
        if not cycle.body.complete:
            cycle.body.fail(ClientDisconnected, "the client closed the connection before the end of the body")
        # Keep the write side open: a half-closed client may still read the response.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = self._closed = True
        self._cancel_timer()
        if self._splice_abort is not None:
            self._splice_abort.set()
        cycle = self._cycle
        if cycle is not None and not cycle.body.complete:
            cycle.body.fail(ClientDisconnected, "the client disconnected before the end of the body")
        self._wake_writer()
        if self._task is None:
            self._context.discard(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- control from the server ----------------------------------------------------

    def close_if_idle(self) -> None:
        """Close the connection unless a request is in flight."""
        if self.idle and not self._closing:
            self._close()

    def abort(self) -> None:
        """Drop the connection now and cancel its handler."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        if self._task is not None:
            self._task.cancel()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The running handler task, if any."""
        return self._task

    # -- reading ---------------------------------------------------------------------

    def _process_events(self) -> None:
        """Turn h11's buffered bytes into requests and body chunks."""
        if self._processing:
            return  # re-entered from a finishing cycle: the outer loop continues
        self._processing = True
        try:
            while not self._closing:
                cycle = self._cycle
                if cycle is not None and cycle.framed_here:
                    break  # h11 parses nothing more until this request is done
                try:
                    event = self._conn.next_event()
                except h11.RemoteProtocolError as error:
                    self._on_protocol_error(error)
                    break
                if event is h11.NEED_DATA:
                    break
                if event is h11.PAUSED:
                    # Pipelined bytes while a request is in flight: read no more.
                    self._pipeline_paused = True
                    self._update_reading()
                    break
                kind = type(event)
                if kind is h11.Data:
                    data = cast(h11.Data, event).data
                    if data and cycle is not None:
                        self._deliver(cycle, data)
                elif kind is h11.Request:
                    self._on_request(cast(h11.Request, event))
                elif kind is h11.EndOfMessage:
                    if cycle is not None:
                        self._on_body_complete(cycle)
                else:  # ConnectionClosed: unreachable, EOF is never fed to h11
                    break
        finally:
            self._processing = False
        if self._cycle is None and not self._closing:
            self._arm_idle_timer()

    def _on_request(self, event: h11.Request) -> None:
        self._cancel_timer()
        self._idle_bytes = 0
        content_length: int | None = None
        chunked = False
        items: list[tuple[str, str]] = []
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            items.append((name, value))
            if name == "content-length":
                content_length = int(value)  # validated by h11
            elif name == "transfer-encoding":
                chunked = True
        headers = Headers(items)
        method = event.method.decode("ascii")
        target = event.target.decode("latin-1")
        cycle = _Cycle(self, method, target, self._conn.they_are_waiting_for_100_continue)
        length = None if chunked else (content_length or 0)
        body = RequestBody(cycle, self._loop, length, self._limits.body_timeout)
        cycle.body = body
        cycle.request = Request(
            method=method,
            target=target,
            headers=headers,
            body=body,
            send_informational=cycle.send_informational,
            client=self._client,
            http_version=event.http_version.decode("ascii"),
            request_id=request_id_from(headers.get("x-request-id")),
        )
        self._cycle = cycle
        task = self._loop.create_task(self._run(cycle))
        self._task = task
        task.add_done_callback(self._on_task_done)
        if length:
            cycle.framed_here = True
            self._raw_remaining = length
            self._awaiting_first_read = not cycle.expect_continue
            self._update_reading()
            # The first body bytes may have arrived with the head; they are still in
            # h11's buffer (this h11 connection parses nothing more).
            trailing = self._conn.trailing_data[0]
            if trailing:
                self._on_framed_bytes(cycle, trailing)

    def _on_framed_bytes(self, cycle: _Cycle, data: bytes | memoryview) -> None:
        """Bytes that arrived while the current request's body is framed here."""
        size = len(data)
        take = min(size, self._raw_remaining)
        if take:
            self._raw_remaining -= take
            if cycle.draining:
                self._count_drained(cycle, take)
            else:
                # The one copy on this path: the read buffer is reused for the next read.
                self._deliver(cycle, bytes(data[:take]))
        if take < size:
            # The next request(s), pipelined: keep them and read no more for now.
            self._pending += bytes(data[take:])
            self._pipeline_paused = True
            self._update_reading()
        if take and not self._raw_remaining and not self._closing:
            self._on_body_complete(cycle)

    def _deliver(self, cycle: _Cycle, chunk: bytes) -> None:
        size = len(chunk)
        if cycle.draining:
            self._count_drained(cycle, size)
            return
        cycle.bytes_in += size
        if self._count_received is not None:
            self._count_received(size)
        if cycle.body.feed(chunk) > self._limits.body_high_water and not self._body_backpressure:
            self._body_backpressure = True
            self._update_reading()

    def _count_drained(self, cycle: _Cycle, size: int) -> None:
        cycle.bytes_in += size
        cycle.drained += size
        if cycle.drained > self._limits.drain_limit:
            self._close(linger=True)

    def _on_body_complete(self, cycle: _Cycle) -> None:
        cycle.body.finish()
        if cycle.draining:
            self._finish_cycle()

    def _on_protocol_error(self, error: h11.RemoteProtocolError) -> None:
        cycle = self._cycle
        if cycle is None:
            self._reject(error.error_status_hint)
            return
        # A malformed body (e.g. bad chunk framing): the application keeps what it
        # got, its response goes out, then the connection closes.
        cycle.close_after = True
        cycle.body.fail(ClientDisconnected, f"malformed request body: {error}")
        self._reading_stopped = True
        self._update_reading()
        if cycle.response_done:
            self._close(linger=True)

    def _update_reading(self) -> None:
        paused = (
            self._body_backpressure
            or self._pipeline_paused
            or self._reading_stopped
            or self._splice_paused
            or self._awaiting_first_read
        )
        if paused is self._reading_paused or self._closing or self._transport is None:
            return
        self._reading_paused = paused
        if paused:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()
        observer = self._context.flow_observer
        if observer is not None:
            observer(self, paused)

    # -- splicing a body into a file ---------------------------------------------------

    def _splice_hold(self, cycle: _Cycle, hold: bool) -> None:
        if cycle is not self._cycle:
            return
        self._splice_wanted = hold
        if hold:
            if not self._splice_paused:
                self._splice_paused = True
                self._update_reading()
        elif self._splice_paused and not self._splice_release_scheduled:
            # Released on the next loop iteration, so that the next splice_to of the
            # same body (called right after this one returns) finds reading paused.
            self._splice_release_scheduled = True
            self._loop.call_soon(self._splice_release)

    def _splice_release(self) -> None:
        self._splice_release_scheduled = False
        if not self._splice_wanted and self._splice_paused:
            self._splice_paused = False
            self._update_reading()

    def _splice_ready(self, cycle: _Cycle) -> bool:
        sock_fd = self._socket_fd
        if (
            sock_fd is None
            or cycle is not self._cycle
            or not cycle.framed_here
            or cycle.draining
            or self._closing
            or not self._reading_paused
            or self._raw_remaining <= 0
        ):
            return False
        try:
            waiting = struct.unpack("i", fcntl.ioctl(sock_fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return False
        return bool(waiting >= min(SPLICE_MIN_WAITING, self._raw_remaining))

    async def _splice_body(
        self,
        cycle: _Cycle,
        fd: int,
        offset: int,
        max_bytes: int,
        stop: SpliceStop | None,
        executor: Executor | None,
        first: Sequence[bytes | memoryview] = (),
    ) -> _splice.SpliceResult:
        first_size = sum(len(chunk) for chunk in first)
        if not self._splice_ready(cycle) or self._socket_fd is None:
            if not first:
                return _splice.SpliceResult()
            # Not worth a splice after all: just write the bytes already read.
            written, error = await self._loop.run_in_executor(executor, _splice.pwrite_chunks, fd, first, offset)
            return _splice.SpliceResult(written_first=written, file_error=error)
        count = min(max_bytes - first_size, self._raw_remaining)
        abort = self._splice_abort = threading.Event()
        stops = (abort,) if stop is None else (abort, stop.event)
        # The thread gets its own descriptor: if the transport closes the socket
        # meanwhile, its number cannot be reused by another connection under us.
        sock_fd = os.dup(self._socket_fd)
        try:
            work = self._loop.run_in_executor(
                executor, _splice_and_close, sock_fd, fd, offset, count, stops, SPLICE_IDLE_SECONDS, first
            )
        except BaseException:
            os.close(sock_fd)
            self._splice_abort = None
            raise
        try:
            result = await work
        finally:
            self._splice_abort = None
        consumed = result.consumed
        if consumed:
            self._raw_remaining -= consumed
            cycle.bytes_in += consumed
            cycle.body.spliced(consumed)
            if self._count_received is not None:
                self._count_received(consumed)
        if result.eof and self._raw_remaining:
            cycle.close_after = True
            cycle.body.fail(ClientDisconnected, "the client closed the connection before the end of the body")
        elif result.file_error is not None and self._raw_remaining:
            # Bytes were taken from the socket but not stored: nobody can tell the
            # client which, so the connection ends after the response.
            cycle.close_after = True
        if consumed and not self._raw_remaining and not self._closing:
            self._on_body_complete(cycle)
        return result

    # -- the request cycle -----------------------------------------------------------

    async def _run(self, cycle: _Cycle) -> None:
        try:
            try:
                response = await self._context.handler(cycle.request)
                if not isinstance(response, Response):
                    raise TypeError(f"the handler returned {type(response).__name__}, not Response")
            except Exception:
                log.exception(
                    "request handler failed",
                    extra={"request_id": cycle.request.request_id, "method": cycle.method},
                )
                if not cycle.body.complete:
                    cycle.close_after = True  # how much of the body is still coming is unknown
                response = _text_response(500)
            await self._send_response(cycle, response)
        except _ConnectionGone:
            pass
        except Exception:
            # Failed while the response was being written (the application's body
            # iterator raised, or its Content-Length was wrong): the framing is
            # broken, so the only honest signal left is to drop the connection.
            log.exception("sending the response failed", extra={"request_id": cycle.request.request_id})
            self.abort()
        else:
            self._after_response(cycle)
        finally:
            self._log_access(cycle)
            observer = self._context.observer
            if observer is not None:
                observer.request_finished(cycle.method, cycle.status, time.perf_counter() - cycle.started)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task is self._task:
            self._task = None
            if self._closed:
                self._context.discard(self)

    def _after_response(self, cycle: _Cycle) -> None:
        cycle.response_done = True
        if self._closing:
            return
        if cycle.close_after or self._context.stopping or self._conn.our_state is not h11.DONE:
            # Unread body bytes may still be on their way: linger.
            self._close(linger=not cycle.body.complete)
            return
        if cycle.body.complete:
            self._finish_cycle()
            return
        # Early response: read and discard the rest of the body, within a budget.
        cycle.draining = True
        cycle.body.discard()
        self._body_backpressure = False
        self._awaiting_first_read = False
        self._update_reading()
        self._set_timer(_DRAIN, self._limits.drain_timeout)

    def _must_close_after(self, cycle: _Cycle) -> bool:
        """Whether the connection must close after this response (decided before
        the head goes out, so it can say ``Connection: close``)."""
        if cycle.close_after or self._context.stopping:
            return True
        body = cycle.body
        if body.complete:
            return False
        if cycle.expect_continue and not cycle.continue_sent:
            # The client may or may not send the body it announced: the connection
            # is in an unknown state (Go's net/http decides the same).
            return True
        return body.length is not None and body.length - cycle.bytes_in > self._limits.drain_limit

    def _finish_cycle(self) -> None:
        """Both request and response are complete: get ready for the next request."""
        cycle = self._cycle
        assert cycle is not None
        self._cycle = None
        self._cancel_timer()
        if cycle.framed_here:
            self._conn = self._new_h11()
            pending, self._pending = self._pending, b""
            self._idle_bytes = len(pending)
            if pending:
                self._conn.receive_data(pending)
        else:
            self._conn.start_next_cycle()
            self._idle_bytes = len(self._conn.trailing_data[0])
        self._body_backpressure = False
        self._pipeline_paused = False
        self._awaiting_first_read = False
        self._update_reading()
        self._process_events()

    def _on_first_read(self, cycle: _Cycle) -> None:
        if cycle is self._cycle and self._awaiting_first_read:
            self._awaiting_first_read = False
            self._update_reading()
        if (
            cycle.expect_continue
            and not cycle.continue_sent
            and cycle is self._cycle
            and not self._closing
            and self._conn.our_state is h11.SEND_RESPONSE
        ):
            cycle.continue_sent = True
            self._write(self._conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=_REASONS[100])))

    # -- writing ---------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    def _wake_writer(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def _wait_writable(self) -> None:
        """Wait until the transport wants more data (a slow reader cannot make the
        server buffer a whole response)."""
        while self._writing_paused and not self._closed:
            writable: asyncio.Future[None] = self._loop.create_future()
            self._writable = writable
            try:
                await writable
            finally:
                self._writable = None
        if self._closed:
            raise _ConnectionGone

    async def _send_informational(self, cycle: _Cycle, status: int, headers: list[tuple[str, str]]) -> None:
        if not 100 <= status < 200 or status == 101:
            raise ValueError(f"not an informational status: {status}")
        if cycle is not self._cycle or cycle.response_started:
            raise RuntimeError("the final response was already sent")
        if self._closing:
            return  # nobody to tell
        event = h11.InformationalResponse(
            status_code=status, headers=_encode_headers(headers), reason=_REASONS.get(status, b"")
        )
        self._write(self._conn.send(event))
        if status == 100:
            cycle.continue_sent = True
        if self._writing_paused:
            await self._wait_writable()

    def _head(self, cycle: _Cycle, response: Response) -> h11.Response:
        """The h11 response head; raises on an invalid status or header."""
        status = response.status
        headers = [_SERVER_HEADER, (b"date", _http_date())]
        has_length = has_request_id = False
        for name, value in response.headers:
            lower = name.lower()
            if lower == "content-length":
                has_length = True
            elif lower == "x-request-id":
                has_request_id = True
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        if not has_request_id:
            headers.append((b"x-request-id", cycle.request.request_id.encode("ascii")))
        body = response.body
        if not has_length and isinstance(body, bytes) and status not in _NO_BODY_STATUSES:
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        if cycle.close_after:
            headers.append((b"connection", b"close"))
        return h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""))

    async def _send_response(self, cycle: _Cycle, response: Response) -> None:
        if self._must_close_after(cycle):
            cycle.close_after = True
        try:
            head = self._head(cycle, response)
        except (h11.LocalProtocolError, ValueError) as error:
            # Nothing is written yet (building the event validates it): answer 500.
            log.error("invalid response from the handler: %s", error, extra={"request_id": cycle.request.request_id})
            await _close_body(response.body)
            response = _text_response(500)
            head = self._head(cycle, response)
        if self._closed:
            await _close_body(response.body)
            cycle.status = response.status
            raise _ConnectionGone
        conn = self._conn
        cycle.response_started = True
        cycle.status = response.status
        self._write(conn.send(head))
        body = response.body
        with_body = cycle.method != "HEAD" and response.status not in _NO_BODY_STATUSES
        if isinstance(body, bytes):
            if body and with_body:
                self._send_data(cycle, body)
        elif not with_body:
            await _close_body(body)
        else:
            await self._stream(cycle, body)
        self._write(conn.send(h11.EndOfMessage()))
        if self._writing_paused:
            await self._wait_writable()

    def _send_data(self, cycle: _Cycle, data: bytes) -> None:
        # The passthrough variant writes the application's bytes object itself
        # (h11's plain send() would join it with the framing into a copy).
        pieces = self._conn.send_with_data_passthrough(h11.Data(data=data))
        if pieces is not None and not self._closed and self._transport is not None:
            for piece in pieces:
                self._transport.write(piece)
        cycle.bytes_out += len(data)
        if self._count_sent is not None:
            self._count_sent(len(data))

    async def _stream(self, cycle: _Cycle, body: AsyncIterable[bytes]) -> None:
        try:
            async for chunk in body:
                if self._closed:
                    raise _ConnectionGone
                if chunk:
                    self._send_data(cycle, chunk)
                    if self._writing_paused:
                        await self._wait_writable()
        finally:
            await _close_body(body)

    # -- closing, errors and timers ----------------------------------------------------

    def _close(self, *, linger: bool = False) -> None:
        """Close gracefully: buffered response bytes are still written.

        With ``linger`` (the client may still be sending), only the write side is
        shut now and incoming bytes are read and dropped for up to ``drain_timeout``
        seconds: closing a socket with unread input makes the kernel send a reset,
        which can destroy the response before the client reads it (nginx's
        lingering close solves the same problem).
        """
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:
            # The peer is already gone (plain asyncio raises ENOTCONN here; uvloop
            # does not): nothing left to linger for.
            transport.abort()
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._set_timer(_LINGER, self._limits.drain_timeout)

    def _reject(self, status: int) -> None:
        """Answer a request that never became one (malformed, too large, too slow)
        with a short text response, then close."""
        response = _text_response(status)
        body = cast(bytes, response.body)
        headers = [
            _SERVER_HEADER,
            (b"date", _http_date()),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        request_id = _new_request_id()
        headers.append((b"x-request-id", request_id.encode("ascii")))
        conn = self._conn
        try:
            # h11 lets a server answer from IDLE (and after a RemoteProtocolError).
            data = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            data = b""
        self._write(data)
        self._close(linger=True)
        if self._context.observer is not None:
            self._context.observer.request_finished("-", status, 0.0)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "- - %d",
                status,
                extra={
                    "method": "-",
                    "path": "-",
                    "status": status,
                    "bytes_in": 0,
                    "bytes_out": len(body) if data else 0,
                    "duration_ms": 0.0,
                    "request_id": request_id,
                    "client": self._client_text,
                },
            )

    def _arm_idle_timer(self) -> None:
        if self._idle_bytes:
            # A request head has begun: its deadline does not move as more arrives.
            if self._timer_kind != _HEADER:
                self._set_timer(_HEADER, self._limits.header_timeout)
        elif self._timer_kind != _KEEPALIVE and self._timer_kind != _HEADER:
            self._set_timer(_KEEPALIVE, self._limits.keepalive_timeout)

    def _set_timer(self, kind: str, delay: float) -> None:
        self._cancel_timer()
        self._timer_kind = kind
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_kind = ""

    def _on_timer(self) -> None:
        kind = self._timer_kind
        self._timer = None
        self._timer_kind = ""
        if kind == _LINGER:
            if self._transport is not None:
                self._transport.close()
            return
        if self._closing:
            return
        if kind == _HEADER and self._cycle is None:
            self._reject(408)
        else:  # keep-alive expired, or the body being drained did not end in time
            self._close()

    def _log_access(self, cycle: _Cycle) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        path = cycle.target.partition("?")[0]  # query strings may carry secrets
        status = cycle.status
        access_log.info(
            "%s %s %s",
            cycle.method,
            path,
            status or "-",
            extra={
                "method": cycle.method,
                "path": path,
                "status": status,
                "bytes_in": cycle.bytes_in,
                "bytes_out": cycle.bytes_out,
                "duration_ms": round((time.perf_counter() - cycle.started) * 1000, 1),
                "request_id": cycle.request.request_id,
                "client": self._client_text,
            },
        )


def _splice_usable(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> int | None:
    """The socket's descriptor when body bytes may be spliced from it: Linux, a plain
    (not TLS) stream socket, and a loop that stops polling a paused transport."""
    if not _splice.SPLICE_SUPPORTED or not pause_reading_is_strict(loop):
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        fd = sock.fileno()
    except (AttributeError, OSError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _splice_and_close(
    sock_fd: int,
    fd: int,
    offset: int,
    count: int,
    stops: tuple[threading.Event, ...],
    idle: float,
    first: Sequence[bytes | memoryview],
) -> _splice.SpliceResult:
    try:
        written = 0
        if first:
            written, error = _splice.pwrite_chunks(fd, first, offset)
            if error is not None:
                return _splice.SpliceResult(written_first=written, file_error=error)
        result = _splice.splice_socket_to_file(sock_fd, fd, offset + written, count, stops, idle)
        result.written_first = written
        return result
    finally:
        os.close(sock_fd)


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


def _text_response(status: int) -> Response:
    reason = _REASONS.get(status, b"Error").decode("ascii")
    return Response(
        status,
        [("content-type", "text/plain; charset=utf-8")],
        f"{status} {reason}\n".encode("ascii"),
    )


async def _close_body(body: bytes | AsyncIterable[bytes]) -> None:
    """Close an async generator body that will not be (fully) iterated."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
