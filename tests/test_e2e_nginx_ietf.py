"""The IETF draft behind nginx: tus-js-client (``ietf-draft-05``, interop 6) uploads
through Debian's nginx with the shipped site config to the composed server with
``behind_proxy = true``.

nginx 1.22 takes a ``104 (Upload Resumption Supported)`` for the final response: it
passes the real ``201`` head on as body and leaves the upstream keep-alive connection
out of step, so every later request on it stalls until tusd-py's keep-alive timeout
(75 s). With ``behind_proxy`` the server sends no 104 (``server.interim_responses =
"auto"``), and every request answers at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import download, file_store_config

from tests.nginx_support import RunningNginx, run_nginx
from tests.test_ietf_js_client import NODE, run_client
from tusd_py.cli import Running, serving
from tusd_py.config import MiB

pytestmark = [
    pytest.mark.usefixtures("nginx_installed"),
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
]

FAST_MS = 1000
"""Every exchange answers well under this; a stalled upstream connection takes 75 s."""


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(file_store_config(tmp_path, **{"server.behind_proxy": True})) as running:
        yield running


@pytest.fixture
def nginx(server: Running) -> Iterator[RunningNginx]:
    with run_nginx([f"127.0.0.1:{server.port}"]) as running:
        yield running


def _source(tmp_path: Path, size: int) -> tuple[Path, str]:
    data = os.urandom(size)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


async def _upload(nginx: RunningNginx, tmp_path: Path, size: int, **options: Any) -> list[dict[str, Any]]:
    """Upload ``size`` random bytes through nginx; check them; the exchanges."""
    source, digest = _source(tmp_path, size)
    # A stalled request would end at tusd-py's keep-alive timeout (75 s): give up before.
    result = await run_client(f"{nginx.url}/files/", source, timeout=30, protocol="ietf-draft-05", **options)
    assert result["url"].startswith(f"{nginx.url}/files/"), result["url"]
    stored = await asyncio.to_thread(download, result["url"])
    assert hashlib.sha256(stored).hexdigest() == digest
    exchanges: list[dict[str, Any]] = result["exchanges"]
    for exchange in exchanges:
        assert exchange["request"]["upload-draft-interop-version"] == "6"
        assert exchange["milliseconds"] < FAST_MS, exchanges
    return exchanges


async def test_chunked_ietf_upload_through_nginx_answers_every_request_at_once(
    server: Running, nginx: RunningNginx, tmp_path: Path
) -> None:
    exchanges = await _upload(nginx, tmp_path, 3 * MiB + 123, chunkSize=MiB)
    assert [exchange["method"] for exchange in exchanges] == ["POST"] + ["PATCH"] * 4
    assert [exchange["status"] for exchange in exchanges] == [201, 204, 204, 204, 200]
    assert exchanges[-1]["response"]["upload-complete"] == "?1"


async def test_ietf_uploads_in_the_creation_request_through_nginx(
    server: Running, nginx: RunningNginx, tmp_path: Path
) -> None:
    # Several in a row: they share nginx's keep-alive connections to tusd-py.
    for _ in range(3):
        exchanges = await _upload(nginx, tmp_path, 256 * 1024, uploadDataDuringCreation=True)
        assert [(exchange["method"], exchange["status"]) for exchange in exchanges] == [("POST", 201)]
