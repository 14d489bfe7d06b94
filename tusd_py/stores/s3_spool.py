"""The spool ring of one PATCH: bounded slots holding received bytes until S3 has them.

A slot holds the new bytes of one part while they arrive and until its UploadPart
succeeds (or, for the last partial part, until its tail segment is stored). The ring
has ``max_buffered_parts`` slots; ``SpoolRing.acquire`` waits while all are taken, and
since the store pulls the next body chunk only after it has a slot for it, a full ring
stops reading the request body: that is the backpressure that pauses the client's
socket.

With the file spool (the default) a slot is held in memory while the process's
``SpoolBudget`` (``store.s3.spool_memory``) has room for a whole part, so a few uploads
at once never pay the file's write and read back (a third of the server's CPU per GiB
on one 512 MiB upload over TLS). Past the budget, file slots keep only a small write
buffer in memory and the rest in an anonymous temporary file (unlinked at once, so
nothing is left behind on a crash); file I/O runs in a worker thread, never on the
event loop. Given a ``hasher`` factory,
a file slot also hashes the bytes in that thread as it writes them (the part's
integrity checksum then costs no pass of its own, and covers the spool file's round
trip too). Given ``payload_sha256``, it also computes each part's SHA-256 there, which
SigV4 signs (plain http): the part can then be sent in pieces while it is read, like an
unsigned one, instead of whole. Memory slots keep the chunks as received.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, Protocol, TypeVar

from tusd_py.stores.s3_client import StreamedBody

T = TypeVar("T")

MEMORY_HEAD_SIZE = 1024 * 1024
"""The first slot of a PATCH keeps its first bytes in memory while they are no more
than this: a body that ends within them (a 1 MiB PATCH's tail) is read back from
memory, never written to the file and read again. Later slots hold the bytes of a
large body, which would only wait there for the next chunk."""
FILE_FLUSH_SIZE = 512 * 1024
"""Past its head, a file slot writes to disk once this many bytes are pending,
together with the chunk that brought them there: a slot then holds at most this much
(and, during the write, the chunk) in memory, not a batch plus the next chunk, and
small body chunks still cost one thread hop per batch, not one each. 16 uploads
receiving at once: at most 8 MiB pending in total."""
STREAM_PIECE_SIZE = 512 * 1024
"""A part streamed from its spool file (``FileSlot.streamed``) is read in pieces of
this size: the memory of a part in flight, and one thread hop per piece. 16 uploads
at once: 7 MiB lower peak than 1 MiB pieces, for no CPU that the benchmark shows;
256 KiB pieces cost 10% more CPU per GiB."""
WRITEV_MAX_BUFFERS = 512
"""Chunks per ``os.writev`` call (well below Linux's IOV_MAX of 1024)."""


Chunk = bytes | memoryview
"""Bytes as a slot takes them: a view where the writer cut a body chunk at a part
boundary (not copied)."""


def _owned(chunk: Chunk) -> bytes:
    """``chunk`` as bytes of its own (a view is copied, so it no longer holds its chunk)."""
    return bytes(chunk) if isinstance(chunk, memoryview) else chunk


class Hasher(Protocol):
    """What a slot needs of a hash object (``hashlib.md5()`` is one)."""

    def update(self, data: Chunk, /) -> None: ...

    def digest(self) -> bytes: ...


class SpoolSlot(Protocol):
    """Bytes of one part (or leftover) while they wait for S3."""

    @property
    def size(self) -> int:
        """Bytes appended so far."""
        ...

    async def append(self, data: Chunk) -> None:
        """Add ``data`` at the end (not modified while the slot may use it)."""
        ...

    @property
    def in_memory(self) -> int:
        """Bytes of it held in memory (not, or not only, in a file)."""
        ...

    async def spill(self) -> None:
        """Move what is held in memory to the slot's file, if it has one: a complete
        part waiting for its upload then holds no body bytes in memory."""
        ...

    async def read_chunks(self) -> list[bytes]:
        """Everything appended, as a list of byte strings (joined by the caller)."""
        ...

    async def streamed(self) -> StreamedBody | None:
        """Everything appended, as a body read in pieces while it is sent; None when
        the bytes are not all where the slot can read them back piece by piece."""
        ...

    def digest(self) -> bytes | None:
        """After ``read_chunks`` or ``streamed``: the digest of everything appended,
        when the slot hashed its bytes on the way in; None when it did not (the caller
        hashes)."""
        ...

    async def close(self) -> None:
        """Free the slot's memory or file."""
        ...


class SpoolBudget:
    """Bytes the whole process may hold in memory slots of file-spool rings: a slot
    takes a whole part's worth of it when it is made and gives it back when closed."""

    def __init__(self, size: int) -> None:
        self._left = size

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes if that many are left."""
        if size > self._left:
            return False
        self._left -= size
        return True

    def give(self, size: int) -> None:
        self._left += size


class MemorySlot:
    """A slot in memory; ``reserved`` bytes of ``budget`` go back to it on close (or,
    should a cancelled writer never close it, when the slot is collected)."""

    def __init__(self, budget: SpoolBudget | None = None, reserved: int = 0) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._give_back = weakref.finalize(self, budget.give, reserved) if budget is not None else None

    @property
    def size(self) -> int:
        return self._size

    @property
    def in_memory(self) -> int:
        return self._size

    async def append(self, data: Chunk) -> None:
        self._chunks.append(_owned(data))
        self._size += len(data)

    async def spill(self) -> None:
        pass  # a memory slot has no file

    async def read_chunks(self) -> list[bytes]:
        return list(self._chunks)

    async def streamed(self) -> StreamedBody | None:
        return None  # already in memory: read_chunks costs no copy

    def digest(self) -> bytes | None:
        return None

    async def close(self) -> None:
        self._chunks.clear()
        if self._give_back is not None:
            self._give_back()  # once: a finalizer runs at most once


class FileSlot:
    """A slot in an anonymous temporary file in ``directory`` (system temp if empty);
    with ``hasher`` (a factory such as ``hashlib.md5``), every byte written to the file
    is hashed in the same worker-thread call that writes it. ``keep_head``: keep the
    first ``MEMORY_HEAD_SIZE`` bytes in memory until more come."""

    def __init__(
        self, directory: str = "", hasher: Callable[[], Hasher] | None = None, payload_sha256: bool = False,
        keep_head: bool = True,
    ) -> None:
        self._directory = directory or None
        self._keep_head = keep_head
        self._file: IO[bytes] | None = None
        self._pending: list[Chunk] = []
        self._pending_size = 0
        self._size = 0
        self._busy: asyncio.Future[Any] | None = None
        self._hash = hasher() if hasher is not None else None
        self._sha256 = hashlib.sha256() if payload_sha256 else None

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

    @property
    def in_memory(self) -> int:
        return self._pending_size

    async def append(self, data: Chunk) -> None:
        self._pending.append(data)
        self._pending_size += len(data)
        self._size += len(data)
        # The head stays in memory (MEMORY_HEAD_SIZE); past it, a batch is written
        # with the chunk that completed it, so nothing is left pending after a large
        # chunk (holding it until the next one came would keep a chunk per upload).
        past_head = not self._keep_head or self._file is not None or self._size > MEMORY_HEAD_SIZE
        if past_head and self._pending_size >= FILE_FLUSH_SIZE:
            await self._flush()
        elif isinstance(data, memoryview) and data.nbytes < memoryview(data.obj).nbytes:
            # A piece cut from a body chunk, kept: a copy of it, so that the whole
            # chunk is not held until this slot's bytes are written.
            self._pending[-1] = bytes(data)

    async def spill(self) -> None:
        # Without a file all the bytes are in memory (at most the head, or less than
        # a flush batch: a short final part), and stay there: read back from memory.
        if self._file is not None:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        chunks = self._pending
        self._pending = []
        self._pending_size = 0
        await self._in_thread(lambda: self._write(chunks))

    def _write(self, chunks: list[Chunk]) -> None:
        """Append ``chunks`` to the file with ``writev`` (no joined copy) and hash them."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="tusd-py-spool-")
        fd = self._file.fileno()  # only raw fd I/O on this file: its buffer stays empty
        if self._hash is not None:
            for chunk in chunks:
                self._hash.update(chunk)
        if self._sha256 is not None:
            for chunk in chunks:
                self._sha256.update(chunk)
        for first in range(0, len(chunks), WRITEV_MAX_BUFFERS):
            batch = chunks[first:first + WRITEV_MAX_BUFFERS]
            while batch:
                written = os.writev(fd, batch)
                while batch and written >= len(batch[0]):  # drop what was written in full
                    written -= len(batch[0])
                    batch.pop(0)
                if written:  # a short write ended inside this buffer
                    batch[0] = memoryview(batch[0])[written:]

    async def read_chunks(self) -> list[bytes]:
        if self._file is None:  # the head only: in memory
            return [_owned(chunk) for chunk in self._pending]
        await self._flush()
        return [await self._in_thread(self._read_all)]

    async def streamed(self) -> StreamedBody | None:
        if self._file is None:
            return None
        await self._flush()
        sha256 = self._sha256.hexdigest() if self._sha256 is not None else None
        return _SpoolFileBody(self, sha256)

    def digest(self) -> bytes | None:
        if self._hash is None or self._file is None or self._pending:
            return None  # bytes that never went through the file were not hashed
        return self._hash.digest()

    def _read_all(self) -> bytes:
        return self._read(0, self._size)

    def _read(self, start: int, stop: int) -> bytes:
        assert self._file is not None
        pieces: list[bytes] = []
        position = start
        while position < stop:  # one pread returns at most ~2 GiB on Linux
            piece = os.pread(self._file.fileno(), stop - position, position)
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


class _SpoolFileBody:
    """A file slot's bytes (all in its file) as a ``StreamedBody``: read back in
    ``STREAM_PIECE_SIZE`` pieces, each in a worker thread."""

    def __init__(self, slot: FileSlot, sha256: str | None) -> None:
        self._slot = slot
        self._size = slot.size
        self._sha256 = sha256

    @property
    def sha256(self) -> str | None:
        return self._sha256

    def __len__(self) -> int:
        return self._size

    async def pieces(self) -> AsyncIterator[bytes]:
        slot = self._slot
        for start in range(0, self._size, STREAM_PIECE_SIZE):
            stop = min(start + STREAM_PIECE_SIZE, self._size)
            yield await slot._in_thread(functools.partial(slot._read, start, stop))

    async def read_all(self) -> bytes:
        return await self._slot._in_thread(self._slot._read_all)


class _CountedSlot:
    """A slot that reports its life to ``on_change``: +1 now, -1 when closed."""

    def __init__(self, inner: SpoolSlot, on_change: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_change: Callable[[int], None] | None = on_change
        on_change(1)

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def in_memory(self) -> int:
        return self._inner.in_memory

    async def append(self, data: Chunk) -> None:
        await self._inner.append(data)

    async def spill(self) -> None:
        await self._inner.spill()

    async def read_chunks(self) -> list[bytes]:
        return await self._inner.read_chunks()

    async def streamed(self) -> StreamedBody | None:
        return await self._inner.streamed()

    def digest(self) -> bytes | None:
        return self._inner.digest()

    async def close(self) -> None:
        on_change, self._on_change = self._on_change, None
        if on_change is not None:
            on_change(-1)
        await self._inner.close()


class SpoolRing:
    """At most ``slots`` slots in use at once; ``kind`` is "file" or "memory"; with
    "file", a slot is in memory while ``budget`` has ``slot_size`` bytes left.
    ``on_change`` (optional, e.g. a metrics gauge) hears +1 per new slot and -1 when
    a slot is closed. ``hasher`` (optional) makes file slots hash their bytes as they
    write them (``SpoolSlot.digest``); ``payload_sha256``, also with SHA-256 for SigV4
    (``StreamedBody.sha256``)."""

    def __init__(
        self, slots: int, kind: str = "file", directory: str = "", on_change: Callable[[int], None] | None = None,
        hasher: Callable[[], Hasher] | None = None, payload_sha256: bool = False,
        budget: SpoolBudget | None = None, slot_size: int = 0,
    ) -> None:
        self._free = asyncio.Semaphore(slots)
        self._budget = budget
        self._slot_size = slot_size
        self._kind = kind
        self._directory = directory
        self._on_change = on_change
        self._hasher = hasher
        self._payload_sha256 = payload_sha256
        self._first = True

    @property
    def full(self) -> bool:
        """Every slot is taken: ``acquire`` waits."""
        return self._free.locked()

    async def acquire(self) -> SpoolSlot:
        """A new empty slot; waits while every slot is taken (backpressure)."""
        await self._free.acquire()
        slot: SpoolSlot
        if self._kind != "file":
            slot = MemorySlot()
        elif self._budget is not None and self._budget.take(self._slot_size):
            slot = MemorySlot(self._budget, self._slot_size)
        else:
            slot = FileSlot(self._directory, self._hasher, self._payload_sha256, keep_head=self._first)
        self._first = False  # only a PATCH's first slot can hold all of a small body
        return slot if self._on_change is None else _CountedSlot(slot, self._on_change)

    def release(self) -> None:
        """Give a slot's place back (its bytes are in S3, or no longer needed)."""
        self._free.release()
