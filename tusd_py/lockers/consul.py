"""Consul locker: per-upload locks shared by several hosts.

Design (DESIGN.md, "Lockers"):

- One Consul session per locker instance, created by ``start()`` (or lazily by the
  first ``lock``), with a TTL renewed every ttl/3, the configured lock-delay and
  behavior. The lock of upload ``U`` is the key ``<prefix>locks/U`` acquired with
  ``PUT ?acquire=<session>`` and released with ``?release=<session>``.
- Release requests travel through Consul KV: a waiter that finds ``U`` held by session
  ``S`` writes ``<prefix>release/U`` = ``{"holder": S, "nonce": ...}``. Each instance runs
  one watcher, a recursive blocking query on ``<prefix>release/``, and calls
  ``on_release_request`` for requests addressed to its session for ids it holds. The
  waiter meanwhile blocks on the lock key (a blocking query) and retries the acquire
  when it changes, until ``acquire_timeout``.
- Losing the session (renew answers 404, the session watcher sees it gone, no
  successful renew for a whole TTL, Consul restarted) sets ``held.lost`` of every lock
  held under it and calls its ``on_release_request``, so in-flight writes stop; the
  next lock creates a new session. Nothing crashes the process.
- Consul unreachable (refused, timed out after ``request_timeout``, 5xx, ACL denied)
  raises ``LockUnavailable`` with a message naming the agent; the handler answers 503
  and writes nothing.
- Requests of this process for the same id are first serialized in-process by a
  ``MemoryLocker`` (same queueing and release-request semantics), so only one request
  per id and process talks to Consul at a time.
- ``held.generation`` is None: this locker does not vouch for who held a lock before
  (not built yet: the value written on release could name the releasing hold, and an
  acquire with ``cas=<ModifyIndex>`` of the released key, read first, would prove that
  nobody held it in between, at one more Consul call per acquisition).

Parts (one job each): ``consul_agent.ConsulAgent`` talks to the agent,
``consul_agent.ConsulSession`` keeps the instance's session alive, ``_ReleaseRequests``
writes and watches release requests, and ``ConsulLocker`` acquires and releases the
lock keys with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from tusd_py.config import ConsulLockConfig
from tusd_py.lockers.base import (
    BackgroundWork,
    HeldLock,
    LockObserver,
    LockTimeout,
    LockUnavailable,
    ReleaseRequest,
    ask_to_release,
    check_lock_name,
    observed,
)
from tusd_py.lockers.consul_agent import (
    WATCH_RETRY_SECONDS,
    WATCH_WAIT_SECONDS,
    ConsulAgent,
    ConsulSession,
    InvalidSession,
    next_index,
)
from tusd_py.lockers.memory import MemoryLocker

log = logging.getLogger("tusd_py.lockers.consul")

LOCK_DELAY_POLL_SECONDS = (0.05, 1.0)
"""First and largest wait between acquire attempts while a lock key is free but the
acquire fails (lock-delay after a holder's session was invalidated: Consul does not
say how long it lasts)."""


@dataclass(eq=False)
class _Holding:
    """One lock of this instance, from the first acquire attempt to the release."""

    upload_id: str
    on_release_request: ReleaseRequest
    held: HeldLock = field(default_factory=HeldLock)
    session_id: str | None = None
    """The session the lock is (being) acquired with."""
    acquired: bool = False
    release_requested: bool = False
    """A release request arrived; if it came before ``acquired``, it is delivered then."""
    remote_request_seen: bool = False
    """A release request key was written for this hold (deleted again on release)."""

    def request_release(self, remote: bool = False) -> None:
        self.release_requested = True
        self.remote_request_seen = self.remote_request_seen or remote
        if self.acquired:
            self.call_on_release_request()

    def call_on_release_request(self) -> None:
        ask_to_release(self.on_release_request)


class _ReleaseRequests:
    """Release requests through Consul KV under ``<prefix>release/``: waiters write them
    (``send``), holders delete them (``withdraw``), and one watcher per instance, a
    recursive blocking query, hands each request addressed to the current session to
    ``deliver(upload_id, holder_session, modify_index)`` once."""

    def __init__(
        self,
        agent: ConsulAgent,
        prefix: str,
        identity: dict[str, Any],
        current_session: Callable[[], str | None],
        deliver: Callable[[str, str, int], None],
    ) -> None:
        """``identity`` (host, pid) goes into each request written, for operators."""
        self._agent = agent
        self._prefix = prefix
        self._identity = identity
        self._current_session = current_session
        self._deliver = deliver
        self._seen: dict[str, int] = {}
        """Release-request key -> ModifyIndex already handled, so each is handled once."""
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = False

    async def send(self, upload_id: str, holder: str) -> None:
        """Ask the instance holding ``upload_id`` under session ``holder`` to release it."""
        value = json.dumps({"holder": holder, "nonce": uuid.uuid4().hex, **self._identity})
        await self._agent.call("request release", self._agent.client.kv.put(self._prefix + upload_id, value))

    async def withdraw(self, upload_id: str, modify_index: int | None = None) -> None:
        """Delete the release request of ``upload_id`` (with ``modify_index``: only
        that very request, not one written since)."""
        await self._agent.call(
            "delete release request", self._agent.client.kv.delete(self._prefix + upload_id, cas=modify_index)
        )

    def watch_for_new_session(self) -> None:
        """Forget the requests handled so far and make sure the watcher runs (called
        when a session was created)."""
        self._seen.clear()
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    def stop(self) -> list[asyncio.Task[None]]:
        """Cancel the watcher; returns it (if any) for the caller to await."""
        self._stopped = True
        if self._watcher is None:
            return []
        self._watcher.cancel()
        return [self._watcher]

    async def _watch(self) -> None:
        """One blocking query over ``<prefix>release/`` for the whole instance."""
        index: int | None = None
        retry = WATCH_RETRY_SECONDS[0]
        while not self._stopped:
            try:
                new_index, entries = await self._agent.call(
                    "watch release requests",
                    self._agent.client.kv.get(self._prefix, recurse=True, index=index, wait=f"{WATCH_WAIT_SECONDS:g}s"),
                    time_limit=WATCH_WAIT_SECONDS + self._agent.request_timeout,
                )
            except LockUnavailable as error:
                log.debug("release watcher: %s", error)
                index = None
                await asyncio.sleep(retry)
                retry = min(retry * 2, WATCH_RETRY_SECONDS[1])
                continue
            retry = WATCH_RETRY_SECONDS[0]
            index = next_index(index, new_index)
            self._handle(entries or [])

    def _handle(self, entries: list[dict[str, Any]]) -> None:
        seen: dict[str, int] = {}
        for entry in entries:
            key, modify_index = str(entry.get("Key", "")), int(entry.get("ModifyIndex", 0))
            seen[key] = modify_index
            if self._seen.get(key) == modify_index:
                continue
            try:
                holder = json.loads(entry.get("Value") or b"{}").get("holder")
            except (ValueError, AttributeError):
                continue
            if holder is None or holder != self._current_session():
                continue
            self._deliver(key[len(self._prefix):], holder, modify_index)
        # Forget requests that are gone; the listing is the whole prefix.
        self._seen = seen


class ConsulLocker:
    """Per-upload exclusive locks held as Consul sessions' KV locks (several hosts).

    Build it with ``ConsulLocker.from_config(config.lock.consul, acquire_timeout=...)``
    or with keyword arguments; then ``await start()`` (creates the session, starts the
    watchers; raises ``LockUnavailable`` if Consul cannot be reached) and finally
    ``await close()`` (releases every held lock and destroys the session).

    It acquires and releases the lock keys; the session (``ConsulSession``) and the
    release requests (``_ReleaseRequests``) are kept by their own parts.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:8500",
        scheme: str = "http",
        token: str = "",
        key_prefix: str = "tusd-py/",
        session_ttl: float = 15.0,
        lock_delay: float = 1.0,
        behavior: str = "release",
        acquire_timeout: float = 20.0,
        *,
        request_timeout: float = 5.0,
        session_name: str = "tusd-py",
        renew_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: LockObserver | None = None,
    ) -> None:
        """``token`` empty: the ``CONSUL_HTTP_TOKEN`` variable, if set.
        ``observer`` (optional) is told about lock waits, takeovers and timeouts.
        ``request_timeout``: seconds one Consul call may take before Consul counts as
        unreachable. ``renew_interval`` (default ttl/3) and ``clock`` (when the last
        successful renew happened) are there for tests."""
        if behavior not in {"release", "delete"}:
            raise ValueError(f"behavior must be 'release' or 'delete', got {behavior!r}")
        if key_prefix.startswith("/"):
            raise ValueError("key_prefix must not start with '/'")
        self._agent = ConsulAgent(address, scheme, token or os.environ.get("CONSUL_HTTP_TOKEN", ""), request_timeout)
        self._lock_prefix = f"{key_prefix}locks/"
        self._acquire_timeout = acquire_timeout
        self._observer = observer
        self._identity = {"host": socket.gethostname(), "pid": os.getpid()}
        self._session = ConsulSession(
            self._agent,
            name=session_name,
            ttl=session_ttl,
            lock_delay=lock_delay,
            behavior=behavior,
            renew_interval=renew_interval if renew_interval is not None else session_ttl / 3,
            clock=clock,
            on_created=self._session_created,
            on_renewed=self._session_renewed,
            on_lost=self._session_lost,
        )
        self._requests = _ReleaseRequests(
            self._agent, f"{key_prefix}release/", self._identity, lambda: self._session.id, self._release_requested
        )

        self._local = MemoryLocker(acquire_timeout=acquire_timeout)
        self._background = BackgroundWork()
        self._holdings: dict[str, _Holding] = {}
        self._unreleased: dict[str, str] = {}
        """Upload id -> session: locks whose release failed (Consul unreachable);
        retried after each renew, and released at once if someone asks."""
        self._closed = False

    @classmethod
    def from_config(
        cls, config: ConsulLockConfig, acquire_timeout: float, *, observer: LockObserver | None = None
    ) -> ConsulLocker:
        """The locker described by the ``[lock.consul]`` section."""
        return cls(
            address=config.address,
            scheme=config.scheme,
            token=config.token,
            key_prefix=config.key_prefix,
            session_ttl=config.session_ttl,
            lock_delay=config.lock_delay,
            behavior=config.behavior,
            acquire_timeout=acquire_timeout,
            request_timeout=config.request_timeout,
            observer=observer,
        )

    @property
    def session_id(self) -> str | None:
        """The current Consul session (None before start and after a loss)."""
        return self._session.id

    async def start(self) -> None:
        """Create the session and start the watchers; ``LockUnavailable`` if Consul
        cannot be reached."""
        await self._session.ensure()

    def lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AbstractAsyncContextManager[HeldLock]:
        """Acquire the lock of ``upload_id`` (see ``lockers.base.Locker.lock``)."""
        check_lock_name(upload_id)
        return observed(functools.partial(self._lock, upload_id), on_release_request, self._observer)

    @contextlib.asynccontextmanager
    async def _lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AsyncIterator[HeldLock]:
        if self._closed:
            raise LockUnavailable("Consul locker is closed")
        deadline = asyncio.get_running_loop().time() + self._acquire_timeout
        holding = _Holding(upload_id, on_release_request)
        async with self._local.lock(upload_id, holding.request_release):
            await self._acquire(holding, deadline)
            try:
                yield holding.held
            finally:
                await self._release(holding)

    # --- acquiring and releasing ------------------------------------------------------

    def _lock_value(self, session_id: str) -> str:
        return json.dumps({"session": session_id, **self._identity})

    async def _acquire(self, holding: _Holding, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        upload_id = holding.upload_id
        lock_key = self._lock_prefix + upload_id
        asked: set[str] = set()
        poll = LOCK_DELAY_POLL_SECONDS[0]
        self._holdings[upload_id] = holding
        try:
            while True:
                session_id = await self._session.ensure()
                holding.session_id = session_id
                try:
                    acquired = await self._agent.call(
                        "acquire lock",
                        self._agent.client.kv.put(lock_key, self._lock_value(session_id), acquire=session_id),
                    )
                except InvalidSession:
                    self._session.lose(session_id, "Consul no longer knows the session")
                    continue
                except (LockUnavailable, asyncio.CancelledError):
                    # The acquire may have succeeded in Consul although we got no
                    # answer: release it (harmless if it did not).
                    self._background.start(self._release_key(upload_id, session_id, quiet=True))
                    raise
                if acquired and session_id != self._session.id:
                    continue  # the session was lost while the acquire was in flight
                if acquired:
                    self._unreleased.pop(upload_id, None)
                    holding.acquired = True
                    # A request we wrote to the previous holder is still in KV if that
                    # holder died before it could withdraw it: ours to delete now.
                    holding.remote_request_seen = holding.remote_request_seen or bool(asked)
                    if holding.release_requested:
                        holding.call_on_release_request()
                    return
                if loop.time() >= deadline:
                    raise LockTimeout(
                        f"upload {upload_id} is locked by another instance that did not release it "
                        f"within {self._acquire_timeout:g}s"
                    )
                index, entry = await self._agent.call("read lock", self._agent.client.kv.get(lock_key))
                holder = entry.get("Session") if entry else None
                if holder is not None and holder not in asked:
                    await self._requests.send(upload_id, holder)
                    asked.add(holder)
                # Wait for the lock key to change (released, or taken by someone else).
                # A free key that we could not acquire is in lock-delay, whose length
                # Consul does not tell: wait a growing, bounded time, woken early by any
                # change of the key.
                if holder is None:
                    wait, poll = poll, min(poll * 2, LOCK_DELAY_POLL_SECONDS[1])
                else:
                    wait = WATCH_WAIT_SECONDS
                wait = max(0.0, min(wait, deadline - loop.time()))
                if wait > 0:
                    await self._agent.call(
                        "wait for lock",
                        self._agent.client.kv.get(lock_key, index=index, wait=f"{max(1, int(wait * 1000))}ms"),
                        time_limit=wait + self._agent.request_timeout,
                    )
        except BaseException:
            if self._holdings.get(upload_id) is holding:
                del self._holdings[upload_id]
            raise

    async def _release(self, holding: _Holding) -> None:
        upload_id = holding.upload_id
        if self._holdings.get(upload_id) is holding:
            del self._holdings[upload_id]
        session_id = holding.session_id
        if holding.held.lost.is_set() or session_id is None or session_id != self._session.id:
            return  # the session that held it is gone, and so is the lock
        try:
            if holding.remote_request_seen:
                # Clean up the request before unlocking: a request written after this
                # point is addressed to us and ignored by the next holder.
                await self._requests.withdraw(upload_id)
            await self._release_key(upload_id, session_id)
        except (LockUnavailable, InvalidSession) as error:
            log.warning("could not release the lock of upload %s; will retry: %s", upload_id, error)
            self._unreleased[upload_id] = session_id

    async def _release_key(self, upload_id: str, session_id: str, quiet: bool = False) -> None:
        try:
            await self._agent.call(
                "release lock",
                self._agent.client.kv.put(
                    self._lock_prefix + upload_id, self._lock_value(session_id), release=session_id
                ),
            )
        except (LockUnavailable, InvalidSession):
            if not quiet:
                raise

    async def _retry_release(self, upload_id: str, session_id: str) -> None:
        try:
            await self._release_key(upload_id, session_id)
        except (LockUnavailable, InvalidSession):
            return
        if self._unreleased.get(upload_id) == session_id:
            del self._unreleased[upload_id]

    # --- told by the session and the release watcher ---------------------------------

    def _session_created(self, session_id: str) -> None:
        self._requests.watch_for_new_session()

    def _session_renewed(self, session_id: str) -> None:
        for upload_id, owner in list(self._unreleased.items()):
            if owner == session_id and upload_id not in self._holdings:
                self._background.start(self._retry_release(upload_id, session_id))

    def _session_lost(self, session_id: str, reason: str) -> None:
        """Mark every lock held under the lost ``session_id`` lost."""
        for upload_id in [i for i, s in self._unreleased.items() if s == session_id]:
            del self._unreleased[upload_id]
        lost = [h for h in self._holdings.values() if h.session_id == session_id and h.acquired]
        log.warning("Consul session %s lost (%s); %d held lock(s) lost", session_id, reason, len(lost))
        for holding in lost:
            holding.held.lost.set()
            holding.call_on_release_request()

    def _release_requested(self, upload_id: str, holder: str, modify_index: int) -> None:
        """Another instance asked session ``holder`` (ours) to release ``upload_id``."""
        holding = self._holdings.get(upload_id)
        if holding is not None and holding.session_id == holder:
            holding.request_release(remote=True)
        elif self._unreleased.get(upload_id) == holder:
            self._background.start(self._retry_release(upload_id, holder))
        elif holding is None:
            # We released before the request reached us, so nobody withdraws it: its
            # writer acquires the free lock and withdraws it then, unless it was killed
            # first. Delete that very request (a newer one is kept); a waiter that is
            # still alive needs it no more, the lock being free.
            self._background.start(self._withdraw_stale(upload_id, modify_index))

    async def _withdraw_stale(self, upload_id: str, modify_index: int) -> None:
        try:
            await self._requests.withdraw(upload_id, modify_index)
        except (LockUnavailable, InvalidSession) as error:
            log.debug("could not delete the stale release request of upload %s: %s", upload_id, error)

    # --- plumbing ----------------------------------------------------------------------

    async def close(self) -> None:
        """Release every held lock, destroy the session, stop the watchers."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._session.stop(), *self._requests.stop()]
        await asyncio.gather(*tasks, return_exceptions=True)
        session_id = self._session.forget()
        holdings = list(self._holdings.values())
        self._holdings.clear()
        for holding in holdings:
            holding.held.lost.set()
        await self._local.close()
        await self._background.finish()
        if session_id is not None:
            # Release explicitly first: destroying a session puts its locks under
            # lock-delay, which would stall the other instances for nothing.
            for holding in holdings:
                if holding.acquired and holding.session_id == session_id:
                    with contextlib.suppress(LockUnavailable, InvalidSession):
                        await self._release_key(holding.upload_id, session_id)
            await self._session.destroy(session_id)
        await self._agent.close()
