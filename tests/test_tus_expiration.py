"""Expiration on the file store: Upload-Expires, 410 for expired uploads, the sweeper
(in-server and ``tusd-py cleanup``) and orphan removal, all on a controllable clock."""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tus_fakes import BASE, QueueBody, StaticBody, header, make_request

from tusd_py import cli
from tusd_py.cli import tus_options
from tusd_py.config import Config
from tusd_py.expiry import Sweeper
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.stores.file import FileStore
from tusd_py.tus.handler import TusHandler

LIFETIME = 3600.0
GRACE = 600.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(self, directory: Path, lifetime: float = LIFETIME) -> None:
        self.clock = Clock()
        self.config = Config()
        self.config.expiration.lifetime = lifetime
        self.directory = directory
        self.store = FileStore(str(directory))
        self.locker = MemoryLocker(acquire_timeout=5.0)
        self.handler = TusHandler(self.store, self.locker, tus_options(self.config), clock=self.clock)
        self.sweeper = Sweeper(self.store, self.locker, orphan_grace=GRACE, clock=self.clock)

    async def create(self, length: int) -> tuple[str, str | None]:
        response = await self.handler(make_request("POST", BASE, {"Upload-Length": str(length)}))
        assert response.status == 201
        return (header(response, "Location") or "").rsplit("/", 1)[-1], header(response, "Upload-Expires")

    async def patch(self, upload_id: str, offset: int, body: StaticBody | QueueBody) -> tuple[int, str | None]:
        headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
        response = await self.handler(make_request("PATCH", BASE + upload_id, headers, body))
        return response.status, header(response, "Upload-Expires")

    async def head_status(self, upload_id: str) -> int:
        return (await self.handler(make_request("HEAD", BASE + upload_id))).status


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    value = Setup(tmp_path / "data")
    yield value
    await value.store.close()


async def test_upload_expires_is_announced_for_unfinished_uploads(setup: Setup) -> None:
    upload_id, expires = await setup.create(10)
    assert expires is not None
    assert email.utils.parsedate_to_datetime(expires).timestamp() == pytest.approx(setup.clock.now + LIFETIME, abs=1)
    status, expires = await setup.patch(upload_id, 0, StaticBody([b"12345"]))
    assert status == 204 and expires is not None
    status, expires = await setup.patch(upload_id, 5, StaticBody([b"67890"]))
    assert status == 204 and expires is None  # finished uploads do not expire
    response = await setup.handler(make_request("OPTIONS", BASE))
    assert "expiration" in (header(response, "Tus-Extension") or "").split(",")


async def test_expiration_is_off_by_default(tmp_path: Path) -> None:
    setup = Setup(tmp_path, lifetime=0)
    try:
        _, expires = await setup.create(10)
        assert expires is None
        response = await setup.handler(make_request("OPTIONS", BASE))
        assert "expiration" not in (header(response, "Tus-Extension") or "").split(",")
    finally:
        await setup.store.close()


async def test_expired_upload_answers_410_until_swept(setup: Setup) -> None:
    upload_id, _ = await setup.create(10)
    done_id, _ = await setup.create(3)
    await setup.patch(done_id, 0, StaticBody([b"abc"]))
    setup.clock.now += LIFETIME - 1
    assert await setup.head_status(upload_id) == 200
    setup.clock.now += 1
    assert await setup.head_status(upload_id) == 410
    body = StaticBody([b"abc"])
    status, _ = await setup.patch(upload_id, 0, body)
    assert status == 410 and body.reads == 0
    assert await setup.head_status(done_id) == 200  # finished: never expires

    result = await setup.sweeper.sweep()
    assert (result.expired, result.skipped) == (1, 0)
    assert await setup.head_status(upload_id) == 404
    assert not (setup.directory / upload_id).exists()
    assert not (setup.directory / f"{upload_id}.info").exists()
    assert await setup.head_status(done_id) == 200
    assert (await setup.sweeper.sweep()).expired == 0


async def test_sweep_keeps_uploads_that_did_not_expire(setup: Setup) -> None:
    upload_id, _ = await setup.create(10)
    assert (await setup.sweeper.sweep()).expired == 0
    assert await setup.head_status(upload_id) == 200


async def test_expiry_during_an_upload(setup: Setup) -> None:
    """The upload expires while a PATCH is running: the sweep asks the PATCH to let
    go (it stores what arrived and answers), then removes the upload."""
    upload_id, _ = await setup.create(100)
    stalled = QueueBody(length=100)
    stalled.feed(b"x" * 40)
    running = asyncio.create_task(setup.patch(upload_id, 0, stalled))
    await stalled.waiting.wait()
    setup.clock.now += LIFETIME + 1
    result = await setup.sweeper.sweep()
    status, _ = await running
    assert status == 204  # the running PATCH answered normally
    assert result.expired == 1
    assert await setup.head_status(upload_id) == 404


async def test_upload_completed_before_the_sweep_stays(setup: Setup) -> None:
    upload_id, _ = await setup.create(3)
    await setup.patch(upload_id, 0, StaticBody([b"abc"]))
    setup.clock.now += LIFETIME * 10
    assert (await setup.sweeper.sweep()).expired == 0
    assert await setup.head_status(upload_id) == 200


async def test_orphans_older_than_the_grace_period_are_removed(setup: Setup) -> None:
    upload_id, _ = await setup.create(10)
    directory = setup.directory
    (directory / "abc123").write_bytes(b"orphan data")  # its .info is gone
    (directory / "def456.tmp-00ff").write_bytes(b"crashed concatenation")
    (directory / "abc123.info.tmp-1234").write_bytes(b"{")
    (directory / "cut123.info").write_bytes(b"")  # a creation a crash cut short
    (directory / "notes.txt").write_bytes(b"not ours")
    (directory / "sub").mkdir()
    assert (await setup.sweeper.sweep()).orphans == 0  # all younger than the grace period
    setup.clock.now += GRACE + 1
    result = await setup.sweeper.sweep()
    assert result.orphans == 4
    assert sorted(os.listdir(directory)) == sorted(["notes.txt", "sub", f"{upload_id}.info"])
    assert await setup.head_status(upload_id) == 200  # has its .info: never an orphan


async def test_sweeper_runs_every_interval(setup: Setup) -> None:
    """``Sweeper.run`` with a sleep the test controls: each released sleep is one sweep."""
    upload_id, _ = await setup.create(10)
    setup.clock.now += LIFETIME + 1
    ticks: asyncio.Queue[None] = asyncio.Queue()
    sleeping: asyncio.Queue[float] = asyncio.Queue()

    async def sleep(seconds: float) -> None:
        sleeping.put_nowait(seconds)
        await ticks.get()

    task = asyncio.create_task(setup.sweeper.run(30.0, sleep))
    try:
        assert await sleeping.get() == 30.0
        assert await setup.head_status(upload_id) == 410  # not swept before the interval
        ticks.put_nowait(None)
        assert await sleeping.get() == 30.0  # one sweep ran, the next interval started
        assert await setup.head_status(upload_id) == 404
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_cleanup_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "data"
    setup = Setup(directory)
    try:
        upload_id, _ = await setup.create(10)
    finally:
        await setup.store.close()
    # Make the upload old: expired for a cleanup on the real clock.
    info_path = directory / f"{upload_id}.info"
    info_path.write_text(info_path.read_text().replace('"expires_at":', '"expires_at":1,"_":'))
    old = time.time() - 7200
    (directory / "deadbeef").write_bytes(b"orphan")
    os.utime(directory / "deadbeef", (old, old))
    status = await asyncio.to_thread(cli.main, ["cleanup", "--directory", str(directory), "--log-level", "error"])
    assert status == 0
    assert "removed 1 expired uploads and 1 orphans" in capsys.readouterr().out
    assert sorted(os.listdir(directory)) == []


async def test_stop_sweeper_ends_a_sweeper_that_lost_a_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancellation lost inside a sweep (Python 3.11's wait_for can lose one) must not
    leave the shutdown waiting for the next sweep."""
    monkeypatch.setattr(cli, "SWEEPER_CANCEL_RETRY_SECONDS", 0.01)
    sweeping = asyncio.Event()
    cancellations = 0

    async def sweeper() -> None:
        nonlocal cancellations
        while True:
            sweeping.set()
            try:
                await asyncio.Event().wait()  # a sweep's S3 call
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    continue  # lost: the sweeper goes on to its next sweep
                raise

    task = asyncio.create_task(sweeper())
    await sweeping.wait()
    stopping = asyncio.create_task(cli.stop_sweeper(task))
    # asyncio.wait leaves both running at the bound (a timeout would cancel them, and
    # that second cancellation would end the sweeper by itself).
    await asyncio.wait([stopping], timeout=10)
    try:
        assert stopping.done(), "stop_sweeper still waits for a sweeper that lost its cancellation"
        assert task.cancelled() and cancellations == 2
    finally:
        task.cancel()
        await asyncio.wait([stopping, task], timeout=10)
