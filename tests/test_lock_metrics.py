"""Lockers report waits, takeovers and timeouts to an observer (the server's Metrics).

The same helper (``lockers.base.observed_lock``) serves every locker; these tests run it
through the memory locker and, across two independent instances, the file locker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tusd_py.lockers.base import Locker, LockTimeout
from tusd_py.lockers.file import FileLocker
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.metrics import Metrics

STEP_TIMEOUT = 10.0


class Recorder:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.takeovers = 0
        self.timeouts = 0

    def lock_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def lock_takeover(self) -> None:
        self.takeovers += 1

    def lock_timeout(self) -> None:
        self.timeouts += 1


async def _takeover(holder_locker: Locker, waiter_locker: Locker) -> None:
    """A holder that lets go when asked; a waiter that then gets the lock."""
    release = asyncio.Event()
    holding = asyncio.Event()

    async def hold() -> None:
        async with holder_locker.lock("upload1", release.set):
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    async with asyncio.timeout(STEP_TIMEOUT):
        await holding.wait()
        async with waiter_locker.lock("upload1", lambda: None):
            pass
        await holder


async def test_memory_locker_reports_wait_takeover_and_timeout() -> None:
    recorder = Recorder()
    locker = MemoryLocker(acquire_timeout=0.2, observer=recorder)
    async with locker.lock("free", lambda: None):
        pass
    assert len(recorder.waits) == 1 and recorder.takeovers == 0

    await _takeover(locker, locker)
    assert len(recorder.waits) == 3
    assert recorder.takeovers == 1  # the holder let go because it was asked

    async with locker.lock("stuck", lambda: None):  # ignores the release request
        with pytest.raises(LockTimeout):
            async with locker.lock("stuck", lambda: None):
                pass
        assert recorder.timeouts == 1
        assert len(recorder.waits) == 4  # the timed-out waiter reports no wait
        assert recorder.takeovers == 1
    # A holder that was asked counts when it lets go, whatever made it finish.
    assert recorder.takeovers == 2
    await locker.close()


async def test_lost_lock_is_not_a_takeover() -> None:
    recorder = Recorder()
    locker = MemoryLocker(acquire_timeout=1.0, observer=recorder)
    async with locker.lock("upload1", lambda: None) as held:
        await locker.close()  # marks held locks lost
        assert held.lost.is_set()
    assert recorder.takeovers == 0


async def test_file_lockers_report_to_their_own_metrics(tmp_path: Path) -> None:
    holder_metrics, waiter_metrics = Metrics(process_metrics=False), Metrics(process_metrics=False)
    holder = FileLocker(str(tmp_path), acquire_timeout=STEP_TIMEOUT, observer=holder_metrics)
    waiter = FileLocker(str(tmp_path), acquire_timeout=STEP_TIMEOUT, observer=waiter_metrics)
    try:
        await _takeover(holder, waiter)
    finally:
        await holder.close()
        await waiter.close()

    def samples(metrics: Metrics) -> dict[str, float]:
        text = metrics.render()[0].decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }

    holder_samples, waiter_samples = samples(holder_metrics), samples(waiter_metrics)
    assert holder_samples["tusd_py_lock_takeovers_total"] == 1
    assert waiter_samples["tusd_py_lock_takeovers_total"] == 0
    assert holder_samples["tusd_py_lock_wait_seconds_count"] == 1
    assert waiter_samples["tusd_py_lock_wait_seconds_count"] == 1
    assert waiter_samples["tusd_py_lock_timeouts_total"] == 0
