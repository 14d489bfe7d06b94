"""Moving request body bytes from a socket into a file inside the kernel (Linux).

``splice(2)`` moves socket data into a pipe by reference and from the pipe into a
file's page cache with one copy, so a body costs one memory pass on the server
instead of three (socket -> read buffer, read buffer -> bytes object, bytes object ->
page cache). This module holds the part that runs on a worker thread; the
connection's ``SpliceControl`` (``splice_control.py``) decides when to use it and
keeps the books.

The worker never blocks for long: it waits for socket data in ``poll`` slices of
``POLL_SLICE_SECONDS`` (checking its stop events in between) and hands back once no
byte arrived for ``idle`` seconds, so a slow or stalled client never holds a thread;
the event loop then waits for it as usual (with the body timeout).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = [
    "SPLICE_SUPPORTED", "SpliceResult", "StopFlag", "pwrite_chunks", "splice_socket_to_file", "write_then_splice",
]

SPLICE_SUPPORTED: Final = hasattr(os, "splice") and hasattr(select, "poll")
"""Whether this platform has ``splice(2)`` (Linux, Python 3.10+)."""

PIPE_SIZE: Final = 1024 * 1024
"""Requested capacity of the pipe between socket and file: each round trip
socket -> pipe -> file moves up to this much (1 MiB is the default
``/proc/sys/fs/pipe-max-size``, which unprivileged processes may not exceed)."""

WAKE_BYTES: Final = 256 * 1024
"""Socket receive low-water mark while splicing (``SO_RCVLOWAT``): the worker wakes
when this much (or the rest of the body) waits, not at every segment. A non-blocking
splice takes only what is already there, so without it each round trip moves a few
segments: on the ingest benchmark 1 GiB took ~20% longer, and the client spent ~20%
more CPU refilling pages the pipe still held."""

POLL_SLICE_SECONDS: Final = 0.02
"""Longest wait for socket data between two looks at the stop events."""

_SOCKET_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_FILE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0)
_POLL_IN = select.POLLIN | select.POLLERR | select.POLLHUP if SPLICE_SUPPORTED else 0


class StopFlag(Protocol):
    """Asks a running worker call to return (``types.CopyStop``); polled between
    socket waits."""

    def is_set(self) -> bool: ...


@dataclass(slots=True)
class SpliceResult:
    """What one ``splice_socket_to_file`` call did."""

    moved: int = 0
    """Bytes from the socket now in the file (always equal to ``consumed`` unless
    ``file_error``)."""
    written_first: int = 0
    """Bytes already read from the socket, written before splicing (see
    ``write_then_splice``)."""
    consumed: int = 0
    """Bytes taken from the socket."""
    eof: bool = False
    """The client closed its side (or the socket failed): no more body bytes."""
    file_error: OSError | None = None
    """Writing the file failed; ``consumed - moved`` bytes were lost with the pipe."""


class _Pipe(threading.local):
    """One pipe per worker thread, reused between calls (always left empty)."""

    fds: tuple[int, int] | None = None


_pipe = _Pipe()


def _open_pipe() -> tuple[int, int]:
    fds = _pipe.fds
    if fds is None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default 64 KiB pipe works, with more round trips
        fds = _pipe.fds = (read_end, write_end)
    return fds


def _drop_pipe() -> None:
    """Close this thread's pipe (it may hold bytes that could not be written)."""
    fds, _pipe.fds = _pipe.fds, None
    if fds is not None:
        for fd in fds:
            os.close(fd)


def splice_socket_to_file(
    sock_fd: int,
    fd: int,
    offset: int,
    count: int,
    stops: Sequence[StopFlag],
    idle: float,
) -> SpliceResult:
    """Move up to ``count`` bytes from the (non-blocking) socket ``sock_fd`` into file
    ``fd`` at ``offset``. Never reads more than ``count`` bytes from the socket.

    Returns when ``count`` bytes are moved, the client closed or the socket failed,
    one of ``stops`` is set, no byte arrived for ``idle`` seconds, or the file could
    not be written. Every byte taken from the socket is in the file before this
    returns, except after a file error (reported, with the counts)."""
    result = SpliceResult()
    read_end, write_end = _open_pipe()
    poller = select.poll()
    poller.register(sock_fd, _POLL_IN)
    wake_bytes = _WakeBytes(sock_fd)
    try:
        idle_since = time.monotonic()
        while result.consumed < count:
            if any(stop.is_set() for stop in stops):
                break
            try:
                taken = os.splice(sock_fd, write_end, min(count - result.consumed, PIPE_SIZE), flags=_SOCKET_FLAGS)
            except BlockingIOError:
                waited = time.monotonic() - idle_since
                if waited >= idle:
                    break
                wake_bytes.set(min(WAKE_BYTES, count - result.consumed))
                try:
                    poller.poll(max(1, int(min(POLL_SLICE_SECONDS, idle - waited) * 1000)))
                except InterruptedError:  # pragma: no cover - retried by PEP 475
                    pass
                continue
            except OSError as error:
                if error.errno == errno.EINTR:  # pragma: no cover - retried by PEP 475
                    continue
                result.eof = True
                break
            if taken == 0:
                result.eof = True
                break
            result.consumed += taken
            idle_since = time.monotonic()
            try:
                while result.moved < result.consumed:
                    written = os.splice(read_end, fd, result.consumed - result.moved, offset_dst=offset + result.moved,
                                        flags=_FILE_FLAGS)
                    if written <= 0:
                        raise OSError(errno.EIO, "splice into the file wrote nothing")
                    result.moved += written
            except OSError as error:
                result.file_error = error
                _drop_pipe()
                break
    finally:
        wake_bytes.restore()
    return result


def write_then_splice(
    sock_fd: int,
    fd: int,
    offset: int,
    count: int,
    stops: Sequence[StopFlag],
    idle: float,
    first: Sequence[bytes | memoryview],
) -> SpliceResult:
    """Write ``first`` (body bytes already read from the socket) at ``offset``, then
    ``splice_socket_to_file`` up to ``count`` more right after them: one worker call
    for both. Closes ``sock_fd`` (a duplicate made for this call) when done."""
    try:
        written = 0
        if first:
            written, error = pwrite_chunks(fd, first, offset)
            if error is not None:
                return SpliceResult(written_first=written, file_error=error)
        result = splice_socket_to_file(sock_fd, fd, offset + written, count, stops, idle)
        result.written_first = written
        return result
    finally:
        os.close(sock_fd)


class _WakeBytes:
    """The socket's ``SO_RCVLOWAT`` while a splice runs, back to 1 (what the event
    loop's readiness needs) when it ends. Best effort: without it splicing works, in
    smaller steps."""

    __slots__ = ("_fd", "_value")

    def __init__(self, sock_fd: int) -> None:
        self._fd = sock_fd
        self._value = 1

    def set(self, value: int) -> None:
        value = max(1, value)
        if value != self._value:
            self._value = value
            try:
                with socket.socket(fileno=os.dup(self._fd)) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
            except OSError:
                pass

    def restore(self) -> None:
        self.set(1)


def pwrite_chunks(fd: int, chunks: Sequence[bytes | memoryview], offset: int) -> tuple[int, OSError | None]:
    """Write ``chunks`` back to back at ``offset`` (retrying short writes); returns
    the bytes written and the error that stopped it, if any."""
    written = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                step = os.pwrite(fd, view, offset + written)
                if step <= 0:
                    raise OSError(errno.EIO, "pwrite wrote nothing")
                written += step
                view = view[step:]
    except OSError as error:
        return written, error
    return written, None
