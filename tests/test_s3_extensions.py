"""Concatenation, checksum and expiration on the S3 store, through the tus handler,
against moto (with S3's real 5 MiB minimum part size where part sizes matter)."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiobotocore.session import get_session
from helpers import data_of, make_bucket, object_bytes, sha256
from test_s3_support import (
    CountingClient,
    SeamWrapper,
    bucket_contents,
    open_store,
    s3_config,
)
from tus_fakes import BASE, HOST, StaticBody, body_bytes, header, make_request

from tusd_py.cli import tus_options
from tusd_py.config import Config, Size
from tusd_py.expiry import Sweeper
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.stores.base import SupportsConcatenation, SupportsExpiration, UploadInfo
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_client import S3Client, S3Error
from tusd_py.stores.s3_concat import PlannedPart, SourceRange, plan_parts
from tusd_py.tus.handler import TusHandler

KiB = 1024
MiB = 1024 * KiB


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Tus:
    """A tus handler over an S3 store."""

    def __init__(self, store: S3Store, lifetime: float = 0.0, max_buffered: int = 64 * MiB) -> None:
        self.store = store
        self.clock = Clock()
        config = Config()
        config.expiration.lifetime = lifetime
        config.checksum.max_buffered_size = Size(max_buffered)
        self.locker = MemoryLocker(acquire_timeout=5.0)
        self.handler = TusHandler(store, self.locker, tus_options(config), clock=self.clock)

    async def create(self, length: int, **extra: str) -> str:
        response = await self.handler(make_request("POST", BASE, {"Upload-Length": str(length), **extra}))
        assert response.status == 201, (response.status, response.body)
        return (header(response, "Location") or "").rsplit("/", 1)[-1]

    async def patch(self, upload_id: str, offset: int, data: bytes, chunk: int = 256 * KiB, **extra: str) -> Any:
        headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset), **extra}
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        return await self.handler(make_request("PATCH", BASE + upload_id, headers, StaticBody(pieces)))

    async def partial(self, data: bytes) -> str:
        upload_id = await self.create(len(data), **{"Upload-Concat": "partial"})
        if data:
            response = await self.patch(upload_id, 0, data)
            assert response.status == 204, response.status
        return upload_id

    async def final(self, ids: list[str]) -> Any:
        concat = "final;" + " ".join(f"http://{HOST}{BASE}{upload_id}" for upload_id in ids)
        return await self.handler(make_request("POST", BASE, {"Upload-Concat": concat}))


# --- the part plan ---------------------------------------------------------------------


def _shape(parts: list[PlannedPart]) -> list[tuple[bool, list[tuple[str, int, int]]]]:
    return [(part.copy, [(r.key, r.start, r.stop) for r in part.ranges]) for part in parts]


def test_plan_small_partials_are_combined() -> None:
    parts = plan_parts([("a", 3), ("b", 4), ("c", 2)], min_part_size=5, max_copy_size=20)
    assert _shape(parts) == [(False, [("a", 0, 3), ("b", 0, 2)]), (False, [("b", 2, 4), ("c", 0, 2)])]


def test_plan_large_partials_are_copied_and_gaps_filled() -> None:
    parts = plan_parts([("a", 12), ("b", 2), ("c", 9), ("d", 45)], min_part_size=5, max_copy_size=20)
    assert _shape(parts) == [
        (True, [("a", 0, 12)]),
        (False, [("b", 0, 2), ("c", 0, 3)]),
        (True, [("c", 3, 9)]),
        (True, [("d", 0, 15)]),
        (True, [("d", 15, 30)]),
        (True, [("d", 30, 45)]),
    ]


@pytest.mark.parametrize("seed", range(30))
def test_plan_invariants(seed: int) -> None:
    import random

    generator = random.Random(seed)
    sources = [(f"k{i}", generator.choice([0, 1, 4, 5, 6, 17, 60])) for i in range(generator.randint(1, 8))]
    parts = plan_parts(sources, min_part_size=5, max_copy_size=20)
    assert all(part.size >= 5 for part in parts[:-1])
    assert all(part.size <= 20 for part in parts)
    assert all(len(part.ranges) == 1 for part in parts if part.copy)
    flattened = [r for part in parts for r in part.ranges]
    expected: list[SourceRange] = []
    for r in flattened:  # ranges are contiguous, in order, and cover every byte once
        if expected and expected[-1].key == r.key and expected[-1].stop == r.start:
            expected[-1] = SourceRange(r.key, expected[-1].start, r.stop)
        else:
            expected.append(r)
    assert [(r.key, r.start, r.stop) for r in expected] == [(key, 0, size) for key, size in sources if size]


# --- concatenation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "expected_copies"),
    [
        ([100 * KiB, 10, 1 * MiB], 0),  # only partials below 5 MiB: one combined part
        # Mixed, with S3's real 5 MiB minimum: 6 MiB copied; 1 KiB + the first 5 MiB - 1 KiB
        # of the next combined; the rest of it + 2 MiB + the start of the 12 MiB combined;
        # the rest of the 12 MiB (over 5 MiB) copied.
        ([6 * MiB, 1 * KiB, 7 * MiB + 3, 2 * MiB, 12 * MiB], 2),
    ],
)
async def test_concatenation_on_s3(
    moto_endpoint: str, bucket: str, sizes: list[int], expected_copies: int
) -> None:
    counting: list[CountingClient] = []

    def wrap(inner: S3Client) -> S3Client:
        counting.append(CountingClient(inner))
        return counting[0]

    store = await open_store(s3_config(moto_endpoint, bucket, part_size=Size(5 * MiB)), wrap=wrap)
    assert isinstance(store, SupportsConcatenation)
    tus = Tus(store)
    try:
        datas = [data_of(size, seed=index) for index, size in enumerate(sizes)]
        ids = [await tus.partial(data) for data in datas]
        before = dict(counting[0].calls)
        response = await tus.final(ids)
        assert response.status == 201, await body_bytes(response)
        final_id = (header(response, "Location") or "").rsplit("/", 1)[-1]
        stored = await object_bytes(moto_endpoint, bucket, final_id)
        assert sha256(stored) == sha256(b"".join(datas))
        copies = counting[0].calls.get("UploadPartCopy", 0) - before.get("UploadPartCopy", 0)
        assert copies == expected_copies

        head = await tus.handler(make_request("HEAD", BASE + final_id))
        assert header(head, "Upload-Length") == str(sum(sizes))
        assert header(head, "Upload-Offset") == str(sum(sizes))
        assert (header(head, "Upload-Concat") or "").startswith("final;http://")
        assert (await tus.patch(final_id, sum(sizes), b"x")).status == 403
        download = await tus.handler(make_request("GET", BASE + final_id))
        assert sha256(await body_bytes(download)) == sha256(b"".join(datas))
        _, multipart_uploads = await bucket_contents(moto_endpoint, bucket)
        assert multipart_uploads == []
    finally:
        await store.close()


class _CopyFails(SeamWrapper):
    async def _call(self, operation: str, call: Callable[[], Any], sent: int = 0) -> Any:
        if operation == "UploadPartCopy":
            raise S3Error(operation, "InternalError", 500, "injected")
        return await call()


async def test_failed_concatenation_leaves_nothing(moto_endpoint: str, bucket: str) -> None:
    store = await open_store(s3_config(moto_endpoint, bucket, part_size=Size(5 * MiB)), wrap=_CopyFails)
    tus = Tus(store)
    try:
        ids = [await tus.partial(data_of(6 * MiB)), await tus.partial(b"tail")]
        keys_before, _ = await bucket_contents(moto_endpoint, bucket)
        response = await tus.final(ids)
        assert response.status == 503
        keys, multipart_uploads = await bucket_contents(moto_endpoint, bucket)
        assert sorted(keys) == sorted(keys_before)
        assert multipart_uploads == []
    finally:
        await store.close()


async def test_unknown_and_unfinished_partials_on_s3(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket))
    tus = Tus(store)
    try:
        unfinished = await tus.create(10, **{"Upload-Concat": "partial"})
        response = await tus.final([unfinished])
        assert response.status == 400 and b"not finished" in await body_bytes(response)
        response = await tus.final(["a" * 32])
        assert response.status == 400 and b"does not exist" in await body_bytes(response)
    finally:
        await store.close()


# --- checksum ----------------------------------------------------------------------------


def _checksum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


async def test_checksum_on_s3(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket))
    tus = Tus(store, max_buffered=3 * MiB)
    try:
        data = data_of(int(2.5 * MiB))
        upload_id = await tus.create(len(data))
        # A mismatch stores nothing: no part, no tail segment.
        response = await tus.patch(upload_id, 0, data, **{"Upload-Checksum": _checksum("sha256", data + b"!")})
        assert response.status == 460
        keys, _ = await bucket_contents(fast_moto, bucket)
        assert sorted(keys) == [f"{upload_id}.info"]
        assert (await store.get(upload_id)).info.offset == 0
        # Too large for the bound: 413 before reading.
        response = await tus.patch(upload_id, 0, data + data, **{"Upload-Checksum": _checksum("md5", data + data)})
        assert response.status == 413
        # A match is stored as usual (parts and a tail), and completes the upload.
        response = await tus.patch(upload_id, 0, data, **{"Upload-Checksum": _checksum("md5", data)})
        assert response.status == 204 and header(response, "Upload-Offset") == str(len(data))
        assert sha256(await object_bytes(fast_moto, bucket, upload_id)) == sha256(data)
    finally:
        await store.close()


# --- expiration --------------------------------------------------------------------------


async def test_expired_upload_is_removed_from_s3(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket, prefix="up/"))
    assert isinstance(store, SupportsExpiration)
    tus = Tus(store, lifetime=60)
    sweeper = Sweeper(store, tus.locker, orphan_grace=3600, clock=tus.clock)
    try:
        expiring = await tus.create(3 * MiB)
        await tus.patch(expiring, 0, data_of(MiB + 5))  # one part and a tail segment
        empty = await tus.create(10)
        done = await tus.create(3)
        await tus.patch(done, 0, b"abc")
        tus.clock.now += 59
        assert (await sweeper.sweep()).expired == 0
        tus.clock.now += 2
        assert (await tus.handler(make_request("HEAD", BASE + expiring))).status == 410
        result = await sweeper.sweep()
        assert (result.expired, result.orphans) == (2, 0)
        keys, multipart_uploads = await bucket_contents(fast_moto, bucket)
        assert sorted(keys) == sorted([f"up/{done}", f"up/{done}.info"])  # .info and tail segments gone
        assert multipart_uploads == []  # aborted
        assert (await tus.handler(make_request("HEAD", BASE + empty))).status == 404
        assert (await tus.handler(make_request("HEAD", BASE + done))).status == 200
    finally:
        await store.close()


async def test_orphans_on_s3(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket, prefix="up/"))
    try:
        live = await store.create(UploadInfo(id="live", length=10 * MiB))
        async with get_session().create_client("s3", endpoint_url=fast_moto, region_name="us-east-1") as client:
            await client.create_multipart_upload(Bucket=bucket, Key="up/orphan")  # its .info never written
            await client.create_multipart_upload(Bucket=bucket, Key="elsewhere/x")  # not under the prefix
            await client.put_object(Bucket=bucket, Key="up/gone.tail/0000000000000000", Body=b"tail")
            await client.put_object(Bucket=bucket, Key="up/finished-object", Body=b"kept: may be a consumer's")
        # Too young: the tail segment stays. (moto reports a fixed 2010 "Initiated"
        # for every multipart upload, so only objects' ages can be checked here.)
        await store.remove_orphans(created_before=time.time() - 3600)
        keys, _ = await bucket_contents(fast_moto, bucket)
        assert "up/gone.tail/0000000000000000" in keys
        await store.remove_orphans(created_before=time.time() + 60)
        keys, multipart_uploads = await bucket_contents(fast_moto, bucket)
        assert sorted(keys) == ["up/finished-object", "up/live.info"]
        assert sorted(multipart_uploads) == ["elsewhere/x", "up/live"]
        assert (await store.get(live.info.id)).info.offset == 0
        listed = [info.id async for info in store.list_uploads()]
        assert listed == ["live"]
    finally:
        await store.close()
