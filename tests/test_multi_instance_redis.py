"""Several hosts with lock.backend = "redis": what only Redis has (Redis down, Redis
restarted mid-PATCH). Two tusd-py processes (``python -m tusd_py.cli --config FILE``,
tests/instances.py) on one moto bucket, locking through one real redis-server (the
``redis_server`` fixture of conftest.py). What every distributed locker must do across
instances is in test_distributed_lockers.py.
Waits are on responses, each with a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import create, data_of, head_offset, object_bytes, patch, sha256, upload_id_of

from tests.instances import (
    Instance,
    MiB,
    bucket_state,
    expect_continue_patch,
    merged,
    redis_settings,
    running,
    s3_settings,
)
from tests.rawhttp import request
from tests.redis_support import RedisServer

BOUND = 30.0
"""Upper bound for an expected event (a bound, never a delay)."""



@pytest.fixture
async def pair(
    tmp_path: Path, moto_endpoint: str, bucket: str, redis_server: RedisServer
) -> AsyncIterator[list[Instance]]:
    """Instances "a" and "b": same bucket, same Redis, separate processes."""
    settings = merged(s3_settings(moto_endpoint, bucket), redis_settings(redis_server.url))
    async with running(tmp_path, {"a": settings, "b": settings}) as instances:
        yield instances




async def test_redis_down_answers_503_writes_nothing_and_recovers(
    pair: list[Instance], moto_endpoint: str, bucket: str, redis_server: RedisServer
) -> None:
    a, b = pair
    length = 4 * MiB
    payload = data_of(length, 81)
    path = await create(a.port, length)
    response = await patch(a.port, path, 0, payload[:MiB])
    assert response.status == 204, response
    before = await bucket_state(moto_endpoint, bucket)

    await asyncio.to_thread(redis_server.stop)
    refused = [
        await patch(a.port, path, MiB, payload[MiB:2 * MiB]),
        await patch(b.port, path, MiB, payload[MiB:2 * MiB]),
        await request(b.port, "POST", "/files/", {"Upload-Length": "10"}),
        await request(a.port, "HEAD", path),
    ]
    for answer in refused:
        assert answer.status == 503, answer
    for answer in refused[:3]:
        assert b"lock service is unavailable" in answer.body, answer
    assert await bucket_state(moto_endpoint, bucket) == before

    # Redis comes back empty (no persistence): both instances recover by themselves.
    await asyncio.to_thread(redis_server.start)
    assert await head_offset(b.port, path) == MiB
    response = await patch(b.port, path, MiB, payload[MiB:])
    assert response.status == 204, response
    assert sha256(await object_bytes(moto_endpoint, bucket, upload_id_of(path))) == sha256(payload)


async def test_redis_restarted_mid_patch_stops_it_and_keeps_the_offset_truthful(
    pair: list[Instance], moto_endpoint: str, bucket: str, redis_server: RedisServer
) -> None:
    a, b = pair
    length = 9 * MiB
    sent = 6 * MiB + 777
    payload = data_of(length, 91)
    path = await create(a.port, length)
    stalled, head = await expect_continue_patch(a.port, path, 0, length)
    try:
        assert head.status == 100, head  # A holds the lock
        await stalled.send(payload[:sent])
        # Redis comes back empty: A's next renewal (every lease/3) finds its key gone.
        await asyncio.to_thread(redis_server.restart)
        answer = await stalled.read_response("PATCH", timeout=BOUND)
    finally:
        stalled.abort()
    assert answer.status == 503, answer
    assert b"lock was lost" in answer.body, answer

    offset = await head_offset(b.port, path)
    assert 0 <= offset <= sent
    assert await head_offset(a.port, path) == offset
    response = await patch(a.port, path, offset, payload[offset:])
    assert response.status == 204 and response.header("upload-offset") == str(length), response
    assert sha256(await object_bytes(moto_endpoint, bucket, upload_id_of(path))) == sha256(payload)
