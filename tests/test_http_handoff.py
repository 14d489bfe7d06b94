"""``WorkerCall``: a call on a real worker thread that the event loop waits for.

The caller's accounting (``on_done``) runs before the waiting task is woken, errors
reach the waiter, and a cancelled waiter still waits for the call's end (after asking
it to stop), so nothing the worker did goes uncounted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator

import pytest

from tusd_py.http.handoff import WorkerCall
from tusd_py.http.types import CopyStop

WAIT = 10.0


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


@pytest.mark.both_loops
@pytest.mark.parametrize("default_executor", [False, True])
async def test_result_after_on_done(pool: concurrent.futures.ThreadPoolExecutor, default_executor: bool) -> None:
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    threads: list[int] = []

    def work(a: int, b: int) -> int:
        threads.append(threading.get_ident())
        return a + b

    def on_done(call: WorkerCall[int]) -> None:
        seen.append(f"done {call.result} {call.error}")

    call = WorkerCall(loop, None if default_executor else pool, work, (2, 3), on_done)
    assert await asyncio.wait_for(call.wait(None), WAIT) == 5
    seen.append("woken")
    assert seen == ["done 5 None", "woken"]
    assert threads and threads[0] != threading.get_ident()


async def test_error_reaches_the_waiter(pool: concurrent.futures.ThreadPoolExecutor) -> None:
    calls: list[WorkerCall[None]] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    call = WorkerCall(asyncio.get_running_loop(), pool, fail, (), calls.append)
    with pytest.raises(OSError, match="No space left"):
        await asyncio.wait_for(call.wait(None), WAIT)
    assert calls == [call] and call.done and call.result is None and isinstance(call.error, OSError)


@pytest.mark.both_loops
async def test_cancelled_waiter_stops_the_call_and_waits_for_its_end(
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    loop = asyncio.get_running_loop()
    started = threading.Event()
    stop = CopyStop()
    finished: list[int] = []

    def work() -> int:
        started.set()
        while not stop.is_set():  # a splice polls its stop flags like this
            started.wait(0.01)
        return 42

    call = WorkerCall(loop, pool, work, (), lambda call: finished.append(call.result or 0))
    waiter = asyncio.ensure_future(call.wait(stop))
    assert await loop.run_in_executor(None, started.wait, WAIT)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # The cancellation came out only once the call had ended and was counted.
    assert stop.is_set()
    assert finished == [42] and call.done
