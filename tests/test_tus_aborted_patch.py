"""A PATCH whose client hangs up mid-body, end to end on the file store (whose PATCH
bodies are spliced from the socket into the file): the bytes that arrived are stored,
and the exchange is logged and counted as aborted (status 0), not as a 204."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import create, file_store_config, head_offset, patch_head

from tests.rawhttp import RawConnection
from tusd_py.cli import Running, serving

pytestmark = pytest.mark.both_loops


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(file_store_config(tmp_path)) as running:
        yield running


async def _scrape(port: int) -> str:
    connection = await RawConnection.open(port)
    try:
        await connection.send_request("GET", "/metrics")
        return (await connection.read_response("GET")).body.decode()
    finally:
        await connection.close()


def _patches(metrics: str, status: str) -> int:
    match = re.search(rf'tusd_py_requests_duration_seconds_count{{method="PATCH",status="{status}"}} (\S+)', metrics)
    return int(float(match.group(1))) if match else 0


class _PatchLines(logging.Handler):
    """Collects the access log's PATCH lines; ``logged`` is set at the first one (the
    access log is written on the event loop's thread, after the exchange ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("PATCH "):
            self.records.append(record)
            self.logged.set()


async def test_a_patch_cut_off_mid_body_is_logged_and_counted_as_aborted(server: Running) -> None:
    size = 4 * 1024 * 1024
    path = await create(server.port, size)
    half = size // 2
    lines = _PatchLines()
    access = logging.getLogger("tusd_py.access")
    level = access.level
    access.addHandler(lines)
    access.setLevel(logging.INFO)
    try:
        client = await RawConnection.open(server.port)
        await client.send(patch_head(path, 0, size) + b"z" * half)
        await client.close()
        async with asyncio.timeout(30):
            await lines.logged.wait()
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    assert await head_offset(server.port, path) == half  # what arrived is stored
    assert [(record.status, record.bytes_in) for record in lines.records] == [(0, half)]  # type: ignore[attr-defined]
    metrics = await _scrape(server.port)
    assert (_patches(metrics, "0"), _patches(metrics, "204")) == (1, 0)
