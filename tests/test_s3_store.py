"""S3 store behaviour against a moto server over HTTP: lengths, chunk sizes,
interrupted PATCHes, resuming on another instance, deferred length, termination,
download, start-up checks, retries, failures, backpressure.

Most tests use a moto with a 1 MiB minimum part size and 1 MiB parts (fast); those
marked "real minimum" use the session moto with S3's 5 MiB minimum, so that a part
of the wrong size would fail with EntityTooSmall as on S3.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from helpers import data_of, make_bucket, object_bytes, sha256
from test_s3_support import (
    ClientGone,
    CountingClient,
    MiB,
    SeamWrapper,
    body,
    broken_body,
    bucket_contents,
    open_store,
    patch,
    s3_config,
    upload,
)

from tusd_py.config import S3StoreConfig, Size
from tusd_py.stores.base import (
    IteratedBody,
    Store,
    StoreConfigError,
    StoreUnavailable,
    SupportsConcatenation,
    SupportsExpiration,
    UploadInfo,
    UploadNotFound,
    UploadTooLarge,
    new_upload_id,
)
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_client import BodyChecksum, PartBody, S3Client, S3Error, S3TransientError, content_md5
from tusd_py.stores.s3_spool import SpoolRing, SpoolSlot

KiB = 1024


@pytest.fixture
async def bucket(fast_moto: str) -> str:
    return await make_bucket(fast_moto)


async def _store(endpoint: str, bucket: str, **overrides: Any) -> S3Store:
    return await open_store(s3_config(endpoint, bucket, **overrides))


async def _created(store: S3Store, length: int | None, **kwargs: Any) -> UploadInfo:
    return (await store.create(UploadInfo(id=new_upload_id(), length=length, **kwargs))).info


async def _assert_finished_object(endpoint: str, bucket: str, store: S3Store, info: UploadInfo, data: bytes) -> None:
    stored = await object_bytes(endpoint, bucket, info.id)
    assert sha256(stored) == sha256(data)
    fresh = (await store.get(info.id)).info
    assert fresh.finished and fresh.offset == len(data) == fresh.length
    keys, multipart_uploads = await bucket_contents(endpoint, bucket)
    assert sorted(keys) == sorted([info.id, f"{info.id}.info"]), "tail segments left behind"
    assert multipart_uploads == []


async def test_implements_the_store_capabilities(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket)
    try:
        assert isinstance(store, Store)
        assert isinstance(store, SupportsConcatenation)
        assert isinstance(store, SupportsExpiration)
        opened = await store.create(UploadInfo(id=new_upload_id(), length=1))
        for member in ("write", "finish", "declare_length", "terminate", "read"):  # termination, deferred, download
            assert callable(getattr(opened, member))
    finally:
        await store.close()


@pytest.mark.parametrize("length", [0, 1, MiB - 1, MiB, MiB + 1, 3 * MiB + 12345])
async def test_lengths_around_the_part_size(fast_moto: str, bucket: str, length: int) -> None:
    store = await _store(fast_moto, bucket)
    try:
        data = data_of(length)
        info = await _created(store, length)
        info = await upload(store, info, data, patch_size=700 * KiB)
        await _assert_finished_object(fast_moto, bucket, store, info, data)
    finally:
        await store.close()


@pytest.mark.parametrize("chunk_size", [KiB, 64 * KiB, MiB, 3 * MiB + 7])
async def test_chunk_sizes(fast_moto: str, bucket: str, chunk_size: int) -> None:
    store = await _store(fast_moto, bucket)
    try:
        data = data_of(4 * MiB + 333, seed=chunk_size)
        info = await _created(store, len(data))
        info = await upload(store, info, data, patch_size=len(data), chunk_size=chunk_size)
        await _assert_finished_object(fast_moto, bucket, store, info, data)
    finally:
        await store.close()


async def test_real_minimum_40_mib_chunks_in_one_patch(moto_endpoint: str) -> None:
    """Real 5 MiB minimum, 8 MiB parts, one PATCH of 40 MiB chunks; memory spool."""
    bucket = await make_bucket(moto_endpoint)
    store = await _store(moto_endpoint, bucket, part_size=Size(8 * MiB), spool="memory")
    try:
        data = data_of(41 * MiB + 5)
        info = await _created(store, len(data))
        info = await upload(store, info, data, patch_size=len(data), chunk_size=40 * MiB)
        await _assert_finished_object(moto_endpoint, bucket, store, info, data)
    finally:
        await store.close()


async def test_real_minimum_small_patches_and_lengths(moto_endpoint: str) -> None:
    """Real 5 MiB minimum, 5 MiB parts: many small PATCHes that are not aligned to
    parts, and the lengths part_size - 1, part_size, part_size + 1."""
    bucket = await make_bucket(moto_endpoint)
    store = await _store(moto_endpoint, bucket, part_size=Size(5 * MiB))
    try:
        cases = [(5 * MiB - 1, 1536 * KiB), (5 * MiB, 5 * MiB), (5 * MiB + 1, 2 * MiB), (11 * MiB + 7, 3 * MiB)]
        for length, patch in cases:
            data = data_of(length, seed=length)
            info = await _created(store, length)
            info = await upload(store, info, data, patch_size=patch, chunk_size=256 * KiB)
            assert sha256(await object_bytes(moto_endpoint, bucket, info.id)) == sha256(data)
    finally:
        await store.close()


async def _interrupted_then_resumed(
    endpoint: str, bucket: str, data: bytes, first: int, make_body: Callable[[bytes, int], IteratedBody]
) -> None:
    """Send ``data[:first]`` in a PATCH that breaks off after those bytes; check they
    all count; resume on a second store instance; check the object."""
    store_a = await _store(endpoint, bucket)
    store_b = await _store(endpoint, bucket)
    try:
        info = await _created(store_a, len(data))
        opened = await store_a.get(info.id)
        try:
            offset = (await opened.write(opened.info.offset, make_body(data[:first], 100 * KiB))).offset
        except ClientGone:
            offset = opened.info.offset
        assert offset == first
        # Another instance (no shared memory) serves the next request.
        resumed = (await store_b.get(info.id)).info
        assert resumed.offset == first
        finished = await upload(store_b, resumed, data, patch_size=len(data))
        await _assert_finished_object(endpoint, bucket, store_b, finished, data)
    finally:
        await store_a.close()
        await store_b.close()


@pytest.mark.parametrize(
    "first",
    [MiB // 2, MiB, 2 * MiB, 2 * MiB + 1, 2 * MiB + 700 * KiB],
    ids=["mid-part-0", "part-boundary-1", "part-boundary-2", "just-past-boundary", "mid-part-2"],
)
@pytest.mark.parametrize("make_body", [body, broken_body], ids=["ends-early", "client-gone"])
async def test_interrupted_patch_keeps_every_byte(
    fast_moto: str, bucket: str, first: int, make_body: Callable[[bytes, int], IteratedBody]
) -> None:
    await _interrupted_then_resumed(fast_moto, bucket, data_of(3 * MiB + 99), first, make_body)


async def test_interruptions_inside_the_tail_accumulate_segments(fast_moto: str, bucket: str) -> None:
    """Several PATCHes interrupted inside the same part leave one segment each; the
    PATCH that crosses the boundary turns them into a part and deletes them."""
    data = data_of(2 * MiB + 10)
    store_a = await _store(fast_moto, bucket)
    store_b = await _store(fast_moto, bucket, tail_cache_size=Size(0))
    try:
        info = await _created(store_a, len(data))
        for end, store in [(100 * KiB, store_a), (300 * KiB, store_b), (301 * KiB, store_a), (900 * KiB, store_b)]:
            opened = await store.get(info.id)
            with pytest.raises(ClientGone):
                await opened.write(opened.info.offset, broken_body(data[opened.info.offset:end], 7 * KiB))
            assert opened.info.offset == end
        info = (await store_a.get(info.id)).info
        assert info.offset == 900 * KiB
        keys, _ = await bucket_contents(fast_moto, bucket)
        assert len([key for key in keys if ".tail/" in key]) == 4
        finished = await upload(store_b, info, data, patch_size=len(data))
        await _assert_finished_object(fast_moto, bucket, store_b, finished, data)
    finally:
        await store_a.close()
        await store_b.close()


async def test_deferred_length(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket, deferred_length_ceiling=Size(64 * MiB))
    try:
        data = data_of(2 * MiB + 4321)
        info = await _created(store, None)
        assert info.storage["part_size"] == MiB
        for end in (700 * KiB, 2 * MiB + 100, len(data)):
            opened = await store.get(info.id)
            info = opened.info
            assert info.length is None
            assert (await opened.write(info.offset, body(data[info.offset:end], 64 * KiB))).offset == end
        opened = await store.get(info.id)
        assert opened.info.offset == len(data)  # all in parts + tail; no length yet
        await opened.declare_length(len(data))
        info = await opened.finish()
        await _assert_finished_object(fast_moto, bucket, store, info, data)
    finally:
        await store.close()


async def test_deferred_length_declared_first_then_sent(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket)
    try:
        data = data_of(MiB + 5)
        info = await _created(store, None)
        info = await (await store.get(info.id)).declare_length(len(data))
        info = await upload(store, info, data, patch_size=600 * KiB)
        await _assert_finished_object(fast_moto, bucket, store, info, data)
    finally:
        await store.close()


async def test_deferred_length_zero(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket)
    try:
        info = await _created(store, None)
        opened = await store.get(info.id)
        await opened.declare_length(0)
        info = await opened.finish()
        await _assert_finished_object(fast_moto, bucket, store, info, b"")
    finally:
        await store.close()


async def test_deferred_length_ceiling_is_enforced(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket, deferred_length_ceiling=Size(2 * MiB))
    try:
        info = await _created(store, None)
        with pytest.raises(UploadTooLarge):
            await (await store.get(info.id)).declare_length(2 * MiB + 1)
        opened = await store.get(info.id)
        data = data_of(3 * MiB)
        with pytest.raises(UploadTooLarge):
            await opened.write(0, body(data, 256 * KiB))
        assert opened.info.offset == 2 * MiB  # what fits was stored
        assert (await store.get(info.id)).info.offset == 2 * MiB
    finally:
        await store.close()


async def test_part_size_grows_for_large_uploads(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket)
    try:
        info = await _created(store, 100_000 * MiB + 1)
        assert info.storage["part_size"] == 11 * MiB  # ceil(100,000 MiB / 10,000) rounded up
        stored = json.loads(await object_bytes(fast_moto, bucket, f"{info.id}.info"))
        assert stored["storage"]["part_size"] == 11 * MiB
        assert stored["storage"]["multipart_upload_id"]
        await (await store.get(info.id)).terminate()
    finally:
        await store.close()


@pytest.mark.parametrize("stage", ["created", "tail", "parts-and-tail", "finished"])
async def test_termination_leaves_nothing(fast_moto: str, bucket: str, stage: str) -> None:
    store = await _store(fast_moto, bucket)
    try:
        data = data_of(3 * MiB + 5)
        info = await _created(store, len(data))
        if stage == "tail":
            await patch(store, info.id, data[:500 * KiB])
        elif stage == "parts-and-tail":
            await patch(store, info.id, data[:2 * MiB + 5])
        elif stage == "finished":
            await upload(store, info, data, patch_size=len(data))
        await (await store.get(info.id)).terminate()
        assert await bucket_contents(fast_moto, bucket) == ([], [])
        with pytest.raises(UploadNotFound):
            await store.get(info.id)
    finally:
        await store.close()


async def test_read_streams_ranges_of_a_finished_upload(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket)
    try:
        data = data_of(MiB + 777)
        info = await upload(store, await _created(store, len(data)), data, patch_size=len(data))
        opened = await store.get(info.id)
        for start, stop in [(0, len(data)), (5, 6), (MiB - 3, MiB + 500), (10, 10)]:
            received = b"".join([chunk async for chunk in opened.read(start, stop)])
            assert received == data[start:stop]
    finally:
        await store.close()


async def test_get_of_unknown_or_invalid_ids(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket)
    try:
        with pytest.raises(UploadNotFound):
            await store.get(new_upload_id())
        with pytest.raises(UploadNotFound):
            await store.get("../etc/passwd")
    finally:
        await store.close()


async def test_metadata_filetype_becomes_the_content_type(fast_moto: str, bucket: str) -> None:
    store = await _store(fast_moto, bucket, prefix="uploads/")
    try:
        info = await _created(store, 3, metadata={"filetype": "dGV4dC9wbGFpbg=="})  # text/plain
        await upload(store, info, b"abc", patch_size=3)
        from aiobotocore.session import get_session

        async with get_session().create_client("s3", endpoint_url=fast_moto, region_name="us-east-1") as client:
            head = await client.head_object(Bucket=bucket, Key=f"uploads/{info.id}")
        assert head["ContentType"] == "text/plain"
    finally:
        await store.close()


async def test_crash_between_complete_and_info_rewrite_is_recognised(fast_moto: str, bucket: str) -> None:
    """CompleteMultipartUpload succeeded, then the process died before ``.info`` said
    finished: get sees the multipart upload gone and the object at full length."""

    class DiesAfterComplete(SeamWrapper):
        async def _call(self, operation: str, call: Callable[[], Any], sent: int = 0) -> Any:
            if operation == "PutObject" and getattr(self, "completed", False):
                raise RuntimeError("process died")
            result = await call()
            if operation == "CompleteMultipartUpload":
                self.completed = True
            return result

    data = data_of(MiB + 3)
    dying = await open_store(s3_config(fast_moto, bucket), wrap=DiesAfterComplete)
    store = await _store(fast_moto, bucket)
    try:
        info = await _created(dying, len(data))
        opened = await dying.get(info.id)
        assert (await opened.write(0, body(data, 64 * KiB))).offset == len(data)
        with pytest.raises(RuntimeError):
            await opened.finish()
        reopened = await store.get(info.id)
        fresh = reopened.info
        assert fresh.finished and fresh.offset == len(data)
        stored = json.loads(await object_bytes(fast_moto, bucket, f"{info.id}.info"))
        assert stored["finished"] is True  # repaired
        assert sha256(await object_bytes(fast_moto, bucket, info.id)) == sha256(data)
        assert await reopened.finish() is fresh  # idempotent
    finally:
        await dying.close()
        await store.close()


async def test_all_bytes_stored_but_not_completed_reports_less_than_length(fast_moto: str, bucket: str) -> None:
    """A crash after the last UploadPart but before CompleteMultipartUpload: get does
    not report offset == length (no client would ever finish it); resending the rest
    finishes it."""
    data = data_of(2 * MiB + 50)
    store = await _store(fast_moto, bucket)
    try:
        info = await _created(store, len(data))
        assert (await patch(store, info.id, data)).offset == len(data)  # finish never called
        fresh = (await store.get(info.id)).info
        assert fresh.offset == 2 * MiB
        finished = await upload(store, fresh, data, patch_size=len(data))
        await _assert_finished_object(fast_moto, bucket, store, finished, data)
    finally:
        await store.close()


async def test_open_checks_the_bucket_at_startup(fast_moto: str) -> None:
    with pytest.raises(StoreConfigError, match="does not exist"):
        await S3Store.open(s3_config(fast_moto, "no-such-bucket-here"))
    with pytest.raises(StoreConfigError, match="bucket is not set"):
        await S3Store.open(S3StoreConfig())
    store = await S3Store.open(s3_config(fast_moto, await make_bucket(fast_moto)))
    await store.close()


async def test_open_with_an_unreachable_endpoint_fails_clearly() -> None:
    from conftest import free_port

    with pytest.raises(StoreConfigError, match="cannot reach S3"):
        await S3Store.open(s3_config(f"http://127.0.0.1:{free_port()}", "bucket"))


async def test_open_without_credentials_fails_clearly(fast_moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = await make_bucket(fast_moto)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreConfigError, match="no AWS credentials"):
        await S3Store.open(s3_config(fast_moto, bucket))


async def test_open_with_rejected_credentials_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto does not check credentials, so the rejection is simulated at the seam."""

    class Rejecting:
        async def head_bucket(self, bucket: str) -> None:
            raise S3Error("HeadBucket", "403", 403, "Forbidden")

        async def close(self) -> None:
            pass

    async def connect(**kwargs: Any) -> Any:
        return Rejecting()

    monkeypatch.setattr("tusd_py.stores.s3.AioS3Client.connect", connect)
    with pytest.raises(StoreConfigError, match="refused access.*credentials"):
        await S3Store.open(S3StoreConfig(bucket="b"))


class _FlakyEveryOtherCall(SeamWrapper):
    """Every call fails once with a transient error before it succeeds (inside the
    retry layer, so the store never sees the failures)."""

    def __init__(self, inner: S3Client) -> None:
        super().__init__(inner)
        self.failures = 0
        self._fail_next = True

    async def _call(self, operation: str, call: Callable[[], Any], sent: int = 0) -> Any:
        if self._fail_next:
            self._fail_next = False
            self.failures += 1
            raise S3TransientError(operation, "SlowDown", 503, "please reduce your request rate")
        self._fail_next = True
        return await call()


async def test_transient_errors_are_retried_on_every_call(fast_moto: str, bucket: str) -> None:
    flaky: list[_FlakyEveryOtherCall] = []

    def wrap(inner: S3Client) -> S3Client:
        flaky.append(_FlakyEveryOtherCall(inner))
        return flaky[0]

    store = await open_store(s3_config(fast_moto, bucket, max_concurrent_part_uploads=1), inner_wrap=wrap)
    try:
        data = data_of(3 * MiB + 1)
        info = await _created(store, len(data))
        info = await upload(store, info, data, patch_size=1536 * KiB)
        opened = await store.get(info.id)
        received = b"".join([chunk async for chunk in opened.read(0, len(data))])
        assert received == data
        assert flaky[0].failures > 10
        await opened.terminate()
    finally:
        await store.close()


class _PartFails(SeamWrapper):
    """UploadPart of ``part_number`` fails for good (after the retry layer)."""

    def __init__(self, inner: S3Client, part_number: int) -> None:
        super().__init__(inner)
        self.part_number = part_number
        self.started: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        self.started[part_number].set()
        if part_number == self.part_number:
            await self.started[part_number + 1].wait()  # let later parts get going
            raise S3TransientError("UploadPart", "InternalError", 500, "we encountered an internal error")
        return await super().upload_part(bucket, key, upload_id, part_number, body, checksum)


async def test_a_failed_part_is_kept_as_a_tail_segment_and_the_offset_stays_truthful(
    fast_moto: str, bucket: str
) -> None:
    data = data_of(5 * MiB + 10)
    failing = await open_store(s3_config(fast_moto, bucket), wrap=lambda inner: _PartFails(inner, 2))
    store = await _store(fast_moto, bucket)
    try:
        info = await _created(failing, len(data))
        opened = await failing.get(info.id)
        with pytest.raises(StoreUnavailable, match="part 2"):
            await opened.write(0, body(data[:4 * MiB + 5], 256 * KiB))
        # Part 1 is stored, part 2's bytes were saved as a tail segment; parts 3+ do not count.
        assert opened.info.offset == 2 * MiB
        fresh = (await store.get(info.id)).info
        assert fresh.offset == 2 * MiB
        finished = await upload(store, fresh, data, patch_size=len(data))
        await _assert_finished_object(fast_moto, bucket, store, finished, data)
    finally:
        await failing.close()
        await store.close()


async def test_part_uploads_are_bounded_by_the_global_semaphore(fast_moto: str, bucket: str) -> None:
    counters: list[CountingClient] = []

    def wrap(inner: S3Client) -> S3Client:
        counters.append(CountingClient(inner))
        return counters[0]

    config = s3_config(fast_moto, bucket, max_concurrent_part_uploads=2, max_buffered_parts=4)
    store = await open_store(config, wrap=wrap)
    try:
        uploads = [await _created(store, 4 * MiB) for _ in range(3)]
        datas = [data_of(4 * MiB, seed=i) for i in range(3)]
        await asyncio.gather(
            *(upload(store, info, d, patch_size=4 * MiB) for info, d in zip(uploads, datas, strict=True))
        )
        assert counters[0].peak_parts == 2
        for info, d in zip(uploads, datas, strict=True):
            assert sha256(await object_bytes(fast_moto, bucket, info.id)) == sha256(d)
    finally:
        await store.close()


class _GatedParts(SeamWrapper):
    """UploadPart waits until the test opens the gate."""

    def __init__(self, inner: S3Client) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        await self.gate.wait()
        return await super().upload_part(bucket, key, upload_id, part_number, body, checksum)


@pytest.mark.parametrize("spool", ["file", "memory"])
async def test_a_full_ring_stops_reading_the_body(
    fast_moto: str, bucket: str, spool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With parts stuck in upload, write() pulls at most max_buffered_parts parts'
    worth of body (plus one chunk): the backpressure that pauses the socket."""
    gated: list[_GatedParts] = []
    # Set when the writer waits for a slot of a full ring, or (were nothing holding
    # it back) when it has read the whole body.
    reader_stopped = asyncio.Event()
    acquire = SpoolRing.acquire

    async def acquire_noting_a_full_ring(ring: SpoolRing) -> SpoolSlot:
        if ring.full:
            reader_stopped.set()
        return await acquire(ring)

    monkeypatch.setattr(SpoolRing, "acquire", acquire_noting_a_full_ring)

    def wrap(inner: S3Client) -> S3Client:
        gated.append(_GatedParts(inner))
        return gated[0]

    config = s3_config(fast_moto, bucket, max_buffered_parts=2, spool=spool)
    store = await open_store(config, wrap=wrap)
    try:
        data = data_of(6 * MiB)
        info = await _created(store, len(data))
        opened = await store.get(info.id)
        pulled = 0

        async def counted_body() -> AsyncIterator[bytes]:
            nonlocal pulled
            async for chunk in body(data, 64 * KiB):
                pulled += len(chunk)
                yield chunk
            reader_stopped.set()

        write = asyncio.create_task(opened.write(0, IteratedBody(counted_body())))
        await reader_stopped.wait()  # the ring is full (two parts received), or no backpressure
        assert 2 * MiB <= pulled <= 2 * MiB + 64 * KiB
        gated[0].gate.set()
        assert (await write).offset == len(data)
        await opened.finish()
        assert sha256(await object_bytes(fast_moto, bucket, info.id)) == sha256(data)
    finally:
        await store.close()


async def test_tail_cache_rejects_a_segment_rewritten_by_another_instance(fast_moto: str, bucket: str) -> None:
    """A caches the segment it wrote at offset X; B later rewrites the segment at the
    same key with other bytes (a client that resent different data); A must notice
    the ETag change and read B's bytes."""
    data = data_of(MiB + 100)
    other = hashlib.sha256(b"other").digest() * (100 * KiB // 32)
    store_a = await _store(fast_moto, bucket)
    store_b = await _store(fast_moto, bucket)
    try:
        info = await _created(store_a, len(data))
        await patch(store_a, info.id, data[:100 * KiB])
        # B: the segment at 0 exists; B writes a new one at 100 KiB, then we rewrite
        # the segment at 0 behind A's back through B's client.
        await patch(store_b, info.id, data[100 * KiB:200 * KiB])
        await store_b._client.put_object(bucket, f"{info.id}.tail/{0:016d}", other, content_md5(other))
        expected = other + data[100 * KiB:]
        finished = await upload(store_a, info, expected, patch_size=len(data))
        assert sha256(await object_bytes(fast_moto, bucket, finished.id)) == sha256(expected)
    finally:
        await store_a.close()
        await store_b.close()


async def test_stale_segments_are_deleted_and_never_count(fast_moto: str, bucket: str) -> None:
    """A segment beyond a gap (left by a failed write) sits exactly where the next
    part will end; the next write deletes it before that part is stored, so its
    (here: wrong) bytes never count."""
    data = data_of(2 * MiB + 10)
    store = await _store(fast_moto, bucket)
    try:
        info = await _created(store, len(data))
        await patch(store, info.id, data[:500 * KiB])
        garbage = b"\xff" * (300 * KiB)
        stale_key = f"{info.id}.tail/{MiB:016d}"
        await store._client.put_object(bucket, stale_key, garbage, content_md5(garbage))
        opened = await store.get(info.id)
        assert opened.info.offset == 500 * KiB
        assert (await opened.write(500 * KiB, body(data[500 * KiB:MiB], 64 * KiB))).offset == MiB
        keys, _ = await bucket_contents(fast_moto, bucket)
        assert stale_key not in keys
        assert (await store.get(info.id)).info.offset == MiB
        finished = await upload(store, info, data, patch_size=len(data))
        await _assert_finished_object(fast_moto, bucket, store, finished, data)
    finally:
        await store.close()
