"""The Consul side of the Consul locker (``consul.py``): the agent's HTTP API and the
one session of a locker instance.

- ``ConsulAgent`` is one Consul agent's HTTP API: the py-consul client and the
  translation of its failures into ``LockUnavailable``.
- ``ConsulSession`` is the per-instance session: created on demand, renewed every
  ttl/3, watched so that its invalidation is noticed at once, and forgotten when it is
  lost (the locker is told, and the next ``ensure`` creates a new one).

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
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio
import consul.base

from tusd_py.lockers.base import LockUnavailable

# The locker's logger: session events belong to the Consul locker's log.
log = logging.getLogger("tusd_py.lockers.consul")

T = TypeVar("T")

WATCH_WAIT_SECONDS = 30.0
"""Longest a blocking query (release watcher, session watcher) waits before it is
re-issued. Well under Consul's 10 min cap and aiohttp's 5 min default total timeout."""

WATCH_RETRY_SECONDS = (0.1, 5.0)
"""First and largest pause before re-issuing a watcher query that failed (Consul down):
bounded so a recovering agent is not hammered, short so recovery is noticed fast."""


class InvalidSession(Exception):
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


def next_index(previous: int | None, returned: Any) -> int | None:
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


class ConsulAgent:
    """One Consul agent's HTTP API: the py-consul client, built by ``connect``, and
    ``call``, which turns its failures into ``LockUnavailable``."""

    def __init__(self, address: str, scheme: str, token: str, request_timeout: float) -> None:
        """``address`` is ``host:port`` (``ValueError`` otherwise); ``request_timeout``
        is how long one call may take before Consul counts as unreachable."""
        self.address = address
        self._host, self._port = _parse_address(address)
        self._scheme = scheme
        self._token = token
        self.request_timeout = request_timeout
        """Seconds one Consul call may take; a blocking query gets its wait on top."""
        self.client: Any = None
        """The py-consul client; None before ``connect`` and after ``close``."""

    def connect(self) -> Any:
        """The py-consul client, built on first use."""
        if self.client is None:
            client = _Consul(host=self._host, port=self._port, scheme=self._scheme)
            # py-consul prefers CONSUL_HTTP_TOKEN over an explicit token; we do not.
            client.token = self._token or None
            self.client = client
        return self.client

    async def call(self, operation: str, request: Awaitable[T], time_limit: float | None = None) -> T:
        """Await one Consul call, turning transport and server failures into
        ``LockUnavailable`` (``consul.NotFound`` and ``InvalidSession`` pass through)."""
        try:
            async with asyncio.timeout(time_limit if time_limit is not None else self.request_timeout):
                return await request
        except consul.NotFound:
            raise
        except consul.ACLPermissionDenied as error:
            raise LockUnavailable(
                f"Consul at {self.address} denied {operation}: check the ACL token (lock.consul.token or "
                "CONSUL_HTTP_TOKEN)"
            ) from error
        except consul.ConsulException as error:
            if "invalid session" in str(error).lower():
                raise InvalidSession(str(error)) from error
            raise LockUnavailable(f"Consul at {self.address} failed to {operation}: {error}") from error
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            detail = str(error) or type(error).__name__
            raise LockUnavailable(f"Consul at {self.address} is unreachable ({operation}): {detail}") from error

    async def close(self) -> None:
        """Close the client's HTTP connections (a later ``connect`` builds a new one)."""
        if self.client is not None:
            await self.client.close()
            self.client = None


class ConsulSession:
    """The one Consul session of a locker instance: created by ``ensure``, renewed every
    ``renew_interval``, watched, and forgotten when lost.

    The locker is told through callbacks: ``on_created(session_id)`` after a session was
    created, ``on_renewed(session_id)`` after each successful renew and
    ``on_lost(session_id, reason)`` once the session is gone (renew answered 404, the
    watcher saw it invalidated, no successful renew for a whole TTL, or ``lose``).
    """

    def __init__(
        self,
        agent: ConsulAgent,
        *,
        name: str,
        ttl: float,
        lock_delay: float,
        behavior: str,
        renew_interval: float,
        clock: Callable[[], float],
        on_created: Callable[[str], None],
        on_renewed: Callable[[str], None],
        on_lost: Callable[[str, str], None],
    ) -> None:
        """``name``, ``ttl``, ``lock_delay`` and ``behavior`` are those of the Consul
        session; ``clock`` tells when the last successful renew happened."""
        self._agent = agent
        self._name = name
        self._ttl = ttl
        self._lock_delay = lock_delay
        self._behavior = behavior
        self._renew_interval = renew_interval
        self._clock = clock
        self._on_created = on_created
        self._on_renewed = on_renewed
        self._on_lost = on_lost
        self._id: str | None = None
        self._guard = asyncio.Lock()
        self._last_renewed = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def id(self) -> str | None:
        """The current session (None before the first ``ensure``, after a loss and
        after ``forget``)."""
        return self._id

    async def ensure(self) -> str:
        """The current session, created (and its renewing and watching started) if
        there is none; ``LockUnavailable`` if Consul cannot be reached or after ``stop``."""
        if self._closed:
            raise LockUnavailable("Consul locker is closed")
        if self._id is not None:
            return self._id
        async with self._guard:
            if self._id is not None:
                return self._id
            client = self._agent.connect()
            session_id: str = await self._agent.call(
                "create session",
                client.session.create(
                    name=self._name,
                    ttl=self._ttl,
                    lock_delay=self._lock_delay,
                    behavior=self._behavior,
                ),
            )
            self._id = session_id
            self._last_renewed = self._clock()
            self._tasks = [
                asyncio.create_task(self._renew_loop(session_id)),
                asyncio.create_task(self._watch(session_id)),
            ]
            self._on_created(session_id)
            log.info("Consul session %s created (ttl=%gs, lock_delay=%gs)", session_id, self._ttl, self._lock_delay)
            return session_id

    def lose(self, session_id: str, reason: str) -> None:
        """Forget ``session_id`` (if still current), stop renewing and watching it, and
        tell the locker, which marks every lock held under it lost."""
        if self._id != session_id:
            return
        self._id = None
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks = []
        self._on_lost(session_id, reason)

    def stop(self) -> list[asyncio.Task[None]]:
        """Refuse new sessions and cancel renewing and watching; returns the cancelled
        tasks for the caller to await. The session itself stays until ``forget``."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        return list(self._tasks)

    def forget(self) -> str | None:
        """Forget the current session without telling the locker (closing) and return
        it, for ``destroy`` once its locks are released."""
        session_id, self._id = self._id, None
        return session_id

    async def destroy(self, session_id: str) -> None:
        """Destroy ``session_id`` in Consul; failures are ignored (its TTL ends it)."""
        with contextlib.suppress(LockUnavailable, InvalidSession, consul.NotFound):
            await self._agent.call("destroy session", self._agent.client.session.destroy(session_id))

    async def _renew_loop(self, session_id: str) -> None:
        while self._id == session_id:
            # A periodic timer, not synchronization: renewals every ttl/3.
            await asyncio.sleep(self._renew_interval)
            try:
                await self._agent.call("renew session", self._agent.client.session.renew(session_id))
            except consul.NotFound:
                self.lose(session_id, "renew: session not found")
                return
            except LockUnavailable as error:
                # Consul may invalidate the session as soon as a TTL has passed since
                # the last renew it saw: past that, exclusivity is no longer certain.
                if self._clock() - self._last_renewed >= self._ttl:
                    self.lose(session_id, f"not renewed for a whole TTL: {error}")
                    return
                log.warning("could not renew Consul session %s: %s", session_id, error)
                continue
            self._last_renewed = self._clock()
            self._on_renewed(session_id)

    async def _watch(self, session_id: str) -> None:
        """Notice at once when Consul invalidates our session (not only at the next
        renew)."""
        index: int | None = None
        retry = WATCH_RETRY_SECONDS[0]
        while self._id == session_id:
            try:
                new_index, info = await self._agent.call(
                    "watch session",
                    self._agent.client.session.info(session_id, index=index, wait=f"{WATCH_WAIT_SECONDS:g}s"),
                    time_limit=WATCH_WAIT_SECONDS + self._agent.request_timeout,
                )
            except LockUnavailable:
                # The renew loop decides when an unreachable Consul means a lost session.
                index = None
                await asyncio.sleep(retry)
                retry = min(retry * 2, WATCH_RETRY_SECONDS[1])
                continue
            retry = WATCH_RETRY_SECONDS[0]
            if info is None:
                self.lose(session_id, "Consul invalidated the session")
                return
            index = next_index(index, new_index)
