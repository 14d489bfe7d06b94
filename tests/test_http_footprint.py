"""What an idle keep-alive connection costs the server: only its objects.

Python allocations made by the HTTP layer (``tusd_py``) and h11 are traced while
connections are opened and answered once; the client's own allocations (asyncio
streams) are filtered out. A read buffer owned by each connection (64 KiB) would
show up here; the shared per-thread buffer does not.
"""

from __future__ import annotations

import asyncio
import tracemalloc

import pytest

from tusd_py.http.server import HTTPLimits, HTTPServer
from tusd_py.http.types import Request, Response

CONNECTIONS = 200
MAX_BYTES_PER_CONNECTION = 16 * 1024
"""The issue's target for the whole process (RSS per idle connection); the Python
objects of the HTTP layer and h11 are a part of it."""
WAIT = 5.0


async def _ok(request: Request) -> Response:
    return Response(204, [])


def _server_bytes() -> int:
    """Run in a thread: a snapshot of the whole test process takes long enough to trip
    the test suite's blocked-loop detector on a loaded machine (the connections are
    idle meanwhile, so nothing they allocate is missed)."""
    filtered = tracemalloc.take_snapshot().filter_traces([
        tracemalloc.Filter(True, "*/tusd_py/*"),
        tracemalloc.Filter(True, "*/h11/*"),
    ])
    return sum(stat.size for stat in filtered.statistics("filename"))


@pytest.mark.both_loops
async def test_idle_keepalive_connections_hold_no_read_buffer() -> None:
    server = HTTPServer(_ok, HTTPLimits())
    port = await server.start("127.0.0.1", 0)
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    tracemalloc.start(1)
    try:
        # One connection answered first: the thread's shared buffer is allocated
        # before the baseline, as in a server that has served anything at all.
        for _ in range(CONNECTIONS + 1):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            streams.append((reader, writer))
            writer.write(b"OPTIONS / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 204 ")
            if len(streams) == 1:
                before = await asyncio.to_thread(_server_bytes)
        after = await asyncio.to_thread(_server_bytes)
        assert server.open_connections == CONNECTIONS + 1
    finally:
        tracemalloc.stop()
        for _, writer in streams:
            writer.close()
        await server.stop(1.0)
    per_connection = (after - before) / CONNECTIONS
    assert per_connection <= MAX_BYTES_PER_CONNECTION, f"{per_connection:.0f} bytes per idle connection"
