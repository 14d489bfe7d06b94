"""The S3 store's PATCH pipeline (``s3_writer.PatchWriter``) over an in-memory part
sink, no S3: backpressure, the bound on parts in flight, a failing part, a body that
breaks off, cancellation. Parts are held at gates the tests open, and the tests wait
for events (a part reached the sink, the reader waits for a slot), never for time."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from tusd_py.stores import s3_spool
from tusd_py.stores.base import StoreUnavailable
from tusd_py.stores.s3_client import PartEntry, S3TransientError
from tusd_py.stores.s3_parts import Layout, Segment
from tusd_py.stores.s3_spool import SpoolRing, SpoolSlot
from tusd_py.stores.s3_writer import PatchOutcome, PatchWriter

PART = 1000
CHUNK = 100


def data_of(size: int) -> bytes:
    return bytes(index % 251 for index in range(size))


class MemorySink:
    """A ``PartSink`` in memory. Parts ``held`` wait at their gate until the test
    releases them; a part in ``failures`` raises (after the part named in
    ``fail_after_start``, if any, has started)."""

    def __init__(self, *held: int) -> None:
        self.held = set(held)
        self.parts: dict[int, bytes] = {}
        self.segments: dict[str, bytes] = {}
        self.started: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.failures: dict[int, Exception] = {}
        self.fail_after_start: dict[int, int] = {}
        self.cancelled: list[int] = []
        self.events: list[str] = []
        """What happened, in order ("cancelled 3", "segment 1000")."""
        self.in_flight = 0
        self.peak = 0

    def release(self, *numbers: int) -> None:
        self.held -= set(numbers)
        for number in numbers:
            self.gates[number].set()

    def gate(self, number: int) -> asyncio.Event:
        if number not in self.held:
            self.gates[number].set()
        return self.gates[number]

    async def upload_part(self, number: int, data: list[bytes], slot: SpoolSlot | None) -> PartEntry:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.started[number].set()
        try:
            await self.gate(number).wait()
            if number in self.fail_after_start:
                await self.started[self.fail_after_start[number]].wait()
            if number in self.failures:
                raise self.failures[number]
            body = b"".join(data + (await slot.read_chunks() if slot is not None else []))
            self.parts[number] = body
            return PartEntry(number, len(body), f'"part-{number}"')
        except asyncio.CancelledError:
            self.cancelled.append(number)
            self.events.append(f"cancelled {number}")
            raise
        finally:
            self.in_flight -= 1

    async def put_segment(self, start: int, data: bytes) -> Segment:
        await asyncio.sleep(0)  # a request takes at least a loop turn
        self.events.append(f"segment {start}")
        key = f"u.tail/{start:016d}"
        self.segments[key] = data
        return Segment(key, start, len(data), f'"segment-{start}"')

    async def read_segments(self, segments: Sequence[Segment]) -> list[bytes]:
        return [self.segments[segment.key] for segment in segments]

    async def delete_quietly(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.segments.pop(key, None)


class WatchedRing(SpoolRing):
    """A memory ring that counts its slots in use and says when the reader waits
    for a slot of the full ring."""

    def __init__(self, slots: int) -> None:
        self.slots_in_use = 0
        super().__init__(slots, "memory", on_change=self._count)
        self.reader_waits = asyncio.Event()

    def _count(self, change: int) -> None:
        self.slots_in_use += change

    async def acquire(self) -> SpoolSlot:
        if self.full:
            self.reader_waits.set()
        return await super().acquire()


class Body:
    """A request body of ``data`` in ``CHUNK``-sized chunks that counts what was
    pulled; then it ends, raises ``error``, or (``stall``) waits forever."""

    def __init__(self, data: bytes, *, error: Exception | None = None, stall: bool = False) -> None:
        self.data = data
        self.error = error
        self.stall = stall
        self.pulled = 0
        self.exhausted = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            chunk = self.data[start:start + CHUNK]
            self.pulled += len(chunk)
            yield chunk
            await asyncio.sleep(0)  # a chunk per loop turn, as from a socket
        self.exhausted.set()
        if self.stall:
            await asyncio.Event().wait()  # the client stops sending
        if self.error is not None:
            raise self.error


def writer(sink: MemorySink, ring: SpoolRing, length: int | None) -> PatchWriter:
    return PatchWriter(sink, ring, Layout(PART), upload_id="u", length=length, limit=length or 10**9)


async def first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    await asyncio.wait(waits)


async def test_a_full_ring_pauses_reading_the_body() -> None:
    data = data_of(6 * PART)
    sink = MemorySink(1, 2, 3, 4, 5, 6)
    ring = WatchedRing(2)
    body = Body(data)
    write = asyncio.create_task(writer(sink, ring, len(data)).run(body))
    await first_of(ring.reader_waits, body.exhausted)
    # Two parts in the ring, uploading; the reader waits for a slot before it pulls
    # the next chunk (holding none: the body's own bounded buffer keeps it).
    assert body.pulled == 2 * PART
    await sink.started[2].wait()
    assert sink.in_flight == 2 and sink.parts == {}
    sink.release(1, 2, 3, 4, 5, 6)
    outcome = await write
    assert outcome.error is None and outcome.layout.offset == len(data)
    assert b"".join(sink.parts[number] for number in range(1, 7)) == data
    assert ring.slots_in_use == 0


@pytest.mark.parametrize("slots", [1, 3])
async def test_never_more_parts_upload_at_once_than_the_ring_has_slots(slots: int) -> None:
    data = data_of(10 * PART + 5 * CHUNK)
    sink = MemorySink(*range(1, 12))
    ring = WatchedRing(slots)
    body = Body(data)
    write = asyncio.create_task(writer(sink, ring, None).run(body))
    await first_of(ring.reader_waits, body.exhausted)
    await sink.started[slots].wait()
    assert sink.in_flight == slots
    sink.release(*range(1, 12))
    outcome = await write
    assert sink.peak == slots  # pipelined up to the bound, never beyond
    assert outcome.error is None and outcome.layout.offset == len(data)
    assert [part.number for part in outcome.layout.parts] == list(range(1, 11))
    (segment,) = outcome.layout.segments  # the rest: one tail segment
    assert (segment.start, sink.segments[segment.key]) == (10 * PART, data[10 * PART:])
    assert ring.slots_in_use == 0


async def test_a_failed_part_stops_the_later_ones_and_keeps_its_bytes_as_a_segment() -> None:
    data = data_of(5 * PART + 5 * CHUNK)
    sink = MemorySink(3, 4, 5)
    sink.failures[2] = S3TransientError("UploadPart", "InternalError", 500, "injected")
    sink.fail_after_start[2] = 3  # part 3 is under way when part 2 fails
    ring = WatchedRing(4)
    body = Body(data)
    outcome: PatchOutcome = await writer(sink, ring, len(data)).run(body)
    # What is stored: part 1, and part 2's bytes as a tail segment right after it.
    assert sink.parts == {1: data[:PART]}
    assert [part.number for part in outcome.layout.parts] == [1]
    (segment,) = outcome.layout.segments
    assert (segment.start, sink.segments[segment.key]) == (PART, data[PART:2 * PART])
    assert outcome.layout.offset == 2 * PART
    # The error says what failed and what is stored.
    assert isinstance(outcome.error, StoreUnavailable)
    assert "part 2" in str(outcome.error) and f"{2 * PART} bytes are stored" in str(outcome.error)
    assert isinstance(outcome.error.__cause__, S3TransientError)
    # Later parts were stopped as soon as the failure was known (before its bytes
    # were saved), the body was not read to its end, nothing else was stored.
    assert sink.events.index("cancelled 3") < sink.events.index(f"segment {PART}")
    assert sink.in_flight == 0
    assert body.pulled < len(data)
    assert list(sink.segments) == [segment.key]
    assert ring.slots_in_use == 0


async def test_a_body_that_breaks_off_is_stored_up_to_its_last_byte() -> None:
    data = data_of(2 * PART + 3 * CHUNK)
    sink = MemorySink()
    ring = WatchedRing(2)
    gone = ConnectionResetError("client went away")
    outcome = await writer(sink, ring, 5 * PART).run(Body(data, error=gone))
    assert outcome.error is gone
    assert outcome.layout.offset == len(data)
    assert b"".join([sink.parts[1], sink.parts[2], *sink.segments.values()]) == data
    assert ring.slots_in_use == 0


async def test_a_cancelled_write_stops_its_uploads_and_frees_every_slot() -> None:
    data = data_of(2 * PART + 5 * CHUNK)
    sink = MemorySink(2)
    ring = WatchedRing(3)
    body = Body(data, stall=True)  # part 1 is uploaded, part 2 in flight, half a part received
    tasks_before = asyncio.all_tasks()
    write = asyncio.create_task(writer(sink, ring, 4 * PART).run(body))
    await body.exhausted.wait()
    await sink.started[2].wait()
    assert ring.slots_in_use == 2
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    # Settled: part 1 stays stored; part 2's upload was stopped; the bytes still in
    # the ring were not stored (the caller lists S3 again to learn what is stored).
    assert sink.parts.keys() == {1}
    assert sink.cancelled == [2] and sink.in_flight == 0
    assert sink.segments == {}
    # Nothing leaks: no slot, no task.
    assert ring.slots_in_use == 0 and not ring.full
    assert asyncio.all_tasks() == tasks_before


async def test_a_complete_part_waits_for_its_upload_with_no_bytes_in_memory(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file slot keeps up to a flush batch in memory while it fills; once its part
    is complete, the batch goes to the spool file before the part waits for its turn
    to upload (16 uploads with 3 parts waiting each held ~48 MiB of batches)."""
    monkeypatch.setattr(s3_spool, "MEMORY_HEAD_SIZE", 3 * CHUNK)
    monkeypatch.setattr(s3_spool, "FILE_FLUSH_SIZE", 3 * CHUNK)  # PART is not a whole number of batches
    data = data_of(3 * PART)
    held_in_memory: dict[int, int] = {}

    class WatchingSink(MemorySink):
        async def upload_part(self, number: int, data: list[bytes], slot: SpoolSlot | None) -> PartEntry:
            assert slot is not None
            held_in_memory[number] = slot.in_memory
            return await super().upload_part(number, data, slot)

    sink = WatchingSink(1, 2, 3)
    write = asyncio.create_task(writer(sink, SpoolRing(3, "file", str(tmp_path)), len(data)).run(Body(data)))
    await asyncio.wait([write, asyncio.ensure_future(sink.started[3].wait())], return_when=asyncio.FIRST_COMPLETED)
    assert held_in_memory == {1: 0, 2: 0, 3: 0}
    sink.release(1, 2, 3)
    outcome = await write
    assert outcome.error is None and b"".join(sink.parts[number] for number in (1, 2, 3)) == data
