"""The PATCH body as a store sees it: bounded, and stoppable from outside.

A store's ``write`` iterates a ``GuardedBody``. It ends cleanly (the store then
stores what it has) when:

- the upload's length (or the server's max size) is reached: no byte beyond it is
  ever yielded;
- another request asked for the upload's lock, ``release_all`` was called at
  shutdown, or the lock was lost: a pending read is cancelled at once, because the
  case that matters is a client stalled mid-PATCH with its socket still open. Bytes
  still arriving are yielded until the flow pauses (``_DRAIN_IDLE``) or a budget
  runs out (``_DRAIN_BUDGET``): a client that sent its bytes and went away has them
  in flight behind a full receive window, and they are kept;
- the client disconnected or stopped sending (``ClientDisconnected``/``BodyTimeout``).

When the request body offers it (``SpliceableBody``), so does a guarded body:
``splice_to`` writes the bytes straight into the store's file, under the same rules
(a stop request stops a running splice instead of cancelling a read).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import cast

from tusd_py.http.types import Body, BodyTimeout, ClientDisconnected, SpliceableBody, SpliceStop
from tusd_py.stores.base import FileTarget

# While stopping: bytes already sent by the client arrive back to back (loopback or
# LAN: microseconds apart), so a gap this long means the client stalled and the
# stop can complete; a client still actively sending is cut off after the budget.
_DRAIN_IDLE = 0.25
_DRAIN_BUDGET = 2.0


class EndReason(enum.Enum):
    """Why a guarded body stopped yielding."""

    RUNNING = "running"
    COMPLETE = "complete"
    """The body ended normally."""
    LIMIT = "limit"
    """The upload length (or max size) was reached."""
    OVERFLOW = "overflow"
    """The body carried bytes beyond the limit; they were dropped."""
    RELEASED = "released"
    """Another request wanted the lock, or the server is shutting down."""
    LOST = "lost"
    """The lock was lost."""
    DISCONNECTED = "disconnected"
    TIMEOUT = "timeout"


class GuardedBody:
    """An ``AsyncIterator[bytes]`` over ``body`` that yields at most ``limit`` bytes
    (None: no limit) and can be stopped with ``stop``."""

    def __init__(self, body: Body, limit: int | None = None, stopped: bool = False) -> None:
        self._body = body
        self._chunks: AsyncIterator[bytes] | None = None
        self._remaining = limit
        self._stop_reason: EndReason | None = EndReason.RELEASED if stopped else None
        self._reader: asyncio.Task[object] | None = None
        self._cancelled_read = False
        self._drain_deadline: float | None = None
        self._lost: asyncio.Event | None = None
        self._splice_stop: SpliceStop | None = None
        self.reason = EndReason.RUNNING
        """Why iteration ended (``RUNNING`` while it has not)."""
        self.yielded = 0
        """Bytes handed to the store so far."""

    def set_limit(self, limit: int | None) -> None:
        """Yield at most ``limit`` more bytes (None: no limit); set before iterating."""
        self._remaining = limit

    def stop(self, reason: EndReason = EndReason.RELEASED) -> None:
        """End the iteration as soon as possible, cancelling a pending body read.

        Safe to call from any callback on the event loop, any number of times.
        """
        if self._lost is not None and self._lost.is_set():
            reason = EndReason.LOST
        if self._stop_reason is None or reason is EndReason.LOST:
            # LOST wins over an earlier RELEASED: a locker that loses a lock also
            # calls the holder's release request, and a lost lock must not drain.
            self._stop_reason = reason
        if self._splice_stop is not None:
            self._splice_stop.set()
        reader = self._reader
        if reader is not None and not self._cancelled_read:
            # The read is pending inside ``__anext__`` (the only place ``_reader`` is
            # set), so this cancellation lands in the body read and nowhere else.
            self._cancelled_read = True
            reader.cancel()

    def stop_when_lost(self, lost: asyncio.Event) -> None:
        """Treat ``lost`` (the upload's lock was lost) as ``stop(LOST)``. Checked on
        every read and stop, so it wins over a release request the locker makes in the
        same breath; the caller still calls ``stop`` to cancel a pending read."""
        self._lost = lost

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    @property
    def can_splice(self) -> bool:
        """Whether ``splice_to`` may be used (the request body offers it)."""
        # getattr, not isinstance(): a runtime-checkable Protocol check walks the
        # protocol's members on every call (measurable per PATCH).
        return bool(getattr(self._body, "can_splice", False))

    async def copy_into(self, target: FileTarget, max_bytes: int) -> int | None:
        """See ``stores.base.UploadBody.copy_into``."""
        if not self.can_splice:
            return None
        return await self.splice_to(target.fd, target.offset, max_bytes, executor=target.executor)

    async def splice_to(
        self,
        fd: int,
        offset: int,
        max_bytes: int,
        *,
        stop: SpliceStop | None = None,
        executor: Executor | None = None,
    ) -> int:
        """Write up to ``max_bytes`` body bytes into ``fd`` at ``offset`` (see
        ``SpliceableBody``); the bytes written. 0 once the body ended (``reason``
        says why), or when ``stop`` was set. Same limits and stops as iterating:
        never past the limit, a release request ends it after the drain, a lost lock
        at once. Raises only ``OSError`` (the file)."""
        body = cast(SpliceableBody, self._body)  # callers check can_splice first
        while True:
            if self.reason is not EndReason.RUNNING:
                return 0
            if self._remaining == 0:
                self.reason = EndReason.LIMIT
                return 0
            if self._lost is not None and self._lost.is_set():
                self._stop_reason = EndReason.LOST
            if self._stop_reason is EndReason.LOST:
                self.reason = EndReason.LOST
                return 0
            if self._remaining is not None:
                max_bytes = min(max_bytes, self._remaining)
            draining = self._stop_reason is not None
            own_stop = self._splice_stop = stop if stop is not None else SpliceStop()
            timer: asyncio.TimerHandle | None = None
            if draining:
                # Stopping: keep what is still arriving, end at the first pause.
                loop = asyncio.get_running_loop()
                now = loop.time()
                if self._drain_deadline is None:
                    self._drain_deadline = now + _DRAIN_BUDGET
                left = self._drain_deadline - now
                if left <= 0:
                    self.reason = self._stop_reason or EndReason.RELEASED
                    return 0
                timer = loop.call_later(min(_DRAIN_IDLE, left), own_stop.set)
            try:
                moved = await body.splice_to(fd, offset, max_bytes, stop=own_stop, executor=executor)
            except ClientDisconnected:
                self.reason = EndReason.DISCONNECTED
                return 0
            except BodyTimeout:
                self.reason = EndReason.TIMEOUT
                return 0
            finally:
                self._splice_stop = None
                if timer is not None:
                    timer.cancel()
            if moved:
                if self._remaining is not None:
                    self._remaining -= moved
                self.yielded += moved
                return moved
            if not own_stop.is_set():
                self.reason = EndReason.COMPLETE
                return 0
            if draining:
                self.reason = self._stop_reason or EndReason.RELEASED
                return 0
            if self._stop_reason is None:
                return 0  # the caller's ``stop``
            # Stopped by ``stop()`` while nothing had moved: drain (or end, if lost).

    async def __anext__(self) -> bytes:
        if self.reason is not EndReason.RUNNING:
            raise StopAsyncIteration
        if self._remaining == 0:
            raise self._end(EndReason.LIMIT)
        if self._lost is not None and self._lost.is_set():
            self._stop_reason = EndReason.LOST
        if self._stop_reason is EndReason.LOST:
            # Exclusivity is gone (another instance may get the lock once Consul's
            # lock-delay has passed): stop at once instead of draining.
            raise self._end(EndReason.LOST)
        if self._stop_reason is not None:
            # Stopping: keep what is still arriving, end at the first pause.
            now = asyncio.get_running_loop().time()
            if self._drain_deadline is None:
                self._drain_deadline = now + _DRAIN_BUDGET
            left = self._drain_deadline - now
            if left <= 0:
                raise self._end(self._stop_reason)
            try:
                async with asyncio.timeout(min(_DRAIN_IDLE, left)):
                    return await self._read(cancellable=False)
            except TimeoutError:
                raise self._end(self._stop_reason) from None
        return await self._read(cancellable=True)

    async def _read(self, cancellable: bool) -> bytes:
        if self._chunks is None:
            # Created lazily: nothing touches the body (no 100 Continue) before the
            # handler has validated the request and holds the lock.
            self._chunks = aiter(self._body)
        task = asyncio.current_task()
        if cancellable:
            self._reader = task
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            raise self._end(EndReason.COMPLETE) from None
        except ClientDisconnected:
            raise self._end(EndReason.DISCONNECTED) from None
        except BodyTimeout:
            raise self._end(EndReason.TIMEOUT) from None
        except asyncio.CancelledError:
            # Swallow only our own cancellation, the way asyncio.timeout() does: if
            # someone else cancelled the task too, uncancel() leaves a count above 0.
            if cancellable and self._cancelled_read and task is not None and task.uncancel() == 0:
                self._reader = None
                self._cancelled_read = False
                return await self.__anext__()  # now stopping: drain what arrived
            raise
        finally:
            if cancellable:
                self._reader = None
                self._cancelled_read = False
        if self._remaining is not None:
            if len(chunk) > self._remaining:
                chunk = chunk[: self._remaining]
                self._remaining = 0
                self.reason = EndReason.OVERFLOW
            else:
                self._remaining -= len(chunk)
        self.yielded += len(chunk)
        return chunk

    def _end(self, reason: EndReason) -> StopAsyncIteration:
        self.reason = reason
        return StopAsyncIteration()
