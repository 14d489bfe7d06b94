"""The spool ring of one PATCH: bounded slots holding received bytes until S3 has them.

A slot holds the new bytes of one part while they arrive and until its UploadPart
succeeds (or, for the last partial part, until its tail segment is stored). The ring
has ``max_buffered_parts`` slots; ``SpoolRing.acquire`` waits while all are taken, and
since the store pulls the next body chunk only after it has a slot for it, a full ring
stops reading the request body: that is the backpressure that pauses the client's
socket.

File slots (the default) keep only a small write buffer in memory and the rest in an
anonymous temporary file (unlinked at once, so nothing is left behind on a crash);
file I/O runs in a worker thread, never on the event loop. Memory slots keep the
chunks as received.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any, Protocol, TypeVar

T = TypeVar("T")

FILE_FLUSH_SIZE = 1024 * 1024
"""A file slot writes to disk in batches of about this many bytes: one thread hop per
MiB instead of one per (possibly tiny) body chunk."""


class SpoolSlot(Protocol):
    """Bytes of one part (or leftover) while they wait for S3."""

    @property
    def size(self) -> int:
        """Bytes appended so far."""
        ...

    async def append(self, data: bytes) -> None:
        """Add ``data`` at the end."""
        ...

    async def read_chunks(self) -> list[bytes]:
        """Everything appended, as a list of byte strings (joined by the caller)."""
        ...

    async def close(self) -> None:
        """Free the slot's memory or file."""
        ...


class MemorySlot:
    """A slot in memory."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    async def append(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)

    async def read_chunks(self) -> list[bytes]:
        return list(self._chunks)

    async def close(self) -> None:
        self._chunks.clear()


class FileSlot:
    """A slot in an anonymous temporary file in ``directory`` (system temp if empty)."""

    def __init__(self, directory: str = "") -> None:
        self._directory = directory or None
        self._file: IO[bytes] | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._size = 0
        self._busy: asyncio.Future[Any] | None = None

    async def _in_thread(self, function: Callable[[], T]) -> T:
        """Run file I/O in a worker thread. Shielded: a cancelled caller must not
        cancel I/O that is queued or running (a file created or closed "later" would
        leak); ``close`` waits for it instead."""
        future: asyncio.Future[T] = asyncio.ensure_future(asyncio.to_thread(function))
        self._busy = future
        return await asyncio.shield(future)

    @property
    def size(self) -> int:
        return self._size

    async def append(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        self._size += len(data)
        if self._pending_size >= FILE_FLUSH_SIZE:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        await self._in_thread(lambda: self._write(data))

    def _write(self, data: bytes) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="tusd-py-spool-")
        self._file.write(data)

    async def read_chunks(self) -> list[bytes]:
        if self._file is None:
            return list(self._pending)
        await self._flush()
        return [await self._in_thread(self._read_all)]

    def _read_all(self) -> bytes:
        assert self._file is not None
        self._file.flush()
        pieces: list[bytes] = []
        position = 0
        while position < self._size:  # one pread returns at most ~2 GiB on Linux
            piece = os.pread(self._file.fileno(), self._size - position, position)
            if not piece:
                raise OSError(f"spool file shorter than expected ({position} of {self._size} bytes)")
            pieces.append(piece)
            position += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def close(self) -> None:
        self._pending.clear()
        if self._busy is not None and not self._busy.done():
            await asyncio.wait([self._busy])
        if self._busy is not None and not self._busy.cancelled():
            self._busy.exception()  # seen; the caller that started it got it already
        if self._file is not None:
            file, self._file = self._file, None
            await self._in_thread(file.close)


class _CountedSlot:
    """A slot that reports its life to ``on_change``: +1 now, -1 when closed."""

    def __init__(self, inner: SpoolSlot, on_change: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_change: Callable[[int], None] | None = on_change
        on_change(1)

    @property
    def size(self) -> int:
        return self._inner.size

    async def append(self, data: bytes) -> None:
        await self._inner.append(data)

    async def read_chunks(self) -> list[bytes]:
        return await self._inner.read_chunks()

    async def close(self) -> None:
        on_change, self._on_change = self._on_change, None
        if on_change is not None:
            on_change(-1)
        await self._inner.close()


class SpoolRing:
    """At most ``slots`` slots in use at once; ``kind`` is "file" or "memory".
    ``on_change`` (optional, e.g. a metrics gauge) hears +1 per new slot and -1 when
    a slot is closed."""

    def __init__(
        self, slots: int, kind: str = "file", directory: str = "", on_change: Callable[[int], None] | None = None
    ) -> None:
        self._free = asyncio.Semaphore(slots)
        self._kind = kind
        self._directory = directory
        self._on_change = on_change

    async def acquire(self) -> SpoolSlot:
        """A new empty slot; waits while every slot is taken (backpressure)."""
        await self._free.acquire()
        slot: SpoolSlot = FileSlot(self._directory) if self._kind == "file" else MemorySlot()
        return slot if self._on_change is None else _CountedSlot(slot, self._on_change)

    def release(self) -> None:
        """Give a slot's place back (its bytes are in S3, or no longer needed)."""
        self._free.release()
