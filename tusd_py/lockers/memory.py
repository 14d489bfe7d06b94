"""In-process locker: one event loop, one process.

Each upload id with a holder has an entry: the holder and a FIFO queue of waiters.
A new waiter asks the holder to release (``on_release_request``) and waits up to
``acquire_timeout``. Release hands the lock directly to the first waiter, so a late
arrival can never overtake the queue; when that new holder still has others queued
behind it, it is asked to release in turn, so a stalled request never blocks the
queue for long. Entries are removed when the lock is free and nobody waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from contextlib import AbstractAsyncContextManager

from tusd_py.lockers.base import (
    HeldLock,
    LockObserver,
    LockTimeout,
    LockUnavailable,
    ReleaseRecords,
    ReleaseRequest,
    ask_to_release,
    observed,
)


class _Holder:
    __slots__ = ("held", "on_release_request", "granted")

    def __init__(self, on_release_request: ReleaseRequest) -> None:
        self.held = HeldLock()
        self.on_release_request = on_release_request
        self.granted: asyncio.Future[None] | None = None
        """Resolved when the lock is handed to this waiter."""

    def ask_to_release(self) -> None:
        ask_to_release(self.on_release_request)


class _Entry:
    __slots__ = ("holder", "waiters")

    def __init__(self, holder: _Holder) -> None:
        self.holder: _Holder | None = holder
        self.waiters: collections.deque[_Holder] = collections.deque()


class _Acquisition:
    """``async with``: acquire on enter, release on exit (a plain class: every request
    takes a lock, and a generator-based context manager costs more per use)."""

    __slots__ = ("_locker", "_upload_id", "_on_release_request", "_holder")

    def __init__(self, locker: MemoryLocker, upload_id: str, on_release_request: ReleaseRequest) -> None:
        self._locker = locker
        self._upload_id = upload_id
        self._on_release_request = on_release_request
        self._holder: _Holder | None = None

    async def __aenter__(self) -> HeldLock:
        self._holder = await self._locker._acquire(self._upload_id, self._on_release_request)
        return self._holder.held

    async def __aexit__(self, *exc_info: object) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            self._locker._release(self._upload_id, holder)


class MemoryLocker:
    """Per-upload exclusive locks with release requests, for a single process."""

    def __init__(self, acquire_timeout: float, *, observer: LockObserver | None = None) -> None:
        """``observer`` (optional) is told about lock waits, takeovers and timeouts."""
        self._acquire_timeout = acquire_timeout
        self._observer = observer
        self._entries: dict[str, _Entry] = {}
        self._records = ReleaseRecords()
        """Who released each lock last (``held.generation``)."""
        self._closed = False

    def lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AbstractAsyncContextManager[HeldLock]:
        """Acquire the lock of ``upload_id`` (see ``lockers.base.Locker.lock``)."""
        if self._observer is None:
            return _Acquisition(self, upload_id, on_release_request)
        return observed(functools.partial(_Acquisition, self, upload_id), on_release_request, self._observer)

    async def _acquire(self, upload_id: str, on_release_request: ReleaseRequest) -> _Holder:
        if self._closed:
            raise LockUnavailable("locker is closed")
        me = _Holder(on_release_request)
        entry = self._entries.get(upload_id)
        if entry is None:
            self._entries[upload_id] = _Entry(me)
            me.held.generation = self._records.acquired(upload_id)
            return me
        me.granted = asyncio.get_running_loop().create_future()
        entry.waiters.append(me)
        if entry.holder is not None:
            entry.holder.ask_to_release()
        try:
            async with asyncio.timeout(self._acquire_timeout):
                await me.granted
        except BaseException as error:
            if me.granted.done() and not me.granted.cancelled() and me.granted.exception() is None:
                # Granted in the same instant we timed out or were cancelled: pass it on.
                self._release(upload_id, me)
            else:
                with contextlib.suppress(ValueError):
                    entry.waiters.remove(me)
                me.granted.cancel()
            if isinstance(error, TimeoutError):
                raise LockTimeout(
                    f"upload {upload_id} is held by another request that did not release it "
                    f"within {self._acquire_timeout:g}s"
                ) from None
            raise
        me.held.generation = self._records.acquired(upload_id)
        return me

    def _release(self, upload_id: str, holder: _Holder) -> None:
        entry = self._entries.get(upload_id)
        if entry is None or entry.holder is not holder:
            return  # already released (e.g. by close())
        self._records.released(upload_id, holder.held.generation)
        while entry.waiters:
            successor = entry.waiters.popleft()
            assert successor.granted is not None
            if successor.granted.done():
                continue  # gave up (timed out or cancelled) but not yet removed itself
            entry.holder = successor
            successor.granted.set_result(None)
            if entry.waiters:
                # Someone newer is still waiting: the newest request wins, so the one
                # we just served is asked to hand over once it has started.
                asyncio.get_running_loop().call_soon(successor.ask_to_release)
            return
        entry.holder = None
        del self._entries[upload_id]

    async def close(self) -> None:
        """Mark every held lock lost and fail every waiter with ``LockUnavailable``."""
        self._closed = True
        entries, self._entries = self._entries, {}
        for entry in entries.values():
            if entry.holder is not None:
                entry.holder.held.lost.set()
            for waiter in entry.waiters:
                if waiter.granted is not None and not waiter.granted.done():
                    waiter.granted.set_exception(LockUnavailable("locker is closed"))
