"""The embedded file store: one data file and one JSON info file per upload.

``<dir>/<id>`` holds the bytes, ``<dir>/<id>.info`` the ``UploadInfo`` document,
replaced atomically (temp file, fsync, ``os.replace``) so a crash leaves the old or the
new document, never half of one. The offset is never stored: it is the data file's
size (capped at the length), so bytes that reached the disk always count and a crash
can never make the recorded offset disagree with the data.

All file I/O runs on a small dedicated thread pool, never on the event loop. Received
chunks are written as they are, without a copy, by one ``pwritev`` per batch; while a
batch is being written the next one is gathered, so receiving and writing overlap.
An upload's data file stays open between its PATCHes (``_OpenFiles``), so a PATCH
costs two hand-offs to the pool (read the info, write the body), not four.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from tusd_py.stores.base import (
    FileTarget,
    StoreError,
    StoreUnavailable,
    UploadBody,
    UploadExists,
    UploadInfo,
    UploadNotFound,
    is_valid_upload_id,
)

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
SPLICE_STEP_SIZE = 16 * 1024 * 1024
"""Bytes per ``copy_into`` call when the body can be copied into the file: each call
is one hop to a pool thread; between calls the progress (``yielded``) is updated."""
READ_CHUNK_SIZE = 256 * 1024
"""Bytes per chunk of a download."""
IO_THREADS = 4
"""Threads of the store's pool: a few concurrent uploads' disk writes in flight."""
OPEN_FILES_LIMIT = 64
"""Data files kept open between the PATCHes of an upload (see ``_OpenFiles``)."""
OPEN_FILE_IDLE_SECONDS = 30.0
"""A kept data file not written for this long is closed."""
COPY_STEP_SIZE = 64 * 1024 * 1024
"""Bytes copied per executor call when concatenating: long enough to amortize the hop,
short enough that concurrent uploads' writes get a thread in between."""

_TEMP_MARK = ".tmp-"
"""Temporary files are ``<id>.info.tmp-<hex>`` and ``<id>.tmp-<hex>``."""

log = logging.getLogger("tusd_py.stores.file")


class FileStore:
    """Uploads as files in ``directory`` (created when missing).

    Implements ``Store``, ``SupportsTermination``, ``SupportsDeferredLength``,
    ``SupportsDownload``, ``SupportsConcatenation`` and ``SupportsExpiration``.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as error:
            raise StoreUnavailable(f"cannot create store directory {self.directory}: {error}") from error
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="tusd-file")
        self._open_files = _OpenFiles(self._close_later)

    # --- paths ------------------------------------------------------------------------

    def _data_path(self, upload_id: str) -> str:
        # Defence in depth: the handler validated the id already, but an id that could
        # name another path must never reach the file system from any caller.
        if not is_valid_upload_id(upload_id):
            raise UploadNotFound(upload_id)
        return os.path.join(self.directory, upload_id)

    def _info_path(self, upload_id: str) -> str:
        return self._data_path(upload_id) + ".info"

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def _close_later(self, fd: int) -> None:
        """Close ``fd`` on the pool without waiting for it: closing a file we only
        wrote with ``pwrite`` (no fsync) reports nothing the upload depends on, and
        the request saves a round trip to a pool thread. Errors are logged. Falls back
        to closing here when the pool is shut down."""
        try:
            future = self._pool.submit(os.close, fd)
        except RuntimeError:  # pool shut down (store closing)
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        future.add_done_callback(_log_close_error)

    # --- info documents ---------------------------------------------------------------

    def _write_info_sync(self, info: UploadInfo) -> None:
        path = self._info_path(info.id)
        temp = f"{path}{_TEMP_MARK}{secrets.token_hex(4)}"
        data = json.dumps(info.to_json(), separators=(",", ":")).encode("utf-8")
        try:
            with open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _read_info_sync(self, upload_id: str) -> UploadInfo:
        info_path = self._info_path(upload_id)
        try:
            with open(info_path, "rb", buffering=0) as file:
                document = json.loads(file.read())
            data = os.stat(self._data_path(upload_id))
        except FileNotFoundError as error:
            raise UploadNotFound(upload_id) from error
        except (ValueError, UnicodeDecodeError) as error:
            raise StoreError(f"corrupt info document {info_path}: {error}") from error
        try:
            info = UploadInfo.from_json(document)
        except ValueError as error:
            raise StoreError(f"corrupt info document {info_path}: {error}") from error
        size = data.st_size
        info.offset = size if info.length is None else min(size, info.length)
        info.state = _FileIdentity(data.st_dev, data.st_ino)
        return info

    # --- Store ------------------------------------------------------------------------

    async def create(self, info: UploadInfo) -> UploadInfo:
        """Create the empty data file, then the info document (a crash in between
        leaves only an orphan data file, which ``get_info`` does not see)."""
        await self._run(self._create_sync, info)
        info.offset = 0
        return info

    def _create_sync(self, info: UploadInfo) -> None:
        try:
            fd = os.open(self._data_path(info.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError as error:  # a pre-create hook chose an id in use
            raise UploadExists(info.id) from error
        os.close(fd)
        self._write_info_sync(info)

    async def get_info(self, upload_id: str) -> UploadInfo:
        """The stored info with ``offset`` = size of the data file (capped at length)."""
        try:
            return await self._run(self._read_info_sync, upload_id)
        except UploadNotFound:
            self._open_files.forget(upload_id)  # deleted, maybe by another instance
            raise

    async def write(self, info: UploadInfo, chunks: AsyncIterable[bytes]) -> int:
        """Write ``chunks`` at ``info.offset``; return the new offset.

        Every chunk received is written before this returns, also when ``chunks``
        raises or the task is cancelled (the error is re-raised after the bytes are on
        disk). Chunks are gathered into batches and each batch is written by a pool
        thread with one ``pwritev``, straight from the chunks (no copy), while the next
        batch is gathered. One write is in flight at a time, so the bytes reach the
        file in order and its size (the offset) never counts a gap; after a failed
        write nothing more is written and the error is raised.
        """
        entry = await self._open_data_file(info)
        position = info.offset
        try:
            position = await self._write_to(entry, info, chunks)
        finally:
            # Kept for the next PATCH unless the upload is complete.
            self._open_files.check_in(entry, keep=info.length is None or position < info.length)
        return position

    async def _open_data_file(self, info: UploadInfo) -> _OpenFile:
        """The upload's data file, open for writing: the one kept from an earlier
        PATCH when it is still the file ``get_info`` just found (same device and
        inode), else newly opened."""
        identity = info.state if isinstance(info.state, _FileIdentity) else None
        entry = self._open_files.check_out(info.id, identity)
        if entry is not None:
            return entry
        try:
            fd, opened = await self._run(_open_for_writing, self._data_path(info.id))
        except FileNotFoundError as error:
            raise UploadNotFound(info.id) from error
        return self._open_files.add(info.id, fd, opened)

    async def _write_to(self, entry: _OpenFile, info: UploadInfo, chunks: AsyncIterable[bytes]) -> int:
        fd = entry.fd
        room = None if info.length is None else info.length - info.offset
        position = info.offset
        if hasattr(chunks, "copy_into"):
            # copy_into returns only once its bytes are in the file.
            position, copied = await self._write_spliced(fd, position, room, cast(UploadBody, chunks))
            if copied:
                return position
            room = None if room is None else room - (position - info.offset)
        writer = _OrderedWriter(self._pool, fd, position)
        try:
            try:
                async for chunk in chunks:
                    if room is not None:
                        if len(chunk) > room:
                            # The handler bounds the body; a store never writes past the length.
                            chunk = chunk[:room]
                        room -= len(chunk)
                    if chunk and writer.add(chunk):
                        await _wait_uncancellable(writer.wait_for_room())
            finally:
                # Whatever happened to the iterator, what was received goes to disk.
                await _wait_uncancellable(writer.write_rest())
        finally:
            if writer.in_flight is not None:
                # Only after a second cancellation: the descriptor may be closed
                # only once that thread is done with it.
                entry.in_flight = writer.in_flight
        return writer.position

    async def _write_spliced(self, fd: int, offset: int, room: int | None, body: UploadBody) -> tuple[int, bool]:
        """``write`` for a body that moves itself into the file (``copy_into``, no
        bytes objects on the event loop); the new position, and False when the body
        cannot be copied (iterate the rest). ``copy_into`` returns only once what it
        moved is in the file, so the offset counts only written bytes."""
        position = offset
        while room is None or room > 0:
            step = SPLICE_STEP_SIZE if room is None else min(room, SPLICE_STEP_SIZE)
            try:
                moved = await body.copy_into(FileTarget(fd, position, self._pool), step)
            except OSError as error:
                raise StoreUnavailable(f"cannot write upload data: {error}") from error
            if moved is None:
                return position, False
            if not moved:
                break
            position += moved
            if room is not None:
                room -= moved
        return position, True

    async def finish(self, info: UploadInfo) -> UploadInfo:
        """Mark the upload finished in its info document (idempotent)."""
        self._open_files.forget(info.id)
        if not info.finished:
            info.finished = True
            await self._run(self._write_info_sync, info)
        return info

    async def close(self) -> None:
        """Close the kept data files and stop the thread pool once running file
        operations are done."""
        self._open_files.forget_all()
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._pool.shutdown, wait=True))

    # --- SupportsTermination --------------------------------------------------------

    async def terminate(self, info: UploadInfo) -> None:
        """Delete the info document, then the data (a crash in between leaves an
        orphan data file that no request can reach)."""
        self._open_files.forget(info.id)
        await self._run(self._terminate_sync, info.id)

    def _terminate_sync(self, upload_id: str) -> None:
        found = False
        for path in (self._info_path(upload_id), self._data_path(upload_id)):
            try:
                os.unlink(path)
                found = True
            except FileNotFoundError:
                pass
        if not found:
            raise UploadNotFound(upload_id)

    # --- SupportsDeferredLength -----------------------------------------------------

    async def declare_length(self, info: UploadInfo, length: int) -> UploadInfo:
        """Persist the now-known length."""
        info.length = length
        await self._run(self._write_info_sync, info)
        return info

    # --- SupportsDownload -----------------------------------------------------------

    def read(self, info: UploadInfo, start: int, stop: int) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, stop)`` in chunks of ``READ_CHUNK_SIZE``."""
        return self._read(info.id, start, stop)

    async def _read(self, upload_id: str, start: int, stop: int) -> AsyncIterator[bytes]:
        path = self._data_path(upload_id)
        try:
            fd = await self._run(os.open, path, os.O_RDONLY)
        except FileNotFoundError as error:
            raise UploadNotFound(upload_id) from error
        try:
            position = start
            while position < stop:
                chunk = await self._run(os.pread, fd, min(READ_CHUNK_SIZE, stop - position), position)
                if not chunk:
                    raise StoreError(f"upload {upload_id} is shorter than expected (truncated on disk?)")
                position += len(chunk)
                yield chunk
        finally:
            await _wait_uncancellable(self._run(os.close, fd))

    # --- SupportsConcatenation ------------------------------------------------------

    async def concatenate(self, final: UploadInfo, partials: list[UploadInfo]) -> UploadInfo:
        """Stream the partials' data into a temporary file, link it into place as the
        final upload's data, then write its info document (finished). A crash before
        the link leaves a temporary file and a crash before the info document an
        orphan data file, both invisible to ``get_info`` and removed by
        ``remove_orphans``."""
        assert final.length is not None
        data_path = self._data_path(final.id)
        temp = f"{data_path}{_TEMP_MARK}{secrets.token_hex(4)}"
        try:
            destination = await self._run(os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                position = 0
                for partial in partials:
                    assert partial.length is not None
                    await self._copy_data(partial.id, destination, position, partial.length)
                    position += partial.length
                await self._run(os.fsync, destination)
            finally:
                await _wait_uncancellable(self._run(os.close, destination))
            # link() refuses an existing name, like create()'s O_EXCL.
            try:
                await self._run(os.link, temp, data_path)
            except FileExistsError as error:
                raise UploadExists(final.id) from error
        finally:
            await _wait_uncancellable(self._run(_unlink_quietly, temp))
        final.finished = True
        await self._run(self._write_info_sync, final)
        final.offset = final.length
        return final

    async def _copy_data(self, upload_id: str, destination: int, position: int, count: int) -> None:
        """Copy the first ``count`` bytes of upload ``upload_id`` to ``position`` of
        ``destination``, one executor call per ``COPY_STEP_SIZE`` so that a big copy
        never holds a pool thread for long."""
        try:
            source = await self._run(os.open, self._data_path(upload_id), os.O_RDONLY)
        except FileNotFoundError as error:
            raise UploadNotFound(upload_id) from error
        try:
            copied = 0
            while copied < count:
                step = await self._run(
                    _copy_range, source, copied, destination, position + copied, min(COPY_STEP_SIZE, count - copied)
                )
                if step == 0:
                    raise StoreError(f"upload {upload_id} is shorter than its length (truncated on disk?)")
                copied += step
        finally:
            await _wait_uncancellable(self._run(os.close, source))

    # --- SupportsExpiration ---------------------------------------------------------

    async def list_uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload with an info document (unreadable ones are logged and
        skipped: one corrupt document must not stop a cleanup)."""
        names = await self._run(os.listdir, self.directory)
        for name in sorted(names):
            upload_id = name.removesuffix(".info")
            if upload_id == name or not is_valid_upload_id(upload_id):
                continue
            try:
                yield await self.get_info(upload_id)
            except UploadNotFound:
                continue  # terminated meanwhile
            except StoreError as error:
                log.warning("skipping upload %s: %s", upload_id, error)

    async def remove_orphans(self, created_before: float) -> int:
        """Remove data files without an info document and temporary files (of info
        documents and concatenations) last modified before ``created_before``."""
        return await self._run(self._remove_orphans_sync, created_before)

    def _remove_orphans_sync(self, created_before: float) -> int:
        removed = 0
        with os.scandir(self.directory) as entries:
            names = {entry.name: entry for entry in entries if entry.is_file(follow_symlinks=False)}
        for name, entry in names.items():
            upload_id, mark, _ = name.partition(_TEMP_MARK)
            if mark:
                upload_id = upload_id.removesuffix(".info")
            elif name.endswith(".info") or f"{name}.info" in names:
                continue
            if not is_valid_upload_id(upload_id):
                continue  # not ours
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= created_before:
                    continue
                if not mark and os.path.exists(self._info_path(upload_id)):
                    continue  # created meanwhile
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            log.info("removed orphan %s", name)
            removed += 1
        return removed


@dataclass(frozen=True, slots=True)
class _FileIdentity:
    """Which file a path named when it was looked at (``get_info``)."""

    device: int
    inode: int


@dataclass(slots=True, eq=False)
class _OpenFile:
    """A data file open for writing, kept between the PATCHes of one upload."""

    upload_id: str
    fd: int
    identity: _FileIdentity
    users: int = 1
    last_used: float = 0.0
    dropped: bool = False
    in_flight: concurrent.futures.Future[None] | None = None
    """A write still running on the descriptor (only after a second cancellation)."""


class _OpenFiles:
    """Data files kept open between the PATCHes of an upload, so that a PATCH after
    the first costs no ``open``/``close`` round trip to the pool (each is a thread
    hand-off: a few hundred microseconds of a small PATCH).

    Safe because a kept descriptor is used only for the file ``get_info`` found by
    path in the same locked request: same device and inode, else it is dropped and
    the path opened anew (another instance may have deleted and re-created the
    upload). Writes are positional, so another instance writing the same file in
    between changes nothing. At most ``OPEN_FILES_LIMIT`` are kept, each for at
    most ``OPEN_FILE_IDLE_SECONDS`` unused; one in use is never closed under its
    writer. Runs on the event loop only.
    """

    def __init__(self, close: Callable[[int], None]) -> None:
        self._close = close
        self._entries: OrderedDict[str, _OpenFile] = OrderedDict()

    def check_out(self, upload_id: str, identity: _FileIdentity | None) -> _OpenFile | None:
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

    def add(self, upload_id: str, fd: int, identity: _FileIdentity) -> _OpenFile:
        """Keep a newly opened descriptor (checked out by the caller)."""
        self.forget(upload_id)
        entry = self._entries[upload_id] = _OpenFile(upload_id, fd, identity)
        while len(self._entries) > OPEN_FILES_LIMIT:
            oldest = next((key for key, kept in self._entries.items() if not kept.users), None)
            if oldest is None:
                break  # all in use: over the limit until they are checked in
            self.forget(oldest)
        return entry

    def check_in(self, entry: _OpenFile, keep: bool) -> None:
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

    def _release(self, entry: _OpenFile) -> None:
        in_flight, fd = entry.in_flight, entry.fd
        if in_flight is not None:
            in_flight.add_done_callback(lambda _: os.close(fd))
        else:
            self._close(fd)


def _open_for_writing(path: str) -> tuple[int, _FileIdentity]:
    fd = os.open(path, os.O_WRONLY)
    opened = os.fstat(fd)
    return fd, _FileIdentity(opened.st_dev, opened.st_ino)


class _OrderedWriter:
    """The batches of one ``FileStore.write``: gathers chunks on the event loop and
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


def _copy_range(source: int, source_offset: int, destination: int, destination_offset: int, count: int) -> int:
    """Copy up to ``count`` bytes between file descriptors in the kernel where it can
    (``copy_file_range``, which may also share extents on CoW file systems), else
    through a buffer; returns the bytes copied (0: the source ended)."""
    try:
        return os.copy_file_range(source, destination, count, source_offset, destination_offset)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise StoreUnavailable(f"cannot copy upload data: {error}") from error
    data = os.pread(source, min(count, READ_CHUNK_SIZE * 4), source_offset)
    if data:
        _pwrite_all(destination, memoryview(data), destination_offset)
    return len(data)


def _log_close_error(future: concurrent.futures.Future[None]) -> None:
    error = future.exception()
    if error is not None:
        log.warning("closing an upload's data file failed: %s", error)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _wait_uncancellable(awaitable: Awaitable[T]) -> T:
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
