"""One PATCH body on its way into S3: the S3 store's write path (the rules it keeps
are stated in ``s3``'s module docstring).

``PatchWriter`` cuts the body into part-sized pieces. A piece that completes a part
is spooled into a slot of a ``SpoolRing`` and uploaded concurrently while the next
pieces arrive; the next chunk is pulled only once there is a slot for it, so a full
ring stops reading the body (backpressure). What is left below the next part
boundary when the body ends becomes one tail segment.

The writer reaches S3 only through a ``PartSink`` (four calls), so its pipelining,
backpressure and failure handling can be exercised without S3.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tusd_py.stores.base import StoreError, StoreUnavailable, UploadNotFound, UploadTooLarge
from tusd_py.stores.s3_client import PartEntry, S3Error, S3NotFound, S3Timeout
from tusd_py.stores.s3_parts import Layout, Segment, final_part_number
from tusd_py.stores.s3_spool import SpoolRing, SpoolSlot

log = logging.getLogger("tusd_py.stores.s3")


class PartSink(Protocol):
    """Where one upload's parts and tail segments go (bound to the upload)."""

    async def upload_part(self, number: int, data: list[bytes], slot: SpoolSlot | None) -> PartEntry:
        """Upload part ``number``: the bytes of ``data`` followed by those of
        ``slot`` (read only once the upload may start: the sink bounds how many
        parts are sent at once)."""
        ...

    async def put_segment(self, start: int, data: bytes) -> Segment:
        """Store ``data`` as the tail segment that starts at byte ``start``."""
        ...

    async def read_segments(self, segments: Sequence[Segment]) -> list[bytes]:
        """The bytes of ``segments``, in order."""
        ...

    async def delete_quietly(self, keys: Sequence[str]) -> None:
        """Delete objects that no longer count; never raises for an S3 failure."""
        ...


@dataclass(frozen=True, slots=True)
class PatchOutcome:
    """What a write left stored (``layout``), and the error to raise, if any: the
    body's own error, the store's (a part or the tail segment could not be stored),
    or ``UploadTooLarge``."""

    layout: Layout
    error: Exception | None = None


@dataclass(eq=False, slots=True)
class _PartJob:
    """One part being uploaded by a PATCH."""

    number: int
    start: int
    prefix: list[Segment]
    """Existing tail segments that form the beginning of this part."""
    slot: SpoolSlot | None
    """The part's new bytes (None when the prefix alone fills the part)."""
    task: asyncio.Task[PartEntry] | None = None
    holds_ring_slot: bool = False

    @property
    def prefix_size(self) -> int:
        return sum(segment.size for segment in self.prefix)


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception as seen (it is re-raised where the task is awaited;
    this only keeps asyncio from logging "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()


class PatchWriter:
    """The body of one PATCH of upload ``upload_id`` appended after ``base`` (what is
    stored); ``length`` is the upload's length (None: deferred) and ``limit`` the
    bytes it may reach (its length, or its deferred-length ceiling). One use: ``run``."""

    def __init__(
        self, sink: PartSink, ring: SpoolRing, base: Layout, *, upload_id: str, length: int | None, limit: int
    ) -> None:
        self.sink = sink
        self.ring = ring
        self.base = base
        self.upload_id = upload_id
        self.length = length
        self.limit = limit
        self.part_size = base.part_size
        self.jobs: list[_PartJob] = []
        self.failed = False
        """Set as soon as a part upload fails: stop reading the body."""
        # The part being received: its number, first byte, the existing tail segments
        # it starts with, and the slot with its new bytes.
        self.part_number = len(base.parts) + 1
        self.part_start = base.parts_end
        self.prefix = list(base.segments)
        self.fill = base.tail_size
        self.slot: SpoolSlot | None = None
        self.next_slot: SpoolSlot | None = None
        """The slot of the part after this one, taken before a chunk that may cross
        into it is pulled (``_reserve_slot``)."""
        self.largest_chunk = 0
        self.position = base.offset
        self.stale_cleanup: asyncio.Task[None] | None = None
        self.leftover: asyncio.Task[Segment] | None = None

    def _target(self) -> int:
        """Size of the part being received (the last part of a known length is short)."""
        if self._is_final(self.part_number):
            assert self.length is not None
            return self.length - self.part_start
        return self.part_size

    def _is_final(self, number: int) -> bool:
        """Whether part ``number`` is the last one of a known length (short, and what
        ``finish`` completes: never kept as a tail segment)."""
        return self.length is not None and number == final_part_number(self.length, self.part_size)

    async def run(self, body: AsyncIterable[bytes]) -> PatchOutcome:
        """Store ``body``; what is stored once every byte it yielded is (as a part or
        in the tail segment), or stored as far as S3 allowed. Cancelled, it stops
        every upload it started and frees every slot before the cancellation goes on
        (what it stored then is only known by listing S3 again)."""
        body_error: Exception | None = None
        too_large = False
        try:
            if self.base.stale_segments:
                # Stale segments go before any new segment is written, so that none
                # of them can ever line up behind new bytes and be counted.
                self.stale_cleanup = asyncio.create_task(
                    self.sink.delete_quietly([segment.key for segment in self.base.stale_segments])
                )
                self.stale_cleanup.add_done_callback(_retrieve_exception)
            if 0 < self.fill == self._target():  # the tail alone fills a part (left by a failed write)
                self._dispatch()
            try:
                async for chunk in body:
                    room = self.limit - self.position
                    if len(chunk) > room:
                        chunk, too_large = chunk[:room], True
                    if chunk and not await self._feed(chunk):
                        break
                    if too_large or not await self._reserve_slot():
                        break
            except Exception as error:  # the body broke off: store what arrived, then re-raise
                body_error = error
            layout, store_error = await self._settle()
        finally:
            await self._release()
        if body_error is not None:
            return PatchOutcome(layout, body_error)
        if store_error is not None:
            return PatchOutcome(layout, store_error)
        if too_large:
            return PatchOutcome(layout, UploadTooLarge(
                f"upload {self.upload_id} may not exceed {self.limit} bytes"
                + (" (store.s3.deferred_length_ceiling)" if self.length is None else "")
            ))
        return PatchOutcome(layout)

    async def _reserve_slot(self) -> bool:
        """Before the next chunk is pulled: wait for the slot its bytes will need (a
        first slot, or the next part's when a chunk as large as the largest so far
        would complete this part); False once a part upload failed (stop reading).
        Waiting for a full ring holding no chunk leaves the bytes in the request's
        own bounded buffer: a chunk held here while the ring is full was a chunk per
        upload in memory for as long as S3 took."""
        if self.position >= self.limit:
            return True  # no more bytes may come
        room = self._target() - self.fill
        if self.slot is not None and (
            room >= self.largest_chunk or self._is_final(self.part_number) or self.next_slot is not None
        ):
            return True
        slot = await self._acquire()
        if slot is None:
            return False
        if self.slot is None:
            self.slot = slot
        else:
            self.next_slot = slot
        return True

    async def _acquire(self) -> SpoolSlot | None:
        """A slot of the ring (waits while it is full); None once a part upload failed."""
        slot = await self.ring.acquire()
        if self.failed:
            self.ring.release()
            await slot.close()
            return None
        return slot

    async def _feed(self, chunk: bytes) -> bool:
        """Add received bytes; False once a part upload failed (stop reading)."""
        self.largest_chunk = max(self.largest_chunk, len(chunk))
        # A chunk that crosses a part boundary is cut into views, not copies: the
        # rest may wait long for a free slot (a full ring), and copies would hold
        # the chunk's bytes twice meanwhile.
        data: bytes | memoryview = chunk
        while data:
            if self.failed:
                return False
            if self.slot is None:
                self.slot = await self._acquire()  # waits while the ring is full
                if self.slot is None:
                    return False
            room = self._target() - self.fill
            if len(data) <= room:
                piece, data = data, b""
            else:
                view = memoryview(data)
                piece, data = view[:room], view[room:]
            await self.slot.append(piece)
            self.fill += len(piece)
            self.position += len(piece)
            if self.fill == self._target():
                self._dispatch()
        return True

    def _dispatch(self) -> None:
        """Start uploading the part just completed; the next bytes begin a new part."""
        job = _PartJob(self.part_number, self.part_start, self.prefix, self.slot, holds_ring_slot=self.slot is not None)
        job.task = asyncio.create_task(self._upload(job))
        job.task.add_done_callback(self._on_part_done)
        self.jobs.append(job)
        self.part_number += 1
        self.part_start += self.part_size
        self.prefix = []
        self.fill = 0
        self.slot, self.next_slot = self.next_slot, None

    def _on_part_done(self, task: asyncio.Task[PartEntry]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.failed = True

    async def _upload(self, job: _PartJob) -> PartEntry:
        try:
            if job.slot is not None:
                # The part may wait a while for its turn (the process-wide bound on
                # UploadPart calls): meanwhile its last received bytes wait in the
                # spool file, not in memory (up to a flush batch per waiting part).
                await job.slot.spill()
            if self.stale_cleanup is not None:
                # A new part moves the end of the parts forward; a stale segment that
                # starts there must be gone first, or it would start to count.
                await self.stale_cleanup
            data = await self.sink.read_segments(job.prefix) if job.prefix else []
            part = await self.sink.upload_part(job.number, data, job.slot)
            # The segments this part covers are deleted only now: until UploadPart
            # succeeded they were the only copy of their bytes. A crash before this
            # delete leaves segments covered by a part, which do not count.
            if job.prefix:
                await self.sink.delete_quietly([segment.key for segment in job.prefix])
            if job.slot is not None:
                slot, job.slot = job.slot, None
                await slot.close()
            return part
        finally:
            # Free the ring place (also on failure, so a reader waiting for a slot
            # wakes up and sees ``failed``); a failed part's slot stays open for
            # ``_settle`` to save as a segment.
            if job.holds_ring_slot:
                job.holds_ring_slot = False
                self.ring.release()

    async def _store_segment(self, slot: SpoolSlot, start: int) -> Segment:
        if self.stale_cleanup is not None:
            await self.stale_cleanup  # never let a stale delete race the new segment
        data = await slot.read_chunks()
        return await self.sink.put_segment(start, data[0] if len(data) == 1 else b"".join(data))

    async def _settle(self) -> tuple[Layout, StoreError | None]:
        """Wait for the part uploads and store the leftover; the layout of what is
        now stored, and the error to raise if not everything received could be."""
        if not self.failed and self.slot is not None and self.slot.size > 0:
            # Stored concurrently with the parts still in flight: should one of them
            # fail, this segment lies beyond the gap and does not count.
            self.leftover = asyncio.create_task(self._store_segment(self.slot, self.position - self.slot.size))
            self.leftover.add_done_callback(_retrieve_exception)
        new_parts: list[PartEntry] = []
        failed_job: _PartJob | None = None
        failure: BaseException | None = None
        for job in self.jobs:
            assert job.task is not None
            await asyncio.wait([job.task])
            if job.task.cancelled():
                failed_job, failure = job, StoreError("part upload cancelled")
            elif job.task.exception() is not None:
                failed_job, failure = job, job.task.exception()
            else:
                new_parts.append(job.task.result())
                continue
            break
        parts = self.base.parts + new_parts
        if failed_job is None:
            segments = list(self.prefix)  # the original tail, if no part was completed
            if self.leftover is not None:
                await asyncio.wait([self.leftover])
                leftover_error = self.leftover.exception()
                if leftover_error is None:
                    segments.append(self.leftover.result())
                else:
                    layout = Layout(self.part_size, parts, segments)
                    return layout, self._unavailable("storing the tail segment", leftover_error, layout.offset)
            if self.stale_cleanup is not None:
                await self.stale_cleanup
            return Layout(self.part_size, parts, segments), None
        # A part failed for good. Parts after it are useless now (beyond a gap): stop
        # them. Its own bytes can still become a tail segment after its prefix (which
        # is intact: segments are deleted only after their part is stored), unless it
        # is the final part (a tail never reaches the length: finish makes that part).
        for job in self.jobs:
            if job.task is not None and not job.task.done():
                job.task.cancel()
        if self.leftover is not None and not self.leftover.done():
            self.leftover.cancel()
        segments = list(failed_job.prefix)
        # After a timeout S3 is stalled: saving the bytes would only wait out another
        # deadline per attempt before the client hears what is stored.
        slot = failed_job.slot
        if slot is not None and slot.size > 0 and not self._is_final(failed_job.number) and not isinstance(
            failure, S3Timeout
        ):
            try:
                segments.append(await self._store_segment(slot, failed_job.start + failed_job.prefix_size))
            except S3Error as error:
                log.warning("upload %s: could not save part %d as a tail segment: %s",
                            self.upload_id, failed_job.number, error)
        layout = Layout(self.part_size, parts, segments)
        assert failure is not None
        return layout, self._unavailable(f"uploading part {failed_job.number}", failure, layout.offset)

    def _unavailable(self, what: str, error: BaseException, offset: int) -> StoreError:
        if isinstance(error, StoreError):
            return error
        if isinstance(error, S3NotFound) and error.code == "NoSuchUpload":
            return UploadNotFound(self.upload_id)
        failure = StoreUnavailable(f"upload {self.upload_id}: {what} failed ({error}); {offset} bytes are stored")
        failure.__cause__ = error
        return failure

    async def _release(self) -> None:
        """Stop whatever is still running (only after an error or cancellation) and
        free every slot."""
        tasks: list[asyncio.Task[PartEntry] | asyncio.Task[Segment] | asyncio.Task[None]] = [
            job.task for job in self.jobs if job.task is not None and not job.task.done()
        ]
        for extra in (self.leftover, self.stale_cleanup):
            if extra is not None and not extra.done():
                tasks.append(extra)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        slots = [job.slot for job in self.jobs if job.slot is not None]
        slots += [slot for slot in (self.slot, self.next_slot) if slot is not None]
        for slot in slots:
            await slot.close()
