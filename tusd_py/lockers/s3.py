"""S3 locker: per-upload locks shared by several hosts, with no lock service but the
bucket itself (S3 conditional writes).

Design:

- The lock of upload ``U`` is the object ``<lock prefix>U``; its body names the holder
  (instance id, a token unique to this hold, the lease length and a write counter, so
  every write has a new ETag). Acquire = PutObject ``If-None-Match: *``; renew =
  PutObject ``If-Match: <last ETag>`` every ``renew_interval`` (lease/3); release =
  PutObject ``If-Match: <last ETag>`` of a *released* body (the lock is free; the body
  names the hold that released it). A failed condition is S3's 412.
- A released lock is taken with ``If-Match`` on its ETag, and the new hold follows the
  hold named in it (``held.generation``): the condition proves nobody wrote the lock
  in between. The instance that released it tries exactly that first, with the ETag
  of its own release (one request, as for a free lock); others find the released body
  after ``If-None-Match`` fails. A lock taken over after its lease ran out, or created
  anew, follows nothing. Released bodies are ordinary expired locks for the sweep
  (``remove_expired``) once their lease has passed.
- Expiry is judged by S3's clock only: a lock whose ``Last-Modified`` is at least
  ``lease + 1`` s older than the ``Date`` of the response that read it (both carry whole
  seconds) is expired, and a waiter takes it over with ``If-Match`` on the ETag it read,
  so of two waiters exactly one wins. The holder counts its lease from the moment it
  *sent* the last successful write (S3 stamps it later), so it gives the lock up (sets
  ``held.lost``) before any waiter can see it expired.
- A renew that fails its condition (someone took over or deleted the lock) loses the
  lock at once; a renew that cannot reach S3 is retried until the lease runs out.
- Release requests: a waiter that finds the lock held writes ``<lock prefix>U.release``
  naming the holder's token. The holder reads that key every ``poll_interval`` while it
  holds the lock (not at all for holds shorter than that: a HEAD costs two requests),
  calls ``on_release_request`` once per request, and deletes it when it releases.
- Every S3 call has a deadline (``request_timeout``); S3 unreachable raises
  ``LockUnavailable`` (503, nothing written).
- Requests of this process for the same id are first serialized in-process by a
  ``MemoryLocker``, so only one request per id and process talks to S3 at a time.

A holder that stalls past its lease (GC pause, frozen VM) and then writes again cannot
corrupt the upload: see invariant 7 of ``tusd_py.stores.s3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TypeVar

from tusd_py.config import S3LockConfig
from tusd_py.lockers.base import (
    RELEASE_RECORDS,
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
from tusd_py.stores.s3_client import (
    S3Client,
    S3Error,
    S3NotFound,
    S3PreconditionFailed,
    StampedObject,
    content_md5,
)

log = logging.getLogger("tusd_py.lockers.s3")

T = TypeVar("T")

CLOCK_RESOLUTION_SECONDS = 1.0
"""``Last-Modified`` and ``Date`` carry whole seconds: an age read from them may be up
to this much more than the true one, so expiry waits this much longer."""

RELEASE_REQUEST_SUFFIX = ".release"
"""Key suffix of release requests (upload ids never contain a dot)."""


def default_lock_prefix(store_prefix: str) -> str:
    """Where lock objects go when ``lock.s3.prefix`` is empty: inside the store's prefix."""
    return f"{store_prefix}.locks/"


@dataclass(frozen=True, slots=True)
class _LockBody:
    """What a lock object says about its holder."""

    instance: str
    token: str
    lease: float
    seq: int
    released: bool = False
    """The hold ``token`` released the lock cleanly: it is free."""

    def encode(self) -> bytes:
        fields: dict[str, object] = {
            "instance": self.instance, "token": self.token, "lease": self.lease, "seq": self.seq,
        }
        if self.released:
            fields["released"] = True
        return json.dumps(fields).encode()

    @staticmethod
    def decode(data: bytes, default_lease: float) -> _LockBody:
        """The body of a lock object; an unreadable one counts as a stranger's with
        our own lease, so it is taken over once that lease passed."""
        try:
            fields = json.loads(data)
            return _LockBody(
                str(fields["instance"]), str(fields["token"]), float(fields["lease"]), int(fields["seq"]),
                fields.get("released") is True,
            )
        except (ValueError, KeyError, TypeError):
            return _LockBody("?", "?", default_lease, 0)


@dataclass(eq=False)
class _Holding:
    """One lock of this instance, from the first acquire attempt to the release."""

    upload_id: str
    on_release_request: ReleaseRequest
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    held: HeldLock = field(default_factory=HeldLock)
    seq: int = 0
    """Writes of the lock object so far (each gets a new body, hence a new ETag)."""
    etag: str = ""
    """ETag of our last successful write of the lock object."""
    valid_until: float = 0.0
    """Event-loop time until which no waiter can see the lease expired."""
    acquired: bool = False
    release_requested: bool = False
    request_seen: bool = False
    """A release-request object was seen while holding: deleted on release."""
    handled_request: str = ""
    """ETag of the release request last delivered (each is delivered once)."""
    keeper: asyncio.Task[None] | None = None

    def request_release(self) -> None:
        self.release_requested = True
        if self.acquired:
            ask_to_release(self.on_release_request)


class S3Locker:
    """Per-upload exclusive locks held as objects in an S3 bucket (several hosts).

    Build it with ``S3Locker.from_config(client, config.lock.s3, bucket, store_prefix,
    acquire_timeout)`` (``client`` is the S3 store's) or with keyword arguments;
    ``close()`` releases every held lock.
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str,
        *,
        lease: float = 15.0,
        poll_interval: float = 1.0,
        request_timeout: float = 3.0,
        acquire_timeout: float = 20.0,
        renew_interval: float | None = None,
        instance_id: str = "",
        observer: LockObserver | None = None,
    ) -> None:
        """``lease``: seconds a lock outlives its holder's last renewal (S3's clock);
        renewed every ``renew_interval`` (default lease/3). ``poll_interval``: how often
        a holder looks for release requests and a waiter looks at the lock.
        ``request_timeout``: the deadline of every S3 call (then ``LockUnavailable``)."""
        if request_timeout * 2 >= lease:
            raise ValueError("the lease must be more than twice the request timeout (a renewal must fit twice)")
        self._client = client
        self._bucket = bucket
        self._prefix = prefix
        self._lease = lease
        self._poll_interval = poll_interval
        self._request_timeout = request_timeout
        self._acquire_timeout = acquire_timeout
        self._renew_interval = renew_interval if renew_interval is not None else lease / 3
        self._instance = instance_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._observer = observer
        self._local = MemoryLocker(acquire_timeout=acquire_timeout)
        self._holdings: dict[str, _Holding] = {}
        self._releases: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """Upload id -> (ETag, token) of this instance's last release of its lock."""
        self._background = BackgroundWork()
        self._closed = False

    @classmethod
    def from_config(
        cls,
        client: S3Client,
        config: S3LockConfig,
        bucket: str,
        store_prefix: str,
        acquire_timeout: float,
        *,
        observer: LockObserver | None = None,
    ) -> S3Locker:
        """The locker described by ``[lock.s3]``, in the S3 store's bucket."""
        return cls(
            client,
            bucket,
            config.prefix or default_lock_prefix(store_prefix),
            lease=config.lease,
            poll_interval=config.poll_interval,
            request_timeout=config.request_timeout,
            acquire_timeout=acquire_timeout,
            observer=observer,
        )

    def lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AbstractAsyncContextManager[HeldLock]:
        """Acquire the lock of ``upload_id`` (see ``lockers.base.Locker.lock``)."""
        check_lock_name(upload_id)
        return observed(functools.partial(self._lock, upload_id), on_release_request, self._observer)

    @property
    def instance_id(self) -> str:
        """This instance's name in the lock objects it writes (host:pid:random)."""
        return self._instance

    def lock_key(self, upload_id: str) -> str:
        """The key of the lock object of ``upload_id``."""
        return self._prefix + upload_id

    @contextlib.asynccontextmanager
    async def _lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AsyncIterator[HeldLock]:
        if self._closed:
            raise LockUnavailable("S3 locker is closed")
        deadline = asyncio.get_running_loop().time() + self._acquire_timeout
        holding = _Holding(upload_id, on_release_request)
        async with self._local.lock(upload_id, holding.request_release):
            await self._acquire(holding, deadline)
            try:
                yield holding.held
            finally:
                await self._release(holding)

    # --- acquiring -----------------------------------------------------------------------

    async def _acquire(self, holding: _Holding, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        key = self.lock_key(holding.upload_id)
        asked: set[str] = set()
        # First try to create it, or to take our own release back (its ETag unchanged:
        # nobody held it since). replace: the ETag to replace; follows: the hold that
        # released it, if replacing that ETag succeeds.
        write, replace, follows = True, "", None
        took_over = False
        ours = self._releases.pop(holding.upload_id, None)
        if ours is not None:
            replace, follows = ours
        first = True
        while True:
            if not first and loop.time() >= deadline:
                raise LockTimeout(
                    f"upload {holding.upload_id} is locked by another instance that did not release it "
                    f"within {self._acquire_timeout:g}s"
                )
            first = False
            if write:
                try:
                    await self._write(holding, key, replace or None)
                    holding.held.generation = LockGeneration(holding.token, follows)
                    break
                except (S3PreconditionFailed, S3NotFound):
                    pass  # someone else holds it or took it over first
            follows = None
            stamped = await self._read(key, "read lock")
            if stamped is None:
                write, replace = True, ""
                continue
            current = _LockBody.decode(stamped.body, self._lease)
            if current.token == holding.token:
                # Our write went through although its answer was lost (a retry then
                # failed its condition): the lock is ours (following what, unknown).
                holding.etag = stamped.etag
                holding.held.generation = LockGeneration(holding.token, None)
                break
            if current.released:
                write, replace, follows = True, stamped.etag, current.token
                continue
            if stamped.date - stamped.last_modified >= current.lease + CLOCK_RESOLUTION_SECONDS:
                log.info("taking over the expired lock of upload %s from %s", holding.upload_id, current.instance)
                write, replace, took_over = True, stamped.etag, True
                continue
            write = False
            if current.token not in asked:
                asked.add(current.token)
                await self._ask_to_release(holding.upload_id, current.token)
            wait = min(self._poll_interval, deadline - loop.time())
            if wait > 0:
                await asyncio.sleep(wait)
        # A request we wrote to the previous holder (or one that a taken-over holder
        # never saw) would be left behind: delete it when releasing.
        holding.request_seen = bool(asked) or took_over
        holding.acquired = True
        self._holdings[holding.upload_id] = holding
        holding.keeper = loop.create_task(self._keep(holding), name=f"s3-lock-{holding.upload_id}")
        if holding.release_requested:
            ask_to_release(holding.on_release_request)

    async def _write(self, holding: _Holding, key: str, if_match: str | None, *, released: bool = False) -> None:
        """Write the lock object (create if ``if_match`` is None, else replace that
        ETag), held or ``released``; the lease counts from the moment the request is
        sent."""
        holding.seq += 1
        body = _LockBody(self._instance, holding.token, self._lease, holding.seq, released).encode()
        sent = asyncio.get_running_loop().time()
        try:
            holding.etag = await self._call(
                "write lock", holding.upload_id,
                self._client.put_object_if(self._bucket, key, body, if_match=if_match),
            )
        except LockUnavailable:
            if not holding.acquired:
                # The write may have reached S3 without an answer: remove it if so
                # (else it would block the upload for one lease).
                self._background.start(self._remove_if_ours(key, holding.token))
            raise
        holding.valid_until = sent + self._lease

    async def _read(self, key: str, what: str) -> StampedObject | None:
        try:
            return await self._call(what, key, self._client.get_object_stamped(self._bucket, key))
        except S3NotFound:
            return None

    async def _ask_to_release(self, upload_id: str, holder_token: str) -> None:
        body = json.dumps({"holder": holder_token, "from": self._instance}).encode()
        key = self.lock_key(upload_id) + RELEASE_REQUEST_SUFFIX
        await self._call(
            "request release", upload_id, self._client.put_object(self._bucket, key, body, content_md5(body))
        )

    # --- holding -------------------------------------------------------------------------

    async def _keep(self, holding: _Holding) -> None:
        """Renew the lease every ``renew_interval`` and look for release requests every
        ``poll_interval`` until cancelled; lose the lock when a renewal fails its
        condition or the lease runs out without one."""
        loop = asyncio.get_running_loop()
        key = self.lock_key(holding.upload_id)
        next_renew = holding.valid_until - self._lease + self._renew_interval
        next_poll = loop.time() + self._poll_interval
        while True:
            await asyncio.sleep(max(0.0, min(next_renew, next_poll, holding.valid_until) - loop.time()))
            now = loop.time()
            if now >= holding.valid_until:
                self._lose(holding, "its lease ran out: S3 did not answer the renewals in time")
                return
            if now >= next_renew:
                try:
                    if not await self._renew(holding, key):
                        self._lose(holding, "another instance took it over or deleted it")
                        return
                    next_renew = holding.valid_until - self._lease + self._renew_interval
                except LockUnavailable as error:
                    log.warning("could not renew the lock of upload %s (retrying): %s", holding.upload_id, error)
                    next_renew = now + min(self._poll_interval, self._renew_interval)
            elif now >= next_poll:
                with contextlib.suppress(LockUnavailable):
                    await self._look_for_release_request(holding, key)
                next_poll = loop.time() + self._poll_interval

    async def _renew(self, holding: _Holding, key: str) -> bool:
        """Extend the lease; False if the lock is no longer ours."""
        try:
            await self._write(holding, key, holding.etag)
            return True
        except (S3PreconditionFailed, S3NotFound):
            pass
        # A repeat after a lost answer fails its condition too: is our write there?
        stamped = await self._read(key, "read lock")
        if stamped is None:
            return False
        current = _LockBody.decode(stamped.body, self._lease)
        if current.token != holding.token or current.seq != holding.seq:
            return False
        holding.etag = stamped.etag
        return True

    async def _look_for_release_request(self, holding: _Holding, key: str) -> None:
        request = await self._read(key + RELEASE_REQUEST_SUFFIX, "read release request")
        if request is None:
            return
        holding.request_seen = True
        try:
            addressed_to = str(json.loads(request.body)["holder"])
        except (ValueError, KeyError, TypeError):
            return
        if addressed_to == holding.token and request.etag != holding.handled_request:
            holding.handled_request = request.etag
            holding.request_release()

    def _lose(self, holding: _Holding, reason: str) -> None:
        log.warning("lost the lock of upload %s: %s", holding.upload_id, reason)
        holding.held.lost.set()
        ask_to_release(holding.on_release_request)

    # --- releasing -----------------------------------------------------------------------

    async def _release(self, holding: _Holding) -> None:
        if self._holdings.get(holding.upload_id) is holding:
            del self._holdings[holding.upload_id]
        if holding.keeper is not None:
            holding.keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding.keeper
        if holding.held.lost.is_set() or not holding.acquired:
            return
        key = self.lock_key(holding.upload_id)
        try:
            if holding.request_seen:
                # Before the lock: a request written after this is addressed to us and
                # ignored by the next holder.
                request_key = key + RELEASE_REQUEST_SUFFIX
                deleting = self._client.delete_objects(self._bucket, [request_key])
                await self._call("delete release request", key, deleting)
            try:
                await self._write(holding, key, holding.etag, released=True)
                self._remember_release(holding)
            except S3PreconditionFailed:
                # A renewal cut short by the release may have changed the ETag.
                await self._remove_if_ours(key, holding.token)
            except S3NotFound:
                pass
        except LockUnavailable as error:
            log.warning("could not release the lock of upload %s; it expires after %gs: %s",
                        holding.upload_id, self._lease, error)

    def _remember_release(self, holding: _Holding) -> None:
        """Our release's ETag: the next hold here tries to replace exactly it."""
        self._releases[holding.upload_id] = (holding.etag, holding.token)
        self._releases.move_to_end(holding.upload_id)
        while len(self._releases) > RELEASE_RECORDS:
            self._releases.popitem(last=False)

    async def _remove_if_ours(self, key: str, token: str) -> None:
        """Delete the lock object ``key`` if it names our ``token`` (quietly)."""
        with contextlib.suppress(LockUnavailable, S3NotFound, S3PreconditionFailed):
            stamped = await self._read(key, "read lock")
            if stamped is not None and _LockBody.decode(stamped.body, self._lease).token == token:
                await self._delete_lock(key, stamped.etag)

    async def _delete_lock(self, key: str, etag: str) -> None:
        await self._call("release lock", key, self._client.delete_object_if(self._bucket, key, if_match=etag))

    # --- sweeping ------------------------------------------------------------------------

    async def remove_expired(self) -> int:
        """Delete every lock whose lease ran out (judged by S3's clock, deleted with
        ``If-Match`` on the ETag read, so a lock taken over meanwhile stays) and every
        release request whose lock is gone; how many objects were removed. Run by the
        expiry sweep: a holder that crashed leaves its lock behind, and an upload that
        nobody touches again would keep it forever."""
        keys: list[str] = []
        token: str | None = None
        while True:
            page = await self._call(
                "list locks", self._prefix, self._client.list_objects(self._bucket, self._prefix, token)
            )
            keys.extend(entry.key for entry in page.objects)
            if page.next_token is None:
                break
            token = page.next_token
        present = set(keys)
        removed = 0
        for key in keys:
            lock_key = key.removesuffix(RELEASE_REQUEST_SUFFIX)
            if lock_key != key:
                if lock_key in present:
                    continue  # its holder deletes it when it releases
            elif key.removeprefix(self._prefix) in self._holdings:
                continue
            stamped = await self._read(key, "read lock")
            if stamped is None:
                continue
            if lock_key == key:
                lease = _LockBody.decode(stamped.body, self._lease).lease
                if stamped.date - stamped.last_modified < lease + CLOCK_RESOLUTION_SECONDS:
                    continue
            with contextlib.suppress(S3NotFound, S3PreconditionFailed):
                await self._delete_lock(key, stamped.etag)
                removed += 1
        if removed:
            log.info("removed %d expired lock object(s) and orphaned release requests", removed)
        return removed

    # --- plumbing ------------------------------------------------------------------------

    async def _call(self, what: str, about: str, call: Awaitable[T]) -> T:
        """One S3 call with the deadline ``request_timeout``. Failed conditions and
        missing keys are answers and pass through; anything else means S3 cannot be
        used for locking now: ``LockUnavailable``."""
        try:
            async with asyncio.timeout(self._request_timeout):
                return await call
        except (S3PreconditionFailed, S3NotFound):
            raise
        except S3Error as error:
            raise LockUnavailable(f"S3 locker: {what} ({about}) failed: {error}") from error
        except TimeoutError:
            raise LockUnavailable(
                f"S3 locker: {what} ({about}) got no answer from S3 within {self._request_timeout:g}s"
            ) from None

    async def close(self) -> None:
        """Release every held lock (marking it lost first, so its holder stops)."""
        if self._closed:
            return
        self._closed = True
        holdings = list(self._holdings.values())
        for holding in holdings:
            await self._release(holding)
            holding.held.lost.set()
        await self._local.close()
        await self._background.finish()
