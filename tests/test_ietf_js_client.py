"""tus-js-client 4.3 (Node.js) against the composed server on the file store, in its
three protocols: ``tus-v1``, ``ietf-draft-03`` (interop 5) and ``ietf-draft-05``
(interop 6). Each upload is checked byte for byte (sha256 of the stored upload).

The client is driven by ``tests/js/upload_client.js``; ``npm install --prefix tests/js``
installs it (``.ci/run`` does). Without ``node`` these tests are skipped; with ``node``
but without the package they fail, so a CI that forgot the install cannot pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import file_store_config, path_of

from tests.rawhttp import RawConnection
from tusd_py.cli import Running, serving
from tusd_py.config import MiB

JS_DIR = Path(__file__).resolve().parent / "js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

PROTOCOLS = ["tus-v1", "ietf-draft-03", "ietf-draft-05"]
INTEROP_VERSION = {"ietf-draft-03": "5", "ietf-draft-05": "6"}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    async with serving(file_store_config(tmp_path)) as running:
        yield running


async def _run_client(server: Running, source: Path, **options: Any) -> dict[str, Any]:
    return await run_client(f"{server.url}/files/", source, **options)


async def run_client(endpoint: str, source: Path, *, timeout: float = 90, **options: Any) -> dict[str, Any]:
    """Run ``tests/js/upload_client.js`` against ``endpoint`` (the upload collection's
    URL); its JSON result (``url`` and the ``exchanges``). The client is killed and the
    test fails after ``timeout`` seconds."""
    if not (JS_DIR / "node_modules" / "tus-js-client").is_dir():
        pytest.fail("tus-js-client is not installed: run `npm install --prefix tests/js`")
    assert NODE is not None
    arguments = {"endpoint": endpoint, "file": str(source), **options}
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(JS_DIR / "upload_client.js"),
        json.dumps(arguments),
        cwd=JS_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"tus-js-client did not finish within {timeout} s")
    assert process.returncode == 0, stderr.decode(errors="replace")
    result = json.loads(stdout)
    assert isinstance(result, dict)
    return result


async def _stored_sha256(server: Running, url: str) -> str:
    """sha256 of the upload as the server serves it (plain GET download)."""
    path = path_of(url)
    connection = await RawConnection.open(server.port)
    try:
        await connection.send_request("GET", path)
        response = await connection.read_response("GET")
    finally:
        await connection.close()
    assert response.status == 200, response
    return hashlib.sha256(response.body).hexdigest()


def _source(tmp_path: Path, size: int) -> tuple[Path, str]:
    data = os.urandom(size)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _check_protocol(protocol: str, exchanges: list[dict[str, Any]]) -> None:
    """Every request spoke ``protocol`` and every answer came in the same protocol."""
    assert exchanges
    for exchange in exchanges:
        request, response = exchange["request"], exchange["response"]
        if protocol == "tus-v1":
            assert request.get("tus-resumable") == "1.0.0"
            assert response.get("tus-resumable") == "1.0.0"
            continue
        assert request.get("upload-draft-interop-version") == INTEROP_VERSION[protocol]
        assert "tus-resumable" not in request
        assert "tus-resumable" not in response
        if exchange["method"] in ("POST", "PATCH"):
            assert response.get("upload-complete") in ("?0", "?1"), exchange
        if exchange["method"] == "PATCH" and protocol == "ietf-draft-05":
            assert request.get("content-type") == "application/partial-upload"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_chunked_upload_cut_midway_then_resumed(server: Running, tmp_path: Path, protocol: str) -> None:
    size = 4 * MiB + 321
    cut_at = 2 * MiB + 300_000  # inside the third 1 MiB PATCH
    source, digest = _source(tmp_path, size)
    result = await _run_client(server, source, protocol=protocol, chunkSize=MiB, cutAt=cut_at)

    exchanges = result["exchanges"]
    _check_protocol(protocol, exchanges)
    first = [exchange for exchange in exchanges if exchange["phase"] == "first"]
    resumed = [exchange for exchange in exchanges if exchange["phase"] == "resume"]
    assert first[0]["method"] == "POST"
    # The second client resumed the same upload (HEAD) instead of starting over.
    assert resumed[0]["method"] == "HEAD" and resumed[0]["status"] in (200, 204)
    assert all(exchange["method"] != "POST" for exchange in resumed)
    # Every byte that reached the server before the connection was lost was kept.
    assert int(resumed[0]["response"]["upload-offset"]) == cut_at
    last = resumed[-1]
    assert last["method"] == "PATCH" and int(last["response"]["upload-offset"]) == size
    if protocol != "tus-v1":
        assert last["request"]["upload-complete"] == "?1"
        assert last["response"]["upload-complete"] == "?1"
    assert await _stored_sha256(server, result["url"]) == digest


@pytest.mark.parametrize("protocol", ["ietf-draft-03", "ietf-draft-05"])
async def test_whole_file_in_the_creation_request(server: Running, tmp_path: Path, protocol: str) -> None:
    source, digest = _source(tmp_path, 3 * MiB)
    result = await _run_client(server, source, protocol=protocol, uploadDataDuringCreation=True)
    exchanges = result["exchanges"]
    _check_protocol(protocol, exchanges)
    assert [exchange["method"] for exchange in exchanges] == ["POST"]
    assert exchanges[0]["status"] == 201
    assert exchanges[0]["request"]["upload-complete"] == "?1"
    assert exchanges[0]["response"]["upload-complete"] == "?1"
    assert await _stored_sha256(server, result["url"]) == digest


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_deferred_length(server: Running, tmp_path: Path, protocol: str) -> None:
    size = 2 * MiB + 77
    source, digest = _source(tmp_path, size)
    result = await _run_client(server, source, protocol=protocol, chunkSize=MiB, uploadLengthDeferred=True)
    exchanges = result["exchanges"]
    _check_protocol(protocol, exchanges)
    last = exchanges[-1]
    assert last["request"]["upload-length"] == str(size)  # declared with the last chunk
    assert int(last["response"]["upload-offset"]) == size
    assert await _stored_sha256(server, result["url"]) == digest
