"""End to end behind nginx: the composed server (cli.serving with behind_proxy = true)
on a free port, Debian's nginx with the shipped site config (nginx/tusd-py.conf) in
front, and tuspy uploading through nginx.

nginx (Debian package ``nginx``) is required in CI (CI=true): there a missing binary
fails the tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import download, file_store_config, tuspy_upload

from tests.nginx_support import RunningNginx, run_nginx
from tests.rawhttp import RawConnection
from tusd_py.cli import Running, serving
from tusd_py.config import MiB

pytestmark = pytest.mark.usefixtures("nginx_installed")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(file_store_config(tmp_path, **{"server.behind_proxy": True})) as running:
        yield running


@pytest.fixture
def nginx(server: Running) -> Iterator[RunningNginx]:
    # Started from the test's thread: run_nginx blocks only until nginx listens.
    with run_nginx([f"127.0.0.1:{server.port}"]) as running:
        yield running


async def test_tuspy_upload_through_nginx(server: Running, nginx: RunningNginx, tmp_path: Path) -> None:
    payload = os.urandom(20 * MiB)
    source = tmp_path / "source.bin"
    source.write_bytes(payload)

    url = await asyncio.to_thread(tuspy_upload, f"{nginx.url}/files/", source, 5 * MiB, {"filename": "source.bin"})
    # behind_proxy: the upload URL names nginx (X-Forwarded-Host), not tusd-py's port.
    assert url.startswith(f"{nginx.url}/files/"), url

    stored = await asyncio.to_thread(download, url)
    assert len(stored) == len(payload)
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(payload).hexdigest()
    # Every PATCH went through nginx (its access log), in 5 MiB chunks.
    patches = [line for line in nginx.access_log().splitlines() if '"PATCH /files/' in line]
    assert len(patches) == 4, nginx.access_log()


async def _post_through(nginx: RunningNginx, host: str, extra: dict[str, str]) -> str | None:
    connection = await RawConnection.open(nginx.port)
    try:
        await connection.send_request("POST", "/files/", {"Upload-Length": "10", **extra}, host=host)
        response = await connection.read_response("POST")
    finally:
        await connection.close()
    assert response.status == 201, response
    return response.header("location")


async def test_location_follows_forwarded_proto(server: Running, nginx: RunningNginx) -> None:
    # A TLS-terminating load balancer in front of nginx says https.
    location = await _post_through(nginx, "uploads.example.com", {"X-Forwarded-Proto": "https"})
    assert location is not None and location.startswith("https://uploads.example.com/files/"), location
    # Without it, nginx's own scheme, and the host and port the client used.
    host = f"uploads.example.com:{nginx.port}"
    location = await _post_through(nginx, host, {})
    assert location is not None and location.startswith(f"http://{host}/files/"), location
