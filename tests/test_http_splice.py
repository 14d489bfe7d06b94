"""Splicing request bodies straight into files (``CopyableBody``), over real sockets.

HTTP layer: a handler moves the body into a temp file with ``copy_into``; the file must
hold exactly the bytes sent, the next pipelined request must still be answered, and
disconnects and timeouts end the body with every arrived byte stored. End to end: the
composed server on the file store, whose PATCH uses the splice path. A spy on the
worker function proves the kernel path ran (or, with splice unavailable, that it did
not). ``SPLICE_MIN_WAITING`` is lowered to one byte so that any waiting byte is
spliced: what the tests check must not depend on how fast the client is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import socket
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import create, file_store_config, head_offset, patch_head, stored_bytes

from tests.rawhttp import RawConnection, request
from tusd_py.cli import Running, serving
from tusd_py.http import intake as http_intake
from tusd_py.http import splice as http_splice
from tusd_py.http import splice_control as http_splice_control
from tusd_py.http.body import RequestBody
from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.http.types import BodyTimeout, ClientDisconnected, CopyableBody, Request, Response
from tusd_py.stores.base import FileTarget

MiB = 1024 * 1024
WAIT = 10.0

pytestmark = pytest.mark.skipif(not http_splice.SPLICE_SUPPORTED, reason="splice(2) is Linux only")


class SpliceSpy:
    """Counts the bytes the splice worker took from sockets (called on pool threads)."""

    def __init__(self) -> None:
        self.calls = 0
        self.consumed = 0
        self._lock = threading.Lock()

    def wrap(self, real: Callable[..., http_splice.SpliceResult]) -> Callable[..., http_splice.SpliceResult]:
        def spy(*args: Any) -> http_splice.SpliceResult:
            result = real(*args)
            with self._lock:
                self.calls += 1
                self.consumed += result.consumed
            return result

        return spy


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> SpliceSpy:
    spy = SpliceSpy()
    monkeypatch.setattr(http_splice, "splice_socket_to_file", spy.wrap(http_splice.splice_socket_to_file))
    monkeypatch.setattr(http_splice_control, "SPLICE_MIN_WAITING", 1)
    return spy


@contextlib.asynccontextmanager
async def running(handler: Callable[[Request], Awaitable[Response]], **limits: Any) -> AsyncIterator[int]:
    server = HTTPServer(handler, HTTPLimits(**limits))
    port = await server.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await server.stop(1.0)


class SplicingHandler:
    """Splices each request body into its own file; answers with the byte count.

    ``before_splice`` (awaited first) lets a test order events without sleeping."""

    def __init__(self, directory: Path, before_splice: Callable[[Request], Awaitable[None]] | None = None) -> None:
        self.directory = directory
        self.before_splice = before_splice
        self.results: asyncio.Queue[tuple[int, BaseException | None, bytes]] = asyncio.Queue()
        self._count = 0

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET":
            return Response(200, [], b"next")
        body = request.body
        assert isinstance(body, CopyableBody)
        if self.before_splice is not None:
            await self.before_splice(request)
        self._count += 1
        path = self.directory / f"body-{self._count}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        total = 0
        error: BaseException | None = None
        try:
            while True:
                moved = await body.copy_into(FileTarget(fd, total), 3 * MiB)
                assert moved is not None  # the body can be copied
                if not moved:
                    break
                total += moved
        except (ClientDisconnected, BodyTimeout) as raised:
            error = raised
        finally:
            os.close(fd)
        assert body.received == total
        await self.results.put((total, error, path.read_bytes()))
        return Response(200, [], str(total).encode())


class HeldHandler:
    """Holds ``SplicingHandler`` before its splice: ``queued`` tells how many body
    bytes the connection had read with the head (queued before the handler ran),
    and the handler goes on once the test sets ``proceed``."""

    def __init__(self) -> None:
        self.queued: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.proceed = asyncio.Event()

    async def before_splice(self, request: Request) -> None:
        assert isinstance(request.body, RequestBody)
        self.queued.set_result(request.body.buffered)
        await self.proceed.wait()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def head(length: int, target: str = "/b") -> bytes:
    return f"PATCH {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


async def read_text_response(connection: RawConnection) -> bytes:
    return (await connection.read_response("PATCH", timeout=WAIT)).body


@pytest.mark.both_loops
async def test_large_body_is_spliced_exactly(spy: SpliceSpy, tmp_path: Path) -> None:
    payload = os.urandom(24 * MiB + 12345)
    handler = SplicingHandler(tmp_path)
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(head(len(payload)) + payload)
            assert await read_text_response(connection) == str(len(payload)).encode()
            total, error, stored = await handler.results.get()
        finally:
            await connection.close()
    assert error is None and total == len(payload)
    assert sha(stored) == sha(payload)
    assert spy.calls > 0 and spy.consumed > 0


@pytest.mark.both_loops
async def test_bytes_queued_before_the_splice_come_first(spy: SpliceSpy, tmp_path: Path) -> None:
    payload = os.urandom(8 * MiB)
    first = 100_000
    gate = HeldHandler()
    handler = SplicingHandler(tmp_path, gate.before_splice)
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(head(len(payload)) + payload[:first])
            assert 0 < await asyncio.wait_for(gate.queued, WAIT) <= first
            gate.proceed.set()
            await connection.send(payload[first:])
            assert await read_text_response(connection) == str(len(payload)).encode()
            total, error, stored = await handler.results.get()
        finally:
            await connection.close()
    assert error is None and total == len(payload)
    assert sha(stored) == sha(payload)
    assert spy.consumed > 0


@pytest.mark.both_loops
async def test_pipelined_request_after_a_spliced_body_is_answered(spy: SpliceSpy, tmp_path: Path) -> None:
    payload = os.urandom(6 * MiB + 7)
    handler = SplicingHandler(tmp_path)
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(head(len(payload)) + payload + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await read_text_response(connection) == str(len(payload)).encode()
            assert (await connection.read_response("GET", timeout=WAIT)).body == b"next"
            total, _, stored = await handler.results.get()
        finally:
            await connection.close()
    assert total == len(payload) and sha(stored) == sha(payload)
    assert spy.consumed > 0


@pytest.mark.both_loops
async def test_disconnect_mid_body_keeps_every_arrived_byte(spy: SpliceSpy, tmp_path: Path) -> None:
    payload = os.urandom(5 * MiB + 99)
    handler = SplicingHandler(tmp_path)
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        await connection.send(head(len(payload) + 1000) + payload)
        await connection.close()  # 1000 bytes short
        total, error, stored = await asyncio.wait_for(handler.results.get(), WAIT)
    assert isinstance(error, ClientDisconnected)
    assert total == len(payload)
    assert sha(stored) == sha(payload)


@pytest.mark.both_loops
async def test_body_timeout_during_a_splice(spy: SpliceSpy, tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB)
    handler = SplicingHandler(tmp_path)
    async with running(handler, body_timeout=0.3) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(head(len(payload) + 1) + payload)  # then stalls, socket open
            response = await connection.read_response("PATCH", timeout=WAIT)
            total, error, stored = await handler.results.get()
        finally:
            await connection.close()
    assert isinstance(error, BodyTimeout)
    assert response.body == str(len(payload)).encode()
    assert response.header("connection") == "close"
    assert total == len(payload) and sha(stored) == sha(payload)


@pytest.mark.both_loops
async def test_splice_unavailable_falls_back(monkeypatch: pytest.MonkeyPatch, spy: SpliceSpy, tmp_path: Path) -> None:
    monkeypatch.setattr(http_splice, "SPLICE_SUPPORTED", False)
    seen: list[bool] = []

    async def handler(request: Request) -> Response:
        body = request.body
        assert isinstance(body, CopyableBody)
        seen.append(await body.copy_into(FileTarget(-1, 0), MiB) is not None)
        data = b"".join([chunk async for chunk in body])
        return Response(200, [], sha(data).encode())

    payload = os.urandom(4 * MiB)
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(head(len(payload)) + payload)
            assert await read_text_response(connection) == sha(payload).encode()
        finally:
            await connection.close()
    assert seen == [False]
    assert spy.calls == 0


# -- end to end: the file store's PATCH --------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(file_store_config(tmp_path)) as running:
        yield running


@pytest.mark.both_loops
async def test_file_store_patch_is_spliced(spy: SpliceSpy, server: Running, tmp_path: Path) -> None:
    payload = os.urandom(20 * MiB + 3)
    path = await create(server.port, len(payload))
    connection = await RawConnection.open(server.port)
    try:
        await connection.send(patch_head(path, 0, len(payload)) + payload)
        response = await connection.read_response("PATCH", timeout=WAIT)
    finally:
        await connection.close()
    assert response.status == 204
    assert response.header("upload-offset") == str(len(payload))
    assert sha(stored_bytes(tmp_path, path)) == sha(payload)
    assert spy.consumed > 0


@pytest.mark.both_loops
async def test_file_store_disconnect_keeps_every_byte(spy: SpliceSpy, server: Running, tmp_path: Path) -> None:
    payload = os.urandom(8 * MiB)
    sent = 6 * MiB + 5
    path = await create(server.port, len(payload))
    connection = await RawConnection.open(server.port)
    await connection.send(patch_head(path, 0, len(payload)) + payload[:sent])
    await connection.close()
    assert await head_offset(server.port, path) == sent
    assert sha(stored_bytes(tmp_path, path)) == sha(payload[:sent])


@pytest.mark.both_loops
async def test_file_store_stalled_splice_is_released(spy: SpliceSpy, server: Running, tmp_path: Path) -> None:
    """A client stalls mid-PATCH; a HEAD asks the holder to let go: it stops within
    the drain window, keeps what arrived and answers."""
    payload = os.urandom(8 * MiB)
    sent = 5 * MiB + 17
    path = await create(server.port, len(payload))
    stalled = await RawConnection.open(server.port)
    try:
        await stalled.send(patch_head(path, 0, len(payload)) + payload[:sent])
        assert await head_offset(server.port, path) == sent
        answer = await stalled.read_response("PATCH", timeout=WAIT)
        assert answer.status == 204
        assert answer.header("upload-offset") == str(sent)
    finally:
        await stalled.close()
    assert sha(stored_bytes(tmp_path, path)) == sha(payload[:sent])


@pytest.mark.both_loops
async def test_file_store_falls_back_without_splice(
    monkeypatch: pytest.MonkeyPatch, spy: SpliceSpy, tmp_path: Path
) -> None:
    monkeypatch.setattr(http_splice, "SPLICE_SUPPORTED", False)
    async with serving(file_store_config(tmp_path)) as running:
        payload = os.urandom(6 * MiB)
        path = await create(running.port, len(payload))
        response = await request(
            running.port,
            "PATCH",
            path,
            {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
            payload,
        )
        assert response.status == 204
        assert sha(stored_bytes(tmp_path, path)) == sha(payload)
    assert spy.calls == 0


async def test_a_head_read_leaves_the_body_in_the_socket(spy: SpliceSpy, tmp_path: Path) -> None:
    """A head and its body sent at once: the head read takes at most
    ``HEAD_READ_SIZE`` bytes, so all but a few KiB of the body are spliced, not
    copied into a ``bytes`` object and written on their own."""
    payload = os.urandom(1 * MiB)
    gate = HeldHandler()
    handler = SplicingHandler(tmp_path, gate.before_splice)
    request_head = head(len(payload))
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(request_head + payload)
            already = await asyncio.wait_for(gate.queued, WAIT)
            gate.proceed.set()
            assert await read_text_response(connection) == str(len(payload)).encode()
        finally:
            await connection.close()
    total, error, stored = await handler.results.get()
    assert error is None and sha(stored) == sha(payload)
    assert already <= http_intake.HEAD_READ_SIZE - len(request_head)
    assert spy.consumed == len(payload) - already


async def test_copy_into_a_complete_body_leaves_reading_alone(
    spy: SpliceSpy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy that finds the body complete (every store makes one, to learn that
    the body ended) returns 0 without holding and releasing the socket's reading,
    which cost a pause, a resume and a loop turn per request."""
    holds: list[bool] = []
    real_hold = http_splice_control.SpliceControl.hold

    def recording(self: http_splice_control.SpliceControl, hold: bool) -> None:
        holds.append(hold)
        real_hold(self, hold)

    monkeypatch.setattr(http_splice_control.SpliceControl, "hold", recording)
    payload = os.urandom(1 * MiB)
    gate = HeldHandler()
    handler = SplicingHandler(tmp_path, gate.before_splice)
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(head(len(payload)) + payload)
            await asyncio.wait_for(gate.queued, WAIT)
            gate.proceed.set()  # the whole body is in the socket: one copy takes it
            assert await read_text_response(connection) == str(len(payload)).encode()
        finally:
            await connection.close()
    total, error, stored = await handler.results.get()
    assert error is None and sha(stored) == sha(payload)
    assert holds == [True, False]  # the copy that moved the body; none for the one that found it complete


@pytest.mark.both_loops
async def test_file_store_patch_runs_in_its_request_task_alone(
    spy: SpliceSpy, server: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spliced PATCH needs no task besides its request's, no ``threading.Event`` and
    no generator-based context manager: the worker call is awaited as a plain future
    (no task of its own, which cost a loop turn before the thread started and another
    after it ended), a lost lock is watched by a callback (not a task waiting on the
    event), the copy's stop flags are plain attributes (an Event is a lock and a
    condition per copy), and the lock, the store's kept state and the progress events
    are plain context managers (the generator machinery cost more than their work)."""
    payload = os.urandom(2 * MiB)
    path = await create(server.port, 2 * len(payload))
    loop = asyncio.get_running_loop()
    tasks: list[str] = []
    real_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        frame = getattr(coro, "cr_frame", None)
        if frame is None or not frame.f_globals.get("__name__", "").startswith("tests."):
            tasks.append(getattr(coro, "__qualname__", repr(coro)))  # the server's, not the test client's
        if real_factory is not None:
            return real_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    events: list[str] = []

    class CountingEvent(threading.Event):
        def __init__(self) -> None:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("tusd_py"):
                events.append(caller)
            super().__init__()

    generator_managers: list[str] = []
    real_manager_init = contextlib._GeneratorContextManagerBase.__init__  # type: ignore[attr-defined]

    def counting_manager_init(self: Any, func: Any, args: Any, kwds: Any) -> None:
        if func.__module__.startswith("tusd_py"):
            generator_managers.append(func.__qualname__)
        real_manager_init(self, func, args, kwds)

    connection = await RawConnection.open(server.port)
    try:
        for offset in (0, len(payload)):  # a PATCH that creates the data file, one that reuses it
            loop.set_task_factory(counting_factory)
            monkeypatch.setattr(threading, "Event", CountingEvent)
            monkeypatch.setattr(contextlib._GeneratorContextManagerBase, "__init__", counting_manager_init)
            try:
                await connection.send(patch_head(path, offset, len(payload)) + payload)
                response = await connection.read_response("PATCH", timeout=WAIT)
            finally:
                loop.set_task_factory(real_factory)
                monkeypatch.undo()
            assert response.status == 204
            assert tasks == ["RequestCycle.run"]
            assert events == []
            assert generator_managers == []
            tasks.clear()
    finally:
        await connection.close()
    assert sha(stored_bytes(tmp_path, path)) == sha(payload + payload)
    assert spy.consumed > 0


# --- the worker function on its own ---------------------------------------------------------


@contextlib.contextmanager
def tcp_pair() -> Any:
    """A connected loopback TCP pair: (sender, non-blocking receiver)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    receiver.setblocking(False)
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def low_water_mark(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def test_worker_moves_a_whole_body_and_restores_the_low_water_mark(tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB + 7)
    with tcp_pair() as (sender, receiver):
        feeder = threading.Thread(target=sender.sendall, args=(payload,))
        feeder.start()
        fd = os.open(tmp_path / "body", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            result = http_splice.splice_socket_to_file(receiver.fileno(), fd, 5, len(payload), (), idle=WAIT)
        finally:
            os.close(fd)
            feeder.join()
        assert (result.consumed, result.moved, result.eof) == (len(payload), len(payload), False)
        assert (tmp_path / "body").read_bytes()[5:] == payload
        # The event loop polls this socket next: readiness must mean "one byte".
        assert low_water_mark(receiver) == 1


def test_worker_takes_bytes_below_the_wake_threshold_before_going_idle(tmp_path: Path) -> None:
    """A client that sends less than ``WAKE_BYTES`` and pauses still has every byte
    stored: the worker looks at the socket between poll slices, not only on wake-ups."""
    payload = os.urandom(1000)
    assert len(payload) < http_splice.WAKE_BYTES
    with tcp_pair() as (sender, receiver):
        sender.sendall(payload)
        fd = os.open(tmp_path / "body", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # 1 MiB announced, 1000 bytes sent: the worker hands back after the idle gap.
            result = http_splice.splice_socket_to_file(receiver.fileno(), fd, 0, MiB, (), idle=0.2)
        finally:
            os.close(fd)
        assert (result.consumed, result.moved, result.eof) == (1000, 1000, False)
        assert (tmp_path / "body").read_bytes() == payload
        assert low_water_mark(receiver) == 1
        # The socket still works for the event loop: the next bytes are readable at once.
        sender.sendall(b"x")
        assert select.select([receiver], [], [], WAIT)[0] == [receiver]


async def test_queued_bytes_and_the_socket_rest_go_in_one_worker_call(
    spy: SpliceSpy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Body bytes read with the head and the rest waiting in the socket are written
    by one worker call (queued bytes first), not two thread hand-offs."""
    calls: list[int] = []
    real = http_splice.write_then_splice

    def recording(*args: Any) -> http_splice.SpliceResult:
        calls.append(sum(len(chunk) for chunk in args[-1]))
        return real(*args)

    monkeypatch.setattr(http_splice, "write_then_splice", recording)
    payload = os.urandom(150_000)
    gate = HeldHandler()
    handler = SplicingHandler(tmp_path, gate.before_splice)
    async with running(handler) as port:
        connection = await RawConnection.open(port)
        try:
            await connection.send(head(len(payload)) + payload[:100_000])
            already = await asyncio.wait_for(gate.queued, WAIT)
            assert 0 < already <= 100_000
            # On loopback the rest is in the server's socket once sent.
            await connection.send(payload[100_000:])
            gate.proceed.set()
            assert await read_text_response(connection) == str(len(payload)).encode()
            total, error, stored = await handler.results.get()
        finally:
            await connection.close()
    assert error is None and total == len(payload)
    assert sha(stored) == sha(payload)
    assert calls[0] == already  # the queued bytes went with the first splice
    assert spy.consumed == len(payload) - already
