"""The embedded file store: one data file and one JSON info file per upload.

``<dir>/<id>`` holds the bytes, ``<dir>/<id>.info`` the ``UploadInfo`` document,
replaced atomically (temp file, fsync, ``os.replace``) so a crash leaves the old or the
new document, never half of one. The offset is never stored: it is the data file's
size (capped at the length), so bytes that reached the disk always count and a crash
can never make the recorded offset disagree with the data.

All file I/O runs on a small dedicated thread pool, never on the event loop. Writes
are coalesced into 1 MiB ``pwrite`` calls: one executor round trip per MiB instead of
one per received chunk, and the next MiB is received while the previous one is
written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from tusd_py.stores.base import (
    StoreError,
    StoreUnavailable,
    UploadInfo,
    UploadNotFound,
    is_valid_upload_id,
)

T = TypeVar("T")

WRITE_BATCH_SIZE = 1024 * 1024
"""Bytes gathered before one write: large enough that the executor hop is noise,
small enough that a stop loses no time and memory stays bounded (two batches)."""
SPARE_BUFFERS = 8
"""Batch buffers kept for reuse between writes (8 MiB): enough for four uploads at
once without allocating, bounded so idle memory stays small."""
READ_CHUNK_SIZE = 256 * 1024
"""Bytes per chunk of a download."""
IO_THREADS = 4
"""Threads of the store's pool: a few concurrent uploads' disk writes in flight."""


class FileStore:
    """Uploads as files in ``directory`` (created when missing).

    Implements ``Store``, ``SupportsTermination``, ``SupportsDeferredLength`` and
    ``SupportsDownload``.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as error:
            raise StoreUnavailable(f"cannot create store directory {self.directory}: {error}") from error
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="tusd-file")
        self._spare_buffers: list[bytearray] = []

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
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(function, *args))

    # --- info documents ---------------------------------------------------------------

    def _write_info_sync(self, info: UploadInfo) -> None:
        path = self._info_path(info.id)
        temp = f"{path}.tmp-{secrets.token_hex(4)}"
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
        fd = os.open(self._data_path(info.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        self._write_info_sync(info)

    async def get_info(self, upload_id: str) -> UploadInfo:
        """The stored info with ``offset`` = size of the data file (capped at length)."""
        return await self._run(self._read_info_sync, upload_id)

    async def write(self, info: UploadInfo, chunks: AsyncIterable[bytes]) -> int:
        """Write ``chunks`` at ``info.offset``; return the new offset.

        Every chunk received is written before this returns, also when ``chunks``
        raises (the error is re-raised after the bytes are on disk). Chunks are copied
        into two preallocated batch buffers: one is filled on the event loop while the
        other is written by a pool thread. Copying costs less than it saves: each
        received chunk is freed at once, so the allocator hands the same hot memory to
        the next one, instead of a batch of chunks held alive and then freed together
        (measured: fresh pages cost more CPU than the copy).
        """
        path = self._data_path(info.id)
        try:
            fd = await self._run(os.open, path, os.O_WRONLY)
        except FileNotFoundError as error:
            raise UploadNotFound(info.id) from error
        loop = asyncio.get_running_loop()
        buffers = [self._take_buffer(), self._take_buffer()]
        current = buffers[0]
        filled = 0
        position = info.offset
        room = None if info.length is None else info.length - info.offset
        pending: asyncio.Future[None] | None = None

        def submit() -> asyncio.Future[None]:
            nonlocal current, filled, position
            future = loop.run_in_executor(self._pool, _pwrite_all, fd, memoryview(current)[:filled], position)
            position += filled
            current = buffers[1] if current is buffers[0] else buffers[0]
            filled = 0
            return future

        try:
            try:
                async for chunk in chunks:
                    view = memoryview(chunk)
                    if room is not None:
                        # The handler bounds the body; a store never writes past the length.
                        view = view[:room]
                        room -= len(view)
                    while view:
                        count = min(len(view), WRITE_BATCH_SIZE - filled)
                        current[filled : filled + count] = view[:count]
                        filled += count
                        view = view[count:]
                        if filled == WRITE_BATCH_SIZE:
                            if pending is not None:
                                await _wait_uncancellable(pending)
                            pending = submit()
            finally:
                # Whatever happened to the iterator, what was received goes to disk.
                if pending is not None:
                    await _wait_uncancellable(pending)
                    pending = None
                if filled:
                    pending = submit()
                    await _wait_uncancellable(pending)
                    pending = None
        finally:
            if pending is not None and not pending.done():
                # Cancelled while a write was in flight: close when the thread is done,
                # and let the buffers go to the garbage collector.
                pending.add_done_callback(lambda _: os.close(fd))
            else:
                self._spare_buffers.extend(buffers[: max(0, SPARE_BUFFERS - len(self._spare_buffers))])
                await _wait_uncancellable(self._run(os.close, fd))
        return position

    def _take_buffer(self) -> bytearray:
        return self._spare_buffers.pop() if self._spare_buffers else bytearray(WRITE_BATCH_SIZE)

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
