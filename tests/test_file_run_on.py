"""``file_io.run_on``: the file store's hand-off to its pool keeps the semantics of
``loop.run_in_executor`` with one loop callback per call."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from tusd_py.stores.file_io import run_on


async def test_result_and_error_reach_the_caller() -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        assert await run_on(pool, threading.get_ident) != threading.get_ident()
        with pytest.raises(FileNotFoundError):
            await run_on(pool, open, "/nonexistent/tusd-py-run-on")


async def test_a_queued_call_of_a_cancelled_caller_never_starts() -> None:
    """A call that hands back a resource (an open file descriptor) must not run for a
    caller that is gone: nobody would close what it returns."""
    release = threading.Event()
    started: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        blocker = asyncio.ensure_future(run_on(pool, release.wait))
        queued = asyncio.ensure_future(run_on(pool, started.append, "queued"))
        await asyncio.sleep(0)  # both submitted; the one thread is busy with the first
        queued.cancel()
        release.set()
        assert await blocker is True
        with pytest.raises(asyncio.CancelledError):
            await queued
    # The pool has drained (the with block waited for it): the queued call was skipped.
    assert started == []


async def test_a_result_after_the_caller_left_is_dropped_quietly() -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    entered, release = threading.Event(), threading.Event()

    def work() -> int:
        entered.set()
        release.wait()
        return 1

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        running = asyncio.ensure_future(run_on(pool, work))
        await asyncio.to_thread(entered.wait)
        running.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        # One thread, so this call's report comes after the cancelled call's one.
        assert await run_on(pool, int, "7") == 7
    assert loop_errors == []
