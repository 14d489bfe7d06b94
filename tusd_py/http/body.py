"""The streamed request body handed to the application.

The connection protocol pushes chunks in (``feed``) from its read callbacks; the
application pulls them out with ``async for``. Chunks are queued, never joined, so a
byte is copied at most once between the socket buffer and the application.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from tusd_py.http.handoff import WorkerCall
from tusd_py.http.splice import pwrite_chunks
from tusd_py.http.splice_control import SpliceControl
from tusd_py.http.types import BodyTimeout, ClientDisconnected, CopyStop, CopyTarget

__all__ = ["BodyFlow", "RequestBody"]

# libuv timers have millisecond granularity; a timer may fire that much before the
# deadline measured with loop.time(), which must not count as "not yet expired".
_TIMER_SLACK = 0.005


class BodyFlow(Protocol):
    """What a body tells its request (implemented by the connection's request cycle)."""

    def body_first_read(self) -> None:
        """The application asked for the body for the first time (send 100 Continue)."""

    def body_consumed(self, buffered: int) -> None:
        """The application took a chunk; ``buffered`` unread bytes remain."""

    def body_timed_out(self) -> None:
        """A read waited ``body_timeout`` seconds for data; the body has failed."""


class RequestBody:
    """An HTTP request body as an async iterator of chunks (see ``types.Body``).

    Cancelling a pending read is safe: chunks stay queued until a read returns them,
    and the waiter future carries no data, so a cancelled read loses nothing.
    """

    __slots__ = (
        "_flow",
        "_splice",
        "_loop",
        "_chunks",
        "_buffered",
        "_received",
        "_length",
        "_complete",
        "_error",
        "_first_read",
        "_waiter",
        "_timeout",
        "_timer",
        "_wait_started",
    )

    def __init__(
        self,
        flow: BodyFlow,
        loop: asyncio.AbstractEventLoop,
        length: int | None,
        timeout: float,
        splice: SpliceControl | None = None,
    ) -> None:
        """``splice``: the connection's, when this body may be copied into files
        (its bytes are framed by the connection, not h11, and the socket allows it)."""
        self._flow = flow
        self._splice = splice
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._received = 0
        self._length = length
        self._complete = length == 0
        self._error: tuple[type[Exception], str] | None = None
        self._first_read = True
        self._waiter: asyncio.Future[None] | None = None
        self._timeout = timeout
        # One timer per body, re-armed only when it fires early: arming a timer per
        # read would cost an allocation per chunk on the hot path.
        self._timer: asyncio.TimerHandle | None = None
        self._wait_started = 0.0

    # -- application side ---------------------------------------------------------

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        if self._first_read:
            self._first_read = False
            self._flow.body_first_read()
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                # A fresh exception per raise, so tracebacks do not pile up.
                error_type, message = self._error
                raise error_type(message)
            if self._complete:
                raise StopAsyncIteration
            await self._wait()
        chunk = chunks.popleft()
        size = len(chunk)
        self._buffered -= size
        self._received += size
        self._flow.body_consumed(self._buffered)
        return chunk

    async def copy_into(self, target: CopyTarget, max_bytes: int, stop: CopyStop | None = None) -> int | None:
        """See ``types.CopyableBody.copy_into``. Chunks already queued are written
        first (``pwrite`` on a worker thread); then, while at least a read's worth of
        bytes waits in the socket, the connection splices them into the file; else
        this waits for the next chunk like a read does (body timeout included)."""
        splice = self._splice
        if splice is None:
            return None
        if self._first_read:
            self._first_read = False
            self._flow.body_first_read()
        if max_bytes <= 0 or (self._complete and not self._chunks):
            return 0  # (a complete body: nothing to hold reading for)
        if stop is None:
            stop = CopyStop()  # so that a cancellation can end a running splice
        splice.hold(True)
        try:
            while True:
                if self._chunks:
                    return await self._write_queued(splice, target, max_bytes, stop)
                if self._error is not None:
                    error_type, message = self._error
                    raise error_type(message)
                if self._complete or stop.is_set():
                    return 0
                count = min(max_bytes, splice.waiting())
                if count:
                    result = await splice.move(target, count, stop).wait(stop)
                    if result.file_error is not None:
                        raise result.file_error
                    if result.moved:
                        return result.moved
                    if self._error is not None or self._complete:
                        continue
                # Wait for the next chunk on the event loop, reading normally.
                splice.hold(False)
                stop.on_set(self._wake)
                try:
                    await self._wait()
                finally:
                    stop.on_set(None)
                    splice.hold(True)
        finally:
            splice.hold(False)

    async def _write_queued(self, splice: SpliceControl, target: CopyTarget, max_bytes: int, stop: CopyStop) -> int:
        """Write queued chunks (up to ``max_bytes``) at ``target.offset``, and when
        more of the body waits in the socket, splice it right after them in the same
        worker call (one thread hand-off per PATCH instead of two); the bytes written."""
        chunks = self._chunks
        taken: list[bytes | memoryview] = []
        size = 0
        while chunks and size < max_bytes:
            chunk = chunks.popleft()
            if size + len(chunk) > max_bytes:
                cut = max_bytes - size
                chunks.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            taken.append(chunk)
            size += len(chunk)
        self._buffered -= size
        self._received += size
        self._flow.body_consumed(self._buffered)
        count = 0
        if size < max_bytes and not chunks and not self._complete:
            count = min(max_bytes - size, splice.waiting())  # one readiness check per call
        if count:
            result = await splice.move(target, count, stop, taken).wait(stop)
            if result.file_error is not None:
                raise result.file_error
            return result.written_first + result.moved
        write = WorkerCall(self._loop, target.executor, pwrite_chunks, (target.fd, taken, target.offset))
        written, error = await write.wait(None)
        if error is not None:
            raise error
        return written

    @property
    def length(self) -> int | None:
        """The declared Content-Length, or None for a chunked body."""
        return self._length

    @property
    def received(self) -> int:
        """How many body bytes the application has been handed so far."""
        return self._received

    @property
    def buffered(self) -> int:
        """Bytes received from the client that the application has not read yet."""
        return self._buffered

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (it may still be queued, unread)."""
        return self._complete

    # -- connection side ----------------------------------------------------------

    def feed(self, chunk: bytes) -> int:
        """Queue a non-empty chunk; returns how many bytes are now buffered."""
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self._wake()
        return self._buffered

    def spliced(self, count: int) -> None:
        """``count`` bytes went from the socket straight to the application's file."""
        self._received += count

    def finish(self) -> None:
        """The last byte has been received."""
        self._complete = True
        self._stop_timer()
        self._wake()

    def fail(self, error_type: type[Exception], message: str) -> None:
        """The body cannot be completed: once the queued chunks are read, reads raise
        ``error_type(message)`` (``ClientDisconnected`` or ``BodyTimeout``)."""
        if self._complete or self._error is not None:
            return
        self._error = (error_type, message)
        self._stop_timer()
        self._wake()

    def discard(self) -> None:
        """Drop queued chunks: the response was sent and nobody will read them."""
        self._chunks.clear()
        self._buffered = 0
        if self._error is None and not self._complete:
            self._error = (ClientDisconnected, "the response was already sent; the body is being discarded")
        self._stop_timer()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        loop = self._loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        self._wait_started = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._wait_started + self._timeout, self._on_timer)
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody is waiting: the clock starts again with the next read
        deadline = self._wait_started + self._timeout
        if self._loop.time() + _TIMER_SLACK < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self.fail(BodyTimeout, f"no request body data for {self._timeout:g} seconds")
        self._flow.body_timed_out()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
