"""Low-level file I/O of the file store, all of it run on the store's thread pool:
the data files kept open between an upload's PATCHes (``OpenFiles``), the ordered
batch writer of an iterated body (``OrderedWriter``), and copies between files.

Received chunks are written as they are, without a copy, by one ``pwritev`` per
batch; while a batch is being written the next one is gathered, so receiving and
writing overlap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tusd_py.stores.base import StoreUnavailable

T = TypeVar("T")

WRITE_BATCH_SIZE = 1024 * 1024
"""Bytes gathered before a write starts (when none is in flight): large enough that
the thread hop is noise next to the write, small enough that the disk starts early."""
WRITE_AHEAD_LIMIT = 4 * 1024 * 1024
"""Bytes gathered while a write is in flight before receiving waits for it: a disk
slower than the network slows the client down (the socket pauses) instead of filling
memory. At most two such batches per upload are held (one written, one gathered), so
a write never waits for memory the client has not sent yet, and a briefly stalled
writer thread (2 cores shared with the client) does not stall the socket. When the
disk is slow, batches grow towards this size and writes get fewer."""


def _iov_max() -> int:
    try:
        value = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 1024
    return min(1024, value) if value > 0 else 1024


MAX_BATCH_CHUNKS = _iov_max()
"""Chunks per write: one ``pwritev`` takes at most ``IOV_MAX`` buffers, and a body
of tiny chunks (chunked encoding) must not hold a million small objects per batch."""
OPEN_FILES_LIMIT = 64
"""Data files kept open between the PATCHes of an upload (see ``OpenFiles``)."""
OPEN_FILE_IDLE_SECONDS = 30.0
"""A kept data file not written for this long is closed."""
COPY_BUFFER_SIZE = 1024 * 1024
"""Bytes per read when a copy between files cannot stay in the kernel."""

log = logging.getLogger("tusd_py.stores.file")


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file a path named when it was looked at (``FileStore.get``)."""

    device: int
    inode: int


@dataclass(slots=True, eq=False)
class OpenFile:
    """A data file open for writing, kept between the PATCHes of one upload."""

    upload_id: str
    fd: int
    identity: FileIdentity
    users: int = 1
    last_used: float = 0.0
    dropped: bool = False
    in_flight: concurrent.futures.Future[None] | None = None
    """A write still running on the descriptor (only after a second cancellation)."""


class OpenFiles:
    """Data files kept open between the PATCHes of an upload, so that a PATCH after
    the first costs no ``open``/``close`` round trip to the pool (each is a thread
    hand-off: a few hundred microseconds of a small PATCH).

    Safe because a kept descriptor is used only for the file ``FileStore.get`` found by
    path in the same locked request: same device and inode, else it is dropped and
    the path opened anew (another instance may have deleted and re-created the
    upload). Writes are positional, so another instance writing the same file in
    between changes nothing. At most ``OPEN_FILES_LIMIT`` are kept, each for at
    most ``OPEN_FILE_IDLE_SECONDS`` unused; one in use is never closed under its
    writer. Runs on the event loop only.
    """

    def __init__(self, close: Callable[[int], None]) -> None:
        self._close = close
        self._entries: OrderedDict[str, OpenFile] = OrderedDict()

    def check_out(self, upload_id: str, identity: FileIdentity | None) -> OpenFile | None:
        """The kept descriptor of ``upload_id`` if it is that file (one user more)."""
        self._close_idle(time.monotonic())
        entry = self._entries.get(upload_id)
        if entry is None or identity is None:
            return None
        if entry.identity != identity or entry.users:
            self.forget(upload_id)
            return None
        entry.users += 1
        self._entries.move_to_end(upload_id)
        return entry

    def add(self, upload_id: str, fd: int, identity: FileIdentity) -> OpenFile:
        """Keep a newly opened descriptor (checked out by the caller)."""
        self.forget(upload_id)
        entry = self._entries[upload_id] = OpenFile(upload_id, fd, identity)
        while len(self._entries) > OPEN_FILES_LIMIT:
            oldest = next((key for key, kept in self._entries.items() if not kept.users), None)
            if oldest is None:
                break  # all in use: over the limit until they are checked in
            self.forget(oldest)
        return entry

    def check_in(self, entry: OpenFile, keep: bool) -> None:
        """The caller is done with ``entry``; ``keep`` False drops it."""
        entry.users -= 1
        entry.last_used = time.monotonic()
        if entry.in_flight is not None or not keep:
            entry.dropped = True
            if self._entries.get(entry.upload_id) is entry:
                del self._entries[entry.upload_id]
        if entry.dropped and not entry.users:
            self._release(entry)

    def forget(self, upload_id: str) -> None:
        """Stop keeping ``upload_id``'s descriptor (closed once unused)."""
        entry = self._entries.pop(upload_id, None)
        if entry is not None:
            entry.dropped = True
            if not entry.users:
                self._release(entry)

    def forget_all(self) -> None:
        for upload_id in list(self._entries):
            self.forget(upload_id)

    def _close_idle(self, now: float) -> None:
        while self._entries:
            upload_id, entry = next(iter(self._entries.items()))
            if entry.users or now - entry.last_used < OPEN_FILE_IDLE_SECONDS:
                break
            self.forget(upload_id)

    def _release(self, entry: OpenFile) -> None:
        in_flight, fd = entry.in_flight, entry.fd
        if in_flight is not None:
            in_flight.add_done_callback(lambda _: os.close(fd))
        else:
            self._close(fd)


def open_for_writing(path: str, create: bool) -> tuple[int, FileIdentity]:
    """Open the data file at ``path``; ``create``: make it when missing (the upload's
    first bytes), else a missing file raises ``FileNotFoundError``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT if create else os.O_WRONLY, 0o644)
    opened = os.fstat(fd)
    return fd, FileIdentity(opened.st_dev, opened.st_ino)


class OrderedWriter:
    """The batches of one iterated ``FileUpload.write``: gathers chunks on the event loop and
    writes them in order on the pool, one batch in flight at a time.

    ``position`` is the offset after the last byte known to be written. Completion
    of a write is noticed when the next chunk arrives (no wake-up of the event loop
    per write); the loop waits for a write only when ``WRITE_AHEAD_LIMIT`` bytes are
    gathered behind it, or at the end.
    """

    __slots__ = ("_pool", "_fd", "position", "_chunks", "_size", "in_flight", "_in_flight_size", "_failed")

    def __init__(self, pool: concurrent.futures.Executor, fd: int, position: int) -> None:
        self._pool = pool
        self._fd = fd
        self.position = position
        self._chunks: list[bytes] = []
        self._size = 0
        self.in_flight: concurrent.futures.Future[None] | None = None
        self._in_flight_size = 0
        self._failed = False

    async def write_all(self, chunks: AsyncIterable[bytes], room: int | None) -> None:
        """Write the chunks of ``chunks`` at most ``room`` bytes of them (None: no
        bound; the handler bounds the body, and a store never writes past the
        length). Whatever happens to the iterator (it raises, the task is cancelled),
        what was received goes to disk before this returns or re-raises."""
        try:
            async for chunk in chunks:
                if room is not None:
                    if len(chunk) > room:
                        chunk = chunk[:room]
                    room -= len(chunk)
                if chunk and self.add(chunk):
                    await wait_uncancellable(self.wait_for_room())
        finally:
            await wait_uncancellable(self.write_rest())

    def add(self, chunk: bytes) -> bool:
        """Gather ``chunk`` (and start a write when a batch is ready); True when the
        caller must ``await wait_for_room()`` before gathering more. Raises the error
        of a failed write."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        full = self._size >= WRITE_BATCH_SIZE or len(self._chunks) >= MAX_BATCH_CHUNKS
        in_flight = self.in_flight
        if in_flight is not None:
            if not in_flight.done():
                return self._size >= WRITE_AHEAD_LIMIT or len(self._chunks) >= MAX_BATCH_CHUNKS
            self._collect(in_flight)
        if full:
            self._start()
        return False

    async def wait_for_room(self) -> None:
        """Wait for the write in flight, then start writing what was gathered."""
        if self.in_flight is not None:
            await self._wait()
        if self._chunks:
            self._start()

    async def write_rest(self) -> None:
        """Write everything gathered and wait until it is written. After a failed
        write, writes nothing (that error is already on its way up)."""
        if self._failed:
            return
        if self.in_flight is not None:
            await self._wait()
        if self._chunks:
            self._start()
            await self._wait()

    def _start(self) -> None:
        chunks, self._chunks = self._chunks, []
        self._in_flight_size, self._size = self._size, 0
        self.in_flight = self._pool.submit(_write_chunks, self._fd, chunks, self.position)

    async def _wait(self) -> None:
        in_flight = self.in_flight
        assert in_flight is not None
        try:
            await asyncio.wrap_future(in_flight)
        except BaseException:
            if not in_flight.done():
                raise
        self._collect(in_flight)  # raises the write's own error, if any

    def _collect(self, in_flight: concurrent.futures.Future[None]) -> None:
        self.in_flight = None
        if in_flight.exception() is not None:
            self._failed = True
            in_flight.result()  # raises
        self.position += self._in_flight_size


def _write_chunks(fd: int, chunks: list[bytes], position: int) -> None:
    """Write ``chunks`` back to back at ``position`` (retrying short writes); raises
    ``StoreUnavailable`` when the disk refuses (full, I/O error)."""
    if not _HAS_PWRITEV:  # pragma: no cover - every platform we run on has pwritev
        for chunk in chunks:
            _pwrite_all(fd, memoryview(chunk), position)
            position += len(chunk)
        return
    buffers: list[bytes | memoryview] = list(chunks)
    left = sum(len(chunk) for chunk in chunks)
    try:
        while True:
            written = os.pwritev(fd, buffers, position)
            left -= written
            if left <= 0:
                return
            if written <= 0:
                raise OSError(errno.EIO, "pwritev wrote nothing")
            # A short write (rare for regular files): skip what was written.
            position += written
            while written >= len(buffers[0]):
                written -= len(buffers.pop(0))
            if written:
                buffers[0] = memoryview(buffers[0])[written:]
    except OSError as error:
        raise StoreUnavailable(f"cannot write upload data: {error}") from error


_HAS_PWRITEV = hasattr(os, "pwritev")


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    """Write every byte of ``data`` at ``position`` (retrying short writes); raises
    ``StoreUnavailable`` when the disk refuses (full, I/O error)."""
    try:
        while data:
            written = os.pwrite(fd, data, position)
            position += written
            data = data[written:]
    except OSError as error:
        raise StoreUnavailable(f"cannot write upload data: {error}") from error
    finally:
        data.release()


def copy_range(source: int, source_offset: int, destination: int, destination_offset: int, count: int) -> int:
    """Copy up to ``count`` bytes between file descriptors in the kernel where it can
    (``copy_file_range``, which may also share extents on CoW file systems), else
    through a buffer; returns the bytes copied (0: the source ended)."""
    try:
        return os.copy_file_range(source, destination, count, source_offset, destination_offset)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise StoreUnavailable(f"cannot copy upload data: {error}") from error
    data = os.pread(source, min(count, COPY_BUFFER_SIZE), source_offset)
    if data:
        _pwrite_all(destination, memoryview(data), destination_offset)
    return len(data)


def log_close_error(future: concurrent.futures.Future[None]) -> None:
    error = future.exception()
    if error is not None:
        log.warning("closing an upload's data file failed: %s", error)


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def run_on(pool: concurrent.futures.Executor, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on ``pool``, as ``loop.run_in_executor`` runs it (a call
    still queued when the caller is cancelled never starts), but the worker reports
    the end with one loop callback: no concurrent future chained to an asyncio one.
    A POST's create is one such call; the chaining cost about 7% of the POST rate."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        if future.cancelled():  # a read of one attribute: safe off the loop
            return
        try:
            result = function(*args)
        except BaseException as error:
            loop.call_soon_threadsafe(_give_error, future, error)
        else:
            loop.call_soon_threadsafe(_give_result, future, result)

    pool.submit(work)
    return await future


def _give_result(future: asyncio.Future[T], result: T) -> None:
    """On the loop: a worker's result, to a caller still waiting."""
    if not future.cancelled():
        future.set_result(result)


def _give_error(future: asyncio.Future[Any], error: BaseException) -> None:
    """On the loop: a worker's error, to a caller still waiting."""
    if not future.cancelled():
        future.set_exception(error)


async def wait_uncancellable(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to completion even if the current task is cancelled
    meanwhile (the cancellation is re-raised afterwards): a write that started must
    finish before the bytes are counted or the file descriptor is closed."""
    future = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise
