"""Several hosts, for every distributed locker (s3, redis, consul): tusd-py processes
(tests/instances.py) on one moto bucket, locking through the S3 bucket itself, a real
redis-server or the in-process fake Consul (tests/consul_fake.py), alone and behind
real nginx. Each test runs once per locker; what is special to one locker (its service
down or restarted) is in test_multi_instance.py (Consul) and test_multi_instance_redis.py.

Waits are on responses, on the instances' readiness and on the uploads' progress, each
with a bound; the chaos run's seed is printed (shown on failure) and can be set with
``TUSD_TEST_CHAOS_SEED``.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import create, data_of, head_offset, object_bytes, patch, patch_head, sha256, upload_id_of

from tests import nginx_support
from tests.instances import (
    ConsulLockService,
    Instance,
    LockService,
    MiB,
    RedisLockService,
    S3LockService,
    cluster_settings,
    expect_continue_patch,
    kill,
    merged,
    running,
    scenario_concurrent_patches,
    scenario_takeover,
    start_locking,
    stop_all,
    unbuffered_connection,
)
from tests.rawhttp import RawResponse, request
from tests.redis_support import RedisServer

TAKEOVER_SLACK = 5.0
"""Seconds past a lease (and the s3 locker's 1 s margin) within which a killed holder's
lock must be taken over: start-up of the waiter's request on a loaded 2-core machine."""


@pytest.fixture(params=["s3", "redis", "consul"])
def lock_backend(request: pytest.FixtureRequest, moto_endpoint: str, bucket: str) -> LockService:
    if request.param == "s3":
        return S3LockService(moto_endpoint, bucket)
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return RedisLockService(server.url)
    return ConsulLockService()


@pytest.fixture
async def service(lock_backend: LockService) -> AsyncIterator[LockService]:
    await lock_backend.start()
    yield lock_backend
    await lock_backend.stop()


@pytest.fixture
async def pair(tmp_path: Path, moto_endpoint: str, bucket: str, service: LockService) -> AsyncIterator[list[Instance]]:
    """Instances "a" and "b": same bucket, same lock service, separate processes."""
    settings = cluster_settings(moto_endpoint, bucket, service)
    async with running(tmp_path, {"a": settings, "b": settings}) as instances:
        for instance in instances:
            service.instance_started(instance)
        yield instances


async def test_head_on_b_right_after_a_patch_to_a_is_cut_reports_every_byte_a_received(
    pair: list[Instance], moto_endpoint: str, bucket: str, service: LockService
) -> None:
    # Two instances without a shared lock: B answers 5 MiB (the part in S3) while A
    # still holds 2 MiB more that it stores after B's answer.
    a, b = pair
    length = 9 * MiB
    sent = 7 * MiB + 4_321
    payload = data_of(length, 101)
    path = await create(a.port, length)
    cut, head = await expect_continue_patch(a.port, path, 0, length)
    assert head.status == 100, head  # A holds the lock and reads the body
    await cut.send(payload[:sent])
    cut.abort()  # the client is gone; its bytes are in A's socket buffer or read
    assert await head_offset(b.port, path) == sent
    response = await patch(b.port, path, sent, payload[sent:])
    assert response.status == 204 and response.header("upload-offset") == str(length), response
    assert sha256(await object_bytes(moto_endpoint, bucket, upload_id_of(path))) == sha256(payload)
    assert await service.locks_left() == []


async def test_stalled_patch_on_a_is_taken_over_by_b_and_a_answers_what_it_stored(
    pair: list[Instance], moto_endpoint: str, bucket: str, service: LockService
) -> None:
    a, b = pair
    await scenario_takeover(a.port, b.port, moto_endpoint, bucket, seed=21)
    assert await service.locks_left() == []


async def test_racing_patches_at_the_same_offset_never_interleave(
    pair: list[Instance], moto_endpoint: str, bucket: str, service: LockService
) -> None:
    a, b = pair
    await scenario_concurrent_patches(a.port, b.port, moto_endpoint, bucket, 8 * MiB, seed=11)
    assert await service.locks_left() == []


async def test_a_killed_holders_lock_is_taken_over_within_one_lease(
    tmp_path: Path, pair: list[Instance], moto_endpoint: str, bucket: str, service: LockService
) -> None:
    _, b = pair
    doomed = await start_locking(tmp_path, "doomed", cluster_settings(moto_endpoint, bucket, service), service)
    length = 7 * MiB
    payload = data_of(length, seed=31)
    path = await create(doomed.port, length)
    stalled, head = await expect_continue_patch(doomed.port, path, 0, length)
    try:
        assert head.status == 100, head
        await stalled.send(payload[: 6 * MiB])
        assert len(await service.locks_left()) == 1
        await kill(doomed, service)
    finally:
        stalled.abort()
    loop = asyncio.get_running_loop()
    started = loop.time()
    offset = await head_offset(b.port, path)  # waits for the lease, then takes it over
    assert loop.time() - started < service.lease + 1 + TAKEOVER_SLACK, "the lock outlived its lease by far"
    assert offset in (0, 5 * MiB)  # what the killed instance had stored in S3
    response = await patch(b.port, path, offset, payload[offset:])
    assert response.status == 204, response
    assert sha256(await object_bytes(moto_endpoint, bucket, upload_id_of(path))) == sha256(payload)
    assert await service.locks_left() == []


# --- chaos: three instances behind nginx, cuts and SIGKILLs ------------------------------

CHAOS_SEED = int(os.environ.get("TUSD_TEST_CHAOS_SEED", "1212"))
CHAOS_UPLOADS = 30
CHAOS_PARALLEL = 4
CHAOS_KILLS = 5
ATTEMPTS = 40
"""Bound on the retries of one request through nginx while an upstream is down."""
RETRIED = (ConnectionError, asyncio.IncompleteReadError, TimeoutError)
"""What a client sees of a killed upstream besides nginx's 502."""


class Progress:
    """Counts the uploads' requests, so the chaos can kill at chosen points of the run
    (never after a delay)."""

    def __init__(self) -> None:
        self.count = 0
        self.finished = False
        self._condition = asyncio.Condition()

    async def step(self) -> None:
        async with self._condition:
            self.count += 1
            self._condition.notify_all()

    async def finish(self) -> None:
        async with self._condition:
            self.finished = True
            self._condition.notify_all()

    async def reached(self, count: int) -> bool:
        """Wait until ``count`` steps were made (True) or the uploads finished (False)."""
        async with self._condition:
            await self._condition.wait_for(lambda: self.count >= count or self.finished)
            return self.count >= count


async def _through_nginx(port: int, method: str, path: str, headers: dict[str, str]) -> RawResponse:
    """A request retried while nginx answers 502/503 or the connection breaks."""
    for _ in range(ATTEMPTS):
        try:
            response = await request(port, method, path, headers)
        except RETRIED:
            continue
        if response.status not in (502, 503):
            return response
    raise AssertionError(f"{method} {path}: no answer but 502/503 in {ATTEMPTS} attempts")


async def _chaos_upload(port: int, payload: bytes, rng: random.Random, progress: Progress, open_paths: set[str]) -> str:
    """Upload ``payload`` through nginx like a tus client that loses its connection
    1-3 times mid-body and meets killed upstreams: resume from HEAD after anything
    but a complete 204. Offsets never go back and never pass what was sent."""
    created = await _through_nginx(port, "POST", "/files/", {"Upload-Length": str(len(payload))})
    assert created.status == 201, created
    path = created.header("location") or ""
    path = path[path.index("/files/"):]
    open_paths.add(path)
    await progress.step()
    cuts = rng.randint(1, 3)
    offset = furthest = 0
    while True:
        if cuts and rng.random() < 0.7:
            cuts -= 1
            cut = rng.randrange(1, len(payload) - offset)
            connection = await unbuffered_connection(port)
            try:
                await connection.send(patch_head(path, offset, len(payload) - offset) + payload[offset:offset + cut])
            except ConnectionError:
                pass
            connection.abort()
            furthest = max(furthest, offset + cut)
        else:
            furthest = len(payload)
            try:
                response = await patch(port, path, offset, payload[offset:])
                assert response.status in (204, 409, 502, 503), response
                if response.status == 204 and response.header("upload-offset") == str(len(payload)):
                    open_paths.discard(path)
                    await progress.step()
                    return path
            except RETRIED:
                pass
        await progress.step()
        head = await _through_nginx(port, "HEAD", path, {})
        assert head.status == 200, head
        resumed = int(head.header("upload-offset") or -1)
        assert offset <= resumed <= furthest, (path, offset, resumed, furthest)
        offset = resumed
        if offset == len(payload):
            open_paths.discard(path)
            return path


async def _probe_locks(port: int, paths: set[str], bound: float, statuses: tuple[int, ...] = (200,)) -> None:
    """HEAD every upload in ``paths`` on a live instance: each answers (200) within
    ``bound`` (a lock of the killed instance is free one lease after the kill)."""
    loop = asyncio.get_running_loop()

    async def probe(path: str) -> None:
        started = loop.time()
        response = await request(port, "HEAD", path)
        elapsed = loop.time() - started
        assert response.status in statuses, (path, response)
        assert elapsed < bound, f"{path} stayed locked {elapsed:.1f} s after the kill (bound {bound} s)"

    await asyncio.gather(*(probe(path) for path in sorted(paths)))


def _without_orphaned_release_requests(left: list[str]) -> list[str]:
    """``left`` without s3 release requests whose lock is gone or released: a request
    written while its holder was releasing outlives the lock; the expiry sweep
    (S3Locker.remove_expired, tested in test_s3_locker.py) deletes it once the lock
    object is gone, so it is not a leak."""
    return [lock for lock in left if not (lock.endswith(".release") and lock.removesuffix(".release") not in left)]


async def test_uploads_through_nginx_survive_cuts_and_killed_instances(
    nginx_installed: None, tmp_path: Path, moto_endpoint: str, bucket: str, service: LockService,
) -> None:
    print(f"chaos seed {CHAOS_SEED} (set TUSD_TEST_CHAOS_SEED to replay), locker {service.name}")
    rng = random.Random(CHAOS_SEED)
    settings = cluster_settings(moto_endpoint, bucket, service)
    slots: dict[str, Instance] = {}
    for name in ("a", "b", "c"):
        slots[name] = await start_locking(tmp_path, name, settings, service)
    sizes = [rng.randint(1 * MiB, 8 * MiB) for _ in range(CHAOS_UPLOADS)]
    seeds = [rng.randrange(1 << 30) for _ in range(CHAOS_UPLOADS)]
    # ~3.5 steps per upload: kill at random points of the first two thirds.
    kill_points = sorted(rng.sample(range(6, CHAOS_UPLOADS * 2), CHAOS_KILLS))
    progress = Progress()
    open_paths: set[str] = set()
    slots_free = asyncio.Semaphore(CHAOS_PARALLEL)
    finished: set[str] = set()
    kills = 0
    try:
        with nginx_support.run_nginx([f"127.0.0.1:{instance.port}" for instance in slots.values()]) as nginx:

            async def one(size: int, upload_seed: int) -> None:
                async with slots_free:
                    payload = data_of(size, upload_seed)
                    path = await _chaos_upload(nginx.port, payload, random.Random(upload_seed), progress, open_paths)
                finished.add(upload_id_of(path))
                stored = await object_bytes(moto_endpoint, bucket, upload_id_of(path))
                assert len(stored) == size and sha256(stored) == sha256(payload), f"upload {path} is corrupt"

            async def chaos() -> int:
                done = 0
                for generation, point in enumerate(kill_points):
                    if not await progress.reached(point):
                        break
                    name = rng.choice(sorted(slots))
                    victim = slots[name]
                    await kill(victim, service)
                    done += 1
                    live = next(instance for instance in slots.values() if instance is not victim)
                    await _probe_locks(live.port, set(open_paths), service.lease + 1 + TAKEOVER_SLACK)
                    restarted = merged(settings, {"server": {"port": victim.port}})
                    slots[name] = await start_locking(tmp_path, f"{name}{generation}", restarted, service)
                return done

            async def uploads() -> None:
                try:
                    await asyncio.gather(*(one(size, s) for size, s in zip(sizes, seeds, strict=True)))
                finally:
                    await progress.finish()

            kills, _ = await asyncio.gather(chaos(), uploads())
        assert kills >= 3, f"only {kills} kills happened: the kill points are too late for this seed"
        # No lock of an upload a client knows is left. A POST that a SIGKILL cut
        # before its answer may leave its new upload's lock (s3: an expired object,
        # which the next request for it or the expiry sweep deletes): it is free, and
        # a request for that upload removes it.
        left = await service.locks_left()
        # s3: a release request written while its holder was releasing (after it
        # withdrew requests, before it deleted the lock) outlives the lock; the expiry
        # sweep (S3Locker.remove_expired, tested in test_s3_locker.py) deletes such
        # requests once their lock is gone, so they are not counted here.
        left = _without_orphaned_release_requests(left)
        strays = {service.upload_of(lock) for lock in left}
        assert not strays & finished, f"locks of finished uploads are left: {left} (finished: {sorted(finished)})"
        if strays:
            print(f"locks of uploads created by killed POSTs: {sorted(strays)}")
        bound = service.lease + 1 + TAKEOVER_SLACK
        await _probe_locks(slots["a"].port, {f"/files/{upload}" for upload in strays}, bound, (200, 404))
        assert _without_orphaned_release_requests(await service.locks_left()) == []
    finally:
        await stop_all(list(slots.values()))
