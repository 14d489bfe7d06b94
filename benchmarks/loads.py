"""Many-connection workloads of the suite: concurrent uploads, request rate, idle connections.

Each function drives one server process (``ServerProcess``: tusd-py, the peer, or the
sink as the limit) with raw-socket asyncio clients and returns a ``report.Row`` with
the server's cost over the measured span (``accounting.accounted``). The client runs on
uvloop when it is installed: these workloads are many small operations, where the
client's per-request cost matters most, and the client must not be the bottleneck.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

from benchmarks.accounting import accounted, status_kib
from benchmarks.common import MB, GiB, KiB, MiB, ServerFailed, ServerProcess, new_event_loop
from benchmarks.rawclient import TUS_VERSION, HTTPError, RawConnection, create_upload, patch_upload
from benchmarks.report import MB_PER_S, REQUESTS_PER_S, RSS_MIB, Row

HOST = "127.0.0.1"
BASE_PATH = "/files/"

_T = TypeVar("_T")


def run_client(coroutine: Coroutine[Any, Any, _T], server: ServerProcess) -> _T:
    """Run a client coroutine to completion on a fresh loop; a failure becomes
    ``ServerFailed`` carrying the server's log (a crash explains the error best)."""
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(coroutine)
    except (HTTPError, OSError, TimeoutError) as error:
        server.check_alive()
        raise ServerFailed(f"{server.name}: {error!r}\n{server.log_tail()}") from error


def _percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported latency was observed)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# --- 200 concurrent uploads --------------------------------------------------------------

@dataclass(frozen=True)
class Concurrent:
    """``uploads`` uploads of ``size`` bytes each, all PATCHed at once (one PATCH each)."""

    uploads: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.uploads} concurrent x {self.size // MiB}MiB"

    @property
    def total(self) -> int:
        return self.uploads * self.size


async def _concurrent(port: int, load: Concurrent, buffer: memoryview, request_timeout: float,
                      ) -> tuple[float, list[float]]:
    connections = [RawConnection(HOST, port, timeout=request_timeout) for _ in range(load.uploads)]
    try:
        # POSTs first and untimed, so the measured span is the PATCHes only and every
        # upload starts its PATCH at the same moment.
        paths = await asyncio.gather(*(create_upload(c, BASE_PATH, load.size) for c in connections))
        latencies: list[float] = []

        async def patch(connection: RawConnection, path: str) -> None:
            start = time.perf_counter()
            await patch_upload(connection, path, 0, load.size, buffer)
            latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(patch(c, p) for c, p in zip(connections, paths, strict=True)))
        return time.perf_counter() - start, latencies
    finally:
        for connection in connections:
            connection.close()


def measure_concurrent(server: ServerProcess, store: str, run: int, load: Concurrent, buffer: memoryview,
                       timeout: float = 600.0) -> Row:
    """All uploads at once: total MB/s, p50/p99 PATCH latency, server CPU per GiB."""
    with accounted(server.pid) as cost:
        seconds, latencies = run_client(_concurrent(server.port, load, buffer, timeout), server)
    server.check_alive()
    assert cost.server is not None
    gib = load.total / GiB
    return Row(store=store, workload=load.name, target=server.name, run=run, value=load.total / MB / seconds,
               unit=MB_PER_S, server_cpu=cost.server.cpu_seconds / gib, client_cpu=cost.client_cpu_seconds / gib,
               peak_rss_mib=cost.server.peak_rss_bytes / MiB, p50_ms=_percentile(latencies, 0.5) * 1000,
               p99_ms=_percentile(latencies, 0.99) * 1000, other_cpu_s=cost.other_cpu_seconds)


# --- small-request rate ------------------------------------------------------------------

@dataclass(frozen=True)
class RequestRate:
    """``connections`` keep-alive connections, each sending ``method`` requests one after
    the other (no pipelining) for ``seconds``."""

    method: str
    connections: int
    seconds: float
    held_idle: int = 0
    """Idle keep-alive connections opened first and held while the rate is measured."""

    @property
    def name(self) -> str:
        held = f", {self.held_idle:,} idle held" if self.held_idle else ""
        return f"{self.method} rate, {self.connections} conns{held}"


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)


class _RateProtocol(asyncio.Protocol):
    """Sends the next request from the callback that completes the previous response.

    A protocol rather than ``RawConnection``: no coroutine, task or future per request,
    so the client's cost per request is a parse of one small response head.
    """

    def __init__(self, requests: list[bytes], expected_status: bytes, head_only: bool, deadline: float,
                 latencies: list[float], finished: asyncio.Future[None]) -> None:
        self._requests = requests
        self._next = 0
        self._expected_status = expected_status
        self._head_only = head_only
        self._deadline = deadline
        self._latencies = latencies
        self._finished = finished
        self._pending = b""
        self._sent_at = 0.0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        request = self._requests[self._next % len(self._requests)]
        self._next += 1
        self._sent_at = time.perf_counter()
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        self._pending += data
        while (end := self._pending.find(b"\r\n\r\n")) >= 0:
            head = self._pending[:end]
            body_start = end + 4
            if head[9:12] != self._expected_status:
                self._fail(HTTPError(f"expected {self._expected_status!r}, got {head[:200]!r}"))
                return
            if self._head_only:
                body_end = body_start
            elif (length := _CONTENT_LENGTH.search(head)) is not None:
                body_end = body_start + int(length.group(1))
            elif _CHUNKED.search(head):
                # Only empty chunked bodies are expected (Node answers a POST so).
                terminator = self._pending.find(b"0\r\n\r\n", body_start)
                body_end = terminator + 5 if terminator >= 0 else len(self._pending) + 1
            else:
                body_end = body_start
            if body_end > len(self._pending):
                return  # the rest of the body is still on its way
            self._pending = self._pending[body_end:]
            now = time.perf_counter()
            self._latencies.append(now - self._sent_at)
            if now < self._deadline:
                self._send()
            elif not self._finished.done():
                self._finished.set_result(None)

    def _fail(self, error: Exception) -> None:
        if not self._finished.done():
            self._finished.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(HTTPError(f"server closed the connection ({exc!r})"))


def _request_bytes(method: str, target: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{port}", f"Tus-Resumable: {TUS_VERSION}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def request_rate(port: int, load: RequestRate, request_timeout: float) -> tuple[float, list[float]]:
    """Drive ``load`` against ``port``: the seconds it ran and each request's latency."""
    loop = asyncio.get_running_loop()
    if load.method == "HEAD":
        # One upload per connection: HEADs of one upload would queue on its lock in
        # tusd-py and measure lock contention instead of request handling.
        async def make_upload() -> str:
            async with RawConnection(HOST, port, timeout=request_timeout) as connection:
                return await create_upload(connection, BASE_PATH, MiB)

        paths = await asyncio.gather(*(make_upload() for _ in range(load.connections)))
        plans = [([_request_bytes("HEAD", path, port, {})], b"200", True) for path in paths]
    elif load.method == "POST":
        post = _request_bytes("POST", BASE_PATH, port, {"Upload-Length": str(MiB), "Content-Length": "0"})
        plans = [([post], b"201", False)] * load.connections
    elif load.method == "OPTIONS":
        plans = [([_request_bytes("OPTIONS", BASE_PATH, port, {})], b"204", False)] * load.connections
    else:
        raise ValueError(f"no request-rate plan for {load.method}")
    latencies: list[float] = []
    transports: list[asyncio.BaseTransport] = []
    finished: list[asyncio.Future[None]] = []
    held = [RawConnection(HOST, port, timeout=request_timeout) for _ in range(load.held_idle)]
    try:
        for first in range(0, len(held), _CONNECT_BATCH):
            await asyncio.gather(*(_open_idle(c) for c in held[first:first + _CONNECT_BATCH]))
        start = time.perf_counter()
        deadline = start + load.seconds
        for requests, status, head_only in plans:
            done: asyncio.Future[None] = loop.create_future()
            protocol = partial(_RateProtocol, requests, status, head_only, deadline, latencies, done)
            transport, _ = await loop.create_connection(protocol, HOST, port)
            transports.append(transport)
            finished.append(done)
        async with asyncio.timeout(load.seconds + request_timeout):
            await asyncio.gather(*finished)
        seconds = time.perf_counter() - start
        dropped = sum(c.reconnects for c in held)
        if dropped:
            raise HTTPError(f"the server closed {dropped} of {len(held)} held idle connections")
        return seconds, latencies
    finally:
        for opened in transports:
            opened.close()
        for connection in held:
            connection.close()


def measure_request_rate(server: ServerProcess, store: str, run: int, load: RequestRate,
                         timeout: float = 30.0) -> Row:
    """Requests per second over ``load.seconds``, p50/p99 latency, CPU per request."""
    with accounted(server.pid) as cost:
        seconds, latencies = run_client(request_rate(server.port, load, timeout), server)
    server.check_alive()
    assert cost.server is not None
    count = len(latencies)
    return Row(store=store, workload=load.name, target=server.name, run=run, value=count / seconds,
               unit=REQUESTS_PER_S, server_cpu=cost.server.cpu_seconds / count * 1e6,
               client_cpu=cost.client_cpu_seconds / count * 1e6, cpu_unit="µs/req",
               peak_rss_mib=cost.server.peak_rss_bytes / MiB, p50_ms=_percentile(latencies, 0.5) * 1000,
               p99_ms=_percentile(latencies, 0.99) * 1000, other_cpu_s=cost.other_cpu_seconds)


# --- idle connections and slow uploads ---------------------------------------------------

@dataclass(frozen=True)
class IdleAndSlow:
    """``idle`` keep-alive connections that sent one request and wait, while ``slow``
    uploads each send a PATCH at ``bytes_per_second`` for ``seconds``."""

    idle: int
    slow: int
    bytes_per_second: int
    seconds: float

    @property
    def name(self) -> str:
        return f"{self.idle} idle + {self.slow} slow ({self.bytes_per_second // KiB}KiB/s)"


# Connections opened at once: a burst of 1,000 SYNs would overflow a listen backlog of
# 100 and cost one-second SYN retries that say nothing about the server.
_CONNECT_BATCH = 50


async def _open_idle(connection: RawConnection) -> None:
    # One request, so the connection is an idle keep-alive connection (governed by the
    # keep-alive timeout) rather than one that never sent a head.
    response = await connection.request("OPTIONS", BASE_PATH, {"Tus-Resumable": TUS_VERSION})
    if response.status not in (200, 204):
        raise HTTPError(f"OPTIONS {BASE_PATH}: {response.status}")


async def _idle_and_slow(port: int, load: IdleAndSlow, buffer: memoryview, request_timeout: float,
                         idle_opened: Callable[[], None]) -> None:
    idle = [RawConnection(HOST, port, timeout=request_timeout) for _ in range(load.idle)]
    slow = [RawConnection(HOST, port, timeout=request_timeout) for _ in range(load.slow)]
    size = int(load.bytes_per_second * load.seconds)

    async def slow_upload(connection: RawConnection) -> None:
        path = await create_upload(connection, BASE_PATH, size)
        response = await connection.request(
            "PATCH", path,
            {"Tus-Resumable": TUS_VERSION, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
            body=buffer, body_length=size, bytes_per_second=load.bytes_per_second,
        )
        if response.status != 204 or int(response.header("Upload-Offset")) != size:
            raise HTTPError(f"slow PATCH {path}: {response.status} {response.headers}")

    try:
        for first in range(0, len(idle), _CONNECT_BATCH):
            await asyncio.gather(*(_open_idle(c) for c in idle[first:first + _CONNECT_BATCH]))
        idle_opened()
        await asyncio.gather(*(slow_upload(c) for c in slow))
        # Every idle connection must still be open: a server that dropped them would
        # look cheap. One more request on each proves it (reconnects count drops).
        for first in range(0, len(idle), _CONNECT_BATCH):
            await asyncio.gather(*(_open_idle(c) for c in idle[first:first + _CONNECT_BATCH]))
        dropped = sum(c.reconnects for c in idle)
        if dropped:
            raise HTTPError(f"the server closed {dropped} of {len(idle)} idle connections")
    finally:
        for connection in idle + slow:
            connection.close()


def measure_idle_and_slow(server: ServerProcess, store: str, run: int, load: IdleAndSlow, buffer: memoryview,
                          timeout: float = 120.0) -> Row:
    """Peak RSS while holding the connections, and the RSS each idle connection and each
    slow upload added (RSS read before, once the idle connections are open, and at the peak)."""
    before = status_kib(server.pid, "VmRSS") * KiB
    idle_rss: list[int] = []
    with accounted(server.pid) as cost:
        run_client(_idle_and_slow(server.port, load, buffer, timeout,
                                  lambda: idle_rss.append(status_kib(server.pid, "VmRSS") * KiB)), server)
    server.check_alive()
    assert cost.server is not None
    peak = cost.server.peak_rss_bytes
    return Row(store=store, workload=load.name, target=server.name, run=run, value=peak / MiB, unit=RSS_MIB,
               server_cpu=cost.server.cpu_seconds, client_cpu=cost.client_cpu_seconds, cpu_unit="s",
               peak_rss_mib=peak / MiB, rss_per_idle_kib=max(0, idle_rss[0] - before) / load.idle / KiB,
               rss_per_slow_kib=max(0, peak - idle_rss[0]) / load.slow / KiB, other_cpu_s=cost.other_cpu_seconds)
