"""Fakes for calling the tus handler directly: request bodies and requests, plus a
small harness (real FileStore in a temp dir, MemoryLocker, default config)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tusd_py.cli import tus_options
from tusd_py.config import Config
from tusd_py.http.types import Headers, Request, Response
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.stores.file import FileStore
from tusd_py.tus.handler import TusHandler

HOST = "tus.example.org"
BASE = "/files/"


class StaticBody:
    """A body of fixed chunks, optionally ending with an exception instead of EOF."""

    def __init__(self, chunks: Iterable[bytes] = (), error: BaseException | None = None, length: int | None = -1):
        self._chunks = [chunk for chunk in chunks if chunk]
        self._error = error
        total = sum(len(chunk) for chunk in self._chunks)
        self._length = (None if error is not None else total) if length == -1 else length
        self._received = 0
        self.reads = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            self.reads += 1
            await asyncio.sleep(0)  # a real body yields to the loop between chunks
            self._received += len(chunk)
            yield chunk
        self.reads += 1
        if self._error is not None:
            raise self._error

    @property
    def length(self) -> int | None:
        return self._length

    @property
    def received(self) -> int:
        return self._received


class QueueBody:
    """A body the test feeds chunk by chunk; reads block until fed (a stalled client).

    ``waiting`` is set whenever a read is blocked for lack of data, so a test can wait
    for "the handler is now stuck reading" without sleeping. Cancelling a blocked read
    loses nothing, as the real HTTP layer promises.
    """

    def __init__(self, length: int | None = None) -> None:
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._length = length
        self._received = 0
        self.waiting = asyncio.Event()
        self.started = False

    def feed(self, chunk: bytes) -> None:
        self._queue.put_nowait(chunk)

    def end(self) -> None:
        self._queue.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(error)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        self.started = True
        if self._queue.empty():
            self.waiting.set()
        try:
            item = await self._queue.get()
        finally:
            self.waiting.clear()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self._received += len(item)
        return item

    @property
    def length(self) -> int | None:
        return self._length

    @property
    def received(self) -> int:
        return self._received


async def _no_informational(status: int, headers: list[tuple[str, str]]) -> None:
    return None


def make_request(
    method: str,
    target: str = BASE,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: StaticBody | QueueBody | None = None,
    tus: bool = True,
    host: str | None = HOST,
) -> Request:
    """A Request as the HTTP layer would build it (Host and Tus-Resumable by default)."""
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if host is not None and not any(name.lower() == "host" for name, _ in items):
        items.insert(0, ("Host", host))
    if tus and not any(name.lower() == "tus-resumable" for name, _ in items):
        items.append(("Tus-Resumable", "1.0.0"))
    return Request(
        method=method,
        target=target,
        headers=Headers(items),
        body=body if body is not None else StaticBody(),
        send_informational=_no_informational,
        request_id="test-request",
    )


def header(response: Response, name: str) -> str | None:
    """The first value of response header ``name`` (case-insensitive)."""
    return Headers(response.headers).get(name)


async def body_bytes(response: Response) -> bytes:
    """The whole response body."""
    if isinstance(response.body, bytes):
        return response.body
    return b"".join([chunk async for chunk in response.body])


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


@dataclass
class Harness:
    """A handler over a real FileStore and a MemoryLocker."""

    handler: TusHandler
    store: FileStore
    locker: MemoryLocker
    config: Config
    directory: Path

    async def __call__(self, request: Request) -> Response:
        return await self.handler(request)

    async def create(self, length: int | None, metadata: str | None = None, **extra: str) -> str:
        """POST a new upload; returns its id."""
        headers = dict(extra)
        if length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(length)
        if metadata is not None:
            headers["Upload-Metadata"] = metadata
        response = await self.handler(make_request("POST", BASE, headers))
        assert response.status == 201, (response.status, response.body)
        location = header(response, "Location")
        assert location is not None
        return location.rsplit("/", 1)[-1]

    async def patch(
        self, upload_id: str, offset: int, body: StaticBody | QueueBody, **extra: str
    ) -> Response:
        headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset), **extra}
        return await self.handler(make_request("PATCH", BASE + upload_id, headers, body))

    async def head(self, upload_id: str) -> Response:
        return await self.handler(make_request("HEAD", BASE + upload_id))

    async def offset(self, upload_id: str) -> int:
        response = await self.head(upload_id)
        assert response.status == 200, response.status
        value = header(response, "Upload-Offset")
        assert value is not None
        return int(value)

    def data(self, upload_id: str) -> bytes:
        return (self.directory / upload_id).read_bytes()

    async def close(self) -> None:
        await self.store.close()
        await self.locker.close()


def make_harness(directory: Path, config: Config | None = None, acquire_timeout: float = 5.0) -> Harness:
    config = config or Config()
    store = FileStore(str(directory))
    locker = MemoryLocker(acquire_timeout=acquire_timeout)
    return Harness(TusHandler(store, locker, tus_options(config)), store, locker, config, directory)


def files_in(directory: Path | str) -> list[str]:
    """Names in ``directory`` (sync helper: tiny directories in tests)."""
    return sorted(path.name for path in Path(directory).iterdir())
