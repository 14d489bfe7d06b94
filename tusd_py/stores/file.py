"""The embedded file store: one data file and one JSON info file per upload.

``<dir>/<id>`` holds the bytes, ``<dir>/<id>.info`` the ``UploadInfo`` document,
replaced atomically (temp file, fsync, ``os.replace``) so a crash leaves the old or the
new document, never half of one. The offset is never stored: it is the data file's
size (capped at the length; no data file yet is 0), so bytes that reached the disk
always count and a crash can never make the recorded offset disagree with the data.

Creating an upload makes one file, its info document (``O_EXCL``, written and synced
before the upload is announced); the data file appears with the first byte written.
Each new inode is the dear part of a creation (on ext4 without a journal, hundreds of µs
once many files were deleted), and most of a POST's time. A creation that a crash cut
short leaves an empty info document: ``get`` treats it as no upload and
``remove_orphans`` removes it.

All file I/O runs on a small dedicated thread pool, never on the event loop
(``file_io`` holds the low-level parts). A body that can copy itself into a file
(``UploadBody.copy_into``: socket to file inside the kernel) does so; any other is
iterated and written in ordered batches. An upload's data file stays open between its
PATCHes (``file_io.OpenFiles``), so a PATCH costs two hand-offs to the pool (read the
info, write the body), not four.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Container, Sequence
from typing import Any, TypeVar

from tusd_py.lockers.base import LockGeneration
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
from tusd_py.stores.file_io import (
    FileIdentity,
    OpenFile,
    OpenFiles,
    OrderedWriter,
    copy_range,
    log_close_error,
    open_for_writing,
    run_on,
    unlink_quietly,
    wait_uncancellable,
)
from tusd_py.stores.kept import KeptStates

T = TypeVar("T")

COPY_INTO_STEP_SIZE = 16 * 1024 * 1024
"""Bytes per ``copy_into`` call when the body can copy itself into the file: each call
is one hop to a pool thread; between calls the progress (``yielded``) is updated."""
READ_CHUNK_SIZE = 256 * 1024
"""Bytes per chunk of a download."""
IO_THREADS = 8
"""Threads of the store's pool: concurrent uploads' disk writes in flight. A create
waits for its fsync (about 1 ms here) mostly off the CPU, so POSTs need threads to
overlap those waits: 8 threads create 4,650 uploads/s against 3,630/s with 4 (16:
4,800/s); each idle thread costs only its stack."""
INFO_CACHE_SIZE = 4096
"""Parsed info documents kept (LRU), each valid while a stat of its file still matches:
a HEAD or PATCH of an unchanged upload skips the open, read and JSON parse."""
COPY_STEP_SIZE = 64 * 1024 * 1024
"""Bytes copied per executor call when concatenating: long enough to amortize the hop,
short enough that concurrent uploads' writes get a thread in between."""

_TEMP_MARK = ".tmp-"
"""Temporary files are ``<id>.info.tmp-<hex>`` and ``<id>.tmp-<hex>``."""

log = logging.getLogger("tusd_py.stores.file")


class _Directory:
    """The store's directory as its uploads use it: paths, the thread pool, info
    documents and the data files kept open. Shared by ``FileStore`` and its
    ``FileUpload`` handles."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as error:
            raise StoreUnavailable(f"cannot create store directory {self.path}: {error}") from error
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="tusd-file")
        self.open_files = OpenFiles(self._close_later)
        self.kept: KeptStates[tuple[UploadInfo, FileIdentity | None]] = KeptStates()
        """Each upload's info (offset included) and data file as this instance's last
        hold of its lock left them (``kept``); used on the event loop only."""
        self._info_cache: collections.OrderedDict[str, tuple[_StatKey, UploadInfo]] = collections.OrderedDict()
        self._info_cache_lock = threading.Lock()
        """The pool's threads share the cache."""

    def data_path(self, upload_id: str) -> str:
        # Defence in depth: the handler validated the id already, but an id that could
        # name another path must never reach the file system from any caller.
        if not is_valid_upload_id(upload_id):
            raise UploadNotFound(upload_id)
        return os.path.join(self.path, upload_id)

    def info_path(self, upload_id: str) -> str:
        return self.data_path(upload_id) + ".info"

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await run_on(self.pool, function, *args)

    def _close_later(self, fd: int) -> None:
        """Close ``fd`` on the pool without waiting for it: closing a file we only
        wrote with ``pwrite`` (no fsync) reports nothing the upload depends on, and
        the request saves a round trip to a pool thread. Errors are logged. Falls back
        to closing here when the pool is shut down."""
        try:
            future = self.pool.submit(os.close, fd)
        except RuntimeError:  # pool shut down (store closing)
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        future.add_done_callback(log_close_error)

    def create_info_sync(self, info: UploadInfo) -> None:
        """Write the info document of a new upload in place; ``UploadExists`` when the
        id is taken, by an upload or by an orphan data file not yet removed (whose
        bytes would count as the new upload's)."""
        path = self.info_path(info.id)
        if os.path.lexists(self.data_path(info.id)):
            raise UploadExists(info.id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError as error:  # a pre-create hook chose an id in use
            raise UploadExists(info.id) from error
        try:
            try:
                _write_document(fd, info)
            finally:
                os.close(fd)
        except BaseException:
            unlink_quietly(path)
            raise

    def write_info_sync(self, info: UploadInfo) -> None:
        """Replace the info document of an existing upload atomically."""
        path = self.info_path(info.id)
        temp = f"{path}{_TEMP_MARK}{secrets.token_hex(4)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_document(fd, info)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            unlink_quietly(temp)
            raise

    def read_info_sync(self, upload_id: str) -> tuple[UploadInfo, FileIdentity | None]:
        """The info document with ``offset`` = size of the data file (capped at the
        length), and which data file that is. The parsed document is reused while a
        stat of its file matches (every change replaces the file: a new inode)."""
        info_path = self.info_path(upload_id)
        try:
            info = self._cached_info(upload_id, info_path)
        except FileNotFoundError as error:
            with self._info_cache_lock:
                self._info_cache.pop(upload_id, None)
            raise UploadNotFound(upload_id) from error
        try:
            data = os.stat(self.data_path(upload_id))
        except FileNotFoundError:
            return info, None  # nothing written yet
        size = data.st_size
        offset = size if info.length is None else min(size, info.length)
        return info.with_offset(offset), FileIdentity(data.st_dev, data.st_ino)


    def _cached_info(self, upload_id: str, info_path: str) -> UploadInfo:
        cache, lock = self._info_cache, self._info_cache_lock
        with lock:
            cached = cache.get(upload_id)
        if cached is not None and cached[0] == _stat_key(os.stat(info_path)):
            with lock:
                if upload_id in cache:
                    cache.move_to_end(upload_id)
            return cached[1]
        with open(info_path, "rb", buffering=0) as file:
            # The key of the file read, not of the path: a document replaced meanwhile
            # is read again next time.
            key = _stat_key(os.fstat(file.fileno()))
            if key[3] == 0:  # a creation cut short by a crash: it was never announced
                raise FileNotFoundError(info_path)
            try:
                info = UploadInfo.from_json(json.loads(file.read()))
            except (ValueError, UnicodeDecodeError) as error:
                raise StoreError(f"corrupt info document {info_path}: {error}") from error
        with lock:
            cache[upload_id] = (key, info)
            cache.move_to_end(upload_id)
            if len(cache) > INFO_CACHE_SIZE:
                cache.popitem(last=False)
        return info


class _Stamps:
    """Now in ns, strictly after every stamp this process gave before."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last


_unique_stamp = _Stamps().next


def _write_document(fd: int, info: UploadInfo) -> None:
    """Write ``info`` as the whole content of the new file ``fd``, then sync it."""
    data = memoryview(json.dumps(info.to_json(), separators=(",", ":")).encode("utf-8"))
    while data:
        data = data[os.write(fd, data):]
    # A unique mtime, to the nanosecond: the file system's own stamp is as coarse as
    # the kernel tick, and a freed inode may be reused by the next document, which then
    # must not look like the one _cached_info parsed.
    stamp = _unique_stamp()
    os.utime(fd, ns=(stamp, stamp))
    os.fsync(fd)


_StatKey = tuple[int, int, int, int]
"""Inode, mtime and ctime (ns), size of an info document."""


def _stat_key(stat: os.stat_result) -> _StatKey:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)


class FileUpload:
    """One upload of a ``FileStore``, open while the caller holds its lock (see
    ``stores.base.Upload``). It remembers which data file it found, so a kept
    descriptor is reused only for that very file. After every call it leaves its state
    for the next hold of the lock ``generation`` it was opened with (``keep``), or
    drops it when the call failed (``kept``)."""

    __slots__ = ("_directory", "_info", "_identity", "_generation")

    def __init__(
        self, directory: _Directory, info: UploadInfo, identity: FileIdentity | None,
        generation: LockGeneration | None = None,
    ) -> None:
        self._directory = directory
        self._info = info
        self._identity = identity
        self._generation = generation

    def keep(self) -> None:
        """Leave the current state for the next hold of the lock."""
        self._directory.kept.keep(self._info.id, self._generation, (self._info, self._identity))

    @property
    def info(self) -> UploadInfo:
        return self._info

    async def write(self, offset: int, body: UploadBody) -> UploadInfo:
        """Write ``body`` at ``offset``; the new snapshot.

        Every byte received is written before this returns, also when ``body`` raises
        or the task is cancelled (the error is re-raised after the bytes are on disk,
        and ``info`` counts them). One write is in flight at a time, so the bytes
        reach the file in order and its size (the offset) never counts a gap; after a
        failed write nothing more is written and the error is raised.
        """
        with self._directory.kept.keeping(self._info.id, self.keep):
            return await self._write(offset, body)

    async def _write(self, offset: int, body: UploadBody) -> UploadInfo:
        info = self._info
        if offset != info.offset:
            raise StoreError(f"upload {info.id}: write at {offset}, but {info.offset} bytes are stored")
        entry = await self._open_data_file()
        position = offset
        try:
            position, ended = await self._copy_into(entry.fd, offset, info.length, body)
            if not ended:
                writer = OrderedWriter(self._directory.pool, entry.fd, position)
                try:
                    await writer.write_all(body, None if info.length is None else info.length - position)
                finally:
                    position = writer.position
                    if writer.in_flight is not None:
                        # Only after a second cancellation: the descriptor may be
                        # closed only once that thread is done with it.
                        entry.in_flight = writer.in_flight
        finally:
            self._info = info.with_offset(position)
            # Kept for the next PATCH unless the upload is complete.
            self._directory.open_files.check_in(entry, keep=info.length is None or position < info.length)
        return self._info

    async def _open_data_file(self) -> OpenFile:
        """The upload's data file, open for writing: the one kept from an earlier
        PATCH when it is still the file ``FileStore.get`` found (same device and
        inode), else newly opened, made when ``get`` found none (nothing written yet)."""
        upload_id = self._info.id
        open_files = self._directory.open_files
        entry = open_files.check_out(upload_id, self._identity)
        if entry is not None:
            return entry
        path = self._directory.data_path(upload_id)
        try:
            fd, opened = await self._directory.run(open_for_writing, path, self._identity is None)
        except FileNotFoundError as error:
            raise UploadNotFound(upload_id) from error
        self._identity = opened
        return open_files.add(upload_id, fd, opened)

    async def _copy_into(self, fd: int, offset: int, length: int | None, body: UploadBody) -> tuple[int, bool]:
        """Let ``body`` copy itself into the file (no bytes objects on the event
        loop) for as long as it can; the offset after the bytes copied, and whether
        the body ended (else iterate the rest of it). ``copy_into`` returns only once
        what it moved is in the file, so the offset counts only written bytes."""
        position = offset
        pool = self._directory.pool
        while length is None or position < length:
            step = COPY_INTO_STEP_SIZE if length is None else min(length - position, COPY_INTO_STEP_SIZE)
            try:
                moved = await body.copy_into(FileTarget(fd, position, pool), step)
            except OSError as error:
                raise StoreUnavailable(f"cannot write upload data: {error}") from error
            if moved is None:
                return position, False
            if not moved:
                break
            position += moved
        return position, True

    async def finish(self) -> UploadInfo:
        """Mark the upload finished in its info document (idempotent)."""
        self._directory.open_files.forget(self._info.id)
        with self._directory.kept.keeping(self._info.id, self.keep):
            if not self._info.finished:
                finished = dataclasses.replace(self._info, finished=True)
                await self._directory.run(self._directory.write_info_sync, finished)
                self._info = finished
        return self._info

    async def declare_length(self, length: int) -> UploadInfo:
        """Persist the now-known length."""
        with self._directory.kept.keeping(self._info.id, self.keep):
            declared = dataclasses.replace(self._info, length=length)
            await self._directory.run(self._directory.write_info_sync, declared)
            self._info = declared
        return declared

    async def terminate(self) -> None:
        """Delete the info document, then the data (a crash in between leaves an
        orphan data file that no request can reach)."""
        self._directory.kept.forget(self._info.id)
        self._directory.open_files.forget(self._info.id)
        await self._directory.run(self._terminate_sync)

    def _terminate_sync(self) -> None:
        upload_id = self._info.id
        found = False
        for path in (self._directory.info_path(upload_id), self._directory.data_path(upload_id)):
            try:
                os.unlink(path)
                found = True
            except FileNotFoundError:
                pass
        if not found:
            raise UploadNotFound(upload_id)

    async def read(self, start: int, stop: int) -> AsyncIterator[bytes]:
        """Stream bytes ``[start, stop)`` in chunks of ``READ_CHUNK_SIZE``."""
        if start >= stop:
            return  # also when nothing was written: no data file to open
        upload_id = self._info.id
        run = self._directory.run
        try:
            fd = await run(os.open, self._directory.data_path(upload_id), os.O_RDONLY)
        except FileNotFoundError as error:
            raise UploadNotFound(upload_id) from error
        try:
            position = start
            while position < stop:
                chunk = await run(os.pread, fd, min(READ_CHUNK_SIZE, stop - position), position)
                if not chunk:
                    raise StoreError(f"upload {upload_id} is shorter than expected (truncated on disk?)")
                position += len(chunk)
                yield chunk
        finally:
            await wait_uncancellable(run(os.close, fd))


class FileStore:
    """Uploads as files in ``directory`` (created when missing).

    Implements ``Store`` (handles are ``FileUpload``), ``SupportsConcatenation`` and
    ``SupportsExpiration``.
    """

    def __init__(self, directory: str) -> None:
        self._directory = _Directory(directory)
        self.directory = self._directory.path

    # --- Store ------------------------------------------------------------------------

    async def create(self, info: UploadInfo, *, generation: LockGeneration | None = None) -> FileUpload:
        """Create the info document; the data file follows with the first bytes.
        ``generation``: the lock's, under which the new upload's state is kept."""
        info = dataclasses.replace(info, offset=0)
        await self._directory.run(self._directory.create_info_sync, info)
        upload = FileUpload(self._directory, info, None, generation)
        upload.keep()
        return upload

    async def get(self, upload_id: str, *, generation: LockGeneration | None = None) -> FileUpload:
        """The upload with ``offset`` = size of the data file (capped at length): as
        this instance's last hold of its lock left it, when the lock's ``generation``
        vouches that nobody held it since (``kept``; no thread hand-off), else read
        from the files."""
        kept = self._directory.kept.take(upload_id, generation)
        if kept is None:
            try:
                kept = await self._directory.run(self._directory.read_info_sync, upload_id)
            except UploadNotFound:
                self._directory.open_files.forget(upload_id)  # deleted, maybe by another instance
                raise
        upload = FileUpload(self._directory, kept[0], kept[1], generation)
        if generation is not None:  # a look without the lock leaves the last hold's state
            upload.keep()
        return upload

    async def close(self) -> None:
        """Close the kept data files and stop the thread pool once running file
        operations are done."""
        self._directory.open_files.forget_all()
        pool = self._directory.pool
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(pool.shutdown, wait=True))

    # --- SupportsConcatenation ------------------------------------------------------

    async def concatenate(self, final: UploadInfo, partials: Sequence[UploadInfo]) -> UploadInfo:
        """Stream the partials' data into a temporary file, link it into place as the
        final upload's data, then write its info document (finished). A crash before
        the link leaves a temporary file and a crash before the info document an
        orphan data file, both invisible to ``get`` and removed by
        ``remove_orphans``."""
        assert final.length is not None
        run = self._directory.run
        data_path = self._directory.data_path(final.id)
        temp = f"{data_path}{_TEMP_MARK}{secrets.token_hex(4)}"
        try:
            destination = await run(os.open, temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                position = 0
                for partial in partials:
                    assert partial.length is not None
                    await self._copy_data(partial.id, destination, position, partial.length)
                    position += partial.length
                await run(os.fsync, destination)
            finally:
                await wait_uncancellable(run(os.close, destination))
            # link() refuses an existing name, like create()'s O_EXCL.
            try:
                await run(os.link, temp, data_path)
            except FileExistsError as error:
                raise UploadExists(final.id) from error
        finally:
            await wait_uncancellable(run(unlink_quietly, temp))
        finished = dataclasses.replace(final, finished=True, offset=final.length)
        await run(self._directory.write_info_sync, finished)
        return finished

    async def _copy_data(self, upload_id: str, destination: int, position: int, count: int) -> None:
        """Copy the first ``count`` bytes of upload ``upload_id`` to ``position`` of
        ``destination``, one executor call per ``COPY_STEP_SIZE`` so that a big copy
        never holds a pool thread for long."""
        if count == 0:
            return  # an empty partial may have no data file
        run = self._directory.run
        try:
            source = await run(os.open, self._directory.data_path(upload_id), os.O_RDONLY)
        except FileNotFoundError as error:
            raise UploadNotFound(upload_id) from error
        try:
            copied = 0
            while copied < count:
                step = await run(
                    copy_range, source, copied, destination, position + copied, min(COPY_STEP_SIZE, count - copied)
                )
                if step == 0:
                    raise StoreError(f"upload {upload_id} is shorter than its length (truncated on disk?)")
                copied += step
        finally:
            await wait_uncancellable(run(os.close, source))

    # --- SupportsExpiration ---------------------------------------------------------

    async def list_uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload with an info document (unreadable ones are logged and
        skipped: one corrupt document must not stop a cleanup)."""
        names = await self._directory.run(os.listdir, self.directory)
        for name in sorted(names):
            upload_id = name.removesuffix(".info")
            if upload_id == name or not is_valid_upload_id(upload_id):
                continue
            try:
                yield (await self.get(upload_id)).info
            except UploadNotFound:
                continue  # terminated meanwhile
            except StoreError as error:
                log.warning("skipping upload %s: %s", upload_id, error)

    async def remove_orphans(self, created_before: float) -> int:
        """Remove data files without an info document, empty info documents (a
        creation a crash cut short) and temporary files (of info documents and
        concatenations) last modified before ``created_before``."""
        return await self._directory.run(self._remove_orphans_sync, created_before)

    def _remove_orphans_sync(self, created_before: float) -> int:
        removed = 0
        with os.scandir(self.directory) as entries:
            names = {entry.name: entry for entry in entries if entry.is_file(follow_symlinks=False)}
        for name, entry in names.items():
            upload_id, kind = _orphan_candidate(name, names)
            if kind is None or not is_valid_upload_id(upload_id):
                continue  # never an orphan, or not ours
            try:
                stat = entry.stat(follow_symlinks=False)
                if stat.st_mtime >= created_before:
                    continue
                if kind == "info" and stat.st_size > 0:
                    continue  # a written document: an upload
                if kind == "data" and os.path.exists(self._directory.info_path(upload_id)):
                    continue  # created meanwhile
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            log.info("removed orphan %s", name)
            removed += 1
        return removed


def _orphan_candidate(name: str, names: Container[str]) -> tuple[str, str | None]:
    """The upload a file of the store's directory belongs to, and what it may be:
    ``"temp"`` (a temporary file: an orphan once old), ``"info"`` (an info document:
    one if empty, a creation a crash cut short) or ``"data"`` (a data file: one without
    its info document); ``None``: never an orphan (a data file with its document)."""
    upload_id, mark, _ = name.partition(_TEMP_MARK)
    if mark:
        return upload_id.removesuffix(".info"), "temp"
    if name.endswith(".info"):
        return name.removesuffix(".info"), "info"
    return name, None if f"{name}.info" in names else "data"
