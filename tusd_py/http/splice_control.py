"""When and how a connection splices request body bytes from its socket into a file.

A ``SpliceControl`` exists per connection whose socket can be spliced from (see
``splice_socket``). The request body (``RequestBody.copy_into``) asks it to hold
reading, whether enough bytes wait to be worth a worker thread, and to move them;
it owns the socket's descriptor, the readiness check, the worker call and the
accounting, and tells the connection (a ``SpliceSource``) what it took from the
socket. The worker-thread part is in ``splice.py``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios
from collections.abc import Sequence
from typing import Final, Protocol

from tusd_py.http import splice as _splice
from tusd_py.http.flow import ReadingGate
from tusd_py.http.handoff import WorkerCall
from tusd_py.http.limits import KiB
from tusd_py.http.loop import pause_reading_is_strict
from tusd_py.http.types import CopyStop, CopyTarget

__all__ = ["SPLICE_IDLE_SECONDS", "SPLICE_MIN_WAITING", "SpliceControl", "SpliceSource", "splice_socket"]

SPLICE_MIN_WAITING: Final = 256 * KiB
"""Body bytes that must wait in the socket before a splice is started: a client that
sends this fast is worth a worker thread; a slower one is read on the event loop
(never a thread per slow client)."""

SPLICE_IDLE_SECONDS: Final = 0.05
"""A splice hands the socket back to the event loop after this long without data."""


class SpliceSource(Protocol):
    """What a ``SpliceControl`` needs from its connection (the body framing)."""

    def splice_budget(self) -> int:
        """Bytes of the current request body still in the socket that may be spliced
        now; 0 when none may (no body framed by the connection, an early response
        is discarding it, or the connection is closing)."""
        ...

    def body_spliced(self, count: int, eof: bool, file_failed: bool) -> None:
        """``count`` body bytes went from the socket into a file; ``eof``: the client
        closed its side; ``file_failed``: the file could not be written (bytes taken
        from the socket may be lost)."""
        ...


def splice_socket(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> int | None:
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


class SpliceControl:
    """One connection's splicing (see the module docstring).

    Only the body of the request in flight calls it: a body stops calling once it
    is complete or failed, and a request ends only after that.
    """

    __slots__ = ("_loop", "_sock_fd", "_reading", "_source", "_wanted", "_release_scheduled", "_abort")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock_fd: int, reading: ReadingGate, source: SpliceSource
    ) -> None:
        self._loop = loop
        self._sock_fd = sock_fd
        self._reading = reading
        self._source = source
        self._wanted = False
        self._release_scheduled = False
        self._abort: CopyStop | None = None
        """Set when the connection is lost while a splice thread runs."""

    @property
    def running(self) -> bool:
        """Whether a worker thread reads the socket now."""
        return self._abort is not None

    def abort(self) -> None:
        """The connection is gone: a running splice returns at once."""
        if self._abort is not None:
            self._abort.set()

    def hold(self, hold: bool) -> None:
        """Keep the transport from reading (True) while a copy runs; False lets it
        read again from the next loop iteration on, so that back-to-back copies (the
        next one is called right after this one returns) keep it paused."""
        self._wanted = hold
        if hold:
            self._reading.hold(ReadingGate.SPLICE)
        elif self._reading.holds(ReadingGate.SPLICE) and not self._release_scheduled:
            self._release_scheduled = True
            self._loop.call_soon(self._release)

    def _release(self) -> None:
        self._release_scheduled = False
        if not self._wanted:
            self._reading.release(ReadingGate.SPLICE)

    def waiting(self) -> int:
        """How many body bytes to splice now: the rest of the body when at least
        ``SPLICE_MIN_WAITING`` of it (or all of it) waits in the socket and reading
        is paused; else 0 (read it on the event loop)."""
        budget = self._source.splice_budget()
        if budget <= 0 or not self._reading.paused:
            return 0
        try:
            waiting = struct.unpack("i", fcntl.ioctl(self._sock_fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return 0
        return budget if waiting >= min(SPLICE_MIN_WAITING, budget) else 0

    def move(
        self, target: CopyTarget, count: int, stop: CopyStop, first: Sequence[bytes | memoryview] = ()
    ) -> WorkerCall[_splice.SpliceResult]:
        """Start, on a worker thread: write ``first`` (body bytes already read) at
        ``target.offset``, then move up to ``count`` body bytes from the socket into
        the file right after them (``count`` comes from ``waiting``; reading is held).
        The connection is told what was taken from the socket as soon as the call
        ends, before a waiting body is woken, and also when nobody waits any more (a
        cancelled request).

        Not a coroutine: the work starts now, not one event loop turn later in a task
        of its own."""
        abort = self._abort = CopyStop()
        # The thread gets its own descriptor: if the transport closes the socket
        # meanwhile, its number cannot be reused by another connection under us.
        sock_fd = os.dup(self._sock_fd)
        try:
            return WorkerCall(
                self._loop,
                target.executor,
                _splice.write_then_splice,
                (sock_fd, target.fd, target.offset, count, (abort, stop), SPLICE_IDLE_SECONDS, first),
                self._moved,
            )
        except BaseException:
            os.close(sock_fd)
            self._abort = None
            raise

    def _moved(self, call: WorkerCall[_splice.SpliceResult]) -> None:
        self._abort = None
        result = call.result
        if result is not None:  # else the call failed: the waiting body gets the error
            self._source.body_spliced(result.consumed, result.eof, result.file_error is not None)
