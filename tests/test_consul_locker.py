"""ConsulLocker against the in-process fake Consul (tests/consul_fake.py), and the
fake's own Consul semantics.

Two ConsulLocker instances stand for two hosts. Nothing waits on wall-clock sleeps:
tests wait on events with a bound, session TTL and lock-delay run on the fake's
clock, and the locker's "no renew for a whole TTL" check runs on a clock the test
moves.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from consul_fake import FakeConsul

from tusd_py.config import ConsulLockConfig
from tusd_py.lockers.base import HeldLock, LockTimeout, LockUnavailable
from tusd_py.lockers.consul import ConsulLocker

BOUND = 10.0
"""Upper bound for an expected event (a bound, never a delay)."""

pytestmark = pytest.mark.both_loops

LOCK_KEY = "tusd-py/locks/up1"
RELEASE_KEY = "tusd-py/release/up1"


@pytest.fixture
async def fake() -> AsyncIterator[FakeConsul]:
    server = FakeConsul()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def lockers() -> AsyncIterator[list[ConsulLocker]]:
    """Lockers created by a test; closed afterwards."""
    created: list[ConsulLocker] = []
    yield created
    for locker in created:
        await locker.close()


@pytest.fixture(autouse=True)
def _no_consul_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)


def make(fake: FakeConsul, created: list[ConsulLocker], **options: Any) -> ConsulLocker:
    settings: dict[str, Any] = {
        "address": fake.address,
        "session_ttl": 10.0,
        "lock_delay": 0.0,
        "acquire_timeout": BOUND,
        "request_timeout": 2.0,
    }
    settings.update(options)
    locker = ConsulLocker(**settings)
    created.append(locker)
    return locker


async def bounded(awaitable: Any) -> Any:
    async with asyncio.timeout(BOUND):
        return await awaitable


class Holder:
    """A request holding a lock in a task until asked (or told) to release."""

    def __init__(self, locker: ConsulLocker, upload_id: str = "up1", obey: bool = True) -> None:
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

    async def _run(self, locker: ConsulLocker, upload_id: str) -> None:
        async with locker.lock(upload_id, self._on_release_request) as held:
            self.held = held
            self.acquired.set()
            await self.leave.wait()
            self.events.append("released")

    async def started(self) -> Holder:
        await bounded(self.acquired.wait())
        return self


# --- the locker ----------------------------------------------------------------------


async def test_acquire_and_release(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    locker = make(fake, lockers)
    await locker.start()
    async with locker.lock("up1", lambda: None) as held:
        assert fake.holder(LOCK_KEY) == locker.session_id
        value = json.loads(fake.get_value(LOCK_KEY) or b"")
        assert value["session"] == locker.session_id
        assert not held.lost.is_set()
    assert fake.holder(LOCK_KEY) is None


async def test_release_request_reaches_holder_on_other_host(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    host_a, host_b = make(fake, lockers), make(fake, lockers)
    holder = await Holder(host_a).started()
    async with host_b.lock("up1", lambda: None):
        holder.events.append("waiter acquired")
        assert fake.holder(LOCK_KEY) == host_b.session_id
    assert holder.events == ["asked", "released", "waiter acquired"]
    await bounded(holder.task)
    # The holder removed the request it answered.
    assert RELEASE_KEY not in fake.kv


async def test_a_request_for_a_lock_released_before_it_arrived_is_deleted(
    fake: FakeConsul, lockers: list[ConsulLocker], client: Client
) -> None:
    """A waiter killed after writing its request, addressed to a holder that released
    before the request reached it: nobody else would ever delete that key."""
    host_a = make(fake, lockers)
    await _lock_once(host_a)  # host A held up1 and released it; its watcher runs
    value = json.dumps({"holder": host_a.session_id, "nonce": "n", "host": "killed", "pid": 1}).encode()
    assert (await client.call("PUT", "/v1/kv/" + RELEASE_KEY, value))[2] is True
    index = fake.kv[RELEASE_KEY].modify_index
    await bounded(fake.wait_for_request(lambda r: r.method == "DELETE" and r.path == "/v1/kv/" + RELEASE_KEY))
    assert RELEASE_KEY not in fake.kv
    # Only that very request: a newer one written meanwhile would have been kept.
    deletes = fake.requests_to("DELETE", "/v1/kv/" + RELEASE_KEY)
    assert [request.query.get("cas") for request in deletes] == [str(index)]


async def test_timeout_when_holder_ignores_release_request(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    host_a = make(fake, lockers)
    host_b = make(fake, lockers, acquire_timeout=0.5)
    holder = await Holder(host_a, obey=False).started()
    with pytest.raises(LockTimeout):
        async with host_b.lock("up1", lambda: None):
            pytest.fail("acquired a lock held by another host")
    await bounded(holder.asked.wait())
    assert fake.holder(LOCK_KEY) == host_a.session_id
    holder.leave.set()
    await bounded(holder.task)
    async with host_b.lock("up1", lambda: None):
        pass


async def test_two_requests_on_one_instance(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    locker = make(fake, lockers)
    holder = await Holder(locker).started()
    async with locker.lock("up1", lambda: None):
        holder.events.append("second acquired")
    assert holder.events == ["asked", "released", "second acquired"]


async def test_session_loss_marks_held_locks_lost_and_locker_recovers(
    fake: FakeConsul, lockers: list[ConsulLocker]
) -> None:
    locker = make(fake, lockers)
    holder = await Holder(locker).started()
    first_session = locker.session_id
    assert first_session is not None and holder.held is not None
    fake.expire_session(first_session)
    await bounded(holder.held.lost.wait())
    await bounded(holder.task)
    assert holder.events == ["asked", "released"]
    async with locker.lock("up1", lambda: None):
        assert locker.session_id not in (None, first_session)
        assert fake.holder(LOCK_KEY) == locker.session_id


async def test_consul_restart_loses_session(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    locker = make(fake, lockers)
    holder = await Holder(locker).started()
    assert holder.held is not None
    await fake.restart(lose_state=True)
    await bounded(holder.held.lost.wait())
    await bounded(holder.task)
    async with locker.lock("up1", lambda: None):
        assert fake.holder(LOCK_KEY) == locker.session_id


class Clock:
    """The locker's clock for "time since the last renew"; tells when it is read."""

    def __init__(self) -> None:
        self.now = 0.0
        self.read = asyncio.Event()

    def __call__(self) -> float:
        self.read.set()
        return self.now

    async def next_read(self) -> None:
        self.read.clear()
        await bounded(self.read.wait())


async def test_no_renew_for_a_whole_ttl_marks_locks_lost(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    clock = Clock()
    locker = make(fake, lockers, renew_interval=0.02, clock=clock)
    holder = await Holder(locker, obey=False).started()
    assert holder.held is not None
    await fake.stop()  # renewals now fail
    clock.now += 9.0
    # Two failed renewals later, less than a TTL without renewal: still ours.
    await clock.next_read()
    await clock.next_read()
    assert not holder.held.lost.is_set()
    clock.now += 1.0
    await bounded(holder.held.lost.wait())
    await bounded(holder.asked.wait())
    holder.leave.set()
    await bounded(holder.task)


async def test_renew_answering_404_marks_locks_lost(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    locker = make(fake, lockers, renew_interval=0.02)
    holder = await Holder(locker).started()
    assert holder.held is not None and locker.session_id is not None
    # Once the session watcher blocks, forget the session without waking it: only a
    # renew can notice.
    await bounded(fake.wait_for_request(lambda r: r.path.startswith("/v1/session/info/") and "index" in r.query))
    del fake.sessions[locker.session_id]
    await bounded(holder.held.lost.wait())
    await bounded(holder.task)
    assert any(r.path.startswith("/v1/session/renew/") for r in fake.requests)


async def test_unreachable_consul_raises_lock_unavailable_quickly(
    fake: FakeConsul, lockers: list[ConsulLocker]
) -> None:
    await fake.stop()
    locker = make(fake, lockers)
    async with asyncio.timeout(3):
        with pytest.raises(LockUnavailable, match=fake.address):
            await locker.start()
        with pytest.raises(LockUnavailable, match="unreachable"):
            async with locker.lock("up1", lambda: None):
                pytest.fail("locked without Consul")


async def test_consul_going_away_while_running(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    locker = make(fake, lockers)
    await locker.start()
    await fake.stop()
    async with asyncio.timeout(3):
        with pytest.raises(LockUnavailable):
            async with locker.lock("up1", lambda: None):
                pytest.fail("locked without Consul")


async def test_hung_consul_times_out(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    fake.hang = True
    locker = make(fake, lockers, request_timeout=0.3)
    async with asyncio.timeout(3):
        with pytest.raises(LockUnavailable, match="unreachable"):
            await locker.start()


async def test_token_is_sent() -> None:
    fake = FakeConsul(token="s3cret")
    await fake.start()
    created: list[ConsulLocker] = []
    try:
        locker = make(fake, created, token="s3cret")
        async with locker.lock("up1", lambda: None):
            pass
        assert fake.requests
        assert all(r.headers.get("x-consul-token") == "s3cret" for r in fake.requests)
        with pytest.raises(LockUnavailable, match="ACL token"):
            await make(fake, created).start()
    finally:
        for locker in created:
            await locker.close()
        await fake.stop()


async def test_token_from_environment_and_explicit_token_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeConsul(token="s3cret")
    await fake.start()
    created: list[ConsulLocker] = []
    try:
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret")
        await make(fake, created).start()
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "wrong")
        await make(fake, created, token="s3cret").start()
    finally:
        for locker in created:
            await locker.close()
        await fake.stop()


async def test_lock_delay_is_respected_after_invalidation(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    host_a = make(fake, lockers, lock_delay=5.0)
    host_b = make(fake, lockers, acquire_timeout=0.5)
    holder = await Holder(host_a, obey=False).started()
    assert host_a.session_id is not None
    fake.expire_session(host_a.session_id)
    assert fake.holder(LOCK_KEY) is None  # released, but in lock-delay
    with pytest.raises(LockTimeout):
        async with host_b.lock("up1", lambda: None):
            pytest.fail("acquired during lock-delay")
    attempts = [r for r in fake.requests_to("PUT", "/v1/kv/" + LOCK_KEY) if r.query.get("acquire") == host_b.session_id]
    assert attempts
    fake.advance(5.0)
    patient = make(fake, lockers)
    async with patient.lock("up1", lambda: None):
        assert fake.holder(LOCK_KEY) == patient.session_id
    holder.leave.set()
    await bounded(holder.task)


async def test_waiter_acquires_when_lock_delay_ends(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    host_a = make(fake, lockers, lock_delay=5.0)
    host_b = make(fake, lockers)
    holder = await Holder(host_a, obey=False).started()
    assert host_a.session_id is not None
    fake.expire_session(host_a.session_id)
    waiter = asyncio.create_task(_lock_once(host_b))
    await host_b.start()
    # Let the waiter fail at least one acquire, then end the lock-delay.
    await bounded(fake.wait_for_request(lambda r: r.path == "/v1/kv/" + LOCK_KEY and "acquire" in r.query))
    assert fake.holder(LOCK_KEY) is None
    fake.advance(5.0)
    await bounded(waiter)
    holder.leave.set()
    await bounded(holder.task)


async def _lock_once(locker: ConsulLocker) -> None:
    async with locker.lock("up1", lambda: None):
        pass


async def test_behavior_delete_deletes_the_key(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    locker = make(fake, lockers, behavior="delete")
    holder = await Holder(locker).started()
    assert locker.session_id is not None and LOCK_KEY in fake.kv
    assert fake.sessions[locker.session_id].behavior == "delete"
    fake.expire_session(locker.session_id)
    assert LOCK_KEY not in fake.kv
    await bounded(holder.task)


async def test_close_releases_locks_before_destroying_the_session(
    fake: FakeConsul, lockers: list[ConsulLocker]
) -> None:
    host_a = make(fake, lockers, lock_delay=30.0)
    host_b = make(fake, lockers, acquire_timeout=1.0)
    holder = await Holder(host_a, obey=False).started()
    session = host_a.session_id
    await host_a.close()
    assert session not in fake.sessions
    assert holder.held is not None and holder.held.lost.is_set()
    # Released explicitly, so no lock-delay applies.
    async with host_b.lock("up1", lambda: None):
        pass
    holder.leave.set()
    await bounded(holder.task)
    with pytest.raises(LockUnavailable):
        async with host_a.lock("up1", lambda: None):
            pass


async def test_from_config(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    config = ConsulLockConfig(address=fake.address, session_ttl=12.0, lock_delay=2.0, behavior="delete",
                              key_prefix="other/")
    locker = ConsulLocker.from_config(config, acquire_timeout=1.0)
    lockers.append(locker)
    async with locker.lock("up1", lambda: None):
        assert locker.session_id is not None
        session = fake.sessions[locker.session_id]
        assert (session.ttl, session.lock_delay, session.behavior) == (12.0, 2.0, "delete")
        assert fake.holder("other/locks/up1") == locker.session_id


async def test_invalid_upload_id(fake: FakeConsul, lockers: list[ConsulLocker]) -> None:
    locker = make(fake, lockers)
    with pytest.raises(ValueError):
        locker.lock("../x", lambda: None)


# --- the fake ------------------------------------------------------------------------


class Client:
    """Raw HTTP to the fake, to check its Consul semantics independently of py-consul."""

    def __init__(self, fake: FakeConsul, session: aiohttp.ClientSession) -> None:
        self.base = f"http://{fake.address}"
        self.session = session

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> tuple[int, dict[str, str], Any]:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.request(method, self.base + path, params=params, data=data) as response:
            text = await response.text()
            try:
                payload = json.loads(text) if text else None
            except json.JSONDecodeError:
                payload = text
            return response.status, dict(response.headers), payload


@pytest.fixture
async def client(fake: FakeConsul) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(fake, session)


async def test_fake_blocking_query_returns_on_change(fake: FakeConsul, client: Client) -> None:
    await client.call("PUT", "/v1/kv/a", b"1")
    status, headers, _ = await client.call("GET", "/v1/kv/a")
    index = int(headers["X-Consul-Index"])
    blocked = asyncio.create_task(client.call("GET", "/v1/kv/a", index=index, wait="10s"))
    await client.call("PUT", "/v1/kv/other", b"x")  # unrelated key: keeps blocking
    await client.call("GET", "/v1/kv/other")
    assert not blocked.done()
    await client.call("PUT", "/v1/kv/a", b"2")
    status, headers, entries = await bounded(blocked)
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    assert base64.b64decode(entries[0]["Value"]) == b"2"


async def test_fake_blocking_query_ends_after_wait(fake: FakeConsul, client: Client) -> None:
    _, headers, _ = await client.call("PUT", "/v1/kv/a", b"1")
    _, headers, _ = await client.call("GET", "/v1/kv/a")
    status, again, _ = await bounded(client.call("GET", "/v1/kv/a", index=headers["X-Consul-Index"], wait="50ms"))
    assert status == 200 and again["X-Consul-Index"] == headers["X-Consul-Index"]


async def test_fake_index_increases_and_recursive_listing(fake: FakeConsul, client: Client) -> None:
    status, headers, _ = await client.call("GET", "/v1/kv/p/", recurse="")
    assert status == 404 and "X-Consul-Index" in headers
    indexes = []
    for key in ("p/a", "p/b"):
        await client.call("PUT", f"/v1/kv/{key}", b"v")
        _, headers, entries = await client.call("GET", "/v1/kv/p/", recurse="")
        indexes.append(int(headers["X-Consul-Index"]))
    assert indexes[0] < indexes[1]
    assert [entry["Key"] for entry in entries] == ["p/a", "p/b"]
    blocked = asyncio.create_task(client.call("GET", "/v1/kv/p/", recurse="", index=indexes[1], wait="10s"))
    await client.call("DELETE", "/v1/kv/p/a")
    status, headers, entries = await bounded(blocked)
    assert int(headers["X-Consul-Index"]) > indexes[1]  # the tombstone counts
    assert [entry["Key"] for entry in entries] == ["p/b"]


async def test_fake_acquire_release_and_lock_index(fake: FakeConsul, client: Client) -> None:
    _, _, first = await client.call("PUT", "/v1/session/create", {"TTL": "10s", "LockDelay": "0s"})
    _, _, second = await client.call("PUT", "/v1/session/create", {"ttl": "10s"})
    one, two = first["ID"], second["ID"]
    assert (await client.call("PUT", "/v1/kv/l", b"x", acquire=one))[2] is True
    assert (await client.call("PUT", "/v1/kv/l", b"x", acquire=two))[2] is False
    assert (await client.call("PUT", "/v1/kv/l", b"x", release=two))[2] is False
    _, _, entries = await client.call("GET", "/v1/kv/l")
    assert entries[0]["Session"] == one and entries[0]["LockIndex"] == 1
    assert (await client.call("PUT", "/v1/kv/l", b"x", release=one))[2] is True
    assert (await client.call("PUT", "/v1/kv/l", b"x", acquire=two))[2] is True
    _, _, entries = await client.call("GET", "/v1/kv/l")
    assert entries[0]["Session"] == two and entries[0]["LockIndex"] == 2
    status, _, _ = await client.call("PUT", "/v1/kv/l", b"x", acquire="no-such-session")
    assert status == 500


async def test_fake_cas(fake: FakeConsul, client: Client) -> None:
    assert (await client.call("PUT", "/v1/kv/c", b"1", cas=0))[2] is True
    assert (await client.call("PUT", "/v1/kv/c", b"2", cas=0))[2] is False
    _, _, entries = await client.call("GET", "/v1/kv/c")
    index = entries[0]["ModifyIndex"]
    assert (await client.call("PUT", "/v1/kv/c", b"3", cas=index + 100))[2] is False
    assert (await client.call("PUT", "/v1/kv/c", b"3", cas=index))[2] is True
    assert (await client.call("DELETE", "/v1/kv/c", cas=index))[2] is False
    _, _, entries = await client.call("GET", "/v1/kv/c")
    assert (await client.call("DELETE", "/v1/kv/c", cas=entries[0]["ModifyIndex"]))[2] is True
    assert (await client.call("GET", "/v1/kv/c"))[0] == 404


async def test_fake_session_ttl_expiry_lock_delay_and_renew(fake: FakeConsul, client: Client) -> None:
    status, _, _ = await client.call("PUT", "/v1/session/create", {"TTL": "5s"})
    assert status == 400  # Consul's range is 10s..24h
    _, _, created = await client.call("PUT", "/v1/session/create", {"TTL": "10s", "LockDelay": "3s"})
    session = created["ID"]
    assert (await client.call("PUT", "/v1/kv/l", b"x", acquire=session))[2] is True
    fake.advance(9)
    status, _, renewed = await client.call("PUT", f"/v1/session/renew/{session}")
    assert status == 200 and renewed[0]["ID"] == session
    fake.advance(9)  # 9 s after the renew: still alive
    assert (await client.call("GET", f"/v1/session/info/{session}"))[2][0]["ID"] == session
    _, headers, _ = await client.call("GET", f"/v1/session/info/{session}")
    watcher = asyncio.create_task(client.call("GET", f"/v1/session/info/{session}",
                                              index=headers["X-Consul-Index"], wait="10s"))
    fake.advance(1)  # TTL elapsed: invalidated
    assert (await bounded(watcher))[2] == []
    assert (await client.call("PUT", f"/v1/session/renew/{session}"))[0] == 404
    _, _, entries = await client.call("GET", "/v1/kv/l")
    assert "Session" not in entries[0]
    _, _, other = await client.call("PUT", "/v1/session/create", {"TTL": "10s"})
    assert (await client.call("PUT", "/v1/kv/l", b"x", acquire=other["ID"]))[2] is False  # lock-delay
    fake.advance(3)
    assert (await client.call("PUT", "/v1/kv/l", b"x", acquire=other["ID"]))[2] is True


async def test_fake_acl_token() -> None:
    fake = FakeConsul(token="s3cret")
    await fake.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(fake, session)
            assert (await client.call("GET", "/v1/kv/a"))[0] == 403
            async with session.get(f"{client.base}/v1/kv/a", headers={"X-Consul-Token": "s3cret"}) as response:
                assert response.status == 404
    finally:
        await fake.stop()
