"""Redis locker: per-upload locks shared by several hosts through one Redis.

Design (README, "Several instances"):

- Every locker instance has a random instance id. The lock of upload ``U`` is the key
  ``<prefix>lock:U`` holding ``<instance id>:<nonce>`` (a token per hold), taken with
  ``SET key token NX PX lease``. The holder renews it every lease/3 and releases it
  with Lua scripts that act only while the key still holds its token, so a holder
  whose lease lapsed can never extend or delete someone else's lock.
- A renewal that finds another token or no key (Redis restarted without persistence,
  the lease lapsed), or no successful renewal for a whole lease (Redis unreachable),
  marks the lock lost: ``held.lost`` is set and ``on_release_request`` called, so the
  in-flight request stops writing, as on a Consul session loss.
- Release requests use pub/sub with one subscription per instance, to its own channel
  ``<prefix>instance:<id>``. A waiter reads the holder's instance id from the lock's
  value and publishes ``release U <waiter id>`` to it; the holder calls
  ``on_release_request`` and, when it deletes the key, publishes ``released U`` to each
  waiter that asked (in the same script), which wakes the waiter at once. Pub/sub
  delivers at most once, so a waiter also repeats its request every
  ``RESEND_SECONDS`` and retries the ``SET`` after a short, growing wait bounded by
  the key's remaining lease (a crashed holder's key expires on Redis's own clock).
- Redis unreachable (refused, no answer within ``request_timeout``, an error reply)
  raises ``LockUnavailable`` naming the server (password masked); the handler answers
  503 and writes nothing. Connections are re-made on the next call, so the locker
  recovers by itself when Redis is back.
- Generation (``held.generation``): the acquire script also takes (reads and deletes)
  ``<prefix>released:U``, which the release script sets to the releasing hold's token
  (kept ``RELEASE_RECORD_MS``): a hold follows the one named there, and nothing when
  the previous hold never released (its lease lapsed) or the record expired.
- Requests of this process for the same id are serialized in-process first by a
  ``MemoryLocker``, so only one request per id and process talks to Redis at a time.

One Redis endpoint: Redis Cluster is not supported (the release script publishes to
channels that are not keys); a Sentinel-managed primary behind a stable address works,
and a ``READONLY`` answer (a demoted primary) drops the connections so the next call
reaches the new primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tusd_py.config import RedisLockConfig
from tusd_py.lockers.base import (
    BackgroundWork,
    HeldLock,
    LockGeneration,
    LockObserver,
    LockTimeout,
    LockUnavailable,
    ReleaseRequest,
    ask_to_release,
    check_lock_name,
    observed,
)
from tusd_py.lockers.memory import MemoryLocker

log = logging.getLogger("tusd_py.lockers.redis")

T = TypeVar("T")

RETRY_SECONDS = (0.01, 0.25)
"""First and largest wait between two acquire attempts of a waiter that was not woken
by a "released" message (lost message, crashed holder): short, because an attempt is
one cheap round trip."""

RESEND_SECONDS = 1.0
"""A waiter repeats its release request this often (pub/sub may drop a message while
the holder's subscription reconnects)."""

LISTEN_SECONDS = 10.0
"""The subscription pings Redis after this long without a message, and reconnects if
the pong does not come within as long again (a half-open connection never errors)."""

RESUBSCRIBE_SECONDS = (0.1, 5.0)
"""First and largest pause before re-subscribing after the subscription failed."""

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
"""Extend the lease only while the key holds our token."""

_ACQUIRE = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return false
end
local previous = redis.call('get', KEYS[2])
redis.call('del', KEYS[2])
return previous or ''
"""
"""``SET NX PX`` the lock (KEYS[1]) with our token; when it was free, take the release
record (KEYS[2]: the token of the hold that last released it, deleted so that only
the very next hold can follow it) and answer it ('' when there is none). nil: the
lock is held."""

_RELEASE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('del', KEYS[1])
redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[3])
for i = 4, #ARGV do
    redis.call('publish', ARGV[i], ARGV[2])
end
return 1
"""
"""Delete the key only while it holds our token, record that our hold released it
(KEYS[2], kept ARGV[3] ms), then tell each waiter that asked (ARGV[2] is the
"released U" message, ARGV[4..] the waiters' channels)."""

RELEASE_RECORD_MS = 24 * 3600 * 1000
"""How long Redis keeps the record of a lock's last release (``held.generation``):
an upload idle for longer is read back from its store by the next request."""


def masked_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(eq=False)
class _Holding:
    """One lock of this instance, from the first acquire attempt to the release."""

    upload_id: str
    on_release_request: ReleaseRequest
    token: str
    held: HeldLock = field(default_factory=HeldLock)
    acquired: bool = False
    release_requested: bool = False
    """A release request arrived; if it came before ``acquired``, it is delivered then."""
    waiters: set[str] = field(default_factory=set)
    """Instance ids that asked for the lock; told "released" when we delete it."""
    lapse: asyncio.TimerHandle | None = None
    """Marks the lock lost when its lease may have run out without a renewal."""

    def request_release(self) -> None:
        self.release_requested = True
        if self.acquired:
            ask_to_release(self.on_release_request)

    def lose(self) -> None:
        if not self.held.lost.is_set():
            self.held.lost.set()
            ask_to_release(self.on_release_request)


class _Redis:
    """One Redis endpoint: the redis-py client and ``call``, which puts a deadline on
    each command and turns every failure into ``LockUnavailable``."""

    def __init__(self, url: str, password: str, request_timeout: float) -> None:
        self.shown_url = masked_url(url)
        """The URL with the password masked: the only form that is logged."""
        self.request_timeout = request_timeout
        # One retry on a fresh connection: a pooled connection is dead after Redis
        # restarted, and the second try is what reconnects. Every command here is
        # safe to repeat (SET NX by the same token is recognised; the scripts check it).
        self.client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url,
            password=password or None,
            socket_timeout=request_timeout,
            socket_connect_timeout=request_timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )

    async def call(self, operation: str, request: Awaitable[T], time_limit: float | None = None) -> T:
        """Await one Redis command within ``time_limit`` (default ``request_timeout``)."""
        try:
            async with asyncio.timeout(self.request_timeout if time_limit is None else time_limit):
                return await request
        except redis.exceptions.ReadOnlyError as error:
            # A demoted primary (failover behind a stable address): reconnect next time.
            await self.client.connection_pool.disconnect()
            raise LockUnavailable(f"Redis at {self.shown_url} is a read-only replica ({operation})") from error
        except redis.exceptions.AuthenticationError as error:
            raise LockUnavailable(
                f"Redis at {self.shown_url} refused the password ({operation}): check lock.redis.password "
                "or the URL"
            ) from error
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError) as error:
            detail = str(error) or type(error).__name__
            raise LockUnavailable(f"Redis at {self.shown_url} is unreachable ({operation}): {detail}") from error
        except redis.exceptions.RedisError as error:
            raise LockUnavailable(f"Redis at {self.shown_url} failed to {operation}: {error}") from error


class _Subscription:
    """The one pub/sub subscription of a locker instance, to its own channel: runs as
    a task, re-subscribes after failures, and hands each message to ``deliver``."""

    def __init__(self, server: _Redis, channel: str, deliver: Callable[[str], None]) -> None:
        self._server = server
        self._channel = channel
        self._deliver = deliver
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.subscribed = asyncio.Event()
        """Set while the subscription is confirmed by Redis."""

    def start(self) -> None:
        """Start listening (again, if the task ended)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run())

    def stop(self) -> list[asyncio.Task[None]]:
        """Cancel the listener; returns it (if any) for the caller to await."""
        self._stopping = True
        if self._task is None:
            return []
        self._task.cancel()
        return [self._task]

    async def _run(self) -> None:
        pause = RESUBSCRIBE_SECONDS[0]
        # The flag, not only the cancellation, ends the loop: on Python 3.11 a
        # ``wait_for`` whose inner call ends as the task is cancelled loses the
        # cancellation, and the loop would then go on re-subscribing for ever (a
        # shutdown that hung until SIGKILL).
        while not self._stopping:
            pubsub = self._server.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._server.call("subscribe", pubsub.subscribe(self._channel))
                self.subscribed.set()
                pause = RESUBSCRIBE_SECONDS[0]
                await self._listen(pubsub)
            except LockUnavailable as error:
                log.debug("release-request subscription: %s", error)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), self._server.request_timeout)
            if self._stopping:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, RESUBSCRIBE_SECONDS[1])

    async def _listen(self, pubsub: Any) -> None:
        """Deliver messages until the connection fails (``LockUnavailable``)."""
        pinged = False
        while True:
            message = await self._server.call(
                "listen", pubsub.get_message(timeout=LISTEN_SECONDS), time_limit=LISTEN_SECONDS * 2
            )
            if message is None:
                if pinged:
                    raise LockUnavailable(f"Redis at {self._server.shown_url} did not answer a ping (listen)")
                await self._server.call("ping", pubsub.ping())
                pinged = True
                continue
            pinged = False
            if message.get("type") == "message":
                self._deliver(str(message.get("data", "")))


class RedisLocker:
    """Per-upload exclusive locks held as Redis keys with a lease (several hosts).

    Build it with ``RedisLocker.from_config(config.lock.redis, acquire_timeout=...)``;
    ``await start()`` checks Redis and subscribes (``LockUnavailable`` if Redis cannot
    be reached; ``lock`` starts it too), and ``await close()`` releases every held lock.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        acquire_timeout: float = 20.0,
        *,
        password: str = "",
        key_prefix: str = "tusd-py:",
        lease: float = 15.0,
        request_timeout: float = 2.0,
        renew_interval: float | None = None,
        observer: LockObserver | None = None,
    ) -> None:
        """``password`` empty: the URL's, if any. ``lease``: seconds a lock outlives a
        holder that stopped renewing it. ``request_timeout``: seconds one command may
        take before Redis counts as unreachable. ``renew_interval`` (default lease/3)
        is there for tests. ``observer`` (optional) sees lock waits and takeovers."""
        if urlsplit(url).scheme not in {"redis", "rediss"}:
            raise ValueError(f"Redis URL must start with redis:// or rediss://, got {masked_url(url)!r}")
        self._server = _Redis(url, password, request_timeout)
        self._prefix = key_prefix
        self._lease_ms = max(1, round(lease * 1000))
        self._lease = lease
        self._renew_interval = renew_interval if renew_interval is not None else lease / 3
        self._acquire_timeout = acquire_timeout
        self._observer = observer
        self.instance_id = secrets.token_hex(8)
        """This locker's id: the first part of its tokens and the name of its channel."""
        self._subscription = _Subscription(self._server, self._channel(self.instance_id), self._message)
        self._local = MemoryLocker(acquire_timeout=acquire_timeout)
        self._holdings: dict[str, _Holding] = {}
        self._released: dict[str, asyncio.Event] = {}
        """Upload id -> event set by a "released" message, for this instance's waiter."""
        self._renewer: asyncio.Task[None] | None = None
        self._background = BackgroundWork(ignore=(LockUnavailable,))
        self._closed = False

    @classmethod
    def from_config(
        cls, config: RedisLockConfig, acquire_timeout: float, *, observer: LockObserver | None = None
    ) -> RedisLocker:
        """The locker described by the ``[lock.redis]`` section."""
        return cls(
            config.url,
            acquire_timeout,
            password=config.password,
            key_prefix=config.key_prefix,
            lease=config.lease,
            request_timeout=config.request_timeout,
            observer=observer,
        )

    @property
    def shown_url(self) -> str:
        """The Redis URL with its password masked."""
        return self._server.shown_url

    def _key(self, upload_id: str) -> str:
        return f"{self._prefix}lock:{upload_id}"

    def _record_key(self, upload_id: str) -> str:
        """The key naming the hold that last released the lock of ``upload_id``."""
        return f"{self._prefix}released:{upload_id}"

    def _channel(self, instance_id: str) -> str:
        return f"{self._prefix}instance:{instance_id}"

    async def start(self) -> None:
        """Subscribe and start renewing; ``LockUnavailable`` if Redis cannot be reached
        (the subscription keeps retrying in the background)."""
        self._start_tasks()
        await self._server.call("ping", self._server.client.ping())
        log.info("Redis locker using %s (lease %gs)", self._server.shown_url, self._lease)

    def _start_tasks(self) -> None:
        if self._closed:
            raise LockUnavailable("Redis locker is closed")
        self._subscription.start()
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_loop())

    def lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AbstractAsyncContextManager[HeldLock]:
        """Acquire the lock of ``upload_id`` (see ``lockers.base.Locker.lock``)."""
        check_lock_name(upload_id)
        return observed(functools.partial(self._lock, upload_id), on_release_request, self._observer)

    @contextlib.asynccontextmanager
    async def _lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AsyncIterator[HeldLock]:
        self._start_tasks()
        deadline = asyncio.get_running_loop().time() + self._acquire_timeout
        holding = _Holding(upload_id, on_release_request, f"{self.instance_id}:{secrets.token_hex(8)}")
        async with self._local.lock(upload_id, holding.request_release):
            self._holdings[upload_id] = holding
            try:
                await self._acquire(holding, deadline)
                yield holding.held
            finally:
                if self._holdings.get(upload_id) is holding:
                    del self._holdings[upload_id]
                await self._release(holding)

    # --- acquiring and releasing ------------------------------------------------------

    async def _acquire(self, holding: _Holding, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        upload_id, key = holding.upload_id, self._key(holding.upload_id)
        client = self._server.client
        released = self._released.setdefault(upload_id, asyncio.Event())
        asked_at: dict[str, float] = {}
        wait = RETRY_SECONDS[0]
        try:
            while True:
                sent_at = loop.time()
                released.clear()
                try:
                    setting = client.eval(_ACQUIRE, 2, key, self._record_key(upload_id), holding.token, self._lease_ms)
                    previous = await self._server.call("acquire lock", setting)
                    taken = previous is not None
                    value, remaining_ms = (None, -2) if taken else await self._read(key)
                except BaseException:
                    # The SET may have happened although we got no answer: delete it
                    # (only if it holds our token).
                    self._background.start(self._delete(key, holding.token, []))
                    raise
                if taken or value == holding.token:  # the latter: a retried SET
                    # A retried SET lost the answer that named the previous hold.
                    follows = str(previous) if taken and previous else None
                    holding.held.generation = LockGeneration(holding.token, follows)
                    self._renewed(holding, sent_at)
                    holding.acquired = True
                    if holding.release_requested:
                        ask_to_release(holding.on_release_request)
                    return
                now = loop.time()
                if now >= deadline:
                    raise LockTimeout(
                        f"upload {upload_id} is locked by another instance that did not release it "
                        f"within {self._acquire_timeout:g}s"
                    )
                holder = value.split(":", 1)[0] if value else None
                if holder is not None and now - asked_at.get(holder, -RESEND_SECONDS) >= RESEND_SECONDS:
                    asked_at[holder] = now
                    message = f"release {upload_id} {self.instance_id} {value}"
                    await self._server.call("request release", client.publish(self._channel(holder), message))
                    wait = RETRY_SECONDS[0]
                pause = min(wait, deadline - now, RESEND_SECONDS)
                if remaining_ms > 0:
                    pause = min(pause, remaining_ms / 1000)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, pause)):
                        await released.wait()
                wait = min(wait * 2, RETRY_SECONDS[1])
        finally:
            if self._released.get(upload_id) is released:
                del self._released[upload_id]

    async def _read(self, key: str) -> tuple[str | None, int]:
        """The lock's value and its remaining lease in ms (one round trip)."""
        pipeline = self._server.client.pipeline(transaction=False)
        pipeline.get(key)
        pipeline.pttl(key)
        value, remaining_ms = await self._server.call("read lock", pipeline.execute())
        return value, int(remaining_ms)

    async def _release(self, holding: _Holding) -> None:
        if holding.lapse is not None:
            holding.lapse.cancel()
        if not holding.acquired or holding.held.lost.is_set():
            return  # never ours, or no longer: the key is someone else's or gone
        channels = [self._channel(waiter) for waiter in holding.waiters]
        try:
            await self._delete(self._key(holding.upload_id), holding.token, channels)
        except LockUnavailable as error:
            # The lease ends it: waiters get the lock at most one lease later.
            log.warning("could not release the lock of upload %s (it expires with its lease): %s",
                        holding.upload_id, error)

    async def _delete(self, key: str, token: str, channels: list[str]) -> None:
        upload_id = key[len(self._prefix) + len("lock:"):]
        releasing = self._server.client.eval(
            _RELEASE, 2, key, self._record_key(upload_id), token, f"released {upload_id}", RELEASE_RECORD_MS,
            *channels,
        )
        await self._server.call("release lock", releasing)

    # --- renewing --------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        """Renew every held lock every ``renew_interval`` (one pipelined round trip)."""
        loop = asyncio.get_running_loop()
        while not self._closed:  # not only the cancellation: see _Subscription._run
            # A periodic timer, not synchronization.
            await asyncio.sleep(self._renew_interval)
            holdings = [h for h in self._holdings.values() if h.acquired and not h.held.lost.is_set()]
            if not holdings:
                continue
            sent_at = loop.time()
            pipeline = self._server.client.pipeline(transaction=False)
            for holding in holdings:
                pipeline.eval(_RENEW, 1, self._key(holding.upload_id), holding.token, self._lease_ms)
            try:
                results = await self._server.call("renew locks", pipeline.execute())
            except LockUnavailable as error:
                # Each lock is lost when its lease may have run out (``_renewed``).
                log.warning("could not renew %d Redis lock(s): %s", len(holdings), error)
                continue
            for holding, result in zip(holdings, results, strict=True):
                if holding.held.lost.is_set() or self._holdings.get(holding.upload_id) is not holding:
                    continue  # lapsed or released while the renewal was in flight
                if result == 1:
                    self._renewed(holding, sent_at)
                else:
                    self._lose(holding, "the key is gone or holds another token (Redis restarted, or the lease lapsed)")

    def _renewed(self, holding: _Holding, sent_at: float) -> None:
        """The lease of ``holding`` runs at least until ``sent_at + lease`` (Redis
        started it after we sent the command): mark the lock lost then unless renewed
        again, so this holder stops writing before another can take the lock over."""
        if holding.lapse is not None:
            holding.lapse.cancel()
        holding.lapse = asyncio.get_running_loop().call_at(
            sent_at + self._lease, self._lose, holding, "not renewed for a whole lease (Redis unreachable?)"
        )

    def _lose(self, holding: _Holding, reason: str) -> None:
        log.warning("Redis lock of upload %s lost: %s", holding.upload_id, reason)
        holding.lose()

    # --- release requests ------------------------------------------------------------

    def _message(self, message: str) -> None:
        """A message on our channel: ``release U <waiter> <token>`` (the token the
        waiter found in the key) or ``released U``."""
        words = message.split()
        if len(words) == 4 and words[0] == "release":
            upload_id, waiter, token = words[1:]
            holding = self._holdings.get(upload_id)
            if holding is not None and holding.token == token and not holding.held.lost.is_set():
                # Delivered once the SET's answer is in, if it is not yet.
                holding.waiters.add(waiter)
                holding.request_release()
            else:
                # Not held with that token (any more): let the waiter retry at once.
                self._background.start(self._tell_released(upload_id, waiter))
        elif len(words) == 2 and words[0] == "released":
            event = self._released.get(words[1])
            if event is not None:
                event.set()

    async def _tell_released(self, upload_id: str, waiter: str) -> None:
        with contextlib.suppress(LockUnavailable):
            await self._server.call(
                "answer release request", self._server.client.publish(self._channel(waiter), f"released {upload_id}")
            )

    # --- plumbing ----------------------------------------------------------------------

    async def close(self) -> None:
        """Release every held lock, stop the subscription and the renewals."""
        if self._closed:
            return
        self._closed = True
        tasks = self._subscription.stop()
        if self._renewer is not None:
            self._renewer.cancel()
            tasks.append(self._renewer)
        await asyncio.gather(*tasks, return_exceptions=True)
        holdings = list(self._holdings.values())
        self._holdings.clear()
        for holding in holdings:
            if holding.lapse is not None:
                holding.lapse.cancel()
            if holding.acquired and not holding.held.lost.is_set():
                with contextlib.suppress(LockUnavailable):
                    await self._delete(self._key(holding.upload_id), holding.token, [])
            holding.held.lost.set()
        await self._local.close()
        await self._background.finish()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.client.aclose(), self._server.request_timeout)
