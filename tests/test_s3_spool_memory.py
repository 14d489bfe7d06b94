"""What a PATCH body holds in memory on its way into S3: a file slot keeps only its
head and a small batch, a body chunk cut at a part boundary is not copied, the
writer waits for a full ring holding no chunk, and a part streamed from its spool
file holds one piece at a time (16 uploads at once held ~40 MiB more before)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from tusd_py.stores import s3_spool
from tusd_py.stores.s3_botocore import _StreamedPayload
from tusd_py.stores.s3_client import PartEntry
from tusd_py.stores.s3_parts import Layout, Segment
from tusd_py.stores.s3_spool import Chunk, FileSlot, MemorySlot, SpoolRing, SpoolSlot
from tusd_py.stores.s3_writer import PatchWriter

MiB = 1024 * 1024


async def test_a_large_chunk_past_the_head_goes_to_the_file_at_once(tmp_path: Any) -> None:
    """Past its head a slot holds no chunk until the next one comes: with 1 MiB body
    chunks it keeps nothing in memory between appends."""
    slot = FileSlot(str(tmp_path), hashlib.sha256)
    chunks = [os.urandom(s3_spool.MEMORY_HEAD_SIZE) for _ in range(3)]
    await slot.append(chunks[0])
    assert slot.in_memory == s3_spool.MEMORY_HEAD_SIZE  # the head waits in memory
    for chunk in chunks[1:]:
        await slot.append(chunk)
        assert slot.in_memory == 0
    assert b"".join(await slot.read_chunks()) == b"".join(chunks)
    assert slot.digest() == hashlib.sha256(b"".join(chunks)).digest()
    await slot.close()


def count_spool_writes(monkeypatch: Any) -> list[int]:
    """The bytes of every write to a spool file from now on, one entry per write."""
    writes: list[int] = []
    write = FileSlot._write

    def counted(self: FileSlot, chunks: list[Chunk]) -> None:
        writes.append(sum(len(chunk) for chunk in chunks))
        write(self, chunks)

    monkeypatch.setattr(FileSlot, "_write", counted)
    return writes


async def test_small_chunks_past_the_head_are_written_in_batches(tmp_path: Any, monkeypatch: Any) -> None:
    """Tiny chunks still cost one write (one thread hop) per batch, and never more
    than a batch waits in memory."""
    writes = count_spool_writes(monkeypatch)
    slot = FileSlot(str(tmp_path))
    size = 64 * 1024
    data = os.urandom(s3_spool.MEMORY_HEAD_SIZE + 4 * s3_spool.FILE_FLUSH_SIZE)
    held: list[int] = []
    for start in range(0, len(data), size):
        await slot.append(data[start:start + size])
        if slot.size > s3_spool.MEMORY_HEAD_SIZE:
            held.append(slot.in_memory)
    assert max(held) < s3_spool.FILE_FLUSH_SIZE
    assert len(writes) <= 1 + len(data) // s3_spool.FILE_FLUSH_SIZE
    assert b"".join(await slot.read_chunks()) == data
    await slot.close()


class _RecordingSlot(MemorySlot):
    """A memory slot that remembers what it was given, as given."""

    def __init__(self, seen: list[Chunk]) -> None:
        super().__init__()
        self._seen = seen

    async def append(self, data: Chunk) -> None:
        self._seen.append(data)
        await super().append(data)


class _RecordingRing(SpoolRing):
    def __init__(self) -> None:
        super().__init__(4, "memory")
        self.seen: list[Chunk] = []

    async def acquire(self) -> SpoolSlot:
        await super().acquire()
        return _RecordingSlot(self.seen)


class _Sink:
    """Parts and segments kept in memory."""

    def __init__(self) -> None:
        self.parts: dict[int, bytes] = {}
        self.segments: dict[int, bytes] = {}

    async def upload_part(self, number: int, data: list[bytes], slot: SpoolSlot | None) -> PartEntry:
        body = b"".join(data + (await slot.read_chunks() if slot is not None else []))
        self.parts[number] = body
        return PartEntry(number, len(body), f'"{number}"')

    async def put_segment(self, start: int, data: bytes) -> Segment:
        self.segments[start] = data
        return Segment(f"u.tail/{start:016d}", start, len(data), f'"s{start}"')

    async def read_segments(self, segments: Sequence[Segment]) -> list[bytes]:
        return [self.segments[segment.start] for segment in segments]

    async def delete_quietly(self, keys: Sequence[str]) -> None:
        pass


async def test_a_chunk_across_a_part_boundary_is_cut_into_views() -> None:
    part = 1000
    chunk = os.urandom(2 * part + 500)  # ends part 1, is all of part 2, begins the tail

    async def body() -> AsyncIterator[bytes]:
        yield chunk

    ring = _RecordingRing()
    sink = _Sink()
    outcome = await PatchWriter(sink, ring, Layout(part), upload_id="u", length=None, limit=10**9).run(body())
    assert outcome.error is None
    assert [len(piece) for piece in ring.seen] == [part, part, 500]
    for piece in ring.seen:
        assert isinstance(piece, memoryview) and piece.obj is chunk  # no copy of the chunk's bytes
    assert sink.parts == {1: chunk[:part], 2: chunk[part:2 * part]}
    assert sink.segments == {2 * part: chunk[2 * part:]}


class _FullRingWatch(SpoolRing):
    """A memory ring that notes, whenever the writer must wait for a slot, how many
    bytes it pulled from the body and how many it had put into slots."""

    def __init__(self, slots: int, pulled: list[int]) -> None:
        super().__init__(slots, "memory")
        self.writer: PatchWriter | None = None
        self._pulled = pulled
        self.waits: list[tuple[int, int]] = []
        self.waited = asyncio.Event()

    async def acquire(self) -> SpoolSlot:
        if self.full:
            assert self.writer is not None
            self.waits.append((self._pulled[0], self.writer.position))
            self.waited.set()
        return await super().acquire()


class _HeldSink(_Sink):
    """Parts wait until ``open`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()

    async def upload_part(self, number: int, data: list[bytes], slot: SpoolSlot | None) -> PartEntry:
        await self.open.wait()
        return await super().upload_part(number, data, slot)


async def test_the_writer_waits_for_a_full_ring_holding_no_chunk() -> None:
    """Chunks that do not divide the part size: the reader takes the next part's
    slot before it pulls a chunk that may cross into that part, so while the ring is
    full every byte pulled is in a slot (none in a chunk in hand)."""
    part, chunk_size = 1000, 300
    data = os.urandom(5 * part)
    pulled = [0]

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), chunk_size):
            pulled[0] += len(data[start:start + chunk_size])
            yield data[start:start + chunk_size]

    ring = _FullRingWatch(2, pulled)
    sink = _HeldSink()
    writer = PatchWriter(sink, ring, Layout(part), upload_id="u", length=len(data), limit=len(data))
    ring.writer = writer
    write = asyncio.create_task(writer.run(body()))
    await ring.waited.wait()
    sink.open.set()
    outcome = await write
    assert outcome.error is None and b"".join(sink.parts[n] for n in sorted(sink.parts)) == data
    assert ring.waits and all(pulled_then == stored for pulled_then, stored in ring.waits), ring.waits


async def test_a_streamed_part_lets_go_of_each_piece_before_reading_the_next() -> None:
    """A part in flight holds one piece read from its spool file, not two."""
    held: list[int] = []

    class Pieces:
        sha256 = None

        def __len__(self) -> int:
            return 3 * MiB

        async def pieces(self) -> AsyncIterator[bytes]:
            previous: bytes | None = None
            for _ in range(3):
                if previous is not None:
                    held.append(sys.getrefcount(previous))
                piece = previous = os.urandom(MiB)
                alone = sys.getrefcount(piece)
                yield piece
                del piece
            held.append(alone)

        async def read_all(self) -> bytes:
            raise AssertionError("not read whole")

    class Writer:
        async def write(self, chunk: Any) -> None:
            pass

    await _StreamedPayload(Pieces()).write_with_length(Writer(), None)
    # The previous piece, when the next is read, is referenced from here only.
    alone = held.pop()
    assert held == [alone - 1, alone - 1], (held, alone)


async def test_only_a_patchs_first_slot_keeps_a_head(tmp_path: Any) -> None:
    """A later slot holds the bytes of a large body: its first chunk goes to the file
    at once instead of waiting there for the next one."""
    ring = SpoolRing(2, "file", str(tmp_path))
    first, second = await ring.acquire(), await ring.acquire()
    chunk = os.urandom(s3_spool.MEMORY_HEAD_SIZE)
    await first.append(chunk)
    await second.append(chunk)
    assert (first.in_memory, second.in_memory) == (len(chunk), 0)
    assert b"".join(await second.read_chunks()) == chunk
    for slot in (first, second):
        await slot.close()


async def test_a_kept_piece_of_a_chunk_does_not_hold_the_chunk(tmp_path: Any) -> None:
    chunk = os.urandom(s3_spool.MEMORY_HEAD_SIZE)
    slot = FileSlot(str(tmp_path))
    await slot.append(memoryview(chunk)[-1000:])  # the rest of a chunk cut at a part boundary
    assert slot.in_memory == 1000
    assert all(type(kept) is bytes for kept in slot._pending)  # a copy, not a view of all of chunk
    assert await slot.read_chunks() == [chunk[-1000:]]
    await slot.close()
