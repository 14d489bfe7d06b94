"""Removal of expired uploads and orphaned storage: the ``tusd-py cleanup`` command and
the optional in-server sweeper (``expiration.sweep_interval``) run the same ``sweep``.

An upload is expired when it is unfinished and its ``expires_at`` (set at creation
from ``expiration.lifetime`` and announced to the client as ``Upload-Expires``) has
passed. Requests to it answer 410 from then on (``TusHandler.load``); a sweep removes
it with the store's ``terminate``, under the upload's lock: taking the lock asks a
PATCH still running on it to store what it has and answer first, and the expiry is
checked again under the lock, so an upload that was completed meanwhile stays.

Then the store removes orphans (storage without an info document) older than
``expiration.orphan_grace``, which keeps the sweep clear of creations in progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from tusd_py.lockers.base import Locker, LockTimeout, LockUnavailable, RemovesExpiredLocks, no_release_request
from tusd_py.stores.base import Store, StoreError, SupportsExpiration, UploadNotFound

log = logging.getLogger("tusd_py.expiry")


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep removed (and what it had to leave for the next one)."""

    expired: int
    orphans: int
    """Storage no upload owns: left without an info document, and expired lock objects
    of a locker that stores them (the S3 locker)."""
    skipped: int
    """Expired uploads left in place because their lock or the store was unavailable."""


class ExpiringStore(Store, SupportsExpiration, Protocol):
    """A store that can list, terminate and clean up uploads."""



class Sweeper:
    """Removes expired uploads and orphans of ``store``; ``clock`` is Unix time."""

    def __init__(
        self,
        store: ExpiringStore,
        locker: Locker,
        *,
        orphan_grace: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._locker = locker
        self._orphan_grace = orphan_grace
        self._clock = clock

    async def sweep(self) -> SweepResult:
        """One pass over every upload, then the orphans. Problems with one upload are
        logged and leave it for the next sweep; they never end the pass."""
        now = self._clock()
        expired = skipped = 0
        async for listed in self._store.list_uploads():
            # ``list_uploads`` may not fill in the offset: ``finished`` is the cheap
            # first filter, the exact check happens under the lock.
            if listed.expires_at is None or listed.expires_at > now or listed.finished:
                continue
            try:
                if await self._remove_if_expired(listed.id, now):
                    expired += 1
            except (LockTimeout, LockUnavailable, StoreError) as error:
                log.warning("could not remove expired upload %s: %s", listed.id, error)
                skipped += 1
        orphans = await self._store.remove_orphans(now - self._orphan_grace)
        if isinstance(self._locker, RemovesExpiredLocks):
            try:
                orphans += await self._locker.remove_expired()
            except LockUnavailable as error:
                log.warning("could not remove expired locks: %s", error)
        if expired or orphans or skipped:
            log.info("sweep removed %d expired uploads and %d orphans (%d left for later)", expired, orphans, skipped)
        return SweepResult(expired, orphans, skipped)

    async def _remove_if_expired(self, upload_id: str, now: float) -> bool:
        async with self._locker.lock(upload_id, no_release_request):
            try:
                upload = await self._store.get(upload_id)
            except UploadNotFound:
                return False
            if not upload.info.is_expired(now):
                return False
            await upload.terminate()
        log.info("removed expired upload", extra={"upload_id": upload_id})
        return True

    async def run(self, interval: float, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Sweep every ``interval`` seconds until cancelled; a failed sweep is logged
        and retried at the next interval."""
        while True:
            await sleep(interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("expiry sweep failed; retrying in %.0f s", interval)
