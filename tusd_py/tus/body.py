"""The PATCH body as a store sees it: bounded, and stoppable from outside.

A store's ``write`` reads a ``GuardedBody`` (iterating or copying it). It ends cleanly (the store then
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

A guarded body is a store's ``UploadBody``: when the request body offers it
(``CopyableBody``), ``copy_into`` moves the bytes straight into the store's file.
Both ways ask one stop policy (``_plan``) before each read or copy, so they end for
the same reasons at the same moments (a stop request stops a running copy where it
cancels a pending read).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable

from tusd_py.http.types import Body, BodyTimeout, ClientDisconnected, CopyStop, CopyTarget
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
    """A store's ``UploadBody`` over the request ``body``: yields (or copies) at most
    ``limit`` bytes (None: no limit) and can be stopped with ``stop``."""

    def __init__(self, body: Body, limit: int | None = None, stopped: bool = False) -> None:
        self._body = body
        # getattr, not isinstance(): a runtime-checkable Protocol check walks the
        # protocol's members (measurable per PATCH).
        self._copy: Callable[[CopyTarget, int, CopyStop], Awaitable[int | None]] | None = getattr(
            body, "copy_into", None
        )
        self._chunks: AsyncIterator[bytes] | None = None
        self._remaining = limit
        self._stop_reason: EndReason | None = EndReason.RELEASED if stopped else None
        self._reader: asyncio.Task[object] | None = None
        self._cancelled_read = False
        self._drain_deadline: float | None = None
        self._lost: asyncio.Event | None = None
        self._copy_stop: CopyStop | None = None
        self.reason = EndReason.RUNNING
        """Why the body ended (``RUNNING`` while it has not)."""
        self.yielded = 0
        """Bytes handed to the store so far (yielded or copied)."""

    def set_limit(self, limit: int | None) -> None:
        """Yield at most ``limit`` more bytes (None: no limit); set before iterating."""
        self._remaining = limit

    def stop(self, reason: EndReason = EndReason.RELEASED) -> None:
        """End the body as soon as possible, cancelling a pending body read or
        stopping a running copy.

        Safe to call from any callback on the event loop, any number of times.
        """
        if self._lost is not None and self._lost.is_set():
            reason = EndReason.LOST
        if self._stop_reason is None or reason is EndReason.LOST:
            # LOST wins over an earlier RELEASED: a locker that loses a lock also
            # calls the holder's release request, and a lost lock must not drain.
            self._stop_reason = reason
        if self._copy_stop is not None:
            self._copy_stop.set()
        reader = self._reader
        if reader is not None and not self._cancelled_read:
            # The read is pending inside ``_read`` (the only place ``_reader`` is
            # set), so this cancellation lands in the body read and nowhere else.
            self._cancelled_read = True
            reader.cancel()

    def stop_when_lost(self, lost: asyncio.Event) -> None:
        """Treat ``lost`` (the upload's lock was lost) as ``stop(LOST)``. Checked on
        every read and stop, so it wins over a release request the locker makes in the
        same breath; the caller still calls ``stop`` to cancel a pending read."""
        self._lost = lost

    def _plan(self) -> EndReason | float | None:
        """The stop policy, asked before each read or copy: the reason to end now;
        or, while stopping, how long the next read or copy may wait for bytes (the
        drain: keep what is still arriving, end at the first pause or when the
        budget is spent); or None: read until stopped (cancellable)."""
        if self.reason is not EndReason.RUNNING:
            return self.reason
        if self._remaining == 0:
            return EndReason.LIMIT
        if self._lost is not None and self._lost.is_set():
            self._stop_reason = EndReason.LOST
        if self._stop_reason is None:
            return None
        if self._stop_reason is EndReason.LOST:
            # Exclusivity is gone (another instance may get the lock once Consul's
            # lock-delay has passed): stop at once instead of draining.
            return EndReason.LOST
        now = asyncio.get_running_loop().time()
        if self._drain_deadline is None:
            self._drain_deadline = now + _DRAIN_BUDGET
        left = self._drain_deadline - now
        if left <= 0:
            return self._stop_reason
        return min(_DRAIN_IDLE, left)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        plan = self._plan()
        if isinstance(plan, EndReason):
            raise self._end(plan)
        if plan is None:
            return await self._read(cancellable=True)
        try:
            async with asyncio.timeout(plan):
                return await self._read(cancellable=False)
        except TimeoutError:
            raise self._end(self._stop_reason or EndReason.RELEASED) from None

    async def copy_into(self, target: FileTarget, max_bytes: int) -> int | None:
        """Move up to ``max_bytes`` body bytes into ``target`` (see
        ``stores.base.UploadBody``); the bytes written. 0 once the body ended
        (``reason`` says why); None when the request body cannot be copied into a
        file (iterate instead). Same limits and stops as iterating: never past the
        limit, a release request ends it after the drain, a lost lock at once.
        Raises only ``OSError`` (the file)."""
        copy = self._copy
        if copy is None:
            return None
        while True:
            plan = self._plan()
            if isinstance(plan, EndReason):
                self.reason = plan
                return 0
            if self._remaining is not None:
                max_bytes = min(max_bytes, self._remaining)
            stop = self._copy_stop = CopyStop()
            # While stopping, the drain window ends the copy instead of a timeout.
            timer = None if plan is None else asyncio.get_running_loop().call_later(plan, stop.set)
            try:
                moved = await copy(target, max_bytes, stop)
            except ClientDisconnected:
                self.reason = EndReason.DISCONNECTED
                return 0
            except BodyTimeout:
                self.reason = EndReason.TIMEOUT
                return 0
            finally:
                self._copy_stop = None
                if timer is not None:
                    timer.cancel()
            if moved is None:
                return None
            if moved:
                if self._remaining is not None:
                    self._remaining -= moved
                self.yielded += moved
                self._note_complete()
                return moved
            if not stop.is_set():
                self.reason = EndReason.COMPLETE
                return 0
            if plan is not None:
                self.reason = self._stop_reason or EndReason.RELEASED
                return 0
            # Stopped by ``stop()`` while nothing had moved: ask the policy again
            # (drain what still arrives, or end at once if the lock was lost).

    def _note_complete(self) -> None:
        """After a copy: when it took the last byte of the body (and nothing stops the
        body or bounds it), the body ended, and the store's next call (every store
        makes one to learn that) ends at once instead of asking the request body
        again. What ``_plan`` would find then (a stop, the limit) keeps deciding."""
        body = self._body
        length = body.length
        if (
            length is not None
            and body.received >= length
            and self._remaining != 0
            and self._stop_reason is None
            and (self._lost is None or not self._lost.is_set())
        ):
            self.reason = EndReason.COMPLETE

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
