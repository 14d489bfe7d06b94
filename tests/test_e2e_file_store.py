"""End to end on the embedded file store: the composed server (cli.serving) on a free
port, real clients (tuspy) and raw sockets for interrupted and concurrent PATCHes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import create, download, file_store_config, head_offset, patch_head, tuspy_upload

from tests.conftest import free_port, wait_for_port
from tests.rawhttp import RawConnection, request
from tusd_py.cli import Running, serving
from tusd_py.config import MiB

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(file_store_config(tmp_path)) as running:
        yield running


@pytest.mark.both_loops
async def test_tuspy_uploads_50_mib_in_1_mib_chunks(server: Running, tmp_path: Path) -> None:
    # 50 MiB are made, written and hashed in threads: the loop serves the upload.
    payload = await asyncio.to_thread(os.urandom, 50 * MiB)
    source = tmp_path / "source.bin"
    await asyncio.to_thread(source.write_bytes, payload)

    url = await asyncio.to_thread(tuspy_upload, f"{server.url}/files/", source, 1 * MiB, {"filename": "source.bin"})
    stored = await asyncio.to_thread(download, url)
    assert await asyncio.to_thread(_sha256, stored) == await asyncio.to_thread(_sha256, payload)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.both_loops
async def test_interrupted_patch_keeps_every_byte_then_resumes(server: Running) -> None:
    payload = os.urandom(3 * MiB + 123)
    path = await create(server.port, len(payload))
    sent = 1 * MiB + 4567

    connection = await RawConnection.open(server.port)
    await connection.send(patch_head(path, 0, len(payload)) + payload[:sent])
    await connection.close()  # the client goes away mid-body

    assert await head_offset(server.port, path) == sent
    response = await request(
        server.port,
        "PATCH",
        path,
        {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(sent)},
        payload[sent:],
    )
    assert response.status == 204
    assert response.header("upload-offset") == str(len(payload))
    download = await request(server.port, "GET", path)
    assert download.body == payload


async def test_stalled_patch_is_taken_over_by_a_resuming_client(server: Running) -> None:
    """A client stalls mid-PATCH with its socket open; the same client resumes on a new
    connection: the HEAD asks the stalled holder to let go, which stores what it got."""
    payload = os.urandom(2 * MiB)
    path = await create(server.port, len(payload))
    stalled = await RawConnection.open(server.port)
    half = len(payload) // 2
    await stalled.send(patch_head(path, 0, len(payload)) + payload[:half])
    try:
        assert await head_offset(server.port, path) == half
        response = await request(
            server.port,
            "PATCH",
            path,
            {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(half)},
            payload[half:],
        )
        assert response.status == 204, response
        assert (await request(server.port, "GET", path)).body == payload
    finally:
        await stalled.close()


async def test_two_concurrent_patches_never_corrupt(server: Running) -> None:
    payload = os.urandom(4 * MiB)
    path = await create(server.port, len(payload))

    async def patch_from_zero() -> int:
        connection = await RawConnection.open(server.port)
        try:
            await connection.send(patch_head(path, 0, len(payload)))
            for start in range(0, len(payload), 256 * 1024):
                await connection.send(payload[start : start + 256 * 1024])
            response = await connection.read_response("PATCH")
            return response.status
        except (ConnectionError, asyncio.IncompleteReadError):
            return 0
        finally:
            await connection.close()

    statuses = await asyncio.gather(patch_from_zero(), patch_from_zero())
    assert 204 in statuses or 409 in statuses, statuses
    offset = await head_offset(server.port, path)
    stored = (await request(server.port, "GET", path)).body if offset == len(payload) else None
    if stored is not None:
        assert stored == payload
    else:
        # Finish the upload from the reported offset; the result must be exact.
        response = await request(
            server.port,
            "PATCH",
            path,
            {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)},
            payload[offset:],
        )
        assert response.status == 204
        assert (await request(server.port, "GET", path)).body == payload


def test_tusd_py_command_serves_and_shuts_down_gracefully(tmp_path: Path) -> None:
    """The README's command: `tusd-py` on the file store; SIGTERM during a stalled
    PATCH stores what arrived and the process exits within shutdown_timeout."""
    port = free_port()
    directory = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "tusd_py.cli", "--port", str(port), "--directory", str(directory)],
        env={**os.environ, "TUSD_PY_SERVER_SHUTDOWN_TIMEOUT": "5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process=process)

        async def scenario() -> tuple[str, int]:
            options = await request(port, "OPTIONS", "/files/")
            assert options.status == 204 and options.header("tus-version") == "1.0.0"
            path = await create(port, 1 * MiB)
            stalled = await RawConnection.open(port)
            await stalled.send(patch_head(path, 0, 1 * MiB) + b"x" * 1000)
            # A round trip on another connection: the loop has handled the stalled
            # connection's earlier bytes by the time it answers (they were readable first).
            assert (await request(port, "OPTIONS", "/files/")).status == 204
            process.send_signal(signal.SIGTERM)
            answer = await stalled.read_response("PATCH", timeout=10)
            assert answer.status == 204, answer
            assert await stalled.is_closed_by_peer(timeout=10)
            await stalled.close()
            return path, int(answer.header("upload-offset") or -1)

        path, offset = asyncio.run(scenario())
        assert process.wait(timeout=10) == 0
        assert offset == 1000
        assert (directory / path.rsplit("/", 1)[1]).read_bytes() == b"x" * 1000
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0].decode(errors="replace")
    assert "listening on" in output
