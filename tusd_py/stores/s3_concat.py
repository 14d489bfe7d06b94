"""How the S3 store builds a final upload from finished partial uploads: the plan of
the final multipart upload's parts (pure, no I/O, so it can be read and tested alone).

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

from collections.abc import Sequence
from dataclasses import dataclass, field

MiB = 1024 * 1024
GiB = 1024 * MiB
MIN_PART_SIZE = 5 * MiB
"""S3's smallest part (but the last)."""
MAX_COPY_SIZE = 5 * GiB
"""S3's largest UploadPartCopy range (and part)."""


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
