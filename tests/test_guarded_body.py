"""``GuardedBody``: the PATCH body as a store sees it, through both of its paths.

Every case runs twice over a real server and socket: a store that iterates the body
(``async for``), and one that has it copy itself into a real temp file
(``copy_into``, the file store's way; splicing starts at any waiting byte here, so
the worker thread path runs too). Both must end for the same reason with the same
bytes stored: the length limit, the end of the body, a client that disconnects or
stalls, a release request (which drains what is still arriving), and a lost lock
(which stops at once and wins over a release).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.rawhttp import RawConnection
from tusd_py.http import splice as http_splice
from tusd_py.http import splice_control as http_splice_control
from tusd_py.http.body import RequestBody
from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.http.types import Request, Response
from tusd_py.stores.base import FileTarget
from tusd_py.tus import body as guarded_body
from tusd_py.tus.body import EndReason, GuardedBody

WAIT = 10.0
SPLICE_ONLY = pytest.mark.skipif(not http_splice.SPLICE_SUPPORTED, reason="splice(2) is Linux only")
PATHS = ["iterate", pytest.param("copy", marks=SPLICE_ONLY)]


class Store:
    """Writes a guarded body into ``path`` like a store: iterating it, or with
    ``copy_into``; tells waiters how far it got."""

    def __init__(self, path: Path, how: str) -> None:
        self.path = path
        self.how = how
        self.written = 0
        self._progress = asyncio.Condition()

    async def write(self, body: GuardedBody) -> None:
        loop = asyncio.get_running_loop()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if self.how == "copy":
                while moved := await body.copy_into(FileTarget(fd, self.written), 4 * 1024 * 1024):
                    await self._advance(moved)
                assert moved is not None, "the request body can be copied"
            else:
                async for chunk in body:
                    await loop.run_in_executor(None, os.pwrite, fd, chunk, self.written)
                    await self._advance(len(chunk))
        finally:
            os.close(fd)

    async def reached(self, count: int) -> None:
        """Return once ``count`` bytes are stored."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.written >= count)

    async def _advance(self, count: int) -> None:
        async with self._progress:
            self.written += count
            self._progress.notify_all()


class Upload:
    """One PATCH-like request whose body a ``Store`` writes through a ``GuardedBody``."""

    def __init__(self, store: Store, limit: int | None, lost: asyncio.Event | None) -> None:
        self.store = store
        self.limit = limit
        self.lost = lost
        loop = asyncio.get_running_loop()
        self.body: asyncio.Future[GuardedBody] = loop.create_future()
        self.ended: asyncio.Future[EndReason] = loop.create_future()

    async def __call__(self, request: Request) -> Response:
        body = GuardedBody(request.body, self.limit)
        if self.lost is not None:
            body.stop_when_lost(self.lost)
        self.body.set_result(body)
        try:
            await self.store.write(body)
        finally:
            self.ended.set_result(body.reason)
        assert body.yielded == self.store.written
        return Response(204)

    def stored(self) -> bytes:
        return self.store.path.read_bytes() if self.store.path.exists() else b""


@pytest.fixture(params=PATHS)
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setattr(http_splice_control, "SPLICE_MIN_WAITING", 1)
    return Store(tmp_path / "data", request.param)


@contextlib.asynccontextmanager
async def uploading(
    store: Store, length: int, limit: int | None = None, lost: asyncio.Event | None = None, **limits: Any
) -> AsyncIterator[tuple[Upload, RawConnection]]:
    """A server running an ``Upload`` and a client that sent the head of a request
    with a ``length``-byte body."""
    upload = Upload(store, limit, lost)
    server = HTTPServer(upload, HTTPLimits(**limits))
    port = await server.start("127.0.0.1", 0)
    connection = await RawConnection.open(port)
    try:
        await connection.send(f"PATCH /u HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        yield upload, connection
    finally:
        await connection.close()
        await server.stop(1.0)


async def ended(upload: Upload) -> EndReason:
    return await asyncio.wait_for(asyncio.shield(upload.ended), WAIT)


@pytest.fixture
def drain(monkeypatch: pytest.MonkeyPatch) -> Callable[[float, float], None]:
    def set_drain(idle: float, budget: float) -> None:
        monkeypatch.setattr(guarded_body, "_DRAIN_IDLE", idle)
        monkeypatch.setattr(guarded_body, "_DRAIN_BUDGET", budget)

    return set_drain


async def test_whole_body(store: Store) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 11)
    async with uploading(store, len(payload)) as (upload, client):
        await client.send(payload)
        assert await ended(upload) is EndReason.COMPLETE
    assert upload.stored() == payload


@SPLICE_ONLY
async def test_a_copied_body_ends_without_asking_the_request_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a copy took the body's last byte, the store's next call ends the body
    (COMPLETE) without a second request-body copy: that round cost a stop flag, the
    request body's checks and a loop turn on every PATCH."""
    monkeypatch.setattr(http_splice_control, "SPLICE_MIN_WAITING", 1)
    calls: list[int] = []
    real_copy = RequestBody.copy_into

    async def counting(self: RequestBody, *args: Any, **kwargs: Any) -> int | None:
        moved = await real_copy(self, *args, **kwargs)
        calls.append(-1 if moved is None else moved)
        return moved

    monkeypatch.setattr(RequestBody, "copy_into", counting)
    store = Store(tmp_path / "data", "copy")
    payload = os.urandom(1024 * 1024 + 7)
    async with uploading(store, len(payload)) as (upload, client):
        await client.send(payload)
        assert await ended(upload) is EndReason.COMPLETE
    assert upload.stored() == payload
    assert sum(calls) == len(payload) and 0 not in calls


async def test_limit_is_never_passed(store: Store) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    limit = 1024 * 1024 + 5
    async with uploading(store, len(payload), limit=limit) as (upload, client):
        await client.send(payload)
        # Copying never takes a byte past the limit (LIMIT); iterating may receive a
        # chunk across it and drop the rest (OVERFLOW).
        assert await ended(upload) in (EndReason.LIMIT, EndReason.OVERFLOW)
    assert upload.stored() == payload[:limit]


async def test_disconnect_keeps_what_arrived(store: Store) -> None:
    payload = os.urandom(1024 * 1024 + 3)
    async with uploading(store, len(payload) + 100) as (upload, client):
        await client.send(payload)
        await store.reached(len(payload))
        await client.close()
        assert await ended(upload) is EndReason.DISCONNECTED
    assert upload.stored() == payload


async def test_stalled_client_times_out(store: Store) -> None:
    payload = os.urandom(300_000)
    async with uploading(store, len(payload) + 1, body_timeout=0.3) as (upload, client):
        await client.send(payload)
        assert await ended(upload) is EndReason.TIMEOUT
    assert upload.stored() == payload


async def test_release_stops_a_stalled_body_before_its_timeout(store: Store, drain: Callable[..., None]) -> None:
    """A pending read (or a waiting copy) is cut short by the release request: the
    body ends after the drain gap, long before the body timeout."""
    drain(0.2, 2.0)
    payload = os.urandom(500_000)
    async with uploading(store, len(payload) + 1, body_timeout=60.0) as (upload, client):
        await client.send(payload)
        await store.reached(len(payload))
        (await upload.body).stop()
        assert await ended(upload) is EndReason.RELEASED
    assert upload.stored() == payload


async def test_release_keeps_bytes_still_arriving(store: Store, drain: Callable[..., None]) -> None:
    drain(1.0, 5.0)
    first, rest = os.urandom(200_000), os.urandom(700_000)
    async with uploading(store, len(first) + len(rest) + 1, body_timeout=60.0) as (upload, client):
        await client.send(first)
        await store.reached(len(first))
        (await upload.body).stop()
        await client.send(rest)  # in flight when the release came: kept
        assert await ended(upload) is EndReason.RELEASED
    assert upload.stored() == first + rest


async def test_release_drain_ends_when_its_budget_is_spent(store: Store, drain: Callable[..., None]) -> None:
    """The drain ends once its budget is spent, even before a gap of ``_DRAIN_IDLE``."""
    drain(5.0, 0.3)
    first = os.urandom(100_000)
    async with uploading(store, 64 * 1024 * 1024, body_timeout=60.0) as (upload, client):
        await client.send(first)
        await store.reached(len(first))
        (await upload.body).stop()
        assert await ended(upload) is EndReason.RELEASED
    assert upload.stored() == first


async def test_stopped_before_the_first_read_still_drains(store: Store, drain: Callable[..., None]) -> None:
    drain(1.0, 5.0)
    payload = os.urandom(400_000)
    async with uploading(store, len(payload) + 1, body_timeout=60.0) as (upload, client):
        await client.send(payload)
        body = await upload.body
        body.stop()  # before or during the store's first read or copy
        assert await ended(upload) is EndReason.RELEASED
    assert upload.stored() == payload


async def test_lost_lock_stops_at_once_and_wins_over_a_release(store: Store, drain: Callable[..., None]) -> None:
    """A locker that loses the lock also calls the release request: the body ends as
    LOST without draining (the drain gap here would take longer than the wait)."""
    drain(WAIT * 2, WAIT * 2)
    lost = asyncio.Event()
    first = os.urandom(300_000)
    async with uploading(store, len(first) + 1_000_000, lost=lost, body_timeout=60.0) as (upload, client):
        await client.send(first)
        await store.reached(len(first))
        body = await upload.body
        body.stop()  # the release request comes first ...
        lost.set()
        body.stop(EndReason.LOST)  # ... and the loss in the same breath
        assert await ended(upload) is EndReason.LOST
        await client.send(os.urandom(1_000_000))  # too late: never stored
    assert upload.stored() == first


async def test_lost_lock_is_checked_before_every_read(store: Store, drain: Callable[..., None]) -> None:
    """The lock is lost while a read (or copy) waits, and nobody calls ``stop`` yet:
    the bytes that wake it are stored, and the body ends as LOST before the next one."""
    drain(WAIT * 2, WAIT * 2)
    lost = asyncio.Event()
    first, rest = os.urandom(300_000), os.urandom(2_000_000)
    async with uploading(store, len(first) + len(rest) + 1, lost=lost, body_timeout=60.0) as (upload, client):
        await client.send(first)
        await store.reached(len(first))
        lost.set()
        await client.send(rest)
        assert await ended(upload) is EndReason.LOST
    stored = upload.stored()
    assert len(stored) >= len(first) and (first + rest).startswith(stored)
