"""A call on a worker thread that the event loop learns the end of in one turn.

``loop.run_in_executor`` chains the executor's concurrent future to an asyncio future
(callbacks both ways, a lock taken per state change, one loop turn to copy the
state over), and a wait that must survive a cancellation shields that future (one
more future, one more loop turn). A request body copied into a file waits for one
such call per request, so ``WorkerCall`` does the same with one callback: the worker
hands its result to the loop with ``call_soon_threadsafe``, and that callback does
the caller's accounting and wakes the waiting task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

from tusd_py.http.types import CopyStop

T = TypeVar("T")

__all__ = ["WorkerCall"]


class WorkerCall(Generic[T]):
    """``function(*args)`` on ``executor`` (None: the loop's default one), started at
    once. ``on_done(call)`` (optional) runs on the event loop as soon as it ended,
    before a waiting task is woken, whether or not anybody still waits."""

    __slots__ = ("_loop", "_waiter", "_ended", "_on_done", "done", "result", "error")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor | None,
        function: Callable[..., T],
        args: tuple[Any, ...],
        on_done: Callable[[WorkerCall[T]], None] | None = None,
    ) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[T] = loop.create_future()
        self._ended: asyncio.Future[None] | None = None
        """Created when a waiter was cancelled and waits for the end anyway."""
        self._on_done = on_done
        self.done = False
        """The call ended (``result`` or ``error`` is set); read on the loop."""
        self.result: T | None = None
        self.error: BaseException | None = None
        if executor is None:
            # The default executor is the loop's own: only run_in_executor reaches it.
            # Its future is not needed (``_run`` reports through the loop and never raises).
            loop.run_in_executor(None, self._run, function, args)
        else:
            executor.submit(self._run, function, args)

    def _run(self, function: Callable[..., T], args: tuple[Any, ...]) -> None:
        """On the worker thread."""
        try:
            result = function(*args)
        except BaseException as error:  # handed to the waiter as is
            outcome: tuple[T | None, BaseException | None] = (None, error)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._finish, *outcome)

    def _finish(self, result: T | None, error: BaseException | None) -> None:
        """On the event loop: the call ended."""
        self.done, self.result, self.error = True, result, error
        if self._on_done is not None:
            self._on_done(self)
        waiter = self._waiter
        if not waiter.done():  # (a cancelled waiter is done)
            if error is None:
                waiter.set_result(result)  # type: ignore[arg-type]
            else:
                waiter.set_exception(error)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    async def wait(self, stop: CopyStop | None) -> T:
        """The call's result (its error is raised). When the waiting task is
        cancelled meanwhile, ``stop`` is set (asking the call to return early), the
        call is awaited to its end all the same (what it did must be counted first:
        ``on_done``), then the cancellation is re-raised."""
        try:
            return await self._waiter
        except asyncio.CancelledError:
            if self.done and self._waiter.done() and not self._waiter.cancelled():
                self._waiter.exception()  # retrieved: no "never retrieved" warning
            if stop is not None:
                stop.set()
            if not self.done:
                ended = self._ended = self._loop.create_future()
                with contextlib.suppress(BaseException):
                    await ended
            raise
