"""S3Locker against moto (server mode over HTTP), which implements S3's conditional
writes: PutObject ``If-None-Match: *`` / ``If-Match`` and DeleteObject ``If-Match``,
each answering 412 when the condition fails.

Two or three ``S3Locker`` objects with their own S3 clients stand for instances on
different hosts. Leases are 2 s (S3's clock has whole seconds, so a takeover comes
3 s after the last renewal); waits are on events with a bound, never sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import data_of, make_bucket, object_bytes, s3_client

from tests.conftest import free_port
from tusd_py.cli import build_locker
from tusd_py.config import Config, ConfigError, S3StoreConfig, load_config
from tusd_py.expiry import Sweeper
from tusd_py.lockers.base import HeldLock, LockTimeout, LockUnavailable
from tusd_py.lockers.s3 import S3Locker
from tusd_py.stores.base import UploadInfo
from tusd_py.stores.file import FileStore
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_botocore import AioS3Client
from tusd_py.stores.s3_client import BodyChecksum, PartBody, S3Client

BOUND = 15.0
"""Upper bound for an expected event (a bound, never a delay)."""
LEASE = 2.0
PREFIX = "up/.locks/"
KiB = 1024
MiB = 1024 * KiB


async def bounded(awaitable: Awaitable[Any]) -> Any:
    async with asyncio.timeout(BOUND):
        return await awaitable


@pytest.fixture
async def clients(moto_endpoint: str) -> AsyncIterator[list[S3Client]]:
    """S3 clients opened by a test (one per instance); closed afterwards."""
    opened: list[S3Client] = []
    yield opened
    for client in opened:
        await client.close()


@pytest.fixture
async def lockers() -> AsyncIterator[list[S3Locker]]:
    created: list[S3Locker] = []
    yield created
    for locker in created:
        await locker.close()


class Instance:
    """Builds lockers that each talk to S3 through their own client (another host)."""

    def __init__(self, endpoint: str, bucket: str, clients: list[S3Client], lockers: list[S3Locker]) -> None:
        self.endpoint, self.bucket, self.clients, self.lockers = endpoint, bucket, clients, lockers

    async def client(self, wrap: Callable[[S3Client], S3Client] | None = None) -> S3Client:
        client: S3Client = await AioS3Client.connect(endpoint_url=self.endpoint, read_timeout=5)
        self.clients.append(client)
        return wrap(client) if wrap is not None else client

    async def locker(self, wrap: Callable[[S3Client], S3Client] | None = None, **options: Any) -> S3Locker:
        settings: dict[str, Any] = {
            "lease": LEASE, "poll_interval": 0.1, "request_timeout": 0.9, "acquire_timeout": BOUND,
        }
        settings.update(options)
        locker = S3Locker(await self.client(wrap), self.bucket, PREFIX, **settings)
        self.lockers.append(locker)
        return locker


@pytest.fixture
async def hosts(moto_endpoint: str, bucket: str, clients: list[S3Client], lockers: list[S3Locker]) -> Instance:
    return Instance(moto_endpoint, bucket, clients, lockers)


async def lock_body(endpoint: str, bucket: str, key: str = PREFIX + "up1") -> dict[str, Any] | None:
    async with s3_client(endpoint) as client:
        try:
            response = await client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None
        async with response["Body"] as body:
            return dict(json.loads(await body.read()))


async def keys_under(endpoint: str, bucket: str, prefix: str) -> list[str]:
    async with s3_client(endpoint) as client:
        response = await client.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [str(item["Key"]) for item in response.get("Contents", [])]


async def held_locks_under(endpoint: str, bucket: str, prefix: str) -> list[str]:
    """Keys under ``prefix`` except released locks (a lock object whose body says its
    holder released it: free, and kept until the sweep as the record of that release)."""
    held = []
    for key in await keys_under(endpoint, bucket, prefix):
        body = None if key.endswith(".release") else await lock_body(endpoint, bucket, key)
        if body is None or body.get("released") is not True:
            held.append(key)
    return held


class Holder:
    """A request holding a lock in a task until asked (if it obeys) or told to let go."""

    def __init__(self, locker: S3Locker, upload_id: str = "up1", obey: bool = True) -> None:
        self.asked = asyncio.Event()
        self.acquired = asyncio.Event()
        self.go = asyncio.Event()
        self.held: HeldLock | None = None
        self._obey = obey
        self.task = asyncio.create_task(self._run(locker, upload_id))

    def _asked(self) -> None:
        self.asked.set()
        if self._obey:
            self.go.set()

    async def _run(self, locker: S3Locker, upload_id: str) -> None:
        async with locker.lock(upload_id, self._asked) as held:
            self.held = held
            self.acquired.set()
            await self.go.wait()


async def test_acquire_writes_the_lock_object_and_release_marks_it_released(hosts: Instance) -> None:
    locker = await hosts.locker()
    async with locker.lock("up1", lambda: None) as held:
        body = await lock_body(hosts.endpoint, hosts.bucket)
        assert body is not None and body["lease"] == LEASE and body["instance"] == locker.instance_id
        assert "released" not in body
        assert not held.lost.is_set()
    body = await lock_body(hosts.endpoint, hosts.bucket)
    assert body is not None and body["released"] is True and body["instance"] == locker.instance_id
    assert await keys_under(hosts.endpoint, hosts.bucket, "") == [PREFIX + "up1"]
    assert await held_locks_under(hosts.endpoint, hosts.bucket, "") == []


async def test_generations_follow_clean_releases_only(hosts: Instance) -> None:
    a, b = await hosts.locker(), await hosts.locker()
    seen: list[Any] = []
    for locker in (a, a, b, a):
        async with locker.lock("up1", lambda: None) as held:
            seen.append(held.generation)
    first, second, third, fourth = seen
    assert first is not None and first.follows is None  # a new lock object
    assert len({generation.token for generation in seen}) == 4
    assert second.follows == first.token  # our own release, its ETag unchanged
    assert third.follows == second.token  # another host takes the released lock
    assert fourth.follows == third.token  # and we follow it, not our own last hold
    # A lock taken over after its lease ran out follows nothing.
    stalled = await hosts.locker(renew_interval=3600, poll_interval=3600)
    holder = Holder(stalled, obey=False)
    await bounded(holder.acquired.wait())
    assert holder.held is not None and holder.held.generation is not None
    assert holder.held.generation.follows == fourth.token
    async with b.lock("up1", lambda: None) as held:
        assert held.generation is not None and held.generation.follows is None
    holder.go.set()
    await bounded(holder.task)


async def test_a_waiter_on_another_host_asks_the_holder_to_release(hosts: Instance) -> None:
    a, b = await hosts.locker(), await hosts.locker()
    holder = Holder(a)
    await bounded(holder.acquired.wait())
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with b.lock("up1", lambda: None) as held:
        assert holder.asked.is_set()
        assert not held.lost.is_set()
        # Released on request, well before the lease could have run out.
        assert loop.time() - started < LEASE
        assert holder.held is not None and not holder.held.lost.is_set()
    await bounded(holder.task)
    # The holder deleted the release request before releasing its lock: only the
    # released lock is left.
    assert await keys_under(hosts.endpoint, hosts.bucket, "") == [PREFIX + "up1"]
    assert await held_locks_under(hosts.endpoint, hosts.bucket, "") == []


async def test_a_waiter_gives_up_after_the_acquire_timeout(hosts: Instance) -> None:
    a, b = await hosts.locker(), await hosts.locker(acquire_timeout=1.0)
    holder = Holder(a, obey=False)
    await bounded(holder.acquired.wait())
    with pytest.raises(LockTimeout):
        await bounded(b.lock("up1", lambda: None).__aenter__())
    assert holder.asked.is_set()
    holder.go.set()
    await bounded(holder.task)


async def test_a_stalled_holder_is_taken_over_after_its_lease_by_s3s_clock(hosts: Instance) -> None:
    # The holder never renews (a frozen host): its own clock gives it up first, then the
    # waiter sees the lease expired by Last-Modified vs. Date and takes it over.
    a = await hosts.locker(renew_interval=3600, poll_interval=3600)
    b = await hosts.locker()
    holder = Holder(a, obey=False)
    await bounded(holder.acquired.wait())
    assert holder.held is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with b.lock("up1", lambda: None):
        waited = loop.time() - started
        assert holder.held.lost.is_set()  # before anyone else could take it
        body = await lock_body(hosts.endpoint, hosts.bucket)
        assert body is not None and body["instance"] == b.instance_id
    assert waited >= LEASE
    holder.go.set()
    await bounded(holder.task)
    assert await held_locks_under(hosts.endpoint, hosts.bucket, PREFIX) == []


async def test_two_waiters_racing_for_an_expired_lease_exactly_one_wins(hosts: Instance) -> None:
    barrier = asyncio.Barrier(2)
    takeovers: list[str] = []

    class RacingClient:
        """Both waiters' takeover writes leave together, with the same If-Match."""

        def __init__(self, inner: S3Client) -> None:
            self._inner = inner
            self._raced = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        async def put_object_if(self, bucket: str, key: str, body: bytes, *, if_match: str | None) -> str:
            if if_match is not None and not self._raced:  # the first If-Match write: a takeover
                self._raced = True
                takeovers.append(if_match)
                await barrier.wait()
            return await self._inner.put_object_if(bucket, key, body, if_match=if_match)

    def racing(inner: S3Client) -> S3Client:
        return RacingClient(inner)  # type: ignore[return-value]

    a = await hosts.locker(renew_interval=3600, poll_interval=3600)
    b, c = await hosts.locker(racing), await hosts.locker(racing)
    stalled = Holder(a, obey=False)
    await bounded(stalled.acquired.wait())
    first, second = Holder(b, obey=False), Holder(c, obey=False)
    done, _ = await bounded(
        asyncio.wait([asyncio.ensure_future(first.acquired.wait()), asyncio.ensure_future(second.acquired.wait())],
                     return_when=asyncio.FIRST_COMPLETED)
    )
    assert len(takeovers) == 2 and takeovers[0] == takeovers[1]  # both raced for the same ETag
    winner, loser = (first, second) if first.acquired.is_set() else (second, first)
    assert not loser.acquired.is_set()
    await bounded(winner.asked.wait())  # the loser asks the winner to release
    winner.go.set()
    await bounded(loser.acquired.wait())
    assert winner.held is not None and not winner.held.lost.is_set()
    loser.go.set()
    stalled.go.set()
    await bounded(asyncio.gather(winner.task, loser.task, stalled.task))


@pytest.mark.parametrize("change", ["replace", "delete"])
async def test_a_renewal_that_fails_its_condition_loses_the_lock(hosts: Instance, change: str) -> None:
    locker = await hosts.locker(renew_interval=0.2)
    holder = Holder(locker, obey=False)
    await bounded(holder.acquired.wait())
    assert holder.held is not None
    async with s3_client(hosts.endpoint) as client:
        if change == "replace":
            await client.put_object(Bucket=hosts.bucket, Key=PREFIX + "up1", Body=b'{"someone": "else"}')
        else:
            await client.delete_object(Bucket=hosts.bucket, Key=PREFIX + "up1")
    await bounded(holder.held.lost.wait())
    assert holder.asked.is_set()  # the in-flight request is told to stop
    holder.go.set()
    await bounded(holder.task)
    # The lock was not ours any more: the release left the other writer's object alone.
    expected = [PREFIX + "up1"] if change == "replace" else []
    assert await keys_under(hosts.endpoint, hosts.bucket, PREFIX) == expected


async def test_s3_unreachable_raises_lock_unavailable_within_the_request_timeout(hosts: Instance) -> None:
    client = await AioS3Client.connect(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout=5)
    hosts.clients.append(client)
    locker = S3Locker(client, hosts.bucket, PREFIX, lease=LEASE, request_timeout=0.5, acquire_timeout=BOUND)
    hosts.lockers.append(locker)
    with pytest.raises(LockUnavailable, match="S3 locker"):
        await bounded(locker.lock("up1", lambda: None).__aenter__())


def test_the_s3_locker_refuses_the_file_store(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[lock]\nbackend = "s3"\n')
    with pytest.raises(ConfigError, match='needs store.backend = "s3"') as raised:
        load_config(str(path))
    assert "\n" not in str(raised.value)


async def test_build_locker_uses_the_s3_stores_client_and_prefix(moto_endpoint: str, bucket: str) -> None:
    config = Config()
    config.store.backend = "s3"
    config.lock.backend = "s3"
    config.store.s3 = S3StoreConfig(bucket=bucket, endpoint_url=moto_endpoint, prefix="up/")
    store = await S3Store.open(config.store.s3)
    try:
        locker = build_locker(config, store=store)
        assert isinstance(locker, S3Locker) and locker.lock_key("x") == "up/.locks/x"
        async with locker.lock("x", lambda: None):
            assert await lock_body(moto_endpoint, bucket, "up/.locks/x") is not None
        await locker.close()
        with pytest.raises(ConfigError):
            build_locker(config)
    finally:
        await store.close()


# --- a stale writer ---------------------------------------------------------------------


class PartsSeen:
    """An S3Client wrapper that reports each UploadPart once it is stored."""

    def __init__(self, inner: S3Client) -> None:
        self._inner = inner
        self.parts: asyncio.Queue[int] = asyncio.Queue()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        etag = await self._inner.upload_part(bucket, key, upload_id, part_number, body, checksum)
        self.parts.put_nowait(part_number)
        return etag


async def test_a_stale_writer_cannot_corrupt_the_upload(
    fast_moto: str, clients: list[S3Client], lockers: list[S3Locker]
) -> None:
    """Lease lapses mid-PATCH on A (stalled), B takes over and continues, A resumes
    writing the same client bytes: the final object is byte-identical (invariant 7)."""
    bucket = await make_bucket(fast_moto)
    hosts = Instance(fast_moto, bucket, clients, lockers)
    config = S3StoreConfig(bucket=bucket, prefix="up/", part_size=MiB, spool="memory")  # type: ignore[arg-type]
    length = 3 * MiB + 300 * KiB
    data = data_of(length, seed=12)
    seen = PartsSeen(await hosts.client())
    store_a, store_b = S3Store(seen, config), S3Store(await hosts.client(), config)  # type: ignore[arg-type]
    info = (await store_a.create(UploadInfo(id="stale1", length=length))).info
    locker_a = await hosts.locker(renew_interval=3600, poll_interval=3600)  # frozen: never renews
    locker_b = await hosts.locker()
    resume = asyncio.Event()

    async def body_a() -> AsyncGenerator[bytes, None]:
        yield data[: MiB + 512 * KiB]
        await resume.wait()  # the stall: the lease lapses meanwhile
        yield data[MiB + 512 * KiB: 3 * MiB + 50 * KiB]

    async def body_of(start: int, stop: int) -> AsyncGenerator[bytes, None]:
        yield data[start:stop]

    async def writer_a() -> int:
        async with locker_a.lock(info.id, lambda: None) as held:
            upload = await store_a.get(info.id)
            written = await upload.write(0, body_a())
            assert held.lost.is_set()  # it wrote on although its lock was gone
            return written.offset

    task_a = asyncio.create_task(writer_a())
    assert await bounded(seen.parts.get()) == 1  # A stored part 1, then stalled
    async with locker_b.lock(info.id, lambda: None):  # taken over after A's lease
        upload = await store_b.get(info.id)
        assert upload.info.offset == MiB
        written = await upload.write(MiB, body_of(MiB, 3 * MiB + 100 * KiB))
        assert written.offset == 3 * MiB + 100 * KiB
    resume.set()  # A wakes up and writes parts 2 and 3 again, and a shorter tail segment
    assert await bounded(task_a) == 3 * MiB + 50 * KiB
    async with locker_b.lock(info.id, lambda: None):  # the client's HEAD, then its PATCH
        upload = await store_b.get(info.id)
        offset = upload.info.offset
        assert MiB <= offset <= 3 * MiB + 100 * KiB
        await upload.write(offset, body_of(offset, length))
        await upload.finish()
    assert await object_bytes(fast_moto, bucket, "up/stale1") == data
    assert await held_locks_under(fast_moto, bucket, "up/.locks/") == []



async def test_the_sweep_removes_expired_locks_and_orphaned_release_requests(hosts: Instance) -> None:
    """A crashed host leaves its lock object behind; an upload nobody touches again
    would keep it forever. The sweep removes it once its lease expired by S3's clock,
    and a release request whose lock is gone at once; a lock in use stays."""
    sweeper = await hosts.locker()
    crashed = {"instance": "gone", "token": "t", "lease": LEASE, "seq": 1}
    async with s3_client(hosts.endpoint) as client:
        await client.put_object(Bucket=hosts.bucket, Key=PREFIX + "dead", Body=json.dumps(crashed).encode())
        await client.put_object(Bucket=hosts.bucket, Key=PREFIX + "nolock.release", Body=b"{}")
    live = Holder(await hosts.locker(), "live")
    await bounded(live.acquired.wait())

    assert await sweeper.remove_expired() == 1  # the release request; the lease has not run out
    assert sorted(await keys_under(hosts.endpoint, hosts.bucket, PREFIX)) == [PREFIX + "dead", PREFIX + "live"]

    # S3's clock has to pass the lease (the thing under test): sweep until it has,
    # within a bound of three leases.
    for _ in range(12):
        if await sweeper.remove_expired():
            break
        await asyncio.sleep(LEASE / 4)
    assert await keys_under(hosts.endpoint, hosts.bucket, PREFIX) == [PREFIX + "live"]  # renewed: kept
    assert live.held is not None and not live.held.lost.is_set()
    live.go.set()
    await bounded(live.task)


async def test_the_expiry_sweep_runs_the_lock_sweep(hosts: Instance, tmp_path: Path) -> None:
    async with s3_client(hosts.endpoint) as client:
        await client.put_object(Bucket=hosts.bucket, Key=PREFIX + "nolock.release", Body=b"{}")
    store = FileStore(str(tmp_path))
    try:
        result = await Sweeper(store, await hosts.locker(), orphan_grace=3600).sweep()
    finally:
        await store.close()
    assert result.orphans == 1
    assert await keys_under(hosts.endpoint, hosts.bucket, PREFIX) == []
