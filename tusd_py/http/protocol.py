"""One asyncio protocol per connection: HTTP/1.1 over h11 with streamed bodies.

Reading. ``get_buffer`` hands the transport one preallocated 64 KiB buffer, so a
read allocates nothing and h11 is never fed more than 64 KiB at once (larger feeds
cross glibc's mmap threshold and make h11 ~10x slower); a request head is read 4 KiB
at a time (``HEAD_READ_SIZE``), leaving the body that follows it in the socket. A plain head
complete in one read is parsed by ``head.py`` and never reaches h11 (unless its response needs
h11); h11 parses every other request head and chunked bodies. A body with a Content-Length is framed here instead: once
h11 has parsed the head, the next ``length`` bytes are the body, and handing them to
the application straight from the read buffer saves h11's three copies and its
per-event overhead -- the difference between ~2 GB/s and the wire speed of loopback.
Such a body is read ``BODY_READ_SIZE`` (256 KiB) at a time into a buffer shared by the
thread's connections, never past its last byte, so what follows it still goes to
h11 in 64 KiB reads (or is spliced into a file by ``SpliceControl``); see
``BodyIntake``. After such a request a fresh h11 connection parses what follows.

Flow control (``ReadingGate``). Unread body bytes pause the transport above
``body_high_water`` and resume it below ``body_low_water``; pipelined bytes that
arrive while a request is in flight pause it until the response is out (requests
are handled one at a time, in order). Writes wait for ``resume_writing`` when the
transport's buffer is full (``ResponseWriter``).

Timeouts. One timer per connection covers the idle phases: ``header_timeout`` from
accept or from the first byte of a request head (-> 408), ``keepalive_timeout``
between requests (-> close), ``drain_timeout`` while discarding an unread body.
``body_timeout`` lives in the body object.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import h11

from tusd_py.http.access_log import log_rejected, new_request_id, request_id_from
from tusd_py.http.body import RequestBody
from tusd_py.http.cycle import RequestCycle
from tusd_py.http.flow import ReadingGate
from tusd_py.http.head import parse_simple_head
from tusd_py.http.intake import BODY_READ_SIZE, READ_SIZE, BodyIntake
from tusd_py.http.response import ResponseWriter
from tusd_py.http.splice_control import SpliceControl, splice_socket
from tusd_py.http.timer import ConnectionTimer
from tusd_py.http.types import ClientDisconnected, Headers, Request

if TYPE_CHECKING:
    from tusd_py.http.server import ServerContext

__all__ = ["BODY_READ_SIZE", "READ_SIZE", "HTTPProtocol"]

log = logging.getLogger("tusd_py.http")


class HTTPProtocol(asyncio.BufferedProtocol):
    """An HTTP/1.1 server connection (see the module docstring).

    To its request cycles it is a ``CycleHost``; to its ``BodyIntake`` an
    ``IntakeHost``."""

    def __init__(self, context: ServerContext) -> None:
        self._context = context
        self._limits = context.limits
        self._loop = asyncio.get_running_loop()
        self._conn = self._new_h11()
        self._h11_empty = True
        """``_conn`` is idle and holds no bytes: a plain head may bypass it."""
        self._transport: asyncio.Transport | None = None
        self._client: tuple[str, int] | None = None
        self._client_text = "-"
        self._closing = False
        """We closed (or are closing) the transport: process nothing more."""
        self._closed = False
        """``connection_lost`` was called."""
        self._cycle: RequestCycle | None = None
        self._task: asyncio.Task[None] | None = None
        self._processing = False
        self._idle_bytes = 0
        """Bytes of a next request head received while no request is in flight."""
        self._reading = ReadingGate(lambda paused: context.reading_changed(self, paused))
        self._splice: SpliceControl | None = None
        """Set when body bytes may be spliced from this connection's socket."""
        self._timer = ConnectionTimer(self._loop, self._on_timer)
        observer = context.observer
        self._intake = BodyIntake(self, self._reading, self._limits, observer.bytes_received if observer else None)
        self._writer = ResponseWriter(self._loop, observer.bytes_sent if observer else None)

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_size)

    # -- introspection -------------------------------------------------------------

    @property
    def reading_paused(self) -> bool:
        """Whether reading from the socket is paused (flow control)."""
        return self._reading.paused

    @property
    def buffered_body_bytes(self) -> int:
        """Received body bytes of the current request the application has not read."""
        cycle = self._cycle
        return cycle.body.buffered if cycle is not None else 0

    @property
    def closing(self) -> bool:
        """Whether the connection is closing: nothing more is processed."""
        return self._closing

    @property
    def idle(self) -> bool:
        """No request is in flight on this connection (its handler may still be
        finishing up, but the response is complete)."""
        return self._cycle is None

    # -- asyncio.BufferedProtocol callbacks -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._reading.attach(self._transport)
        self._writer.attach(self._transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._client = (str(peer[0]), int(peer[1]))
            self._client_text = f"{peer[0]}:{peer[1]}"
        if not self._context.admit(self, self._client_text):
            self._mark_closing()
            self._transport.abort()
            return
        sock_fd = splice_socket(self._loop, self._transport)
        if sock_fd is not None:
            self._splice = SpliceControl(self._loop, sock_fd, self._reading, self._intake)
        self._timer.set(ConnectionTimer.HEADER, self._limits.header_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._intake.get_buffer(self._cycle is None)

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        if self._splice is not None and self._splice.running:
            # A splice thread reads this socket: bytes read here would be out of
            # order. The loop must not read a paused transport; if it ever does,
            # dropping the connection is the only safe answer.
            log.error("the transport read while a splice was running; closing the connection")
            self.abort()
            return
        cycle = self._cycle
        if cycle is not None and cycle.framed_here:
            self._intake.on_framed_bytes(cycle, self._intake.read(nbytes))
            return
        self._receive(self._intake.read(nbytes))

    def _receive(self, data: bytes | memoryview) -> None:
        """Bytes of request heads (or of a body h11 frames): a plain head complete
        in them while h11 holds nothing starts a request without h11; anything else
        goes to h11."""
        if self._cycle is None:
            if self._h11_empty and self._start_simple(data):
                return
            self._idle_bytes += len(data)
        self._h11_empty = False
        # h11 copies the bytes into its own buffer, so a view can be passed as is.
        self._conn.receive_data(cast(bytes, data))
        self._process_events()

    def eof_received(self) -> bool:
        cycle = self._cycle
        if self._closing or cycle is None or cycle.response_done:
            # Idle, or discarding a body that will now never end: let asyncio close.
            self._mark_closing()
            return False
        cycle.close_after = True
        if not cycle.body.complete:
            cycle.client_hung_up("the client closed the connection before the end of the body")
        # Keep the write side open: a half-closed client may still read the response.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_closing()
        self._closed = True
        self._timer.cancel()
        if self._splice is not None:
            self._splice.abort()
        cycle = self._cycle
        if cycle is not None and not cycle.body.complete:
            cycle.client_hung_up("the client disconnected before the end of the body")
        self._writer.lost()
        if self._task is None:
            self._context.discard(self)

    def pause_writing(self) -> None:
        self._writer.pause()

    def resume_writing(self) -> None:
        self._writer.resume()

    # -- control from the server ----------------------------------------------------

    def close_if_idle(self) -> None:
        """Close the connection unless a request is in flight."""
        if self.idle and not self._closing:
            self._close()

    def abort(self) -> None:
        """Drop the connection now and cancel its handler."""
        self._mark_closing()
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
                    self._reading.hold(ReadingGate.PIPELINE)
                    break
                kind = type(event)
                if kind is h11.Data:
                    data = cast(h11.Data, event).data
                    if data and cycle is not None:
                        self._intake.deliver(cycle, data)
                elif kind is h11.Request:
                    self._on_request(cast(h11.Request, event))
                elif kind is h11.EndOfMessage:
                    if cycle is not None:
                        self.body_complete(cycle)
                else:  # ConnectionClosed: unreachable, EOF is never fed to h11
                    break
        finally:
            self._processing = False
        if self._cycle is None and not self._closing:
            self._arm_idle_timer()

    def _start_simple(self, data: bytes | memoryview) -> bool:
        """Start the request whose head begins ``data`` without h11, if the head is
        complete and plain (``head.py``); the rest of ``data`` is its body or the
        next request's. False: nothing was done."""
        head = parse_simple_head(data, self._limits.max_header_size)
        if head is None:
            return False
        self._timer.cancel()
        self._idle_bytes = 0
        headers = Headers.lowered(head.headers)
        cycle = RequestCycle(self, self._conn, head.method, head.target, False, head.raw)
        self._start_cycle(cycle, headers, head.length, "1.1")
        self._intake.frame(cycle, head.length)
        if head.length:
            self._reading.hold(ReadingGate.FIRST_READ)
        else:
            cycle.body.finish()
        end = len(head.raw)
        if end < len(data):
            self._intake.on_framed_bytes(cycle, data[end:])
        return True

    def _on_request(self, event: h11.Request) -> None:
        self._timer.cancel()
        self._idle_bytes = 0
        if not event.http_version.startswith(b"1."):
            # h11 parses any "HTTP/d.d" request line. A major version other than 1
            # gets 505 (RFC 9110, 15.6.6); a higher minor one (1.2) is served as 1.1,
            # as RFC 9110, 2.5 asks, and h11 frames it so.
            self._reject(505)
            return
        headers, length = _decode_head(event)
        method = event.method.decode("ascii")
        target = event.target.decode("latin-1")
        cycle = RequestCycle(self, self._conn, method, target, self._conn.they_are_waiting_for_100_continue)
        self._start_cycle(cycle, headers, length, event.http_version.decode("ascii"))
        if length:
            self._intake.frame(cycle, length)
            # A framed body is not read from the socket before the application first
            # asks for it: a store that copies the body into a file then gets all of
            # it from the kernel instead of its first MiB through the read buffer
            # (measured: ~1 ms of loop time per PATCH), and a request answered early
            # leaves its body unread in the kernel for the drain logic.
            if not cycle.expect_continue:
                self._reading.hold(ReadingGate.FIRST_READ)
            # The first body bytes may have arrived with the head; they are still in
            # h11's buffer (this h11 connection parses nothing more).
            trailing = self._conn.trailing_data[0]
            if trailing:
                self._intake.on_framed_bytes(cycle, trailing)

    def _start_cycle(self, cycle: RequestCycle, headers: Headers, length: int | None, http_version: str) -> None:
        """Give ``cycle`` its request and start the application on it."""
        # Only a body framed here can be spliced: h11 holds none of its bytes.
        splice = self._splice if length else None
        body = RequestBody(cycle, self._loop, length, self._limits.body_timeout, splice)
        cycle.body = body
        cycle.request = Request(
            method=cycle.method,
            target=cycle.target,
            headers=headers,
            body=body,
            send_informational=cycle.send_informational,
            client=self._client,
            http_version=http_version,
            request_id=request_id_from(headers.get("x-request-id")),
        )
        self._cycle = cycle
        task = self._loop.create_task(cycle.run(self._context, self._writer, self._client_text))
        self._task = task
        task.add_done_callback(self._on_task_done)

    # -- IntakeHost --------------------------------------------------------------------

    def body_complete(self, cycle: RequestCycle) -> None:
        """The last byte of ``cycle``'s body arrived."""
        cycle.body.finish()
        if cycle.draining:
            self._finish_cycle()

    def drain_exceeded(self) -> None:
        """A discarded body ran past ``drain_limit``."""
        self._close(linger=True)

    def _on_protocol_error(self, error: h11.RemoteProtocolError) -> None:
        cycle = self._cycle
        if cycle is None:
            self._reject(error.error_status_hint)
            return
        # A malformed body (e.g. bad chunk framing): the application keeps what it
        # got, its response goes out, then the connection closes.
        cycle.close_after = True
        cycle.body.fail(ClientDisconnected, f"malformed request body: {error}")
        self._reading.hold(ReadingGate.STOPPED)
        if cycle.response_done:
            self._close(linger=True)

    # -- CycleHost: what the request cycles ask ------------------------------------------

    def body_first_read(self, cycle: RequestCycle) -> None:
        """The application of ``cycle`` first asked for the body: read it (and send
        100 Continue when the client waits for it)."""
        if cycle is not self._cycle:
            return
        self._reading.release(ReadingGate.FIRST_READ)
        if (
            cycle.expect_continue
            and not cycle.continue_sent
            and not cycle.response_started  # (a response written without h11 leaves its state)
            and not self._closing
            and cycle.h11_connection().our_state is h11.SEND_RESPONSE
        ):
            cycle.continue_sent = True
            self._writer.write_informational(cycle.h11_connection(), 100, [])

    def body_consumed(self, cycle: RequestCycle, buffered: int) -> None:
        """Resume reading once the application of ``cycle`` has read the body down
        to the low-water mark."""
        if buffered <= self._limits.body_low_water and cycle is self._cycle:
            self._reading.release(ReadingGate.BACKPRESSURE)

    async def send_informational(self, cycle: RequestCycle, status: int, headers: list[tuple[str, str]]) -> None:
        """Send a 1xx response for ``cycle`` before its final response."""
        if cycle is not self._cycle:
            raise RuntimeError("the final response was already sent")
        if self._closing:
            return  # nobody to tell
        self._writer.write_informational(cycle.h11_connection(), status, headers)
        if status == 100:
            cycle.continue_sent = True
        await self._writer.drain()

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task is self._task:
            self._task = None
            if self._closed:
                self._context.discard(self)

    def response_sent(self, cycle: RequestCycle) -> None:
        """``cycle``'s response is out: next request, drain the body, or close."""
        cycle.response_done = True
        if self._closing:
            return
        if cycle.close_after or self._context.stopping or not cycle.keep_alive:
            # Unread body bytes may still be on their way: linger.
            self._close(linger=not cycle.body.complete)
            return
        if cycle.body.complete:
            self._finish_cycle()
            return
        # Early response: read and discard the rest of the body, within a budget.
        cycle.draining = True
        cycle.body.discard()
        self._reading.release(ReadingGate.BACKPRESSURE | ReadingGate.FIRST_READ)
        self._timer.set(ConnectionTimer.DRAIN, self._limits.drain_timeout)

    def _finish_cycle(self) -> None:
        """Both request and response are complete: get ready for the next request."""
        cycle = self._cycle
        assert cycle is not None
        self._cycle = None
        self._timer.cancel()
        pending = self._intake.end()
        self._reading.release(ReadingGate.BACKPRESSURE | ReadingGate.PIPELINE | ReadingGate.FIRST_READ)
        if cycle.framed_here:
            if not cycle.h11_untouched:
                self._conn = self._new_h11()
                self._h11_empty = True
            self._idle_bytes = 0
            if pending:
                self._receive(pending)
                return
        else:
            self._conn.start_next_cycle()
            trailing = self._conn.trailing_data[0]
            self._idle_bytes = len(trailing)
            self._h11_empty = not trailing
        self._process_events()

    # -- closing, errors and timers ----------------------------------------------------

    def _mark_closing(self) -> None:
        self._closing = True
        self._reading.close()

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
        self._mark_closing()
        self._timer.cancel()
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
        self._reading.resume_for_linger()
        self._timer.set(ConnectionTimer.LINGER, self._limits.drain_timeout)

    def _reject(self, status: int) -> None:
        """Answer a request that never became one (malformed, too large, too slow)
        with a short text response, then close."""
        request_id = new_request_id()
        bytes_out = self._writer.reject(self._conn, status, request_id)
        self._close(linger=True)
        if self._context.observer is not None:
            self._context.observer.request_finished("-", status, 0.0)
        log_rejected(status, bytes_out, request_id, self._client_text)

    def _arm_idle_timer(self) -> None:
        kind = self._timer.kind
        if self._idle_bytes:
            # A request head has begun: its deadline does not move as more arrives.
            if kind != ConnectionTimer.HEADER:
                self._timer.set(ConnectionTimer.HEADER, self._limits.header_timeout)
        elif kind != ConnectionTimer.KEEPALIVE and kind != ConnectionTimer.HEADER:
            self._timer.set(ConnectionTimer.KEEPALIVE, self._limits.keepalive_timeout)

    def _on_timer(self, kind: str) -> None:
        if kind == ConnectionTimer.LINGER:
            if self._transport is not None:
                self._transport.close()
            return
        if self._closing:
            return
        if kind == ConnectionTimer.HEADER and self._cycle is None:
            self._reject(408)
        else:  # keep-alive expired, or the body being drained did not end in time
            self._close()


def _decode_head(event: h11.Request) -> tuple[Headers, int | None]:
    """The request's headers, and its body length (None: chunked)."""
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
    return Headers(items), None if chunked else (content_length or 0)
