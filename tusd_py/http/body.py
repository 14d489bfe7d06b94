"""The streamed request body handed to the application.

The connection protocol pushes chunks in (``feed``) from its read callbacks; the
application pulls them out with ``async for``. Chunks are queued, never joined, so a
byte is copied at most once between the socket buffer and the application.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from tusd_py.http.types import BodyTimeout, ClientDisconnected

__all__ = ["BodyFlow", "RequestBody"]

# libuv timers have millisecond granularity; a timer may fire that much before the
# deadline measured with loop.time(), which must not count as "not yet expired".
_TIMER_SLACK = 0.005


class BodyFlow(Protocol):
    """What a body needs from its connection (implemented by the protocol)."""

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
    ) -> None:
        self._flow = flow
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

    async def read_all(self) -> bytes:
        """The whole remaining body in one bytes object (for small bodies only)."""
        return b"".join([chunk async for chunk in self])

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
