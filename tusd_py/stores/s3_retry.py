"""Retries of S3 calls: ``RetryingS3Client`` wraps any ``S3Client`` and retries
transient failures (``S3TransientError``) with exponential backoff and full jitter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tusd_py.stores.s3_client import (
    BodyChecksum,
    MultipartPage,
    ObjectEntry,
    ObjectPage,
    PartBody,
    PartEntry,
    PartPage,
    S3Client,
    S3Error,
    S3NotFound,
    S3Timeout,
    S3TransientError,
    StampedObject,
)

T = TypeVar("T")

log = logging.getLogger("tusd_py.stores.s3")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's recommendation): attempt ``n``
    (from 1) waits a uniformly random time in ``[0, min(max_delay, base_delay * 2**n))``."""

    max_attempts: int = 5
    """Attempts per call, the first included; 1 disables retries."""
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (from 1)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))


class RetryingS3Client:
    """Wraps an ``S3Client`` and retries ``S3TransientError`` per ``RetryPolicy``.

    Every call is safe to repeat: S3 writes are whole-object/whole-part replacements,
    deletes are idempotent, and a repeated CompleteMultipartUpload after a lost
    response fails with NoSuchUpload, which the store recognises.
    """

    def __init__(
        self,
        inner: S3Client,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._inner = inner
        self._policy = policy or RetryPolicy()
        self._sleep = sleep

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 1
        while True:
            try:
                return await call()
            except S3TransientError as error:
                if attempt >= self._policy.max_attempts:
                    raise
                delay = self._policy.delay(attempt)
                if not isinstance(error, S3Timeout):  # which logged itself, once per request
                    log.warning("S3 call failed (%s); retry %d in %.2fs", error, attempt, delay)
                attempt += 1
                await self._sleep(delay)

    async def head_bucket(self, bucket: str) -> None:
        await self._retry(lambda: self._inner.head_bucket(bucket))

    async def create_multipart_upload(
        self, bucket: str, key: str, content_type: str | None, checksum_algorithm: str = ""
    ) -> str:
        """Start a multipart upload of ``key``. An attempt that failed may have
        created one all the same (S3 answered 500 after the fact, or the answer was
        lost): after a retry, every other multipart upload of ``key`` is aborted, so
        exactly one is left (keys are new upload ids: any other is such a leftover)."""
        attempts = 0

        async def create() -> str:
            nonlocal attempts
            attempts += 1
            return await self._inner.create_multipart_upload(bucket, key, content_type, checksum_algorithm)

        multipart_id = await self._retry(create)
        if attempts > 1:
            await self._abort_others(bucket, key, multipart_id)
        return multipart_id

    async def _abort_others(self, bucket: str, key: str, keep: str) -> None:
        """Abort the multipart uploads of ``key`` but ``keep``; a failure is only
        logged (the sweep aborts what no ``.info`` names)."""
        marker: tuple[str, str] | None = None
        try:
            while True:
                page = await self.list_multipart_uploads(bucket, key, marker)
                for upload in page.uploads:
                    if upload.key == key and upload.upload_id != keep:
                        with contextlib.suppress(S3NotFound):
                            await self.abort_multipart_upload(bucket, key, upload.upload_id)
                        log.info("aborted multipart upload %s of %s left by a failed attempt", upload.upload_id, key)
                if page.next_marker is None:
                    return
                marker = page.next_marker
        except S3Error as error:
            log.warning("could not look for multipart uploads of %s left by a failed attempt: %s", key, error)

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        return await self._retry(
            lambda: self._inner.upload_part(bucket, key, upload_id, part_number, body, checksum)
        )

    async def upload_part_copy(
        self, bucket: str, key: str, upload_id: str, part_number: int, source_key: str, start: int, stop: int
    ) -> str:
        return await self._retry(
            lambda: self._inner.upload_part_copy(bucket, key, upload_id, part_number, source_key, start, stop)
        )

    async def list_parts(self, bucket: str, key: str, upload_id: str, marker: int | None) -> PartPage:
        return await self._retry(lambda: self._inner.list_parts(bucket, key, upload_id, marker))

    async def list_multipart_uploads(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None
    ) -> MultipartPage:
        return await self._retry(lambda: self._inner.list_multipart_uploads(bucket, prefix, marker))

    async def complete_multipart_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[PartEntry], *, if_absent: bool = False
    ) -> None:
        await self._retry(
            lambda: self._inner.complete_multipart_upload(bucket, key, upload_id, parts, if_absent=if_absent)
        )

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        await self._retry(lambda: self._inner.abort_multipart_upload(bucket, key, upload_id))

    async def put_object(self, bucket: str, key: str, body: bytes, checksum: BodyChecksum | None) -> str:
        return await self._retry(lambda: self._inner.put_object(bucket, key, body, checksum))

    async def get_object(self, bucket: str, key: str) -> bytes:
        return await self._retry(lambda: self._inner.get_object(bucket, key))

    async def stream_object(self, bucket: str, key: str, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        # A broken stream resumes with a new ranged GET from the first byte not yet
        # yielded; the attempt counter resets whenever bytes arrive.
        position = start
        attempt = 1
        while position < stop:
            try:
                async with contextlib.aclosing(self._inner.stream_object(bucket, key, position, stop)) as stream:
                    async for chunk in stream:
                        position += len(chunk)
                        attempt = 1
                        yield chunk
                if position < stop:
                    raise S3TransientError("GetObject", "ShortRead", 0, f"stream ended at {position} before {stop}")
            except S3TransientError as error:
                if attempt >= self._policy.max_attempts:
                    raise
                delay = self._policy.delay(attempt)
                log.warning("S3 GetObject stream failed at byte %d (%s); retry in %.2fs", position, error, delay)
                attempt += 1
                await self._sleep(delay)

    async def head_object(self, bucket: str, key: str) -> ObjectEntry:
        return await self._retry(lambda: self._inner.head_object(bucket, key))

    async def list_objects(self, bucket: str, prefix: str, token: str | None) -> ObjectPage:
        return await self._retry(lambda: self._inner.list_objects(bucket, prefix, token))

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        await self._retry(lambda: self._inner.delete_objects(bucket, keys))

    async def put_object_if(self, bucket: str, key: str, body: bytes, *, if_match: str | None) -> str:
        # A repeat after a lost response may fail its condition (the first attempt
        # changed the object): callers of conditional writes check what is stored.
        return await self._retry(lambda: self._inner.put_object_if(bucket, key, body, if_match=if_match))

    async def delete_object_if(self, bucket: str, key: str, *, if_match: str) -> None:
        await self._retry(lambda: self._inner.delete_object_if(bucket, key, if_match=if_match))

    async def get_object_stamped(self, bucket: str, key: str) -> StampedObject:
        return await self._retry(lambda: self._inner.get_object_stamped(bucket, key))

    async def close(self) -> None:
        await self._inner.close()
