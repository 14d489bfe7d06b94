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
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tusclient import client as tus_client

from tests import nginx_support
from tests.nginx_support import RunningNginx, run_nginx
from tests.rawhttp import RawConnection
from tusd_py.cli import Running, serving
from tusd_py.config import MiB, load_config


@pytest.fixture(scope="module", autouse=True)
def _nginx_installed() -> None:
    try:
        nginx_support.nginx_binary()
    except nginx_support.NginxUnavailable as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{error}; .ci/run must install it")
        pytest.skip(str(error))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    config = load_config(
        environ={},
        overrides={
            "server.port": 0,
            "server.behind_proxy": True,
            "store.file.directory": str(tmp_path / "data"),
            "server.shutdown_timeout": 5.0,
        },
    )
    async with serving(config) as running:
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

    def upload() -> str:
        client = tus_client.TusClient(f"{nginx.url}/files/")
        with open(source, "rb") as stream:  # tuspy leaves a file it opened itself unclosed
            uploader = client.uploader(file_stream=stream, chunk_size=5 * MiB, metadata={"filename": "source.bin"})
            uploader.upload()
        return str(uploader.url)

    url = await asyncio.to_thread(upload)
    # behind_proxy: the upload URL names nginx (X-Forwarded-Host), not tusd-py's port.
    assert url.startswith(f"{nginx.url}/files/"), url

    def download() -> bytes:
        with urllib.request.urlopen(url, timeout=60) as response:
            return bytes(response.read())

    stored = await asyncio.to_thread(download)
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
