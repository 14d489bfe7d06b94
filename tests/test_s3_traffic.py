"""S3 traffic of small PATCHes: linear, not quadratic.

64 MiB sent as 64 PATCHes of 1 MiB with 8 MiB parts (S3's real 5 MiB minimum), each
PATCH a request of its own (get, then write), bytes counted at the client seam.

Per 8 MiB part, without the tail cache: 7 tail segments PUT (7 MiB), read back once
(7 MiB) and the part uploaded (8 MiB): 22/8 = 2.75x. With the cache the read-back
disappears: 15/8 = 1.875x. ``.info`` documents (a few hundred bytes per request) are
counted separately.
"""

from __future__ import annotations

import asyncio

import pytest
from helpers import data_of, make_bucket, object_bytes, sha256
from test_s3_support import CountingClient, MiB, body, open_store, s3_config

from tusd_py.config import Size
from tusd_py.stores.base import UploadInfo, new_upload_id
from tusd_py.stores.s3_client import BodyChecksum, S3Client

FILE_SIZE = 64 * MiB
PATCH_SIZE = 1 * MiB


class _TrafficCounter(CountingClient):
    """Also counts ``.info`` bytes apart from data bytes."""

    info_sent = 0
    info_received = 0

    @property
    def info_bytes(self) -> int:
        return self.info_sent + self.info_received

    async def put_object(self, bucket: str, key: str, body: bytes, checksum: BodyChecksum | None) -> str:
        if key.endswith(".info"):
            self.info_sent += len(body)
        return await super().put_object(bucket, key, body, checksum)

    async def get_object(self, bucket: str, key: str) -> bytes:
        data = await super().get_object(bucket, key)
        if key.endswith(".info"):
            self.info_received += len(data)
        return data


async def _measure(endpoint: str, tail_cache_size: int) -> tuple[float, float, _TrafficCounter]:
    bucket = await make_bucket(endpoint)
    counters: list[_TrafficCounter] = []

    def wrap(inner: S3Client) -> S3Client:
        counters.append(_TrafficCounter(inner))
        return counters[0]

    config = s3_config(endpoint, bucket, part_size=Size(8 * MiB), tail_cache_size=Size(tail_cache_size))
    store = await open_store(config, wrap=wrap)
    try:
        data = await asyncio.to_thread(data_of, FILE_SIZE)  # 64 MiB: not on the loop
        upload_id = (await store.create(UploadInfo(id=new_upload_id(), length=FILE_SIZE))).info.id
        for start in range(0, FILE_SIZE, PATCH_SIZE):
            opened = await store.get(upload_id)
            assert opened.info.offset == start
            await opened.write(start, body(data[start:start + PATCH_SIZE], 64 * 1024))
        await opened.finish()
        assert sha256(await object_bytes(endpoint, bucket, upload_id)) == sha256(data)
    finally:
        await store.close()
    counter = counters[0]
    data_ratio = (counter.bytes_moved - counter.info_bytes) / FILE_SIZE
    total_ratio = counter.bytes_moved / FILE_SIZE
    return data_ratio, total_ratio, counter


@pytest.mark.parametrize(
    ("tail_cache_size", "data_bound"),
    [(0, 2.75), (64 * MiB, 2.0)],
    ids=["without-tail-cache", "with-tail-cache"],
)
async def test_one_mib_patches_move_linear_traffic(
    moto_endpoint: str, tail_cache_size: int, data_bound: float, record_property: pytest.RecordProperty
) -> None:
    data_ratio, total_ratio, counter = await _measure(moto_endpoint, tail_cache_size)
    record_property("data_ratio", f"{data_ratio:.4f}")
    record_property("total_ratio", f"{total_ratio:.4f}")
    print(
        f"\ntail_cache_size={tail_cache_size}: data {data_ratio:.4f}x, with .info {total_ratio:.4f}x; "
        f"sent={counter.sent} received={counter.received} calls={counter.calls}"
    )
    if tail_cache_size:
        assert data_ratio < data_bound
        assert counter.received.get("GetObject", 0) == counter.info_received  # no tail byte read back
    else:
        assert data_ratio <= data_bound
    assert total_ratio < data_bound + 0.01
