"""Locker interface: one holder per upload, with release requests.

Every request that reads or changes an upload holds its lock::

    async with locker.lock(upload_id, on_release_request) as held:
        ...  # held.lost is set if the lock is lost while held (e.g. Consul session)

When another request wants a held lock, the locker calls the holder's
``on_release_request`` (in the holder's process, whichever host it is on). The holder
stops reading its body, stores what it received, answers its client and leaves the
``async with``; the waiter then gets the lock. A waiter that does not get the lock
within the locker's acquire timeout gets ``LockTimeout``. This is what fixes the
classic "423 Locked forever" after a client reconnects while its old, half-open
connection still holds the lock.

``held.generation`` (``LockGeneration``) says which hold this one directly follows,
when the locker can vouch that it released cleanly and nobody held the lock since: the
memory, redis and s3 lockers can; the file and consul lockers report None (nothing
records the last release), and a store then reads the upload back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable

log = logging.getLogger("tusd_py.lockers")

ReleaseRequest = Callable[[], None]
"""Called (on the holder's event loop) when another request wants the lock."""



def no_release_request() -> None:
    """The release request of a short lock holder (HEAD, DELETE, GET, a sweep, a
    concatenation): it lets go soon on its own, so there is nothing to cut short."""


_LOCK_NAME = re.compile(r"[A-Za-z0-9_-]+")


class LockError(Exception):
    """Base class of locker errors."""


class LockTimeout(LockError):
    """The lock was not released by its holder within the acquire timeout."""


class LockUnavailable(LockError):
    """The lock service cannot be reached (answer 503; nothing is written)."""


@dataclass(frozen=True, slots=True)
class LockGeneration:
    """Who held a lock before: what a store needs to know whether the state it kept
    from its own last hold of an upload is still true.

    ``token`` names this hold (unique across instances and time). ``follows`` is the
    token of the hold this one directly follows, when the lock service vouches that
    that hold ended with a clean release and nobody acquired the lock in between;
    None when it cannot tell (first hold it knows of, a lease taken over from a
    holder that never released, a record that expired or was evicted). A store may
    reuse the state it left at the end of hold ``T`` only when ``follows == T``.
    """

    token: str
    follows: str | None


class LockLost(asyncio.Event):
    """``HeldLock.lost``: an ``asyncio.Event`` that also calls its callbacks when it
    is set, so a holder can stop its write at once without a task waiting on the
    event for every request (a task per PATCH, most of them only ever cancelled)."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop, from ``set``) when the lock is lost;
        at once (here) when it already is."""
        if self.is_set():
            ask_to_release(callback)
            return
        self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        """Forget ``callback`` (no error when it is not there)."""
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def set(self) -> None:
        if self.is_set():
            return
        super().set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            ask_to_release(callback)  # a failing callback is logged; the locker goes on


class HeldLock:
    """A lock while it is held. ``lost`` is set when the locker can no longer
    guarantee exclusivity (session expired, lock service restarted); the holder must
    stop writing as soon as it can. ``generation`` is set by lockers that can tell
    who held the lock before (None: this locker cannot vouch for anything)."""

    __slots__ = ("lost", "generation")

    def __init__(self) -> None:
        self.lost = LockLost()
        self.generation: LockGeneration | None = None


RELEASE_RECORDS = 100_000
"""Uploads whose last clean release an in-process locker remembers (about 10 MB)."""


class ReleaseRecords:
    """The in-process record behind ``LockGeneration`` (memory locker): the token of
    the last clean release per upload, taken (removed) by the next acquisition, so
    that ``follows`` is only ever the hold directly before. Bounded: an evicted
    record makes the next hold vouch for nothing, which is always safe."""

    def __init__(self, capacity: int = RELEASE_RECORDS) -> None:
        self._capacity = capacity
        self._released: OrderedDict[str, str] = OrderedDict()

    def acquired(self, upload_id: str) -> LockGeneration:
        """A new hold of ``upload_id``: its generation (the record is taken)."""
        return LockGeneration(new_lock_token(), self._released.pop(upload_id, None))

    def released(self, upload_id: str, generation: LockGeneration | None) -> None:
        """The hold ``generation`` of ``upload_id`` ended cleanly."""
        if generation is None:
            return
        self._released[upload_id] = generation.token
        self._released.move_to_end(upload_id)
        while len(self._released) > self._capacity:
            self._released.popitem(last=False)


def new_lock_token() -> str:
    """A token naming one hold of a lock (128 random bits)."""
    return secrets.token_hex(16)


@runtime_checkable
class Locker(Protocol):
    """Per-upload exclusive locks with release requests."""

    def lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AbstractAsyncContextManager[HeldLock]:
        """Acquire the lock of ``upload_id``; raises ``LockTimeout`` or
        ``LockUnavailable``. ``on_release_request`` is called while the lock is held
        each time another request asks for it."""
        ...

    async def close(self) -> None:
        """Release every held lock and background resource (sessions, watchers)."""
        ...


@runtime_checkable
class RemovesExpiredLocks(Protocol):
    """A locker whose locks can outlive a crashed holder as stored objects (the S3
    locker): the expiry sweep calls ``remove_expired``. Lockers whose locks expire by
    themselves (Redis keys, Consul sessions, file locks) do not implement it."""

    async def remove_expired(self) -> int:
        """Delete locks whose lease ran out; how many were removed."""
        ...


class LockObserver(Protocol):
    """Receives a locker's numbers (``tusd_py.metrics.Metrics`` is one). Lockers take
    an optional ``observer`` and report through ``observed_lock``."""

    def lock_wait(self, seconds: float) -> None:
        """A lock was acquired after waiting ``seconds`` (about 0 when it was free)."""
        ...

    def lock_takeover(self) -> None:
        """A holder that was asked to release (another request wanted the lock) let go."""
        ...

    def lock_timeout(self) -> None:
        """A waiter gave up after the acquire timeout (``LockTimeout``)."""
        ...


class observed_lock:  # lower case: used (and tested) like the function it was
    """``acquire(on_release_request)``, reporting the wait, a timeout, and whether the
    holder let go because it was asked to (a takeover; not when the lock was lost).

    A plain class, not a generator-based context manager: every request takes a lock,
    and the generator machinery (two context managers deep) cost more per PATCH than
    the memory locker itself."""

    __slots__ = ("_acquire", "_on_release_request", "_observer", "_inner", "_held", "_asked")

    def __init__(
        self,
        acquire: Callable[[ReleaseRequest], AbstractAsyncContextManager[HeldLock]],
        on_release_request: ReleaseRequest,
        observer: LockObserver,
    ) -> None:
        self._acquire = acquire
        self._on_release_request = on_release_request
        self._observer = observer
        self._inner: AbstractAsyncContextManager[HeldLock] | None = None
        self._held: HeldLock | None = None
        self._asked = False

    def _release_request(self) -> None:
        self._asked = True
        self._on_release_request()

    async def __aenter__(self) -> HeldLock:
        started = time.perf_counter()
        inner = self._inner = self._acquire(self._release_request)
        try:
            held = await inner.__aenter__()
        except LockTimeout:
            self._observer.lock_timeout()
            raise
        self._held = held
        try:
            self._observer.lock_wait(time.perf_counter() - started)
        except BaseException:
            await inner.__aexit__(*sys.exc_info())
            raise
        return held

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> bool | None:
        inner, held = self._inner, self._held
        assert inner is not None and held is not None
        try:
            if self._asked and not held.lost.is_set():
                self._observer.lock_takeover()
        finally:
            suppress = await inner.__aexit__(exc_type, exc, traceback)
        return suppress


def observed(
    acquire: Callable[[ReleaseRequest], AbstractAsyncContextManager[HeldLock]],
    on_release_request: ReleaseRequest,
    observer: LockObserver | None,
) -> AbstractAsyncContextManager[HeldLock]:
    """``acquire(on_release_request)``, through ``observed_lock`` when there is an
    ``observer`` (how every locker's ``lock`` reports to its optional observer)."""
    if observer is None:
        return acquire(on_release_request)
    return observed_lock(acquire, on_release_request, observer)


class BackgroundWork:
    """Work a locker starts and does not wait for (a late release, a retry): kept
    referenced until it ends (asyncio holds tasks only weakly), and waited for by
    ``finish`` when the locker closes."""

    def __init__(self, ignore: tuple[type[Exception], ...] = ()) -> None:
        """``ignore``: errors the work may end with that are expected (not logged)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._ignore = ignore

    def start(self, work: Awaitable[None]) -> None:
        """Run ``work`` in a task of its own."""

        async def run() -> None:
            try:
                await work
            except self._ignore:
                pass

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> None:
        """Wait for the work still running (its errors are not raised)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def check_lock_name(upload_id: str) -> None:
    """Raise ``ValueError`` unless ``upload_id`` is safe as a lock file name or a
    Consul key part (letters, digits, '-', '_'). The handler passes only valid ids;
    lockers that build names from them check anyway."""
    if not _LOCK_NAME.fullmatch(upload_id):
        raise ValueError(f"invalid upload id {upload_id!r}")


def ask_to_release(on_release_request: ReleaseRequest) -> None:
    """Call a holder's ``on_release_request``; a buggy callback is logged and must
    not break the locker."""
    try:
        on_release_request()
    except Exception:
        log.exception("on_release_request callback failed")
