"""Access control with real clients and a real proxy, against the README's own example
receiver (the Python block of "Authentication and access control", run as a
subprocess): tus-js-client (Node) and tuspy upload with the right bearer token, another
user's token gets 403 on every verb, and the same through Debian's nginx with the
shipped site config (credentials pass the proxy).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import file_store_config, path_of, tuspy_upload
from test_ietf_js_client import NODE, run_client

from tests.conftest import free_port, stop_process, wait_for_port
from tests.nginx_support import RunningNginx, run_nginx
from tests.rawhttp import request
from tusd_py.cli import Running, serving
from tusd_py.config import Config, MiB

README = Path(__file__).resolve().parent.parent / "README.md"
SECRET = "readme-receiver-secret"
ALICE = {"Authorization": "Bearer alice-secret"}
BOB = {"Authorization": "Bearer bob-secret"}


def readme_receiver_source() -> str:
    section = README.read_text().split("\n### Authentication and access control\n", 1)[1].split("\n### ", 1)[0]
    [source] = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return str(source)


@pytest.fixture
def receiver_url(tmp_path: Path) -> Iterator[str]:
    """The README's receiver, running on a free port."""
    script = tmp_path / "receiver.py"
    script.write_text(readme_receiver_source())
    port = free_port()
    environment = {**os.environ, "HOOK_SECRET": SECRET, "PORT": str(port)}
    process = subprocess.Popen([sys.executable, str(script)], env=environment, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30, process)
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        stop_process(process)


def access_config(tmp_path: Path, url: str, **overrides: object) -> Config:
    return file_store_config(
        tmp_path,
        **{
            "hooks.url": url,
            "hooks.events": ["pre-create", "pre-access"],
            "hooks.secret": SECRET,
            "hooks.retries": 0,
            **overrides,
        },
    )


async def assert_others_refused(port: int, path: str, length: int) -> None:
    """Bob gets 403 on every verb; no token gets 401; alice still sees everything."""
    patch = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(length)}
    for token, status in ((BOB, 403), ({}, 401)):
        for method, extra, body in (("HEAD", {}, b""), ("PATCH", patch, b"x"), ("GET", {}, b""), ("DELETE", {}, b"")):
            refused = await request(port, method, path, {**extra, **token}, body)
            assert refused.status == status, (method, token, refused)
    head = await request(port, "HEAD", path, ALICE)
    assert head.status == 200 and head.header("upload-offset") == str(length)


def test_the_readme_receiver_is_the_one_shown() -> None:
    source = readme_receiver_source()
    assert '"owner": user' in source and "compare_digest" in source


@pytest.fixture
async def server(tmp_path: Path, receiver_url: str) -> AsyncIterator[Running]:
    async with serving(access_config(tmp_path, receiver_url, **{"server.behind_proxy": True})) as running:
        yield running


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("protocol", ["tus-v1", "ietf-draft-05"])
async def test_tus_js_client_with_the_right_token(server: Running, tmp_path: Path, protocol: str) -> None:
    data = os.urandom(3 * MiB + 17)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    result = await run_client(
        f"{server.url}/files/", source, protocol=protocol, chunkSize=MiB, headers=ALICE
    )
    assert [exchange["status"] for exchange in result["exchanges"]][0] == 201
    path = path_of(result["url"])
    downloaded = await request(server.port, "GET", path, ALICE)
    assert downloaded.status == 200 and downloaded.body == data
    await assert_others_refused(server.port, path, len(data))


async def test_tuspy_with_the_right_token_and_without(server: Running, tmp_path: Path) -> None:
    data = os.urandom(MiB + 5)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    url = await asyncio.to_thread(tuspy_upload, f"{server.url}/files/", source, 256 * 1024, headers=ALICE)
    assert (await request(server.port, "GET", path_of(url), ALICE)).body == data
    await assert_others_refused(server.port, path_of(url), len(data))
    refused = await request(server.port, "POST", "/files/", {"Upload-Length": "5"})
    assert refused.status == 401 and b"log in first" in refused.body


# --- through nginx ---------------------------------------------------------------------------


@pytest.fixture
def nginx(server: Running, nginx_installed: None) -> Iterator[RunningNginx]:
    with run_nginx([f"127.0.0.1:{server.port}"]) as running:
        yield running


async def test_credentials_pass_nginx(server: Running, nginx: RunningNginx, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 3)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    url = await asyncio.to_thread(tuspy_upload, f"{nginx.url}/files/", source, MiB, headers=ALICE)
    assert url.startswith(f"{nginx.url}/files/")
    await assert_others_refused(nginx.port, path_of(url), len(data))
    assert await asyncio.to_thread(_download_with, url, ALICE) == data
    refused = await request(nginx.port, "POST", "/files/", {"Upload-Length": "5"})
    assert refused.status == 401 and b"log in first" in refused.body


def _download_with(url: str, headers: dict[str, str]) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        return bytes(response.read())

