"""The embedded file store: one data file and one JSON info file per upload.

``<dir>/<id>`` holds the bytes, ``<dir>/<id>.info`` the ``UploadInfo`` document,
replaced atomically (temp file, fsync, ``os.replace``) so a crash leaves the old or the
new document, never half of one. The offset is never stored: it is the data file's
size (capped at the length), so bytes that reached the disk always count and a crash
can never make the recorded offset disagree with the data.

All file I/O runs on a small dedicated thread pool, never on the event loop. Received
chunks are written as they are, without a copy, by one ``pwritev`` per batch; while a
batch is being written the next one is gathered, so receiving and writing overlap.
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
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tusd_py.stores.base import (
    FileSpliceSource,
    StoreError,
    StoreUnavailable,
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
"""Bytes per ``splice_to`` call when the body can be spliced into the file: each call
is one hop to a pool thread; between calls the progress (``yielded``) is updated."""
READ_CHUNK_SIZE = 256 * 1024
"""Bytes per chunk of a download."""
IO_THREADS = 4
"""Threads of the store's pool: a few concurrent uploads' disk writes in flight."""
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
            with open(info_path, "rb") as file:
                document = json.loads(file.read())
            size = os.stat(self._data_path(upload_id)).st_size
        except FileNotFoundError as error:
            raise UploadNotFound(upload_id) from error
        except (ValueError, UnicodeDecodeError) as error:
            raise StoreError(f"corrupt info document {info_path}: {error}") from error
        try:
            info = UploadInfo.from_json(document)
        except ValueError as error:
            raise StoreError(f"corrupt info document {info_path}: {error}") from error
        info.offset = size if info.length is None else min(size, info.length)
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
        return await self._run(self._read_info_sync, upload_id)

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
        path = self._data_path(info.id)
        try:
            fd = await self._run(os.open, path, os.O_WRONLY)
        except FileNotFoundError as error:
            raise UploadNotFound(info.id) from error
        room = None if info.length is None else info.length - info.offset
        # getattr first: isinstance() against a runtime-checkable Protocol walks the
        # protocol's members on every call (measurable per PATCH).
        if getattr(chunks, "can_splice", False) and isinstance(chunks, FileSpliceSource):
            try:
                return await self._write_spliced(fd, info.offset, room, chunks)
            finally:
                # splice_to returns only once its bytes are in the file.
                self._close_later(fd)
        writer = _OrderedWriter(self._pool, fd, info.offset)
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
            in_flight = writer.in_flight
            if in_flight is not None:
                # Only after a second cancellation: close once the thread is done.
                in_flight.add_done_callback(lambda _: os.close(fd))
            else:
                # Every write is done (write_rest waited for it).
                self._close_later(fd)
        return writer.position

    async def _write_spliced(self, fd: int, offset: int, room: int | None, body: FileSpliceSource) -> int:
        """``write`` for a body that moves itself into the file (``splice_to``, no
        bytes objects on the event loop). ``splice_to`` returns only once what it
        moved is in the file, so the offset counts only written bytes."""
        position = offset
        while room is None or room > 0:
            step = SPLICE_STEP_SIZE if room is None else min(room, SPLICE_STEP_SIZE)
            try:
                moved = await body.splice_to(fd, position, step, executor=self._pool)
            except OSError as error:
                raise StoreUnavailable(f"cannot write upload data: {error}") from error
            if not moved:
                break
            position += moved
            if room is not None:
                room -= moved
        return position

    async def finish(self, info: UploadInfo) -> UploadInfo:
        """Mark the upload finished in its info document (idempotent)."""
        if not info.finished:
            info.finished = True
            await self._run(self._write_info_sync, info)
        return info

    async def close(self) -> None:
        """Stop the thread pool once running file operations are done."""
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._pool.shutdown, wait=True))

    # --- SupportsTermination --------------------------------------------------------

    async def terminate(self, info: UploadInfo) -> None:
        """Delete the info document, then the data (a crash in between leaves an
        orphan data file that no request can reach)."""
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
