"""MemoryLocker: exclusivity, release requests, fairness, timeouts, cleanup.

Everything is asserted through the public interface: a task is known to wait for a
lock when the holder hears its release request, and a lock is known to be free (no
holder or waiter left behind) when a new request gets it without asking anyone.
"""

from __future__ import annotations

import asyncio

import pytest

from tusd_py.lockers.base import Locker, LockTimeout, LockUnavailable
from tusd_py.lockers.memory import MemoryLocker


async def assert_free(locker: MemoryLocker, upload_id: str) -> None:
    """Nobody holds or waits for ``upload_id``: a new request gets the lock and no
    holder is asked to release it. A holder left behind would be asked (and, as it never
    leaves, the request would end in ``LockTimeout``)."""
    asked: list[str] = []
    async with locker.lock(upload_id, lambda: asked.append("again")):
        pass
    assert asked == []


class ReleaseRequests:
    """A holder's ``on_release_request`` that a test can wait on: each call is one
    more request queued behind the holder."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        while self.count < count:
            self._changed.clear()
            await self._changed.wait()


def test_is_a_locker() -> None:
    assert isinstance(MemoryLocker(1.0), Locker)


@pytest.mark.both_loops
async def test_free_lock_is_acquired_and_released() -> None:
    locker = MemoryLocker(5.0)
    async with locker.lock("a", lambda: None) as held:
        assert not held.lost.is_set()
        async with locker.lock("b", lambda: None):
            pass  # other ids are independent
    await assert_free(locker, "a")
    await assert_free(locker, "b")


@pytest.mark.both_loops
async def test_waiter_asks_holder_and_gets_lock_after_release() -> None:
    locker = MemoryLocker(5.0)
    holder_in = asyncio.Event()
    asked = asyncio.Event()
    order: list[str] = []

    async def holder() -> None:
        async with locker.lock("u", asked.set):
            order.append("holder in")
            holder_in.set()
            await asked.wait()
            order.append("holder out")

    holding = asyncio.create_task(holder())
    await holder_in.wait()
    async with locker.lock("u", lambda: None):
        order.append("waiter in")
    await holding
    assert order == ["holder in", "holder out", "waiter in"]
    await assert_free(locker, "u")


async def test_timeout_raises_lock_timeout_with_message() -> None:
    locker = MemoryLocker(0.05)
    requests = ReleaseRequests()
    async with locker.lock("u", requests):
        with pytest.raises(LockTimeout, match="did not release it within 0.05s"):
            async with locker.lock("u", lambda: None):
                pass  # pragma: no cover
        assert requests.count == 1
    # The timed-out waiter left the queue: it does not get the lock after the holder.
    await assert_free(locker, "u")


async def test_waiters_are_served_in_order_and_each_asks_the_holder() -> None:
    locker = MemoryLocker(5.0)
    served: list[int] = []
    release_requests: list[str] = []
    holder_asked = ReleaseRequests()

    def holder_release_request() -> None:
        release_requests.append("holder")
        holder_asked()

    async with locker.lock("u", holder_release_request):

        async def waiter(number: int) -> None:
            async with locker.lock("u", lambda: release_requests.append(f"w{number}")):
                served.append(number)

        tasks = []
        for number in range(3):
            tasks.append(asyncio.create_task(waiter(number)))
            await holder_asked.wait_for(number + 1)  # it queued: the holder heard it
        assert release_requests == ["holder", "holder", "holder"]
    await asyncio.gather(*tasks)
    assert served == [0, 1, 2]
    # A served waiter with others behind it was asked to hand over too.
    assert release_requests[3:] == ["w0", "w1"]
    await assert_free(locker, "u")


async def test_cancelled_waiter_leaves_the_queue() -> None:
    locker = MemoryLocker(5.0)
    requests = ReleaseRequests()
    got_lock = asyncio.Event()
    async with locker.lock("u", requests):
        task = asyncio.create_task(_acquire_and_hold(locker, "u", got_lock))
        await requests.wait_for(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not got_lock.is_set()
    await assert_free(locker, "u")


async def _acquire_and_hold(locker: MemoryLocker, upload_id: str, got_lock: asyncio.Event | None = None) -> None:
    async with locker.lock(upload_id, lambda: None):
        if got_lock is not None:
            got_lock.set()
        await asyncio.Event().wait()


async def test_grant_then_cancel_passes_the_lock_on() -> None:
    locker = MemoryLocker(5.0)
    requests = ReleaseRequests()
    first_in = asyncio.Event()
    second_in = asyncio.Event()

    async def second() -> None:
        async with locker.lock("u", lambda: None):
            second_in.set()

    async with locker.lock("u", requests):
        first = asyncio.create_task(_acquire_and_hold(locker, "u", first_in))
        await requests.wait_for(1)
        later = asyncio.create_task(second())
        await requests.wait_for(2)
    # Leaving the block granted the lock to `first`, which has not run since: cancel
    # it before it can enter.
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await later
    assert not first_in.is_set()
    assert second_in.is_set()
    await assert_free(locker, "u")


async def test_close_marks_holders_lost_and_fails_waiters() -> None:
    locker = MemoryLocker(5.0)
    requests = ReleaseRequests()
    async with locker.lock("u", requests) as held:
        waiter = asyncio.create_task(_acquire_and_hold(locker, "u"))
        await requests.wait_for(1)
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


async def test_lost_lock_calls_the_holders_callbacks() -> None:
    """``held.lost`` tells its callbacks when the lock is lost (how a PATCH stops its
    body without a task waiting on the event): each once, a removed one never, one
    added after the loss at once; a failing one does not keep the others from running."""
    locker = MemoryLocker(5.0)
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("bug")

    def removed() -> None:  # pragma: no cover - removed before the loss
        calls.append("removed")

    async with locker.lock("u", lambda: None) as held:
        held.lost.add_callback(broken)
        held.lost.add_callback(removed)
        held.lost.add_callback(lambda: calls.append("stop"))
        held.lost.remove_callback(removed)
        held.lost.remove_callback(removed)  # not there any more: no error
        await locker.close()
        assert held.lost.is_set()
        assert calls == ["broken", "stop"]
        held.lost.set()  # again: nobody is told twice
        held.lost.add_callback(lambda: calls.append("late"))
        assert calls == ["broken", "stop", "late"]
        await asyncio.wait_for(held.lost.wait(), 1.0)  # still an asyncio.Event
