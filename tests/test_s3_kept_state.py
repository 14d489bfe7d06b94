"""The S3 store's kept state (``tusd_py.stores.kept``): consecutive PATCHes of one
upload on one instance read nothing back from S3, and a hold by anyone else in between
makes the next request read S3 again and see the right offset.

"Instances" here are separate ``S3Store`` objects (each its own client and kept
state) on one moto bucket, taking their locks from one lock service: a shared
``MemoryLocker`` (one process), one ``RedisLocker`` each on a real redis-server, or
one ``S3Locker`` each (own client) on the same moto bucket. The lockers' own
generation rules are tested here for memory and redis, in test_s3_locker.py for s3.
S3 calls are counted at each store's client seam.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio
from helpers import data_of, make_bucket, object_bytes, sha256
from redis_support import RedisServer
from test_s3_support import CountingClient, MiB, body, open_store, s3_config

from tusd_py.config import Size
from tusd_py.lockers.base import Locker, LockGeneration, no_release_request
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.lockers.redis import RedisLocker
from tusd_py.lockers.s3 import S3Locker
from tusd_py.stores.base import StoreError, UploadInfo, new_upload_id
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_botocore import AioS3Client
from tusd_py.stores.s3_client import S3Client

BOUND = 10.0
PART_SIZE = 4 * MiB
PATCH_SIZE = MiB
READS = ("GetObject", "ListParts", "ListObjectsV2", "HeadObject")


@dataclass
class Instance:
    """One server instance: a store with a counted client, and its locker."""

    store: S3Store
    counter: CountingClient
    locker: Locker

    def reads(self) -> int:
        return sum(self.counter.calls.get(name, 0) for name in READS)

    def loads(self) -> int:
        """Times the upload was read back from S3 (every load lists the parts)."""
        return self.counter.calls.get("ListParts", 0)

    def requests(self) -> int:
        return sum(self.counter.calls.values())

    async def create(self, length: int) -> str:
        upload_id = new_upload_id()
        async with self.locker.lock(upload_id, no_release_request) as held:
            await self.store.create(UploadInfo(id=upload_id, length=length), generation=held.generation)
        return upload_id

    async def patch(self, upload_id: str, offset: int, data: bytes, *, trust: bool = True) -> int:
        """One PATCH as the handler makes it (open under the lock, then write); the
        new offset. ``trust=False`` opens without the lock's generation."""
        async with self.locker.lock(upload_id, no_release_request) as held:
            upload = await self.store.get(upload_id, generation=held.generation if trust else None)
            if upload.info.offset != offset:
                return -upload.info.offset - 1  # the handler's 409
            info = await upload.write(offset, body(data, 64 * 1024))
            if info.is_complete:
                info = await upload.finish()
            return info.offset

    async def head(self, upload_id: str) -> int:
        async with self.locker.lock(upload_id, no_release_request) as held:
            return (await self.store.get(upload_id, generation=held.generation)).info.offset


@contextlib.asynccontextmanager
async def instance(endpoint: str, bucket: str, locker: Locker) -> AsyncIterator[Instance]:
    counters: list[CountingClient] = []

    def wrap(inner: S3Client) -> S3Client:
        counters.append(CountingClient(inner))
        return counters[0]

    store = await open_store(s3_config(endpoint, bucket, part_size=Size(PART_SIZE)), wrap=wrap)
    try:
        yield Instance(store, counters[0], locker)
    finally:
        await store.close()


@pytest.fixture
async def bucket(fast_moto: str) -> str:
    return await make_bucket(fast_moto)


@pytest.fixture
async def memory_locker() -> AsyncIterator[MemoryLocker]:
    locker = MemoryLocker(acquire_timeout=BOUND)
    yield locker
    await locker.close()


@pytest.mark.parametrize("trust", [True, False], ids=["kept", "without-generation"])
async def test_consecutive_patches_read_nothing_back(
    fast_moto: str, bucket: str, memory_locker: MemoryLocker, trust: bool
) -> None:
    length = 3 * PART_SIZE
    data = data_of(length)
    async with instance(fast_moto, bucket, memory_locker) as one:
        upload_id = await one.create(length)
        before_reads, before = one.reads(), one.requests()
        for start in range(0, length, PATCH_SIZE):
            if start + PATCH_SIZE == length:
                reads = one.reads() - before_reads  # before the PATCH that finishes
            assert await one.patch(upload_id, start, data[start:start + PATCH_SIZE], trust=trust) == start + PATCH_SIZE
        requests = one.requests() - before
        patches = length // PATCH_SIZE
        print(f"\ntrust={trust}: {requests} S3 requests for {patches} PATCHes, {reads} reads; {one.counter.calls}")
        if trust:
            assert reads == 0
            # A segment per PATCH below a boundary; at a boundary UploadPart and one
            # DeleteObjects of the segments it covers. The last PATCH also completes
            # (Complete, .info, a listing for leftovers).
            assert requests <= 1.5 * patches
        else:
            assert reads >= 2 * (patches - 1)
    assert sha256(await object_bytes(fast_moto, bucket, upload_id)) == sha256(data)


async def test_head_after_a_patch_costs_no_request(fast_moto: str, bucket: str, memory_locker: MemoryLocker) -> None:
    async with instance(fast_moto, bucket, memory_locker) as one:
        upload_id = await one.create(2 * PART_SIZE)
        await one.patch(upload_id, 0, data_of(PATCH_SIZE))
        before = one.requests()
        assert await one.head(upload_id) == PATCH_SIZE
        assert one.requests() == before


async def test_a_look_without_the_lock_keeps_the_state(
    fast_moto: str, bucket: str, memory_locker: MemoryLocker
) -> None:
    """The pre-access hook's look at an upload before the lock (a get without a
    generation) writes nothing, so the next hold still follows the last one and reuses
    what it kept."""
    async with instance(fast_moto, bucket, memory_locker) as one:
        upload_id = await one.create(2 * PART_SIZE)
        await one.patch(upload_id, 0, data_of(PATCH_SIZE))
        looked = await one.store.get(upload_id)
        assert looked.info.offset == PATCH_SIZE
        loads = one.loads()
        assert await one.patch(upload_id, PATCH_SIZE, data_of(PATCH_SIZE)) == 2 * PATCH_SIZE
        assert one.loads() == loads


async def _another_instance_writes_in_between(endpoint: str, bucket: str, first: Locker, second: Locker) -> None:
    length = 2 * PART_SIZE + MiB
    data = data_of(length)
    chunks = [data[start:start + PATCH_SIZE] for start in range(0, length, PATCH_SIZE)]
    async with instance(endpoint, bucket, first) as one, instance(endpoint, bucket, second) as two:
        upload_id = await one.create(length)
        offset = 0
        # Alternate in runs: A writes 2, B writes 1, A writes 3 (across a part
        # boundary, using tail segments B wrote), B writes the rest.
        for run, (writer, count) in enumerate(((one, 2), (two, 1), (one, 3), (two, len(chunks) - 6))):
            loads_before = writer.loads()
            for index in range(count):
                chunk = chunks[offset // PATCH_SIZE]
                new_offset = await writer.patch(upload_id, offset, chunk)
                assert new_offset == offset + len(chunk), f"409 at {offset}: the store said {-new_offset - 1}"
                offset = new_offset
                if index == 0 and run > 0:
                    # The first PATCH after the other instance's hold read S3 back...
                    assert writer.loads() == loads_before + 1
                    loads_before = writer.loads()
            assert writer.loads() == loads_before  # ...the later ones did not
        assert offset == length
        assert await one.head(upload_id) == length
    assert sha256(await object_bytes(endpoint, bucket, upload_id)) == sha256(data)


async def test_another_instance_writing_in_between_is_noticed_memory(
    fast_moto: str, bucket: str, memory_locker: MemoryLocker
) -> None:
    await _another_instance_writes_in_between(fast_moto, bucket, memory_locker, memory_locker)


async def test_another_instance_writing_in_between_is_noticed_redis(
    fast_moto: str, bucket: str, redis_server: RedisServer
) -> None:
    lockers = [RedisLocker(redis_server.url, acquire_timeout=BOUND, lease=3.0, request_timeout=1.0) for _ in range(2)]
    try:
        await _another_instance_writes_in_between(fast_moto, bucket, *lockers)
    finally:
        for locker in lockers:
            await locker.close()


async def test_another_instance_writing_in_between_is_noticed_s3_locker(fast_moto: str, bucket: str) -> None:
    clients = [await AioS3Client.connect(endpoint_url=fast_moto) for _ in range(2)]
    lockers = [
        S3Locker(client, bucket, "locks/", lease=3.0, poll_interval=0.1, request_timeout=1.0, acquire_timeout=BOUND)
        for client in clients
    ]
    try:
        await _another_instance_writes_in_between(fast_moto, bucket, *lockers)
    finally:
        for locker in lockers:
            await locker.close()
        for client in clients:
            await client.close()


async def test_a_failed_write_drops_the_kept_state(fast_moto: str, bucket: str, memory_locker: MemoryLocker) -> None:
    async with instance(fast_moto, bucket, memory_locker) as one:
        upload_id = await one.create(2 * PART_SIZE)
        await one.patch(upload_id, 0, data_of(PATCH_SIZE))
        with pytest.raises(StoreError):
            async with memory_locker.lock(upload_id, no_release_request) as held:
                upload = await one.store.get(upload_id, generation=held.generation)
                await upload.write(PATCH_SIZE + 1, body(b"x", 1))  # not the stored offset
        reads = one.reads()
        assert await one.head(upload_id) == PATCH_SIZE
        assert one.reads() > reads


# --- the lockers' generations --------------------------------------------------------


async def _generations(locker: Locker, other: Locker, upload_id: str = "up1") -> list[LockGeneration | None]:
    seen: list[LockGeneration | None] = []
    for holder in (locker, locker, other, locker):
        async with asyncio.timeout(BOUND), holder.lock(upload_id, no_release_request) as held:
            seen.append(held.generation)
    return seen


def _check_chain(seen: list[Any]) -> None:
    first, second, third, fourth = seen
    assert all(generation is not None for generation in seen)
    assert len({generation.token for generation in seen}) == 4
    assert second.follows == first.token  # released cleanly, nobody in between
    assert third.follows == second.token  # the other instance follows us directly...
    assert fourth.follows == third.token  # ...so we follow it, not our own last hold
    assert fourth.follows != second.token


async def test_memory_locker_generations(memory_locker: MemoryLocker) -> None:
    _check_chain(await _generations(memory_locker, memory_locker))
    async with memory_locker.lock("fresh", no_release_request) as held:
        assert held.generation is not None and held.generation.follows is None


async def test_redis_locker_generations(redis_server: RedisServer) -> None:
    lockers = [RedisLocker(redis_server.url, acquire_timeout=BOUND, lease=1.0, request_timeout=0.3) for _ in range(2)]
    try:
        _check_chain(await _generations(*lockers))
        # A hold whose lease lapsed (its holder crashed or stalled: its key is gone)
        # never released: whoever takes the lock next cannot vouch for anything.
        async with asyncio.timeout(BOUND), lockers[1].lock("up2", no_release_request):
            pass
        plain = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            async with asyncio.timeout(BOUND), lockers[0].lock("up2", no_release_request) as stalled:
                assert stalled.generation is not None and stalled.generation.follows is not None
                await plain.delete("tusd-py:lock:up2")  # the lease lapsed
                async with lockers[1].lock("up2", no_release_request) as taken_over:
                    assert taken_over.generation is not None and taken_over.generation.follows is None
        finally:
            await plain.aclose()
    finally:
        for locker in lockers:
            await locker.close()
