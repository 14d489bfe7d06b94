"""Crash points: the process dies after each S3 call of a request, in turn.

For each scenario the request runs once to count its S3 calls (n); then, for every
i < n, it runs again on a fresh store instance whose client seam lets calls 0..i
reach S3, raises right after call i, and fails every later call before it reaches S3
(the process is dead; calls already in flight finish, as they would on S3). Then a
new instance (no shared memory) checks that:

- get never loses an acknowledged byte, never reports more than was sent (no
  byte counted twice, none counted that is not stored),
- resuming from the reported offset completes the upload, and the object's sha256
  matches (so no byte was skipped or doubled, and no EntityTooSmall happened),
- termination afterwards leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from helpers import data_of, make_bucket, object_bytes, sha256
from test_s3_support import (
    CrashingClient,
    KiB,
    MiB,
    body,
    bucket_contents,
    open_store,
    s3_config,
)

from tusd_py.stores.base import UploadInfo, new_upload_id
from tusd_py.stores.s3 import S3Store


@dataclass
class Scenario:
    name: str
    length: int
    deferred: bool
    acknowledged: int
    """Bytes stored (by another instance) before the crashing request."""
    sent_until: int
    """The crashing request's PATCH carries bytes [acknowledged, sent_until)."""
    finishes: bool
    """The crashing request also declares the length (if deferred) and finishes."""


SCENARIOS = [
    # A tail exists; the PATCH completes part 1 from it, stores part 2, leaves a tail.
    Scenario("crosses-two-boundaries", 4 * MiB + 100, False, 300 * KiB, 2 * MiB + 500 * KiB, False),
    # The PATCH ends exactly on a part boundary.
    Scenario("ends-on-boundary", 3 * MiB + 100, False, 700 * KiB, 2 * MiB, False),
    # The last PATCH: tail + new bytes make part 3, then the short final part 4, then finish.
    Scenario("last-patch-and-finish", 3 * MiB + 50, False, 2 * MiB + 300 * KiB, 3 * MiB + 50, True),
    # Deferred length: the PATCH leaves a tail, the length is declared, finish turns
    # the tail segments into the final part.
    Scenario("deferred-declare-finish", 1 * MiB + 700 * KiB, True, MiB + 200 * KiB, MiB + 700 * KiB, True),
]


async def _setup(endpoint: str, scenario: Scenario, data: bytes) -> tuple[str, str]:
    """A bucket and an upload with ``acknowledged`` bytes stored (by one instance)."""
    bucket = await make_bucket(endpoint)
    store = await open_store(s3_config(endpoint, bucket))
    try:
        created = await store.create(
            UploadInfo(id=new_upload_id(), length=None if scenario.deferred else scenario.length)
        )
        # Two PATCHes, so the tail has two segments when it does not start at 0.
        middle = scenario.acknowledged - 100 * KiB
        for end in (middle, scenario.acknowledged):
            opened = await store.get(created.info.id)
            offset = opened.info.offset
            assert (await opened.write(offset, body(data[offset:end], 64 * KiB))).offset == end
        return bucket, created.info.id
    finally:
        await store.close()


async def _crashing_request(store: S3Store, scenario: Scenario, upload_id: str, data: bytes) -> None:
    opened = await store.get(upload_id)
    info = opened.info
    assert info.offset == scenario.acknowledged
    await opened.write(info.offset, body(data[info.offset:scenario.sent_until], 64 * KiB))
    if scenario.finishes:
        if opened.info.length is None:
            await opened.declare_length(scenario.length)
        await opened.finish()


async def _resume(store: S3Store, upload_id: str, data: bytes, deferred: bool) -> UploadInfo:
    """What a client does next: HEAD, then send the rest from the reported offset."""
    opened = await store.get(upload_id)
    info = opened.info
    if info.finished:
        return info
    if info.offset < len(data):
        assert (await opened.write(info.offset, body(data[info.offset:], 256 * KiB))).offset == len(data)
    if opened.info.length is None:
        await opened.declare_length(len(data))
    return await opened.finish()


async def _run(
    endpoint: str, scenario: Scenario, data: bytes, crash_after: int | None
) -> tuple[CrashingClient, BaseException | None, str, str]:
    bucket, upload_id = await _setup(endpoint, scenario, data)
    seams: list[CrashingClient] = []

    def wrap(inner: object) -> CrashingClient:
        seams.append(CrashingClient(inner, crash_after))  # type: ignore[arg-type]
        return seams[0]

    store = await open_store(s3_config(endpoint, bucket), wrap=wrap)  # type: ignore[arg-type]
    error: BaseException | None = None
    try:
        await _crashing_request(store, scenario, upload_id, data)
    except Exception as caught:  # the "crash" (or its consequence) surfaces here
        error = caught
    finally:
        await store.close()
    return seams[0], error, bucket, upload_id


async def _check_after_crash(endpoint: str, scenario: Scenario, data: bytes, bucket: str, upload_id: str) -> None:
    store = await open_store(s3_config(endpoint, bucket))
    try:
        info = (await store.get(upload_id)).info
        if not info.finished:
            assert scenario.acknowledged <= info.offset <= scenario.sent_until, "lost or invented bytes"
        finished = await _resume(store, upload_id, data, scenario.deferred)
        assert finished.finished and finished.offset == len(data)
        assert sha256(await object_bytes(endpoint, bucket, upload_id)) == sha256(data)
        await (await store.get(upload_id)).terminate()
        assert await bucket_contents(endpoint, bucket) == ([], [])
    finally:
        await store.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
async def test_a_crash_after_any_s3_call_loses_and_doubles_nothing(
    fast_moto: str, scenario: Scenario
) -> None:
    data = data_of(scenario.length, seed=len(scenario.name))
    seam, error, bucket, upload_id = await _run(fast_moto, scenario, data, crash_after=None)
    assert error is None
    calls = seam.count
    assert calls >= 5, seam.operations
    await _check_after_crash(fast_moto, scenario, data, bucket, upload_id)

    for crash_after in range(calls):
        seam, error, bucket, upload_id = await _run(fast_moto, scenario, data, crash_after)
        assert error is not None, f"crash after call {crash_after} went unnoticed"
        await _check_after_crash(fast_moto, scenario, data, bucket, upload_id)

