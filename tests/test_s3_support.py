"""Helpers for the S3 store tests (no tests here): client-seam wrappers that count
calls and bytes or crash after a given call, bucket inspection against a moto server,
request bodies and PATCH "requests" (bucket set-up and test data: ``helpers``; the
``fast_moto`` fixture: ``conftest``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiobotocore.session import get_session

from tusd_py.config import S3StoreConfig, Size, parse_size
from tusd_py.stores.base import IteratedBody, UploadInfo
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_botocore import AioS3Client
from tusd_py.stores.s3_checksum import signs_payload
from tusd_py.stores.s3_client import (
    BodyChecksum,
    MultipartPage,
    ObjectEntry,
    ObjectPage,
    PartBody,
    PartEntry,
    PartPage,
    S3Client,
)
from tusd_py.stores.s3_retry import RetryingS3Client, RetryPolicy

KiB = 1024
MiB = 1024 * KiB

FAST_RETRIES = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.01)


async def bucket_contents(endpoint: str, bucket: str) -> tuple[list[str], list[str]]:
    """(every object key, every in-progress multipart upload's key) in the bucket."""
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1") as client:
        listing = await client.list_objects_v2(Bucket=bucket)
        uploads = await client.list_multipart_uploads(Bucket=bucket)
    return (
        [item["Key"] for item in listing.get("Contents", [])],
        [item["Key"] for item in uploads.get("Uploads", [])],
    )


CHECKSUM_UNDER_TEST = os.environ.get("TUSDPY_TEST_S3_CHECKSUM", "")
"""``store.s3.checksum`` of every store the S3 store, crash and fault tests open (empty:
the default). CI runs tests/test_s3_crash.py, test_s3_store.py and test_s3_robustness.py
once more per other value (.ci/run)."""
PAYLOAD_SIGNING_UNDER_TEST = os.environ.get("TUSDPY_TEST_S3_PAYLOAD_SIGNING", "")
"""``never``: parts go unsigned over moto's http, so whole spooled parts are streamed
(``StreamedBody``) as they are to AWS over https."""
SPOOL_MEMORY_UNDER_TEST = os.environ.get("TUSDPY_TEST_S3_SPOOL_MEMORY", "")
"""``store.s3.spool_memory`` (empty: the default, which holds these tests' small parts
in memory). CI's extra runs set 0, so their parts wait in spool files."""


def s3_config(endpoint: str, bucket: str, **overrides: Any) -> S3StoreConfig:
    config = S3StoreConfig(bucket=bucket, endpoint_url=endpoint, part_size=Size(MiB))
    if CHECKSUM_UNDER_TEST:
        config.checksum = CHECKSUM_UNDER_TEST
    if PAYLOAD_SIGNING_UNDER_TEST:
        config.payload_signing = PAYLOAD_SIGNING_UNDER_TEST
    if SPOOL_MEMORY_UNDER_TEST:
        config.spool_memory = parse_size(SPOOL_MEMORY_UNDER_TEST, "store.s3.spool_memory")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


async def open_store(
    config: S3StoreConfig,
    wrap: Callable[[S3Client], S3Client] | None = None,
    inner_wrap: Callable[[S3Client], S3Client] | None = None,
    max_size: int = 0,
) -> S3Store:
    """An S3Store over a real aiobotocore client with fast retries. ``wrap`` goes
    outside the retry layer (faults it raises are final, like a crash), ``inner_wrap``
    inside it (faults it raises are retried)."""
    raw: S3Client = await AioS3Client.connect(endpoint_url=config.endpoint_url, sign_payload=signs_payload(config))
    if inner_wrap is not None:
        raw = inner_wrap(raw)
    client: S3Client = RetryingS3Client(raw, FAST_RETRIES)
    if wrap is not None:
        client = wrap(client)
    return S3Store(client, config, max_size=max_size)


async def _chunks(data: bytes, chunk_size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk_size):
        yield data[start:start + chunk_size]
        await asyncio.sleep(0)  # a chunk per loop turn, as from a socket (not synchronisation)


def body(data: bytes, chunk_size: int) -> IteratedBody:
    """``data`` as a request body of ``chunk_size`` chunks."""
    return IteratedBody(_chunks(data, chunk_size))


class ClientGone(ConnectionResetError):
    """The body iterator's error when a test's client disconnects."""


async def _broken_chunks(data: bytes, chunk_size: int) -> AsyncIterator[bytes]:
    async for chunk in _chunks(data, chunk_size):
        yield chunk
    raise ClientGone("client went away")


def broken_body(data: bytes, chunk_size: int) -> IteratedBody:
    """``data`` in chunks, then the client is gone (the iterator raises)."""
    return IteratedBody(_broken_chunks(data, chunk_size))


async def patch(store: S3Store, upload_id: str, data: bytes, chunk_size: int = 64 * KiB) -> UploadInfo:
    """One PATCH "request": open the upload and write ``data`` at its offset; the
    new snapshot."""
    opened = await store.get(upload_id)
    return await opened.write(opened.info.offset, body(data, chunk_size))


async def upload(
    store: S3Store, info: UploadInfo, data: bytes, patch_size: int, chunk_size: int = 64 * KiB
) -> UploadInfo:
    """Send ``data[offset:]`` as PATCHes of ``patch_size`` bytes, each in its own
    "request" (get, then write), then finish. Returns the finished info."""
    while True:
        opened = await store.get(info.id)
        info = opened.info
        if info.finished:
            return info
        piece = data[info.offset:info.offset + patch_size]
        written = await opened.write(info.offset, body(piece, chunk_size))
        assert written is opened.info
        if written.length is not None and written.offset == written.length:
            return await opened.finish()


class SeamWrapper:
    """An ``S3Client`` that delegates every call to ``inner`` through ``_call`` (one
    place for subclasses to count, delay or fail calls)."""

    def __init__(self, inner: S3Client) -> None:
        self.inner = inner

    async def _call(self, operation: str, call: Callable[[], Any], sent: int = 0) -> Any:
        return await call()

    def _received(self, operation: str, size: int) -> None:
        """Bytes received from S3 (object bodies)."""

    async def head_bucket(self, bucket: str) -> None:
        await self._call("HeadBucket", lambda: self.inner.head_bucket(bucket))

    async def create_multipart_upload(
        self, bucket: str, key: str, content_type: str | None, checksum_algorithm: str = ""
    ) -> str:
        result: str = await self._call(
            "CreateMultipartUpload",
            lambda: self.inner.create_multipart_upload(bucket, key, content_type, checksum_algorithm),
        )
        return result

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        result: str = await self._call(
            "UploadPart",
            lambda: self.inner.upload_part(bucket, key, upload_id, part_number, body, checksum),
            sent=len(body),
        )
        return result

    async def upload_part_copy(
        self, bucket: str, key: str, upload_id: str, part_number: int, source_key: str, start: int, stop: int
    ) -> str:
        result: str = await self._call(
            "UploadPartCopy",
            lambda: self.inner.upload_part_copy(bucket, key, upload_id, part_number, source_key, start, stop),
        )
        return result

    async def list_parts(self, bucket: str, key: str, upload_id: str, marker: int | None) -> PartPage:
        result: PartPage = await self._call("ListParts", lambda: self.inner.list_parts(bucket, key, upload_id, marker))
        return result

    async def list_multipart_uploads(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None
    ) -> MultipartPage:
        result: MultipartPage = await self._call(
            "ListMultipartUploads", lambda: self.inner.list_multipart_uploads(bucket, prefix, marker)
        )
        return result

    async def complete_multipart_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[PartEntry], *, if_absent: bool = False
    ) -> None:
        await self._call(
            "CompleteMultipartUpload",
            lambda: self.inner.complete_multipart_upload(bucket, key, upload_id, parts, if_absent=if_absent),
        )

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        await self._call("AbortMultipartUpload", lambda: self.inner.abort_multipart_upload(bucket, key, upload_id))

    async def put_object(self, bucket: str, key: str, body: bytes, checksum: BodyChecksum | None) -> str:
        result: str = await self._call(
            "PutObject", lambda: self.inner.put_object(bucket, key, body, checksum), sent=len(body)
        )
        return result

    async def get_object(self, bucket: str, key: str) -> bytes:
        result: bytes = await self._call("GetObject", lambda: self.inner.get_object(bucket, key))
        self._received("GetObject", len(result))
        return result

    async def stream_object(self, bucket: str, key: str, start: int, stop: int) -> AsyncIterator[bytes]:
        stream = await self._call("GetObject", lambda: _opened(self.inner.stream_object(bucket, key, start, stop)))
        async for chunk in stream:
            self._received("GetObject", len(chunk))
            yield chunk

    async def head_object(self, bucket: str, key: str) -> ObjectEntry:
        result: ObjectEntry = await self._call("HeadObject", lambda: self.inner.head_object(bucket, key))
        return result

    async def list_objects(self, bucket: str, prefix: str, token: str | None) -> ObjectPage:
        result: ObjectPage = await self._call("ListObjectsV2", lambda: self.inner.list_objects(bucket, prefix, token))
        return result

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        await self._call("DeleteObjects", lambda: self.inner.delete_objects(bucket, keys))

    async def close(self) -> None:
        await self.inner.close()


async def _opened(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    return stream


class CountingClient(SeamWrapper):
    """Counts calls per operation, bytes sent and received, and the peak number of
    UploadPart calls in flight."""

    def __init__(self, inner: S3Client) -> None:
        super().__init__(inner)
        self.calls: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.in_flight_parts = 0
        self.peak_parts = 0

    async def _call(self, operation: str, call: Callable[[], Any], sent: int = 0) -> Any:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        self.sent[operation] = self.sent.get(operation, 0) + sent
        if operation == "UploadPart":
            self.in_flight_parts += 1
            self.peak_parts = max(self.peak_parts, self.in_flight_parts)
        try:
            return await call()
        finally:
            if operation == "UploadPart":
                self.in_flight_parts -= 1

    def _received(self, operation: str, size: int) -> None:
        self.received[operation] = self.received.get(operation, 0) + size

    @property
    def bytes_moved(self) -> int:
        return sum(self.sent.values()) + sum(self.received.values())


class SimulatedCrash(Exception):
    """Raised by ``CrashingClient``: the process died at this point."""


class CrashingClient(SeamWrapper):
    """Performs calls 0..``crash_after`` normally except that call ``crash_after``
    raises after it reached S3; every later call fails before reaching S3 (the
    process is dead). ``crash_after=None`` only counts calls."""

    def __init__(self, inner: S3Client, crash_after: int | None = None) -> None:
        super().__init__(inner)
        self.crash_after = crash_after
        self.count = 0
        self.operations: list[str] = []

    async def _call(self, operation: str, call: Callable[[], Any], sent: int = 0) -> Any:
        index = self.count
        self.count += 1
        self.operations.append(operation)
        if self.crash_after is not None and index > self.crash_after:
            raise SimulatedCrash(f"dead before call {index} ({operation})")
        result = await call()
        if index == self.crash_after:
            raise SimulatedCrash(f"crash after call {index} ({operation})")
        return result
