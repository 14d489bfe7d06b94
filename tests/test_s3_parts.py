"""The S3 store's pure parts: part sizes, keys, the offset rule, the tail cache, the
retry policy (no S3 needed)."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import pytest

from tusd_py.stores.s3_client import (
    ObjectEntry,
    PartEntry,
    S3Error,
    S3TransientError,
    content_md5,
)
from tusd_py.stores.s3_parts import (
    MAX_OBJECT_SIZE,
    MAX_PARTS,
    MiB,
    Segment,
    TailCache,
    UploadKeys,
    deferred_length_ceiling,
    part_size_for,
    resolve_layout,
)
from tusd_py.stores.s3_retry import RetryingS3Client, RetryPolicy

PS = 8 * MiB
KEYS = UploadKeys.of("uploads/", "abc", "uploads/abc")


def part(number: int, size: int = PS) -> PartEntry:
    return PartEntry(number, size, f'"etag{number}"')


def segment(start: int, size: int) -> ObjectEntry:
    return ObjectEntry(KEYS.segment(start), size, f'"seg{start}"')


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (0, PS),
        (1, PS),
        (PS * MAX_PARTS, PS),
        (PS * MAX_PARTS + 1, PS + MiB),  # needs a larger part, rounded up to a MiB
        (MAX_OBJECT_SIZE, 525 * MiB),  # 5 TiB / 10,000 = 524.3 MiB -> 525 MiB
    ],
)
def test_part_size_fits_every_upload_in_10000_parts(total: int, expected: int) -> None:
    size = part_size_for(total, PS)
    assert size == expected
    assert size % MiB == 0
    assert -(-total // size) <= MAX_PARTS


def test_part_size_rounds_an_odd_preferred_size_up_to_a_mib() -> None:
    assert part_size_for(10, 5 * MiB + 1) == 6 * MiB


def test_deferred_length_ceiling_order_of_precedence() -> None:
    assert deferred_length_ceiling(100 * MiB, 50 * MiB, PS) == 100 * MiB
    assert deferred_length_ceiling(0, 50 * MiB, PS) == 50 * MiB
    assert deferred_length_ceiling(0, 0, PS) == PS * MAX_PARTS
    assert deferred_length_ceiling(0, 0, 5 * 1024**3) == MAX_OBJECT_SIZE


def test_keys_layout_and_segment_names_sort_numerically() -> None:
    assert KEYS.object == "uploads/abc"
    assert KEYS.info == "uploads/abc.info"
    assert KEYS.segment(12345) == "uploads/abc.tail/0000000000012345"
    assert KEYS.segment_start(KEYS.segment(12345)) == 12345
    assert KEYS.segment_start("uploads/abc.tail/junk") is None
    assert sorted([KEYS.segment(10), KEYS.segment(9), KEYS.segment(100)]) == [
        KEYS.segment(9), KEYS.segment(10), KEYS.segment(100)
    ]


def test_offset_counts_contiguous_parts_then_contiguous_segments() -> None:
    layout = resolve_layout(KEYS, PS, None, [part(1), part(2)], [segment(2 * PS, 100), segment(2 * PS + 100, 50)])
    assert [p.number for p in layout.parts] == [1, 2]
    assert [s.start for s in layout.segments] == [2 * PS, 2 * PS + 100]
    assert layout.offset == 2 * PS + 150
    assert layout.stale_segments == []


def test_a_part_after_a_gap_does_not_count() -> None:
    layout = resolve_layout(KEYS, PS, None, [part(1), part(3)], [])
    assert layout.offset == PS


def test_a_short_part_that_is_not_the_final_part_does_not_count() -> None:
    layout = resolve_layout(KEYS, PS, None, [part(1), part(2, PS - 1)], [])
    assert layout.offset == PS
    layout = resolve_layout(KEYS, PS, 3 * PS, [part(1), part(2, PS - 1)], [])
    assert layout.offset == PS


def test_the_final_part_may_be_short_and_ends_at_the_length() -> None:
    length = 2 * PS + 5
    layout = resolve_layout(KEYS, PS, length, [part(1), part(2), part(3, 5)], [])
    assert layout.offset == length
    # ... but the limit of opening an upload hides it until the upload is finished
    hidden = resolve_layout(KEYS, PS, length, [part(1), part(2), part(3, 5)], [], limit=length - 1)
    assert hidden.offset == 2 * PS


def test_segments_covered_by_a_part_or_after_a_gap_are_stale() -> None:
    listed = [segment(0, 10), segment(PS, 100), segment(PS + 200, 5), ObjectEntry(KEYS.tail_prefix + "x", 1, '"x"')]
    layout = resolve_layout(KEYS, PS, None, [part(1)], listed)
    assert layout.offset == PS + 100
    assert sorted(s.key for s in layout.stale_segments) == sorted(
        [KEYS.segment(0), KEYS.segment(PS + 200), KEYS.tail_prefix + "x"]
    )


def test_a_tail_never_crosses_a_part_boundary() -> None:
    # A full part's worth of tail counts (a failed UploadPart saved as a segment);
    # a segment continuing past that boundary does not.
    layout = resolve_layout(KEYS, PS, None, [], [segment(0, PS - 10), segment(PS - 10, 10), segment(PS, 20)])
    assert layout.offset == PS
    assert [s.start for s in layout.stale_segments] == [PS]
    layout = resolve_layout(KEYS, PS, None, [], [segment(0, PS - 10), segment(PS - 10, 20)])
    assert layout.offset == PS - 10


def test_limit_hides_the_segment_that_would_reach_the_length() -> None:
    length = PS + 300
    listed = [segment(PS, 100), segment(PS + 100, 200)]
    assert resolve_layout(KEYS, PS, length, [part(1)], listed).offset == length
    assert resolve_layout(KEYS, PS, length, [part(1)], listed, limit=length - 1).offset == PS + 100


def test_parts_beyond_the_final_part_do_not_count() -> None:
    layout = resolve_layout(KEYS, PS, PS, [part(1), part(2)], [])
    assert layout.offset == PS


def test_tail_cache_is_bounded_and_checks_etag_and_size() -> None:
    cache = TailCache(100)
    cache.put("a", '"1"', b"x" * 60)
    cache.put("b", '"2"', b"y" * 30)
    assert cache.get(Segment("a", 0, 60, '"1"')) == b"x" * 60
    assert cache.get(Segment("a", 0, 60, '"other"')) is None  # rewritten elsewhere
    assert cache.get(Segment("a", 0, 60, '"1"')) is None  # and forgotten
    cache.put("c", '"3"', b"z" * 50)
    cache.put("d", '"4"', b"w" * 60)  # evicts the least recently used
    assert cache.size <= 100
    assert cache.get(Segment("b", 0, 30, '"2"')) is None
    cache.put("huge", '"5"', b"h" * 101)
    assert cache.get(Segment("huge", 0, 101, '"5"')) is None
    disabled = TailCache(0)
    disabled.put("a", '"1"', b"x")
    assert disabled.size == 0


def test_content_md5_is_base64_of_the_digest() -> None:
    assert content_md5(b"abc").value == base64.b64encode(hashlib.md5(b"abc").digest()).decode()
    assert content_md5(b"abc").algorithm == "md5"


def test_retry_delays_grow_exponentially_with_full_jitter() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=0.1, max_delay=1.0)
    for attempt in range(1, 8):
        for _ in range(50):
            assert 0 <= policy.delay(attempt) <= min(1.0, 0.1 * 2**attempt)


class _Flaky:
    """Fails the first ``failures`` calls of head_bucket with ``error``."""

    def __init__(self, failures: int, error: S3Error) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def head_bucket(self, bucket: str) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error


async def _no_sleep(delay: float) -> None:
    await asyncio.sleep(0)


async def test_transient_errors_are_retried_up_to_max_attempts() -> None:
    flaky = _Flaky(3, S3TransientError("HeadBucket", "SlowDown", 503, "slow down"))
    client = RetryingS3Client(flaky, RetryPolicy(max_attempts=4), sleep=_no_sleep)  # type: ignore[arg-type]
    await client.head_bucket("b")
    assert flaky.calls == 4

    flaky = _Flaky(4, S3TransientError("HeadBucket", "InternalError", 500, "oops"))
    client = RetryingS3Client(flaky, RetryPolicy(max_attempts=4), sleep=_no_sleep)  # type: ignore[arg-type]
    with pytest.raises(S3TransientError):
        await client.head_bucket("b")
    assert flaky.calls == 4


async def test_permanent_errors_are_not_retried() -> None:
    flaky = _Flaky(1, S3Error("HeadBucket", "AccessDenied", 403, "no"))
    client = RetryingS3Client(flaky, RetryPolicy(max_attempts=4), sleep=_no_sleep)  # type: ignore[arg-type]
    with pytest.raises(S3Error):
        await client.head_bucket("b")
    assert flaky.calls == 1
