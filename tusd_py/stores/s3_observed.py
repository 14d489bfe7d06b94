"""S3 call timings for metrics: an ``S3Client`` wrapper that reports every call.

``S3Store.open(..., observer=metrics)`` puts it around the retrying client, so a
duration includes the retries and an error means the call failed for good. The S3
store stays free of any metrics library: it only knows ``S3Observer``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import Protocol, TypeVar

from tusd_py.stores.s3_client import (
    BodyChecksum,
    MultipartPage,
    ObjectEntry,
    ObjectPage,
    PartBody,
    PartEntry,
    PartPage,
    S3Client,
    S3NotFound,
    S3PreconditionFailed,
    StampedObject,
)

T = TypeVar("T")


class S3Observer(Protocol):
    """Receives the S3 store's numbers (``tusd_py.metrics.Metrics`` is one)."""

    def s3_call(self, operation: str, seconds: float, error: bool) -> None:
        """S3 call ``operation`` took ``seconds`` (retries included); ``error`` when
        it failed in the end."""
        ...

    def spool_in_use(self, delta: int) -> None:
        """A spool slot was taken (+1) or freed (-1)."""
        ...

    def s3_timeout(self, operation: str) -> None:
        """One request of S3 call ``operation`` ran out of time (each attempt counts;
        the call may still succeed on a retry)."""
        ...


class ObservedS3Client:
    """An ``S3Client`` that reports each call's duration and outcome to an observer."""

    def __init__(self, inner: S3Client, observer: S3Observer) -> None:
        self._inner = inner
        self._observer = observer

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await call
        except BaseException as error:
            # "No such key" is an answer (an unknown upload), not a failing S3, and so
            # is a failed condition (a lock held by another instance).
            failed = not isinstance(error, (S3NotFound, S3PreconditionFailed))
            self._observer.s3_call(operation, time.perf_counter() - started, failed)
            raise
        self._observer.s3_call(operation, time.perf_counter() - started, False)
        return result

    async def head_bucket(self, bucket: str) -> None:
        await self._timed("HeadBucket", self._inner.head_bucket(bucket))

    async def create_multipart_upload(
        self, bucket: str, key: str, content_type: str | None, checksum_algorithm: str = ""
    ) -> str:
        return await self._timed(
            "CreateMultipartUpload", self._inner.create_multipart_upload(bucket, key, content_type, checksum_algorithm)
        )

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        return await self._timed(
            "UploadPart", self._inner.upload_part(bucket, key, upload_id, part_number, body, checksum)
        )

    async def upload_part_copy(
        self, bucket: str, key: str, upload_id: str, part_number: int, source_key: str, start: int, stop: int
    ) -> str:
        return await self._timed(
            "UploadPartCopy",
            self._inner.upload_part_copy(bucket, key, upload_id, part_number, source_key, start, stop),
        )

    async def list_parts(self, bucket: str, key: str, upload_id: str, marker: int | None) -> PartPage:
        return await self._timed("ListParts", self._inner.list_parts(bucket, key, upload_id, marker))

    async def list_multipart_uploads(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None
    ) -> MultipartPage:
        return await self._timed(
            "ListMultipartUploads", self._inner.list_multipart_uploads(bucket, prefix, marker)
        )

    async def complete_multipart_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[PartEntry], *, if_absent: bool = False
    ) -> None:
        await self._timed(
            "CompleteMultipartUpload",
            self._inner.complete_multipart_upload(bucket, key, upload_id, parts, if_absent=if_absent),
        )

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        await self._timed("AbortMultipartUpload", self._inner.abort_multipart_upload(bucket, key, upload_id))

    async def put_object(self, bucket: str, key: str, body: bytes, checksum: BodyChecksum | None) -> str:
        return await self._timed("PutObject", self._inner.put_object(bucket, key, body, checksum))

    async def get_object(self, bucket: str, key: str) -> bytes:
        return await self._timed("GetObject", self._inner.get_object(bucket, key))

    async def stream_object(self, bucket: str, key: str, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        """A ranged GET, timed from the request to the last byte (a download)."""
        started = time.perf_counter()
        error = True
        stream = self._inner.stream_object(bucket, key, start, stop)
        try:
            async for chunk in stream:
                yield chunk
            error = False
        finally:
            await stream.aclose()
            self._observer.s3_call("GetObject", time.perf_counter() - started, error)

    async def head_object(self, bucket: str, key: str) -> ObjectEntry:
        return await self._timed("HeadObject", self._inner.head_object(bucket, key))

    async def list_objects(self, bucket: str, prefix: str, token: str | None) -> ObjectPage:
        return await self._timed("ListObjectsV2", self._inner.list_objects(bucket, prefix, token))

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        await self._timed("DeleteObjects", self._inner.delete_objects(bucket, keys))

    async def put_object_if(self, bucket: str, key: str, body: bytes, *, if_match: str | None) -> str:
        return await self._timed("PutObject", self._inner.put_object_if(bucket, key, body, if_match=if_match))

    async def delete_object_if(self, bucket: str, key: str, *, if_match: str) -> None:
        await self._timed("DeleteObject", self._inner.delete_object_if(bucket, key, if_match=if_match))

    async def get_object_stamped(self, bucket: str, key: str) -> StampedObject:
        return await self._timed("GetObject", self._inner.get_object_stamped(bucket, key))

    async def close(self) -> None:
        await self._inner.close()
