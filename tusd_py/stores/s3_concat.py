"""How the S3 store builds a final upload from finished partial uploads: the plan of
the final multipart upload's parts (``plan_parts``: pure, no I/O, so it can be read
and tested alone), and ``concatenate``, which carries it out.

S3 rejects, at CompleteMultipartUpload only (EntityTooSmall), any part but the last
below 5 MiB. A partial upload's object can become parts server-side (UploadPartCopy
with a byte range, no bytes through us) only in pieces of at least 5 MiB; what is
smaller must be read and uploaded as part of a combined part. The plan walks the
partials' bytes in order:

- at a part boundary, with at least ``min_part_size`` bytes left in the current
  partial, all of them are copied server-side (split into pieces of at most
  ``max_copy_size``, each still at least ``min_part_size``);
- otherwise bytes are gathered, across partials, into a combined part of exactly
  ``min_part_size`` bytes (the last one may be shorter), which is downloaded and
  uploaded.

So every part but the last is at least ``min_part_size``; at most ``min_part_size``
bytes of each partial pass through the server (the rest is copied inside S3); and a
final made only of small partials costs one download and one upload of its bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tusd_py.stores.base import StoreError, UploadInfo, UploadTooLarge
from tusd_py.stores.s3_checksum import LEGACY_CHECKSUM
from tusd_py.stores.s3_client import PartEntry
from tusd_py.stores.s3_objects import S3Fields, S3Objects, all_or_nothing, content_type, store_errors
from tusd_py.stores.s3_parts import MAX_OBJECT_SIZE, MAX_PARTS, UploadKeys

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB
"""S3's smallest part (but the last)."""
MAX_COPY_SIZE = 5 * GiB
"""S3's largest UploadPartCopy range (and part)."""
CONCAT_PARTS_IN_FLIGHT = 4
"""Parts of a final upload being built at once (copies or download + upload); with the
global UploadPart semaphore this bounds the memory of a concatenation (5 MiB each)."""
ASSEMBLY_DEADLINE_SECONDS = 3600.0
"""A final upload being assembled has an ``.info`` (so a crash leaves nothing
unreferenced) whose expiry is this far ahead; finishing clears it. After a crash the
half-built upload expires and a sweep aborts its multipart upload."""


@dataclass(frozen=True, slots=True)
class SourceRange:
    """Bytes ``[start, stop)`` of object ``key``."""

    key: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(slots=True)
class PlannedPart:
    """One part of the final upload: a server-side copy of one range (``copy``), or
    the listed ranges downloaded and uploaded as one body."""

    ranges: list[SourceRange] = field(default_factory=list)
    copy: bool = False

    @property
    def size(self) -> int:
        return sum(piece.size for piece in self.ranges)


def plan_parts(
    sources: Sequence[tuple[str, int]], min_part_size: int = MIN_PART_SIZE, max_copy_size: int = MAX_COPY_SIZE
) -> list[PlannedPart]:
    """The parts, in order, of the object made of ``sources`` (``(key, size)`` each)."""
    assert min_part_size <= max_copy_size
    parts: list[PlannedPart] = []
    gathering = PlannedPart()
    for key, size in sources:
        position = 0
        while position < size:
            left = size - position
            if gathering.size == 0 and left >= min_part_size:
                # Pieces of equal size (up to 1 byte) between min and max copy size.
                count = -(-left // max_copy_size)
                for index in range(count):
                    start = position + left * index // count
                    stop = position + left * (index + 1) // count
                    parts.append(PlannedPart([SourceRange(key, start, stop)], copy=True))
                position = size
                continue
            take = min(left, min_part_size - gathering.size)
            gathering.ranges.append(SourceRange(key, position, position + take))
            position += take
            if gathering.size == min_part_size:
                parts.append(gathering)
                gathering = PlannedPart()
    if gathering.ranges:
        parts.append(gathering)
    return parts


async def concatenate(objects: S3Objects, final: UploadInfo, partials: Sequence[UploadInfo]) -> UploadInfo:
    """Build the final object with one multipart upload planned by ``plan_parts``:
    UploadPartCopy where a partial has 5 MiB or more left, combined download + upload
    parts for smaller pieces; the final upload's snapshot, finished.

    Order: CreateMultipartUpload, ``.info`` (unfinished, expiring after
    ``ASSEMBLY_DEADLINE_SECONDS``), the parts, CompleteMultipartUpload, ``.info``
    finished. A failure aborts the multipart upload and deletes ``.info``; a crash
    leaves either an expiring unfinished upload (swept like any other) or a complete
    object that ``S3Objects.load`` recognises as finished.
    """
    assert final.length is not None
    if final.length > MAX_OBJECT_SIZE:
        raise UploadTooLarge(f"final length {final.length} exceeds S3's largest object ({MAX_OBJECT_SIZE} bytes)")
    keys = objects.new_keys(final)
    plan = plan_parts([(objects.keys_of(partial).object, partial.offset) for partial in partials])
    if len(plan) > MAX_PARTS:
        raise UploadTooLarge(f"the partial uploads would need {len(plan)} parts; S3 allows {MAX_PARTS}")
    fields = S3Fields(multipart_upload_id=None, part_size=MIN_PART_SIZE, max_length=final.length)
    with store_errors(final.id):
        await objects.refuse_existing(keys, final.id)
        await objects.refuse_taken(keys)
        if final.length == 0:
            await objects.put_empty(keys)
        else:
            multipart_id = await objects.client.create_multipart_upload(
                objects.bucket, keys.object, content_type(final)
            )
            fields = dataclasses.replace(fields, multipart_upload_id=multipart_id)
            expiring = dataclasses.replace(final, expires_at=time.time() + ASSEMBLY_DEADLINE_SECONDS)
            assembling = fields.stored_in(expiring, objects.bucket, keys.object)
            try:
                await objects.put_info(keys, assembling)
                gate = asyncio.Semaphore(CONCAT_PARTS_IN_FLIGHT)
                parts = await all_or_nothing([
                    _build_part(objects, keys, multipart_id, number, part, gate)
                    for number, part in enumerate(plan, 1)
                ])
                await objects.complete(keys, multipart_id, parts)
            except BaseException:
                await objects.abort_quietly(keys, multipart_id)
                await objects.delete_quietly([keys.info])
                raise
        finished = fields.stored_in(dataclasses.replace(final, finished=True), objects.bucket, keys.object)
        await objects.put_info(keys, finished)
    return dataclasses.replace(finished, offset=final.length)


async def _build_part(
    objects: S3Objects, keys: UploadKeys, multipart_id: str, number: int, part: PlannedPart, gate: asyncio.Semaphore
) -> PartEntry:
    async with gate:
        if part.copy:
            (piece,) = part.ranges
            async with objects.part_uploads:
                etag = await objects.client.upload_part_copy(
                    objects.bucket, keys.object, multipart_id, number, piece.key, piece.start, piece.stop
                )
            return PartEntry(number, piece.size, etag)
        data = [await _download(objects, piece) for piece in part.ranges]
        return await objects.upload_part(keys, multipart_id, number, data, LEGACY_CHECKSUM)


async def _download(objects: S3Objects, piece: SourceRange) -> bytes:
    chunks: list[bytes] = []
    async with contextlib.aclosing(
        objects.client.stream_object(objects.bucket, piece.key, piece.start, piece.stop)
    ) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    data = b"".join(chunks)
    if len(data) != piece.size:
        raise StoreError(f"{piece.key} is shorter than its upload's length ({len(data)} != {piece.size})")
    return data
