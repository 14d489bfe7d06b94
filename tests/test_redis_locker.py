"""RedisLocker against a real redis-server (Debian's package, tests/redis_support.py)
on a free port without persistence (the ``redis_server`` fixture of conftest.py).
Two tusd-py processes locking through Redis: test_multi_instance_redis.py.

Two RedisLocker objects (separate connections, separate instance ids) stand for two
hosts. Waits are on events with a bound; lease lapses run on Redis's own clock with
leases of about a second.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from tests.redis_support import RedisServer, require_redis_server
from tusd_py.config import ConfigError, load_config
from tusd_py.lockers import redis as redis_locker
from tusd_py.lockers.base import HeldLock, LockTimeout, LockUnavailable
from tusd_py.lockers.redis import RedisLocker, masked_url

BOUND = 10.0
"""Upper bound for an expected event (a bound, never a delay)."""

pytestmark = pytest.mark.both_loops

KEY = "tusd-py:lock:up1"


@pytest.fixture
async def lockers() -> AsyncIterator[list[RedisLocker]]:
    """Lockers created by a test; closed afterwards."""
    created: list[RedisLocker] = []
    yield created
    for locker in created:
        await locker.close()


@pytest.fixture
async def inspect(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at the server's keys and channels."""
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=BOUND)
    yield client
    await client.aclose()


def make(server: RedisServer, created: list[RedisLocker], **options: Any) -> RedisLocker:
    settings: dict[str, Any] = {"acquire_timeout": BOUND, "lease": 3.0, "request_timeout": 0.5}
    settings.update(options)
    locker = RedisLocker(server.url, **settings)
    created.append(locker)
    return locker


async def bounded(awaitable: Any) -> Any:
    async with asyncio.timeout(BOUND):
        return await awaitable


class Holder:
    """A request holding a lock in a task until asked (or told) to release."""

    def __init__(self, locker: RedisLocker, upload_id: str = "up1", obey: bool = True) -> None:
        self.asked = asyncio.Event()
        self.acquired = asyncio.Event()
        self.leave = asyncio.Event()
        self.held: HeldLock | None = None
        self.obey = obey
        self.events: list[str] = []
        self.task = asyncio.create_task(self._run(locker, upload_id))

    def _on_release_request(self) -> None:
        self.events.append("asked")
        self.asked.set()
        if self.obey:
            self.leave.set()

    async def _run(self, locker: RedisLocker, upload_id: str) -> None:
        async with locker.lock(upload_id, self._on_release_request) as held:
            self.held = held
            self.acquired.set()
            await self.leave.wait()
            self.events.append("released")

    async def started(self) -> Holder:
        await bounded(self.acquired.wait())
        return self

    async def lost(self) -> None:
        assert self.held is not None
        await bounded(self.held.lost.wait())


# --- the locker ----------------------------------------------------------------------


async def test_acquire_and_release(
    redis_server: RedisServer, lockers: list[RedisLocker], inspect: redis.asyncio.Redis
) -> None:
    locker = make(redis_server, lockers)
    await locker.start()
    async with locker.lock("up1", lambda: None) as held:
        value = await inspect.get(KEY)
        assert value is not None and value.startswith(locker.instance_id + ":")
        assert 0 < await inspect.pttl(KEY) <= 3000
        assert not held.lost.is_set()
    assert await inspect.get(KEY) is None


async def test_release_request_reaches_holder_on_other_host(
    redis_server: RedisServer, lockers: list[RedisLocker], inspect: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Waiters retry only every 5 s here: only A's "released" message can wake B sooner.
    monkeypatch.setattr(redis_locker, "RETRY_SECONDS", (5.0, 5.0))
    monkeypatch.setattr(redis_locker, "RESEND_SECONDS", 5.0)
    host_a, host_b = make(redis_server, lockers), make(redis_server, lockers)
    holder = await Holder(host_a).started()
    # More locks held by A: still one subscription per instance.
    others = [await Holder(host_a, f"other{n}").started() for n in range(3)]
    await host_b.start()
    started = asyncio.get_running_loop().time()
    async with host_b.lock("up1", lambda: None):
        holder.events.append("waiter acquired")
        assert (await inspect.get(KEY) or "").startswith(host_b.instance_id + ":")
    # Woken by A's "released" message, not by a poll after the lease.
    assert asyncio.get_running_loop().time() - started < 2.0
    assert holder.events == ["asked", "released", "waiter acquired"]
    channels = await inspect.pubsub_channels("tusd-py:*")
    assert sorted(channels) == sorted(f"tusd-py:instance:{h.instance_id}" for h in (host_a, host_b))
    assert all(count == 1 for _, count in await inspect.pubsub_numsub(*channels))
    for other in others:
        other.leave.set()
        await bounded(other.task)


async def test_waiter_times_out_when_holder_does_not_release(
    redis_server: RedisServer, lockers: list[RedisLocker], inspect: redis.asyncio.Redis
) -> None:
    host_a = make(redis_server, lockers)
    host_b = make(redis_server, lockers, acquire_timeout=0.5)
    holder = await Holder(host_a, obey=False).started()
    with pytest.raises(LockTimeout, match="did not release it within 0.5s"):
        async with host_b.lock("up1", lambda: None):
            pass
    assert holder.asked.is_set()
    assert (await inspect.get(KEY) or "").startswith(host_a.instance_id + ":")
    holder.leave.set()
    await bounded(holder.task)
    assert await inspect.get(KEY) is None


async def test_renewal_keeps_a_lock_past_its_lease(redis_server: RedisServer, lockers: list[RedisLocker]) -> None:
    host_a = make(redis_server, lockers, lease=1.0, request_timeout=0.3)
    host_b = make(redis_server, lockers, acquire_timeout=2.5)
    holder = await Holder(host_a, obey=False).started()
    with pytest.raises(LockTimeout):
        async with host_b.lock("up1", lambda: None):
            pass
    assert holder.held is not None and not holder.held.lost.is_set()
    holder.leave.set()
    await bounded(holder.task)


async def test_lease_of_a_holder_that_stopped_renewing_lapses(
    redis_server: RedisServer, lockers: list[RedisLocker], inspect: redis.asyncio.Redis
) -> None:
    # A is a frozen host: it never renews (its renewal interval is past the lease)
    # and does not answer release requests.
    host_a = make(redis_server, lockers, lease=1.0, request_timeout=0.3, renew_interval=60.0)
    host_b = make(redis_server, lockers)
    holder = await Holder(host_a, obey=False).started()
    started = asyncio.get_running_loop().time()
    async with host_b.lock("up1", lambda: None) as held:
        waited = asyncio.get_running_loop().time() - started
        # A stopped before B got in: its own clock ran out the lease first.
        assert holder.held is not None and holder.held.lost.is_set()
        assert (await inspect.get(KEY) or "").startswith(host_b.instance_id + ":")
        assert not held.lost.is_set()
    assert 0.5 < waited < 3.0, waited
    holder.leave.set()
    await bounded(holder.task)
    assert await inspect.get(KEY) is None  # A's late release did not touch B's (gone) key


async def test_token_changed_under_holder_marks_it_lost(
    redis_server: RedisServer, lockers: list[RedisLocker], inspect: redis.asyncio.Redis
) -> None:
    host_a = make(redis_server, lockers, lease=1.5, request_timeout=0.3, renew_interval=0.1)
    holder = await Holder(host_a, obey=False).started()
    await inspect.set(KEY, "someone-else:token", px=60_000)
    await holder.lost()
    assert holder.asked.is_set()  # the in-flight request is told to stop
    holder.leave.set()
    await bounded(holder.task)
    assert await inspect.get(KEY) == "someone-else:token"  # not deleted by A


async def test_redis_restarted_while_a_lock_is_held(
    redis_server: RedisServer, lockers: list[RedisLocker], inspect: redis.asyncio.Redis
) -> None:
    host_a = make(redis_server, lockers, lease=1.5, request_timeout=0.3, renew_interval=0.1)
    host_b = make(redis_server, lockers)
    holder = await Holder(host_a, obey=False).started()
    await host_b.start()
    await asyncio.to_thread(redis_server.restart)
    await holder.lost()  # the key is gone: the renewal finds it so
    assert holder.asked.is_set()
    async with host_b.lock("up1", lambda: None):
        assert (await inspect.get(KEY) or "").startswith(host_b.instance_id + ":")
    holder.leave.set()
    await bounded(holder.task)
    # Both instances re-subscribed: release requests travel again.
    again = await Holder(host_a, "up2").started()
    async with host_b.lock("up2", lambda: None):
        assert again.events == ["asked", "released"]
    await bounded(again.task)


async def test_redis_stopped_then_started_again(
    redis_server: RedisServer, lockers: list[RedisLocker]
) -> None:
    locker = make(redis_server, lockers)
    await locker.start()
    await asyncio.to_thread(redis_server.stop)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LockUnavailable, match=f"Redis at redis://127.0.0.1:{redis_server.port}/0 is unreachable"):
        async with locker.lock("up1", lambda: None):
            pass
    assert loop.time() - started < 2.0  # the request timeout bounds it
    await asyncio.to_thread(redis_server.start)
    async with locker.lock("up1", lambda: None) as held:
        assert not held.lost.is_set()


async def test_holder_stops_when_redis_stays_down_for_a_lease(
    redis_server: RedisServer, lockers: list[RedisLocker]
) -> None:
    locker = make(redis_server, lockers, lease=1.0, request_timeout=0.3, renew_interval=0.2)
    holder = await Holder(locker, obey=False).started()
    await asyncio.to_thread(redis_server.stop)
    await holder.lost()
    holder.leave.set()
    await bounded(holder.task)  # the release fails quietly (the lease ends the key)


async def test_password_is_used_and_never_shown(tmp_path: Path, captured_logs: io.StringIO) -> None:
    require_redis_server()
    server = RedisServer(tmp_path / "redis", password="s3cret-pw")
    await asyncio.to_thread(server.start)
    try:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        assert masked_url(url) == f"redis://:***@127.0.0.1:{server.port}/0"
        good = RedisLocker(url, 5.0, request_timeout=0.5)
        wrong = RedisLocker(f"redis://:wrong-pw@127.0.0.1:{server.port}/0", 5.0, request_timeout=0.5)
        from_setting = RedisLocker(server.url, 5.0, password="s3cret-pw", request_timeout=0.5)
        try:
            await good.start()
            async with from_setting.lock("up1", lambda: None):
                pass
            with pytest.raises(LockUnavailable) as refused:
                await wrong.start()
            assert "wrong-pw" not in str(refused.value) and "***" in str(refused.value)
        finally:
            for locker in (good, wrong, from_setting):
                await locker.close()
    finally:
        await asyncio.to_thread(server.stop)
    assert "s3cret-pw" not in captured_logs.getvalue()
    assert "Redis locker using redis://:***@" in captured_logs.getvalue()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lock.redis.url": "http://127.0.0.1:6379"}, "lock.redis.url must start with redis:// or rediss://"),
        ({"lock.redis.lease": 0.5}, "lock.redis.lease must be at least 1 second"),
        ({"lock.redis.request_timeout": 6}, "at most lock.redis.lease / 3"),
    ],
)
def test_bad_redis_config_is_one_line_error(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(environ={}, overrides={"lock.backend": "redis", **overrides})


def test_redis_config_from_environment() -> None:
    config = load_config(
        environ={"TUSD_PY_LOCK_BACKEND": "redis", "TUSD_PY_LOCK_REDIS_PASSWORD": "pw",
                 "TUSD_PY_LOCK_REDIS_URL": "rediss://redis.internal:6380/2"}
    )
    assert (config.lock.backend, config.lock.redis.password) == ("redis", "pw")
    assert config.lock.redis.url == "rediss://redis.internal:6380/2"


class _CancellationLosingRedis:
    """A ``_Redis`` whose subscribe never answers, and which turns a cancellation into
    ``LockUnavailable``: what Python 3.11's ``wait_for`` can do when its inner call
    ends just as the task is cancelled (the cancellation is lost)."""

    shown_url = "redis://127.0.0.1:1/0"
    request_timeout = 1.0

    def __init__(self) -> None:
        self.client = self
        self.subscribing = asyncio.Event()
        self.losing = True

    def pubsub(self, **_: Any) -> Any:
        return self

    async def subscribe(self, _channel: str) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def call(self, operation: str, request: Any, time_limit: float | None = None) -> Any:
        request.close()  # never awaited: the answer never comes
        self.subscribing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not self.losing:
                raise
            raise LockUnavailable(f"{operation}: the cancellation was lost") from None


async def test_subscription_stops_even_when_a_cancellation_is_lost() -> None:
    """A server stopping while Redis is unreachable once hung until SIGKILL: the
    subscription's loop went on re-subscribing after its cancellation was lost."""
    server = _CancellationLosingRedis()
    subscription = redis_locker._Subscription(server, "channel", lambda _: None)  # type: ignore[arg-type]
    subscription.start()
    async with asyncio.timeout(BOUND):
        await server.subscribing.wait()
    tasks = subscription.stop()
    # asyncio.wait does not cancel what is still running when the bound is reached.
    _, running = await asyncio.wait(tasks, timeout=BOUND)
    try:
        assert not running, "the subscription kept running after stop()"
    finally:
        server.losing = False  # without the fix: let a cancellation through to end it
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=BOUND)
