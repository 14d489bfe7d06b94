"""The upload rules both protocols share (tus 1.0 in ``tus.handler``, the IETF draft in
``tus.ietf``): opening an upload (410 once expired), declaring a length, finishing a
complete upload, and the one body path -- bounded, stoppable by release requests, a
lost lock and shutdown, optionally verified by a checksum first. Every rule exists
once, so the two protocols store bytes and finish uploads in exactly one way.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from tusd_py.http.types import Request
from tusd_py.lockers.base import HeldLock, LockGeneration
from tusd_py.stores.base import IteratedBody, Store, StoreUnavailable, Upload, UploadInfo
from tusd_py.tus.body import EndReason, GuardedBody
from tusd_py.tus.checksum import Checksum, ChecksumSpool
from tusd_py.tus.errors import (
    ERR_CHECKSUM_BODY_TOO_LARGE,
    ERR_CHECKSUM_MISMATCH,
    ERR_LENGTH_ALREADY_SET,
    ERR_LENGTH_BELOW_OFFSET,
    ERR_LOCK_LOST,
    ERR_MAX_SIZE_EXCEEDED,
    ERR_STORE_UNAVAILABLE,
    ERR_UPLOAD_EXPIRED,
    ERR_UPLOAD_SIZE_EXCEEDED,
    TusError,
)
from tusd_py.tus.events import UploadEvents

log = logging.getLogger("tusd_py.tus")


class UploadCore:
    """The shared upload rules over one store (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        events: UploadEvents,
        *,
        max_size: int,
        checksum_max_buffered_size: int,
        checksum_spool_dir: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.events = events
        """Hook events and upload counters (see ``tus.events`` for when each fires)."""
        self._max_size = max_size
        self._checksum_limit = checksum_max_buffered_size
        self._checksum_directory = checksum_spool_dir
        self._clock = clock
        self._bodies: set[GuardedBody] = set()
        self._shutting_down = False

    @property
    def shutting_down(self) -> bool:
        """True once ``release_all`` was called: no new body may start."""
        return self._shutting_down

    def release_all(self) -> None:
        """Graceful shutdown: every running body stops (its upload stores what it
        received and answers); bodies that start later stop at once."""
        self._shutting_down = True
        for body in list(self._bodies):
            body.stop(EndReason.RELEASED)

    def now(self) -> float:
        """The clock (Unix time) upload expiry is measured with."""
        return self._clock()

    async def authorize(self, upload_id: str, mode: str, request: Request) -> None:
        """Ask the pre-access hook (when one is configured) whether ``request`` may
        touch the upload in ``mode`` (``events.READ``/``WRITE``); raises ``TusError``
        when not (404 when there is no such upload).

        Called before the upload's lock is taken: a refused request must not even ask
        a running PATCH to let go. A cached allow costs no store read; otherwise the
        upload is read (not written) for the hook to see, and read again under the
        lock by the request itself.
        """
        events = self.events
        if not events.guards_access or events.access_cached(upload_id, mode, request):
            return
        upload = await self._store.get(upload_id)
        await events.pre_access(upload.info, mode, request)

    async def load(self, upload_id: str, generation: LockGeneration | None = None) -> Upload:
        """Open the upload (under a lock of ``generation``, see ``Store.get``); 410
        once an unfinished upload's expiry time passed (it may not have been swept yet)."""
        upload = await self._store.get(upload_id, generation=generation)
        if upload.info.is_expired(self._clock()):
            raise TusError(ERR_UPLOAD_EXPIRED)
        return upload

    async def declare_length(self, upload: Upload, length: int) -> UploadInfo:
        """Record the length of a deferred-length upload (400 when it contradicts the
        known length or the offset)."""
        info = upload.info
        if info.length is not None:
            if length != info.length:
                raise TusError(ERR_LENGTH_ALREADY_SET)
            return info
        if length < info.offset:
            raise TusError(ERR_LENGTH_BELOW_OFFSET)
        return await upload.declare_length(length)

    async def finish_if_complete(self, upload: Upload, request: Request | None = None) -> UploadInfo:
        """Finish the upload when its length is reached and it is not finished yet;
        ``request`` is passed to the hooks. The pre-finish hook is asked after the
        store finished it: its rejection (a ``TusError``) answers this request, and the
        upload stays finished."""
        info = upload.info
        if info.is_complete and not info.finished:
            info = await upload.finish()
            await self.events.finished(info, request)
        return info

    async def write_body(
        self, request: Request, upload: Upload, body: GuardedBody, held: HeldLock, checksum: Checksum | None = None
    ) -> UploadInfo:
        """Stream ``body`` into the upload at its offset; finish when complete.
        The one body path of both protocols.

        Refuses (413, before a byte is read) a body whose declared Content-Length runs
        past the length or the max size; otherwise bounds the body to it.

        With a ``checksum`` the body is held until verified (``tus.checksum``): 413 for
        a body above ``checksum.max_buffered_size``, 460 and nothing stored on a
        mismatch, nothing stored when the body ends early.
        """
        info = upload.info
        limit = info.length if info.length is not None else (self._max_size or None)
        remaining = None if limit is None else limit - info.offset
        declared = request.body.length
        if remaining is not None and declared is not None and declared > remaining:
            kind = ERR_UPLOAD_SIZE_EXCEEDED if info.length is not None else ERR_MAX_SIZE_EXCEEDED
            raise TusError(kind, f"{declared} bytes sent, {remaining} accepted")
        if checksum is not None and declared is not None and declared > self._checksum_limit:
            raise TusError(ERR_CHECKSUM_BODY_TOO_LARGE, f"{declared} bytes sent, at most {self._checksum_limit}")
        body.set_limit(remaining)
        if held.lost.is_set():
            raise TusError(ERR_LOCK_LOST)

        body.stop_when_lost(held.lost)
        stop_lost = functools.partial(body.stop, EndReason.LOST)
        held.lost.add_callback(stop_lost)
        self._bodies.add(body)
        if self._shutting_down:
            body.stop(EndReason.RELEASED)
        start = info.offset
        try:
            with self.events.receiving(info, body, request):
                if checksum is None:
                    info = await upload.write(start, body)
                else:
                    info = await self._write_verified(upload, body, held, checksum)
        except StoreUnavailable as error:
            # The store says what it kept (``info`` after a failed write): the client
            # resumes from there without a HEAD that could fail the same way.
            stored = upload.info.offset
            log.warning("store unavailable after %d bytes of the body were stored: %s", stored - start, error,
                        extra={"upload_id": info.id, "request_id": request.request_id})
            raise TusError(ERR_STORE_UNAVAILABLE, headers=[("Upload-Offset", str(stored))]) from error
        finally:
            self._bodies.discard(body)
            held.lost.remove_callback(stop_lost)
        offset = info.offset
        self.events.received(info, request)

        extra = {"upload_id": info.id, "request_id": request.request_id, "reason": body.reason.value}
        # held.lost too: the locker calls the release request as it loses a lock, so
        # the body may have ended as RELEASED before the LOST stop arrived.
        if body.reason is EndReason.LOST or held.lost.is_set():
            raise TusError(ERR_LOCK_LOST)
        if body.reason in (EndReason.DISCONNECTED, EndReason.TIMEOUT, EndReason.RELEASED):
            log.info("upload body ended early; stored %d bytes", offset - start, extra=extra)
        info = await self.finish_if_complete(upload, request)
        if info.is_complete:
            log.info("upload finished", extra=extra)
        if body.reason is EndReason.OVERFLOW:
            kind = ERR_UPLOAD_SIZE_EXCEEDED if info.length is not None else ERR_MAX_SIZE_EXCEEDED
            raise TusError(kind, f"stored up to offset {offset}")
        return info

    async def _write_verified(
        self, upload: Upload, body: GuardedBody, held: HeldLock, checksum: Checksum
    ) -> UploadInfo:
        """Hold the body, compare its digest, and only then write it; the new snapshot."""
        info = upload.info
        async with ChecksumSpool(checksum, self._checksum_limit, self._checksum_directory) as spool:
            await spool.receive(body)
            if body.reason not in (EndReason.COMPLETE, EndReason.LIMIT):
                # Cut short (or overflowing): the digest is of bytes that never
                # arrived, so none of them can be verified, and none is stored.
                log.info("body with Upload-Checksum ended early; %d bytes discarded", spool.size,
                         extra={"upload_id": info.id})
                return info
            if not spool.matches():
                raise TusError(ERR_CHECKSUM_MISMATCH, headers=[("Upload-Offset", str(info.offset))])
            if held.lost.is_set():
                raise TusError(ERR_LOCK_LOST)
            return await upload.write(info.offset, IteratedBody(spool.chunks()))
