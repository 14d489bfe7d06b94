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

py-consul notes (1.8.0): ``consul.aio.Consul`` builds its aiohttp connector with
``verify_ssl=`` and ``ssl_context=``, both deprecated by aiohttp 3.x (a
``DeprecationWarning`` on every construction, an error under ``-W error``, and gone in
aiohttp 4); ``_ConsulHTTPClient`` builds the connector with ``ssl=`` instead. And
``Consul(token=...)`` lets ``CONSUL_HTTP_TOKEN`` override an explicit token; the token
is set on the client after construction so the configured one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio
import consul.base

from tusd_py.config import ConsulLockConfig
from tusd_py.lockers.base import (
    HeldLock,
    LockObserver,
    LockTimeout,
    LockUnavailable,
    ReleaseRequest,
    ask_to_release,
    check_lock_name,
    observed,
)
from tusd_py.lockers.memory import MemoryLocker

log = logging.getLogger("tusd_py.lockers.consul")

T = TypeVar("T")

WATCH_WAIT_SECONDS = 30.0
"""Longest a blocking query (release watcher, session watcher) waits before it is
re-issued. Well under Consul's 10 min cap and aiohttp's 5 min default total timeout."""

LOCK_DELAY_POLL_SECONDS = (0.05, 1.0)
"""First and largest wait between acquire attempts while a lock key is free but the
acquire fails (lock-delay after a holder's session was invalidated: Consul does not
say how long it lasts)."""

WATCH_RETRY_SECONDS = (0.1, 5.0)
"""First and largest pause before re-issuing a watcher query that failed (Consul down):
bounded so a recovering agent is not hammered, short so recovery is noticed fast."""


class _InvalidSession(Exception):
    """Consul refused a lock operation because our session no longer exists."""


class _ConsulHTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp adapter with a connector built from non-deprecated options."""

    def __init__(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None) -> None:
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify, cert)
        self.loop = None
        tls: ssl.SSLContext | bool = True
        if scheme == "https":
            if verify is False:
                tls = False
            else:
                tls = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
                if isinstance(cert, tuple):
                    tls.load_cert_chain(*cert)
                elif cert:
                    tls.load_cert_chain(cert)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls))


class _Consul(consul.aio.Consul):  # type: ignore[misc]
    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None) -> Any:
        return _ConsulHTTPClient(host, port, scheme, verify, cert)


def _parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``, or a bare host for port 8500)."""
    parts = urlsplit("//" + address)
    if not parts.hostname or parts.path or parts.query:
        raise ValueError(f"Consul address must be host:port, got {address!r}")
    return parts.hostname, parts.port or 8500


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


class ConsulLocker:
    """Per-upload exclusive locks held as Consul sessions' KV locks (several hosts).

    Build it with ``ConsulLocker.from_config(config.lock.consul, acquire_timeout=...)``
    or with keyword arguments; then ``await start()`` (creates the session, starts the
    watchers; raises ``LockUnavailable`` if Consul cannot be reached) and finally
    ``await close()`` (releases every held lock and destroys the session).
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
        self._address = address
        self._host, self._port = _parse_address(address)
        self._scheme = scheme
        self._token = token or os.environ.get("CONSUL_HTTP_TOKEN", "")
        self._lock_prefix = f"{key_prefix}locks/"
        self._release_prefix = f"{key_prefix}release/"
        self._session_ttl = session_ttl
        self._lock_delay = lock_delay
        self._behavior = behavior
        self._acquire_timeout = acquire_timeout
        self._request_timeout = request_timeout
        self._session_name = session_name
        self._renew_interval = renew_interval if renew_interval is not None else session_ttl / 3
        self._clock = clock
        self._observer = observer
        self._identity = {"host": socket.gethostname(), "pid": os.getpid()}

        self._local = MemoryLocker(acquire_timeout=acquire_timeout)
        self._client: Any = None
        self._session_id: str | None = None
        self._session_guard = asyncio.Lock()
        self._last_renewed = 0.0
        self._session_tasks: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._holdings: dict[str, _Holding] = {}
        self._seen_requests: dict[str, int] = {}
        """Release-request key -> ModifyIndex already handled, so each is handled once."""
        self._unreleased: dict[str, str] = {}
        """Upload id -> session: locks whose release failed (Consul unreachable);
        retried by the renew loop, and released at once if someone asks."""
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
        return self._session_id

    async def start(self) -> None:
        """Create the session and start the watchers; ``LockUnavailable`` if Consul
        cannot be reached."""
        await self._ensure_session()

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
                session_id = await self._ensure_session()
                holding.session_id = session_id
                try:
                    acquired = await self._call(
                        "acquire lock", self._client.kv.put(lock_key, self._lock_value(session_id), acquire=session_id)
                    )
                except _InvalidSession:
                    self._session_lost(session_id, "Consul no longer knows the session")
                    continue
                except (LockUnavailable, asyncio.CancelledError):
                    # The acquire may have succeeded in Consul although we got no
                    # answer: release it (harmless if it did not).
                    self._in_background(self._release_key(upload_id, session_id, quiet=True))
                    raise
                if acquired and session_id != self._session_id:
                    continue  # the session was lost while the acquire was in flight
                if acquired:
                    self._unreleased.pop(upload_id, None)
                    holding.acquired = True
                    if holding.release_requested:
                        holding.call_on_release_request()
                    return
                if loop.time() >= deadline:
                    raise LockTimeout(
                        f"upload {upload_id} is locked by another instance that did not release it "
                        f"within {self._acquire_timeout:g}s"
                    )
                index, entry = await self._call("read lock", self._client.kv.get(lock_key))
                holder = entry.get("Session") if entry else None
                if holder is not None and holder not in asked:
                    await self._request_release(upload_id, holder)
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
                    await self._call(
                        "wait for lock",
                        self._client.kv.get(lock_key, index=index, wait=f"{max(1, int(wait * 1000))}ms"),
                        time_limit=wait + self._request_timeout,
                    )
        except BaseException:
            if self._holdings.get(upload_id) is holding:
                del self._holdings[upload_id]
            raise

    async def _request_release(self, upload_id: str, holder: str) -> None:
        value = json.dumps({"holder": holder, "nonce": uuid.uuid4().hex, **self._identity})
        await self._call("request release", self._client.kv.put(self._release_prefix + upload_id, value))

    async def _release(self, holding: _Holding) -> None:
        upload_id = holding.upload_id
        if self._holdings.get(upload_id) is holding:
            del self._holdings[upload_id]
        session_id = holding.session_id
        if holding.held.lost.is_set() or session_id is None or session_id != self._session_id:
            return  # the session that held it is gone, and so is the lock
        try:
            if holding.remote_request_seen:
                # Clean up the request before unlocking: a request written after this
                # point is addressed to us and ignored by the next holder.
                await self._call("delete release request", self._client.kv.delete(self._release_prefix + upload_id))
            await self._release_key(upload_id, session_id)
        except (LockUnavailable, _InvalidSession) as error:
            log.warning("could not release the lock of upload %s; will retry: %s", upload_id, error)
            self._unreleased[upload_id] = session_id

    async def _release_key(self, upload_id: str, session_id: str, quiet: bool = False) -> None:
        try:
            await self._call(
                "release lock",
                self._client.kv.put(self._lock_prefix + upload_id, self._lock_value(session_id), release=session_id),
            )
        except (LockUnavailable, _InvalidSession):
            if not quiet:
                raise

    # --- session -----------------------------------------------------------------------

    def _get_client(self) -> Any:
        if self._client is None:
            client = _Consul(host=self._host, port=self._port, scheme=self._scheme)
            # py-consul prefers CONSUL_HTTP_TOKEN over an explicit token; we do not.
            client.token = self._token or None
            self._client = client
        return self._client

    async def _ensure_session(self) -> str:
        if self._closed:
            raise LockUnavailable("Consul locker is closed")
        if self._session_id is not None:
            return self._session_id
        async with self._session_guard:
            if self._session_id is not None:
                return self._session_id
            client = self._get_client()
            session_id: str = await self._call(
                "create session",
                client.session.create(
                    name=self._session_name,
                    ttl=self._session_ttl,
                    lock_delay=self._lock_delay,
                    behavior=self._behavior,
                ),
            )
            self._session_id = session_id
            self._last_renewed = self._clock()
            self._seen_requests.clear()
            self._session_tasks = [
                asyncio.create_task(self._renew_loop(session_id)),
                asyncio.create_task(self._watch_session(session_id)),
            ]
            if self._watcher is None or self._watcher.done():
                self._watcher = asyncio.create_task(self._watch_release_requests())
            log.info("Consul session %s created (ttl=%gs, lock_delay=%gs)", session_id, self._session_ttl,
                     self._lock_delay)
            return session_id

    def _session_lost(self, session_id: str, reason: str) -> None:
        """Mark every lock held under ``session_id`` lost and forget the session."""
        if self._session_id != session_id:
            return
        self._session_id = None
        current = asyncio.current_task()
        for task in self._session_tasks:
            if task is not current:
                task.cancel()
        self._session_tasks = []
        for upload_id in [i for i, s in self._unreleased.items() if s == session_id]:
            del self._unreleased[upload_id]
        lost = [h for h in self._holdings.values() if h.session_id == session_id and h.acquired]
        log.warning("Consul session %s lost (%s); %d held lock(s) lost", session_id, reason, len(lost))
        for holding in lost:
            holding.held.lost.set()
            holding.call_on_release_request()

    async def _renew_loop(self, session_id: str) -> None:
        while self._session_id == session_id:
            # A periodic timer, not synchronization: renewals every ttl/3.
            await asyncio.sleep(self._renew_interval)
            try:
                await self._call("renew session", self._client.session.renew(session_id))
            except consul.NotFound:
                self._session_lost(session_id, "renew: session not found")
                return
            except LockUnavailable as error:
                # Consul may invalidate the session as soon as a TTL has passed since
                # the last renew it saw: past that, exclusivity is no longer certain.
                if self._clock() - self._last_renewed >= self._session_ttl:
                    self._session_lost(session_id, f"not renewed for a whole TTL: {error}")
                    return
                log.warning("could not renew Consul session %s: %s", session_id, error)
                continue
            self._last_renewed = self._clock()
            for upload_id, owner in list(self._unreleased.items()):
                if owner == session_id and upload_id not in self._holdings:
                    self._in_background(self._retry_release(upload_id, session_id))

    async def _retry_release(self, upload_id: str, session_id: str) -> None:
        try:
            await self._release_key(upload_id, session_id)
        except (LockUnavailable, _InvalidSession):
            return
        if self._unreleased.get(upload_id) == session_id:
            del self._unreleased[upload_id]

    async def _watch_session(self, session_id: str) -> None:
        """Notice at once when Consul invalidates our session (not only at the next
        renew)."""
        index: int | None = None
        retry = WATCH_RETRY_SECONDS[0]
        while self._session_id == session_id:
            try:
                new_index, info = await self._call(
                    "watch session",
                    self._client.session.info(session_id, index=index, wait=f"{WATCH_WAIT_SECONDS:g}s"),
                    time_limit=WATCH_WAIT_SECONDS + self._request_timeout,
                )
            except LockUnavailable:
                # The renew loop decides when an unreachable Consul means a lost session.
                index = None
                await asyncio.sleep(retry)
                retry = min(retry * 2, WATCH_RETRY_SECONDS[1])
                continue
            retry = WATCH_RETRY_SECONDS[0]
            if info is None:
                self._session_lost(session_id, "Consul invalidated the session")
                return
            index = _next_index(index, new_index)

    async def _watch_release_requests(self) -> None:
        """One blocking query over ``<prefix>release/`` for the whole instance."""
        index: int | None = None
        retry = WATCH_RETRY_SECONDS[0]
        while not self._closed:
            try:
                new_index, entries = await self._call(
                    "watch release requests",
                    self._client.kv.get(
                        self._release_prefix, recurse=True, index=index, wait=f"{WATCH_WAIT_SECONDS:g}s"
                    ),
                    time_limit=WATCH_WAIT_SECONDS + self._request_timeout,
                )
            except LockUnavailable as error:
                log.debug("release watcher: %s", error)
                index = None
                await asyncio.sleep(retry)
                retry = min(retry * 2, WATCH_RETRY_SECONDS[1])
                continue
            retry = WATCH_RETRY_SECONDS[0]
            index = _next_index(index, new_index)
            self._handle_release_requests(entries or [])

    def _handle_release_requests(self, entries: list[dict[str, Any]]) -> None:
        seen: dict[str, int] = {}
        for entry in entries:
            key, modify_index = str(entry.get("Key", "")), int(entry.get("ModifyIndex", 0))
            seen[key] = modify_index
            if self._seen_requests.get(key) == modify_index:
                continue
            try:
                holder = json.loads(entry.get("Value") or b"{}").get("holder")
            except (ValueError, AttributeError):
                continue
            upload_id = key[len(self._release_prefix):]
            if holder is None or holder != self._session_id:
                continue
            holding = self._holdings.get(upload_id)
            if holding is not None and holding.session_id == holder:
                holding.request_release(remote=True)
            elif self._unreleased.get(upload_id) == holder:
                self._in_background(self._retry_release(upload_id, holder))
        # Forget requests that are gone; the listing is the whole prefix.
        self._seen_requests = seen

    # --- plumbing ----------------------------------------------------------------------

    async def _call(self, operation: str, request: Awaitable[T], time_limit: float | None = None) -> T:
        """Await one Consul call, turning transport and server failures into
        ``LockUnavailable`` (``consul.NotFound`` and ``_InvalidSession`` pass through)."""
        try:
            async with asyncio.timeout(time_limit if time_limit is not None else self._request_timeout):
                return await request
        except consul.NotFound:
            raise
        except consul.ACLPermissionDenied as error:
            raise LockUnavailable(
                f"Consul at {self._address} denied {operation}: check the ACL token (lock.consul.token or "
                "CONSUL_HTTP_TOKEN)"
            ) from error
        except consul.ConsulException as error:
            if "invalid session" in str(error).lower():
                raise _InvalidSession(str(error)) from error
            raise LockUnavailable(f"Consul at {self._address} failed to {operation}: {error}") from error
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            detail = str(error) or type(error).__name__
            raise LockUnavailable(f"Consul at {self._address} is unreachable ({operation}): {detail}") from error

    def _in_background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Release every held lock, destroy the session, stop the watchers."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._session_tasks, *([self._watcher] if self._watcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session_id, self._session_id = self._session_id, None
        holdings = list(self._holdings.values())
        self._holdings.clear()
        for holding in holdings:
            holding.held.lost.set()
        await self._local.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if session_id is not None:
            # Release explicitly first: destroying a session puts its locks under
            # lock-delay, which would stall the other instances for nothing.
            for holding in holdings:
                if holding.acquired and holding.session_id == session_id:
                    with contextlib.suppress(LockUnavailable, _InvalidSession):
                        await self._release_key(holding.upload_id, session_id)
            with contextlib.suppress(LockUnavailable, _InvalidSession, consul.NotFound):
                await self._call("destroy session", self._client.session.destroy(session_id))
        if self._client is not None:
            await self._client.close()
            self._client = None


def _next_index(previous: int | None, returned: Any) -> int | None:
    """The index for the next blocking query. Consul's guidance: an index that went
    backwards (agent restarted with fresh state) or is not positive means start over
    with a plain read."""
    try:
        index = int(returned)
    except (TypeError, ValueError):
        return None
    if index <= 0 or (previous is not None and index < previous):
        return None
    return index
