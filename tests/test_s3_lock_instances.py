"""Several hosts with no lock service: tusd-py processes on one moto bucket with
``lock.backend = "s3"`` (lock objects by conditional writes), alone and behind nginx.

The instances are real processes (tests/instances.py); waits are on responses, each
with a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import create, data_of, head_offset, object_bytes, patch, sha256, upload_id_of

from tests import nginx_support
from tests.instances import (
    Instance,
    MiB,
    expect_continue_patch,
    merged,
    running,
    s3_settings,
    scenario_concurrent_patches,
    scenario_interrupted_uploads,
    scenario_takeover,
    start_instance,
)
from tests.test_s3_locker import keys_under

LEASE = 3
S3_LOCK = {"lock": {"backend": "s3"}, "lock.s3": {"lease": LEASE, "poll_interval": 0.2, "request_timeout": 1}}
LOCK_PREFIX = ".locks/"


@pytest.fixture
async def pair(tmp_path: Path, moto_endpoint: str, bucket: str) -> AsyncIterator[list[Instance]]:
    """Instances "a" and "b": same bucket, locks in it, separate processes."""
    settings = merged(s3_settings(moto_endpoint, bucket), S3_LOCK, {"server": {"behind_proxy": True}})
    async with running(tmp_path, {"a": settings, "b": settings}) as instances:
        yield instances


async def test_concurrent_patches_through_two_instances_never_interleave(
    pair: list[Instance], moto_endpoint: str, bucket: str
) -> None:
    a, b = pair
    await scenario_concurrent_patches(a.port, b.port, moto_endpoint, bucket, 8 * MiB, seed=11)
    assert await keys_under(moto_endpoint, bucket, LOCK_PREFIX) == []


async def test_stalled_patch_on_one_instance_is_taken_over_by_the_other(
    pair: list[Instance], moto_endpoint: str, bucket: str
) -> None:
    # B's HEAD reports every byte A received: B's lock request made A store and release.
    a, b = pair
    await scenario_takeover(a.port, b.port, moto_endpoint, bucket, seed=21)
    assert await keys_under(moto_endpoint, bucket, LOCK_PREFIX) == []


async def test_a_killed_holder_is_taken_over_after_one_lease(
    tmp_path: Path, pair: list[Instance], moto_endpoint: str, bucket: str
) -> None:
    _, b = pair
    settings = merged(s3_settings(moto_endpoint, bucket), S3_LOCK)
    doomed = await start_instance(tmp_path, "doomed", settings)
    length = 7 * MiB
    payload = data_of(length, seed=31)
    path = await create(doomed.port, length)
    stalled, head = await expect_continue_patch(doomed.port, path, 0, length)
    try:
        assert head.status == 100, head
        await stalled.send(payload[: 6 * MiB])
        assert await keys_under(moto_endpoint, bucket, LOCK_PREFIX) == [LOCK_PREFIX + upload_id_of(path)]
        doomed.process.kill()
        await doomed.process.wait()
    finally:
        stalled.abort()
    loop = asyncio.get_running_loop()
    started = loop.time()
    offset = await head_offset(b.port, path)  # waits for the lease, then takes it over
    assert loop.time() - started < LEASE + 1 + 5, "the lock outlived its lease by far"
    assert offset in (0, 5 * MiB)  # what the killed instance had stored in S3
    response = await patch(b.port, path, offset, payload[offset:])
    assert response.status == 204, response
    assert sha256(await object_bytes(moto_endpoint, bucket, upload_id_of(path))) == sha256(payload)
    assert await keys_under(moto_endpoint, bucket, LOCK_PREFIX) == []


async def test_interrupted_uploads_through_nginx_round_robin(
    nginx_installed: None, pair: list[Instance], moto_endpoint: str, bucket: str
) -> None:
    a, b = pair
    with nginx_support.run_nginx([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as nginx:
        interruptions = await scenario_interrupted_uploads(nginx.port, moto_endpoint, bucket, count=20, seed=51)
    assert interruptions >= 10
    for instance in pair:
        assert "PATCH" in instance.log(), instance.name
    assert await keys_under(moto_endpoint, bucket, LOCK_PREFIX) == []
