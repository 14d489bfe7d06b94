"""Parts and tail segments of an S3 upload: sizes, keys, and the offset rule
(invariant 2 in ``s3``'s module docstring), precisely.

Everything here is pure (no I/O), so the rule that makes every crash point safe can
be read, and tested, in one place:

    offset = the contiguous run of parts 1..n, each exactly ``part_size`` (except a
             final part that ends exactly at the upload's length)
           + the contiguous run of tail segments starting at ``n * part_size``,
             never crossing the next part boundary.

Anything else that is listed (a part after a gap or of the wrong size, a segment
covered by a part, after a gap, or crossing a boundary) is ignored: it is the trace of
a write that crashed or failed half-way and does not count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tusd_py.stores.s3_client import ObjectEntry, PartEntry

MiB = 1024 * 1024
MAX_PARTS = 10_000
"""S3's limit on parts per multipart upload."""
MAX_OBJECT_SIZE = 5 * 1024**4
"""S3's largest object (5 TiB)."""
SEGMENT_DIGITS = 16
"""Tail segment keys carry their start offset zero-padded to this many digits, so
lexicographic listing order is numeric order (16 digits cover 5 TiB with room)."""


def part_size_for(total: int, preferred: int) -> int:
    """The part size of an upload of at most ``total`` bytes: the preferred size, or
    larger so that ``total`` fits in 10,000 parts, rounded up to a whole MiB."""
    needed = -(-total // MAX_PARTS)
    size = max(preferred, needed, 1)
    return -(-size // MiB) * MiB


def deferred_length_ceiling(configured: int, max_size: int, preferred: int) -> int:
    """The largest total length of a deferred-length upload: the configured ceiling,
    else the server's max size, else what ``preferred``-sized parts can hold; never
    more than S3's largest object."""
    ceiling = configured or max_size or part_size_for(0, preferred) * MAX_PARTS
    return min(ceiling, MAX_OBJECT_SIZE)


@dataclass(frozen=True, slots=True)
class UploadKeys:
    """The S3 keys of one upload: its final object and its bookkeeping (under the
    metadata prefix, by id)."""

    upload_id: str
    object: str
    """The final object, built by the multipart upload."""
    info: str
    """The JSON upload info."""
    tail_prefix: str
    """Prefix of the tail segments (``<object>.tail/``)."""

    @classmethod
    def of(cls, metadata_prefix: str, upload_id: str, object_key: str) -> UploadKeys:
        """The keys of ``upload_id``, its bookkeeping under ``metadata_prefix``."""
        base = f"{metadata_prefix}{upload_id}"
        return cls(upload_id=upload_id, object=object_key, info=f"{base}.info", tail_prefix=f"{base}.tail/")

    def segment(self, start: int) -> str:
        """The key of the tail segment that starts at byte ``start``."""
        return f"{self.tail_prefix}{start:0{SEGMENT_DIGITS}d}"

    def segment_start(self, key: str) -> int | None:
        """The start offset named by a tail segment key, or None for a foreign key."""
        name = key[len(self.tail_prefix):] if key.startswith(self.tail_prefix) else ""
        return int(name) if len(name) == SEGMENT_DIGITS and name.isdigit() else None


@dataclass(frozen=True, slots=True)
class Segment:
    """A tail segment: bytes ``[start, start + size)`` in object ``key``."""

    key: str
    start: int
    size: int
    etag: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(slots=True)
class Layout:
    """What counts of an upload's stored bytes (see the module docstring)."""

    part_size: int
    parts: list[PartEntry] = field(default_factory=list)
    """The counted run of parts 1..n."""
    segments: list[Segment] = field(default_factory=list)
    """The counted tail segments, contiguous from the end of the parts."""
    stale_segments: list[Segment] = field(default_factory=list)
    """Listed segments that do not count and should be deleted."""

    @property
    def parts_end(self) -> int:
        """Bytes covered by the counted parts."""
        return sum(part.size for part in self.parts)

    @property
    def tail_size(self) -> int:
        return sum(segment.size for segment in self.segments)

    @property
    def offset(self) -> int:
        """Bytes stored, counted by the rule."""
        return self.parts_end + self.tail_size


def final_part_number(length: int, part_size: int) -> int:
    """The number of the last part of an upload of ``length`` bytes (at least 1)."""
    return max(1, -(-length // part_size))


def resolve_layout(
    keys: UploadKeys,
    part_size: int,
    length: int | None,
    parts: Iterable[PartEntry],
    objects: Iterable[ObjectEntry],
    limit: int | None = None,
) -> Layout:
    """Apply the offset rule to what ListParts and ListObjectsV2 returned.

    ``limit`` caps the offset: nothing is counted that would end after it. The store
    passes ``length - 1`` for unfinished uploads so that an upload whose bytes are
    all stored but whose CompleteMultipartUpload has not happened yet (a crash
    between the two) reports its last part or segment as missing; the client sends
    those bytes again and that PATCH finishes the upload, instead of a client that
    sees ``offset == length`` waiting forever for an upload that is never completed.
    """
    final_number = final_part_number(length, part_size) if length is not None else None
    layout = Layout(part_size)
    for part in sorted(parts, key=lambda entry: entry.number):
        expected_number = len(layout.parts) + 1
        if part.number != expected_number:
            break  # a gap (or a duplicate): nothing after it counts
        if final_number is not None and part.number > final_number:
            break
        if final_number is not None and part.number == final_number:
            expected_size = length - (final_number - 1) * part_size if length is not None else part_size
        else:
            expected_size = part_size
        if part.size != expected_size or (limit is not None and layout.parts_end + part.size > limit):
            break
        layout.parts.append(part)

    # Tail segments continue the parts but never cross the next part boundary (nor
    # the length or limit): a tail is always "less than or exactly one part".
    position = layout.parts_end
    boundary = position + part_size
    if length is not None:
        boundary = min(boundary, length)
    if limit is not None:
        boundary = min(boundary, limit)
    complete = final_number is not None and len(layout.parts) == final_number
    by_start: dict[int, Segment] = {}
    for entry in objects:
        start = keys.segment_start(entry.key)
        segment = Segment(entry.key, start if start is not None else -1, entry.size, entry.etag)
        if start is None or start in by_start:
            layout.stale_segments.append(segment)
        else:
            by_start[start] = segment
    while not complete and position in by_start:
        segment = by_start[position]
        if segment.size <= 0 or segment.end > boundary:
            break
        layout.segments.append(by_start.pop(position))
        position = segment.end
    layout.stale_segments.extend(segment for segment in by_start.values() if segment.start >= 0)
    return layout


class TailCache:
    """Recently written tail segments, bounded in bytes, least recently used first out.

    An entry is only trusted when the listed segment has the same key, size and ETag:
    another instance may have rewritten or deleted the segment since.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._size

    def put(self, key: str, etag: str, data: bytes) -> None:
        """Remember the bytes just stored under ``key`` (skipped when they would not fit)."""
        self.discard(key)
        if not etag or len(data) > self.capacity:
            return
        self._entries[key] = (etag, data)
        self._size += len(data)
        while self._size > self.capacity:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._size -= len(evicted)

    def get(self, segment: Segment) -> bytes | None:
        """The cached bytes of ``segment`` if they are certainly its current content."""
        entry = self._entries.get(segment.key)
        if entry is None:
            return None
        etag, data = entry
        if etag != segment.etag or len(data) != segment.size:
            self.discard(segment.key)
            return None
        self._entries.move_to_end(segment.key)
        return data

    def discard(self, key: str) -> None:
        """Forget ``key`` (after the segment was deleted)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._size -= len(entry[1])
