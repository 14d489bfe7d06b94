"""MemoryLocker: exclusivity, release requests, fairness, timeouts, cleanup."""

from __future__ import annotations

import asyncio

import pytest

from tusd_py.lockers.base import Locker, LockTimeout, LockUnavailable
from tusd_py.lockers.memory import MemoryLocker


def test_is_a_locker() -> None:
    assert isinstance(MemoryLocker(1.0), Locker)


@pytest.mark.both_loops
async def test_free_lock_is_acquired_and_cleaned_up() -> None:
    locker = MemoryLocker(1.0)
    async with locker.lock("a", lambda: None) as held:
        assert locker.is_locked("a")
        assert not held.lost.is_set()
        async with locker.lock("b", lambda: None):
            pass  # other ids are independent
    assert not locker.is_locked("a")
    assert not locker.is_locked("b")


@pytest.mark.both_loops
async def test_waiter_asks_holder_and_gets_lock_after_release() -> None:
    locker = MemoryLocker(5.0)
    asked = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with locker.lock("u", asked.set):
            order.append("holder in")
            await asked.wait()
            order.append("holder out")

    holding = asyncio.create_task(holder())
    await asyncio.sleep(0)
    assert order == ["holder in"]
    async with locker.lock("u", lambda: None):
        order.append("waiter in")
    await holding
    assert order == ["holder in", "holder out", "waiter in"]
    assert not locker.is_locked("u")


async def test_timeout_raises_lock_timeout_with_message() -> None:
    locker = MemoryLocker(0.05)
    requests = 0

    def on_release() -> None:
        nonlocal requests
        requests += 1

    async with locker.lock("u", on_release):
        with pytest.raises(LockTimeout, match="did not release it within 0.05s"):
            async with locker.lock("u", lambda: None):
                pass  # pragma: no cover
        assert requests == 1
        assert len(locker._entries["u"].waiters) == 0  # the timed-out waiter left the queue
    assert not locker.is_locked("u")


async def test_waiters_are_served_in_order_and_each_asks_the_holder() -> None:
    locker = MemoryLocker(5.0)
    served: list[int] = []
    release_requests: list[str] = []

    async with locker.lock("u", lambda: release_requests.append("holder")):

        async def waiter(number: int) -> None:
            async with locker.lock("u", lambda: release_requests.append(f"w{number}")):
                served.append(number)

        tasks = []
        for number in range(3):
            tasks.append(asyncio.create_task(waiter(number)))
            await asyncio.sleep(0)  # let it queue (ordering, not synchronization)
        assert release_requests == ["holder", "holder", "holder"]
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2]
    # A served waiter with others behind it was asked to hand over too.
    assert release_requests[3:] == ["w0", "w1"]
    assert not locker.is_locked("u")


async def test_cancelled_waiter_leaves_the_queue() -> None:
    locker = MemoryLocker(5.0)
    async with locker.lock("u", lambda: None):
        task = asyncio.create_task(_acquire_and_hold(locker, "u"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not locker.is_locked("u")


async def _acquire_and_hold(locker: MemoryLocker, upload_id: str) -> None:
    async with locker.lock(upload_id, lambda: None):
        await asyncio.Event().wait()


async def test_grant_then_cancel_passes_the_lock_on() -> None:
    locker = MemoryLocker(5.0)
    second_in = asyncio.Event()

    async def second() -> None:
        async with locker.lock("u", lambda: None):
            second_in.set()

    async with locker.lock("u", lambda: None):
        first = asyncio.create_task(_acquire_and_hold(locker, "u"))
        await asyncio.sleep(0)
        later = asyncio.create_task(second())
        await asyncio.sleep(0)
    # The lock was just granted to `first`, which has not run yet: cancel it now.
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await later
    assert second_in.is_set()
    assert not locker.is_locked("u")


async def test_close_marks_holders_lost_and_fails_waiters() -> None:
    locker = MemoryLocker(5.0)
    async with locker.lock("u", lambda: None) as held:
        waiter = asyncio.create_task(_acquire_and_hold(locker, "u"))
        await asyncio.sleep(0)
        await locker.close()
        assert held.lost.is_set()
        with pytest.raises(LockUnavailable):
            await waiter
    with pytest.raises(LockUnavailable):
        async with locker.lock("v", lambda: None):
            pass  # pragma: no cover


async def test_failing_release_callback_does_not_break_the_locker() -> None:
    locker = MemoryLocker(0.05)

    def broken() -> None:
        raise RuntimeError("bug")

    async with locker.lock("u", broken):
        with pytest.raises(LockTimeout):
            async with locker.lock("u", lambda: None):
                pass  # pragma: no cover
