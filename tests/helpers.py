"""Helpers shared by the test modules (no tests here): the config of a composed server
on the file store, raw tus requests over a socket (create, HEAD offset, PATCH), tuspy
uploads and plain downloads, test data, and S3 buckets on a moto server."""

from __future__ import annotations

import hashlib
import random
import urllib.request
import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Self

from aiobotocore.session import AioSession, get_session
from aiohttp import web
from rawhttp import RawResponse, request
from tusclient import client as tus_client

from tusd_py.config import Config, load_config

# --- a composed server -----------------------------------------------------------------


def file_store_config(tmp_path: Path, **overrides: Any) -> Config:
    """A server on a free port (``server.port = 0``) over a file store in
    ``tmp_path/data``, with short lock and shutdown bounds; ``overrides`` by dotted key."""
    return load_config(
        environ={},
        overrides={
            "server.port": 0,
            "store.file.directory": str(tmp_path / "data"),
            "lock.acquire_timeout": 5.0,
            "server.shutdown_timeout": 5.0,
            **overrides,
        },
    )


# --- raw tus requests ------------------------------------------------------------------


def path_of(location: str) -> str:
    """The path of an absolute upload URL (``http://host/files/id`` -> ``/files/id``)."""
    return "/" + location.split("/", 3)[3]


def upload_id_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[1]


def stored_bytes(tmp_path: Path, path: str) -> bytes:
    """The upload's data file, under ``file_store_config(tmp_path)``, as the store
    wrote it (none yet: nothing written)."""
    data = tmp_path / "data" / upload_id_of(path)
    return data.read_bytes() if data.exists() else b""


def patch_head(path: str, offset: int, length: int) -> bytes:
    """The head of a PATCH of ``length`` bytes at ``offset`` (the body is the caller's)."""
    return (
        f"PATCH {path} HTTP/1.1\r\nHost: localhost\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def create(port: int, length: int, metadata: str = "") -> str:
    """POST a new upload; its path (``/files/<id>``)."""
    headers = {"Upload-Length": str(length)}
    if metadata:
        headers["Upload-Metadata"] = metadata
    response = await request(port, "POST", "/files/", headers)
    assert response.status == 201, response
    location = response.header("location")
    assert location is not None
    return path_of(location)


async def head_offset(port: int, path: str) -> int:
    response = await request(port, "HEAD", path)
    assert response.status == 200, response
    return int(response.header("upload-offset") or -1)


async def patch(port: int, path: str, offset: int, data: bytes) -> RawResponse:
    return await request(
        port, "PATCH", path, {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}, data
    )


# --- tuspy and plain HTTP (blocking: run them with asyncio.to_thread) -------------------


def tuspy_upload(
    endpoint: str,
    source: Path,
    chunk_size: int,
    metadata: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> str:
    """Upload ``source`` with tuspy in ``chunk_size`` PATCHes; the upload's URL."""
    client = tus_client.TusClient(endpoint, headers=headers or {})
    with open(source, "rb") as stream:  # tuspy leaves a file it opened itself unclosed
        uploader = client.uploader(file_stream=stream, chunk_size=chunk_size, metadata=metadata or {})
        uploader.upload()
    return str(uploader.url)


def download(url: str, timeout: float = 60.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


# --- data ------------------------------------------------------------------------------


_DATA_BLOCK = 1024 * 1024


def data_of(size: int, seed: int = 1) -> bytes:
    """Deterministic pseudo-random bytes: one random MiB, rotated by a different
    amount for every MiB of the result, so no two MiB are alike and a byte misplaced
    by a part or a segment shows. ``randbytes`` alone costs 0.35 s for 64 MiB here:
    on a test's event loop that is a blocking call; this is ~10x cheaper."""
    block = random.Random(seed).randbytes(min(size, _DATA_BLOCK))
    if size <= _DATA_BLOCK:
        return block
    view = memoryview(block)
    data = bytearray(-(-size // _DATA_BLOCK) * _DATA_BLOCK)
    for start in range(0, len(data), _DATA_BLOCK):
        at = (start // _DATA_BLOCK * 104_729) % _DATA_BLOCK
        data[start:start + _DATA_BLOCK - at] = view[at:]
        data[start + _DATA_BLOCK - at:start + _DATA_BLOCK] = view[:at]
    del data[size:]
    return bytes(data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- S3 (moto) -------------------------------------------------------------------------


_sessions: list[AioSession] = []


def s3_client(endpoint: str) -> AbstractAsyncContextManager[Any]:
    """An S3 client of ``endpoint`` (``async with``). The helpers share one session:
    a new one loads S3's service model from disk, on the event loop, for every client
    (0.2 s, seconds on a loaded machine: the loop-blocking check would report it)."""
    if not _sessions:
        _sessions.append(get_session())
    return _sessions[0].create_client("s3", endpoint_url=endpoint, region_name="us-east-1")


async def make_bucket(endpoint: str) -> str:
    """A fresh, empty bucket."""
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    async with s3_client(endpoint) as client:
        await client.create_bucket(Bucket=bucket)
    return bucket


async def object_bytes(endpoint: str, bucket: str, key: str) -> bytes:
    async with s3_client(endpoint) as client:
        response = await client.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return bytes(await body.read())


class HookReceiver:
    """A webhook receiver on 127.0.0.1 (``port``, 0: a free one, kept to restart on)
    that hands every POST to /hook to ``handle``, which a subclass defines."""

    def __init__(self) -> None:
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, http_request: web.Request) -> web.Response:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
