"""Several hosts with lock.backend = "consul": what only Consul has (a session lost
mid-PATCH, Consul unreachable). Two tusd-py processes (``python -m tusd_py.cli --config
FILE``) on one moto bucket, locking through one Consul (the in-process fake of
tests/consul_fake.py, served by this test's event loop). What every distributed locker
must do across instances is in test_distributed_lockers.py.

The instances are real processes started by tests/instances.py; they are ready when
they send READY=1 to the test's NOTIFY_SOCKET. Waits are on responses and on the fake
Consul's state changes, each with a bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import create, data_of, head_offset, object_bytes, patch, sha256, upload_id_of

from tests.consul_fake import FakeConsul
from tests.instances import (
    Instance,
    MiB,
    bucket_state,
    consul_settings,
    expect_continue_patch,
    merged,
    running,
    s3_settings,
)
from tests.rawhttp import request

LOCK_PREFIX = "tusd-py/locks/"
BOUND = 30.0
"""Upper bound for an expected event (a bound, never a delay)."""


@pytest.fixture
async def consul() -> AsyncIterator[FakeConsul]:
    fake = FakeConsul()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def pair(tmp_path: Path, moto_endpoint: str, bucket: str, consul: FakeConsul) -> AsyncIterator[list[Instance]]:
    """Instances "a" and "b": same bucket, same Consul, separate processes."""
    settings = merged(
        s3_settings(moto_endpoint, bucket), consul_settings(consul.address), {"server": {"behind_proxy": True}}
    )
    async with running(tmp_path, {"a": settings, "b": settings}) as instances:
        # Each instance created its Consul session at startup (cli.start_locker).
        assert len(consul.sessions) == 2
        yield instances




async def test_session_lost_mid_patch_stops_it_and_keeps_the_offset_truthful(
    pair: list[Instance], moto_endpoint: str, bucket: str, consul: FakeConsul
) -> None:
    a, b = pair
    length = 9 * MiB
    sent = 6 * MiB + 777
    payload = data_of(length, 31)
    path = await create(a.port, length)
    lock_key = LOCK_PREFIX + upload_id_of(path)
    stalled, head = await expect_continue_patch(a.port, path, 0, length)
    try:
        assert head.status == 100, head
        holder = consul.holder(lock_key)
        assert holder is not None
        await stalled.send(payload[:sent])
        consul.expire_session(holder)  # as a TTL expiry would; A keeps its socket open
        answer = await stalled.read_response("PATCH", timeout=BOUND)
    finally:
        stalled.abort()
    assert answer.status == 503, answer
    assert b"lock was lost" in answer.body, answer
    assert consul.holder(lock_key) is None  # Consul released it with the session
    consul.advance(1.0)  # the lock-delay of the invalidated session passes

    offset = await head_offset(b.port, path)
    assert 0 <= offset <= sent
    assert await head_offset(a.port, path) == offset
    # A lives on with a new session and serves the resume.
    response = await patch(a.port, path, offset, payload[offset:])
    assert response.status == 204 and response.header("upload-offset") == str(length), response
    assert holder not in consul.sessions and len(consul.sessions) == 2
    assert sha256(await object_bytes(moto_endpoint, bucket, upload_id_of(path))) == sha256(payload)


async def test_consul_unreachable_answers_503_and_writes_nothing(
    pair: list[Instance], moto_endpoint: str, bucket: str, consul: FakeConsul
) -> None:
    a, b = pair
    length = 4 * MiB
    payload = data_of(length, 41)
    path = await create(a.port, length)
    response = await patch(a.port, path, 0, payload[:MiB])
    assert response.status == 204, response
    before = await bucket_state(moto_endpoint, bucket)

    await consul.stop()
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

    # Consul comes back (a restarted agent without state): both recover by themselves.
    await consul.restart()
    assert await head_offset(b.port, path) == MiB
    response = await patch(b.port, path, MiB, payload[MiB:])
    assert response.status == 204, response
    assert sha256(await object_bytes(moto_endpoint, bucket, upload_id_of(path))) == sha256(payload)
