"""Request body bytes on their way from the socket to the application's body.

A body with a Content-Length is framed here, not by h11 (see ``protocol.py``): once
h11 has parsed the head, the next ``length`` bytes are the body. They are read
``BODY_READ_SIZE`` at a time into a buffer shared by the thread's connections,
never past the body's last byte, so what follows it still goes to h11 in
``READ_SIZE`` reads; or a ``SpliceControl`` moves them into a file, and the intake
(its ``SpliceSource``) counts them.

Every read lands in that one shared buffer (a ``READ_SIZE`` read in its first 64 KiB):
no connection owns a read buffer, so an idle keep-alive connection costs only its
objects (a 64 KiB buffer per connection was 625 MiB at 10,000 connections).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from tusd_py.http.flow import ReadingGate
from tusd_py.http.limits import HTTPLimits, KiB

if TYPE_CHECKING:
    from tusd_py.http.cycle import RequestCycle

__all__ = ["BODY_READ_SIZE", "HEAD_READ_SIZE", "READ_SIZE", "BodyIntake", "IntakeHost"]

READ_SIZE: Final = 64 * KiB
"""Bytes per socket read, and so the most h11 is ever fed at once (see
``protocol.py``)."""

HEAD_READ_SIZE: Final = 4 * KiB
"""Bytes per socket read while no request is in flight (reading a request head).
A client sends a PATCH's head and body back to back, so a head read also takes the
body bytes that fit: at 64 KiB that was a 64 KiB copy into a ``bytes`` object and a
separate write of it on the worker per request, where the rest of the body is
spliced in the kernel. 4 KiB holds a tus head (a few hundred bytes; a larger one
takes more reads); bodies h11 frames (chunked) are read ``READ_SIZE`` at a time."""

BODY_READ_SIZE: Final = 256 * KiB
"""Bytes per socket read of a body framed here (never fed to h11). Every read costs a
round of Python (copy out, queue, wake the reader, the store's bookkeeping), so reads
are large; but a read lands in the body's queue whole, so it is also memory per
upload. 256 KiB: 16 S3 uploads at once peak 15 MiB lower than with 1 MiB reads, for
about 3% more server CPU per GiB (``benchmarks.s3 --concurrent 16x64MiB``); file-store
PATCHes splice their bodies and never read them here."""


class _ReadBuffer(threading.local):
    """One ``BODY_READ_SIZE`` buffer per thread (so per event loop), shared by all its
    connections: ``buffer_updated`` copies the bytes out before it returns (h11's
    ``receive_data`` copies into h11's own buffer; a framed body's bytes are copied
    into ``bytes``), and a transport calls ``get_buffer`` and ``buffer_updated`` back
    to back, so no connection holds the buffer between reads. Memory stays one buffer,
    not one per upload nor 64 KiB per connection. Allocated on first use."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(BODY_READ_SIZE))
        self.small_view = self.view[:READ_SIZE]
        self.head_view = self.view[:HEAD_READ_SIZE]


_read_buffer = _ReadBuffer()


class IntakeHost(Protocol):
    """What a ``BodyIntake`` needs from its connection."""

    @property
    def closing(self) -> bool:
        """Whether the connection is closing (nothing more is processed)."""
        ...

    def body_complete(self, cycle: RequestCycle) -> None:
        """The last byte of ``cycle``'s body arrived."""
        ...

    def drain_exceeded(self) -> None:
        """A discarded body ran past ``drain_limit``: close the connection."""
        ...


class BodyIntake:
    """One connection's request body bytes (see the module docstring)."""

    __slots__ = ("_host", "_reading", "_limits", "_count_received", "_read_view", "_framed",
                 "remaining", "pending")

    def __init__(
        self,
        host: IntakeHost,
        reading: ReadingGate,
        limits: HTTPLimits,
        count_received: Callable[[int], None] | None,
    ) -> None:
        """``count_received(n)`` (optional) is told about every body chunk."""
        self._host = host
        self._reading = reading
        self._limits = limits
        self._count_received = count_received
        self._read_view: memoryview | None = None
        """What the last ``get_buffer`` returned (a view of the thread's shared buffer)."""
        self._framed: RequestCycle | None = None
        """The request whose body is framed here, while it is in flight."""
        self.remaining = 0
        """Body bytes still expected for the body framed here."""
        self.pending = b""
        """Bytes after a body framed here, kept for the next request."""

    def get_buffer(self, head: bool) -> memoryview:
        """Where the transport reads next (``BufferedProtocol.get_buffer``); ``head``:
        no request is in flight (the bytes are a request head)."""
        remaining = self.remaining
        if remaining > READ_SIZE:
            # Inside a body framed here: read large, but never past its end, so the
            # bytes of a pipelined next request still go through the 64 KiB buffer.
            view = _read_buffer.view
            read_view = view if remaining >= BODY_READ_SIZE else view[:remaining]
        elif head:
            read_view = _read_buffer.head_view
        else:
            read_view = _read_buffer.small_view
        self._read_view = read_view
        return read_view

    def read(self, nbytes: int) -> memoryview:
        """The ``nbytes`` the transport just read into the last ``get_buffer`` (valid
        until the next ``get_buffer`` of any connection of this thread: copy them)."""
        view = self._read_view
        assert view is not None, "read() before get_buffer()"
        return view[:nbytes]

    def frame(self, cycle: RequestCycle, length: int) -> None:
        """``cycle``'s body is the next ``length`` bytes (``length`` > 0)."""
        cycle.framed_here = True
        self._framed = cycle
        self.remaining = length

    def end(self) -> bytes:
        """The request in flight is done: the bytes kept for the next one."""
        self._framed = None
        pending, self.pending = self.pending, b""
        return pending

    def on_framed_bytes(self, cycle: RequestCycle, data: bytes | memoryview) -> None:
        """Bytes that arrived while ``cycle``'s body is framed here."""
        size = len(data)
        take = min(size, self.remaining)
        if take:
            self.remaining -= take
            if cycle.draining:
                self._count_drained(cycle, take)
            else:
                # The one copy on this path: the read buffer is reused for the next read.
                self.deliver(cycle, bytes(data[:take]))
        if take < size:
            # The next request(s), pipelined: keep them and read no more for now.
            self.pending += bytes(data[take:])
            self._reading.hold(ReadingGate.PIPELINE)
        if take and not self.remaining and not self._host.closing:
            self._host.body_complete(cycle)

    def deliver(self, cycle: RequestCycle, chunk: bytes) -> None:
        """Hand a body chunk to ``cycle``'s body (or drop it while discarding)."""
        size = len(chunk)
        if cycle.draining:
            self._count_drained(cycle, size)
            return
        cycle.bytes_in += size
        if self._count_received is not None:
            self._count_received(size)
        if cycle.body.feed(chunk) > self._limits.body_high_water:
            self._reading.hold(ReadingGate.BACKPRESSURE)

    def _count_drained(self, cycle: RequestCycle, size: int) -> None:
        cycle.bytes_in += size
        cycle.drained += size
        if cycle.drained > self._limits.drain_limit:
            self._host.drain_exceeded()

    # -- SpliceSource ------------------------------------------------------------------

    def splice_budget(self) -> int:
        """Bytes of the framed body in flight still in the socket (0: none may be
        spliced now)."""
        cycle = self._framed
        if cycle is None or cycle.draining or self._host.closing:
            return 0
        return self.remaining

    def body_spliced(self, count: int, eof: bool, file_failed: bool) -> None:
        """Account for ``count`` body bytes spliced from the socket into a file."""
        cycle = self._framed
        assert cycle is not None  # a request ends only once its body stops splicing
        if count:
            self.remaining -= count
            cycle.bytes_in += count
            cycle.body.spliced(count)
            if self._count_received is not None:
                self._count_received(count)
        if eof and self.remaining:
            cycle.client_hung_up("the client closed the connection before the end of the body")
        elif file_failed and self.remaining:
            # Bytes were taken from the socket but not stored: nobody can tell the
            # client which, so the connection ends after the response.
            cycle.close_after = True
        if count and not self.remaining and not self._host.closing:
            self._host.body_complete(cycle)
