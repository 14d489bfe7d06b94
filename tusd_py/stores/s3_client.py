"""The narrow S3 client seam of the S3 store.

``S3Client`` lists only the S3 calls the store makes, with plain Python types in and
out, so tests can wrap it to inject faults after any call or to count the bytes moved.
Each method is exactly one S3 request (pagination is the caller's job), which keeps
"crash after call i" meaningful.

Two implementations live here:

- ``AioS3Client`` over an aiobotocore client: it translates botocore's exceptions into
  the small ``S3Error`` family below and never retries (botocore's own retries are
  switched off so that retrying happens in exactly one place);
- ``RetryingS3Client``, which wraps any ``S3Client`` and retries transient failures
  (5xx, SlowDown/throttling, timeouts, connection resets) with exponential backoff
  and full jitter. A broken download stream resumes from the byte it reached.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import aiohttp
import aiohttp.payload
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.handlers import convert_body_to_file_like_object

log = logging.getLogger("tusd_py.stores.s3")

T = TypeVar("T")

# Error codes S3 (and S3-compatible services) use for conditions that go away when
# the request is repeated a little later.
TRANSIENT_ERROR_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "TooManyRequestsException", "PriorRequestNotComplete", "OperationAborted",
    "ConditionalRequestConflict",  # 409: a concurrent conditional write; S3 says retry
})
NOT_FOUND_ERROR_CODES = frozenset({"NoSuchKey", "NoSuchUpload", "NoSuchBucket", "NotFound", "404"})

STREAM_CHUNK_SIZE = 256 * 1024
"""Download chunk size: large enough to keep per-chunk overhead low, small enough
that a slow reader does not pin much memory."""


class S3Error(Exception):
    """An S3 call failed; ``code`` is S3's error code (or a local one such as
    ``"ConnectionError"``), ``status`` the HTTP status (0 when there was none)."""

    def __init__(self, operation: str, code: str, status: int, message: str) -> None:
        super().__init__(f"{operation}: {code} ({status}): {message}" if status else f"{operation}: {code}: {message}")
        self.operation = operation
        self.code = code
        self.status = status


class S3NotFound(S3Error):
    """The key, multipart upload or bucket does not exist."""


class S3TransientError(S3Error):
    """A failure that may succeed when repeated (5xx, throttling, timeouts, resets)."""


class S3PreconditionFailed(S3Error):
    """A conditional write or delete found the object not as required (412
    PreconditionFailed: ``If-None-Match: *`` found it present, ``If-Match`` found
    another ETag or no object). An answer, never retried."""


@dataclass(frozen=True, slots=True)
class StampedObject:
    """A small object read whole, with what S3 said about it and when: ``etag``
    (quoted), ``last_modified`` and ``date`` (the response's ``Date``, S3's clock),
    both Unix time to the second as S3 sends them."""

    body: bytes
    etag: str
    last_modified: float
    date: float


class S3Timeout(S3TransientError):
    """The request got no complete answer within its deadline (``Deadlines``)."""


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long one S3 request may take, from its start to the end of its answer,
    sending the body included (botocore's connect and read timeouts do not bound a
    send that stalls)."""

    seconds: float = 30.0
    """A request with no body, or a body of up to ``body_size`` bytes."""
    body_size: int = 8 * 1024 * 1024
    """Larger bodies (and server-side copies) get proportionally longer."""

    def for_body(self, size: int) -> float:
        """The deadline of a request that sends (or copies) ``size`` bytes."""
        return self.seconds * max(1.0, size / self.body_size)

    @property
    def complete(self) -> float:
        """CompleteMultipartUpload: S3 assembles the object meanwhile, which AWS says
        may take minutes for large objects."""
        return self.seconds * COMPLETE_DEADLINE_FACTOR


COMPLETE_DEADLINE_FACTOR = 10


@dataclass(frozen=True, slots=True)
class ObjectEntry:
    """An object as listed (or HEAD-ed): key, size and ETag (quoted, as S3 sends it)."""

    key: str
    size: int
    etag: str
    last_modified: float | None = None
    """Unix time (from listings; None where S3 did not say)."""


@dataclass(frozen=True, slots=True)
class ObjectPage:
    """One ListObjectsV2 page; ``next_token`` is None on the last page."""

    objects: list[ObjectEntry]
    next_token: str | None


@dataclass(frozen=True, slots=True)
class PartEntry:
    """One uploaded part of a multipart upload."""

    number: int
    size: int
    etag: str


@dataclass(frozen=True, slots=True)
class PartPage:
    """One ListParts page; ``next_marker`` is None on the last page."""

    parts: list[PartEntry]
    next_marker: int | None


@dataclass(frozen=True, slots=True)
class MultipartEntry:
    """A multipart upload in progress, as listed."""

    key: str
    upload_id: str
    initiated: float
    """Unix time it was created."""


@dataclass(frozen=True, slots=True)
class MultipartPage:
    """One ListMultipartUploads page; ``next_marker`` (key marker, upload id marker)
    is None on the last page."""

    uploads: list[MultipartEntry]
    next_marker: tuple[str, str] | None


@runtime_checkable
class S3Client(Protocol):
    """The S3 calls the S3 store makes, one request each."""

    async def head_bucket(self, bucket: str) -> None:
        """Check that the bucket exists and the credentials may use it."""
        ...

    async def create_multipart_upload(self, bucket: str, key: str, content_type: str | None) -> str:
        """Start a multipart upload of ``key``; returns its upload id."""
        ...

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: bytes, content_md5: str
    ) -> str:
        """Upload one part (``content_md5``: base64 MD5 of ``body``, checked by S3);
        returns its ETag."""
        ...

    async def upload_part_copy(
        self, bucket: str, key: str, upload_id: str, part_number: int, source_key: str, start: int, stop: int
    ) -> str:
        """Make bytes ``[start, stop)`` of object ``source_key`` (same bucket) part
        ``part_number``, server-side; returns its ETag."""
        ...

    async def list_parts(self, bucket: str, key: str, upload_id: str, marker: int | None) -> PartPage:
        """One page of the multipart upload's parts after part number ``marker``."""
        ...

    async def list_multipart_uploads(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None
    ) -> MultipartPage:
        """One page of the multipart uploads in progress under ``prefix``."""
        ...

    async def complete_multipart_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[tuple[int, str]], *, if_absent: bool = False
    ) -> None:
        """Assemble the object from ``(part number, ETag)`` pairs, in order; with
        ``if_absent`` only where no object has the key (else ``S3PreconditionFailed``)."""
        ...

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort a multipart upload and discard its parts."""
        ...

    async def put_object(self, bucket: str, key: str, body: bytes, content_md5: str) -> str:
        """Store a whole object (checked against ``content_md5``); returns its ETag."""
        ...

    async def get_object(self, bucket: str, key: str) -> bytes:
        """Read a whole (small) object."""
        ...

    def stream_object(self, bucket: str, key: str, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        """Stream bytes ``[start, stop)`` of an object (a ranged GET)."""
        ...

    async def head_object(self, bucket: str, key: str) -> ObjectEntry:
        """Size and ETag of an object; raises ``S3NotFound``."""
        ...

    async def list_objects(self, bucket: str, prefix: str, token: str | None) -> ObjectPage:
        """One ListObjectsV2 page of the keys under ``prefix``."""
        ...

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        """Delete up to 1000 keys in one request (missing keys are not an error)."""
        ...

    async def put_object_if(self, bucket: str, key: str, body: bytes, *, if_match: str | None) -> str:
        """Store a small object only if it is absent (``if_match`` None: ``If-None-Match:
        *``) or has ETag ``if_match``; returns its ETag. ``S3PreconditionFailed`` if not."""
        ...

    async def delete_object_if(self, bucket: str, key: str, *, if_match: str) -> None:
        """Delete ``key`` only if its ETag is ``if_match``; ``S3PreconditionFailed``
        if it is not, ``S3NotFound`` (or nothing, as S3 may answer) if it is gone."""
        ...

    async def get_object_stamped(self, bucket: str, key: str) -> StampedObject:
        """Read a whole (small) object with its ETag, Last-Modified and the response's
        Date; raises ``S3NotFound``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def content_md5(body: bytes) -> str:
    """The Content-MD5 header value of ``body`` (base64 of the binary digest)."""
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode("ascii")


# --- aiobotocore implementation --------------------------------------------------------

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    HTTPClientError,  # connection closed, read timeout, response streaming errors
    BotoConnectionError,  # endpoint unreachable, connect timeout, proxy/TLS failures
    IncompleteReadError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
)


def _translate(operation: str, error: BaseException) -> S3Error:
    """Turn a botocore/aiohttp exception into an ``S3Error``."""
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code", "Unknown"))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(details.get("Message", "") or error)
        if code in NOT_FOUND_ERROR_CODES or (status == 404 and code not in TRANSIENT_ERROR_CODES):
            return S3NotFound(operation, code, status, message)
        if code == "PreconditionFailed" or status == 412:
            return S3PreconditionFailed(operation, code, status, message)
        if code in TRANSIENT_ERROR_CODES or status >= 500 or status == 429:
            return S3TransientError(operation, code, status, message)
        return S3Error(operation, code, status, message)
    if isinstance(error, NoCredentialsError):
        return S3Error(operation, "NoCredentials", 0, str(error))
    if isinstance(error, _TRANSPORT_ERRORS):
        return S3TransientError(operation, "ConnectionError", 0, f"{type(error).__name__}: {error}")
    return S3Error(operation, type(error).__name__, 0, str(error))


@contextlib.contextmanager
def _translated(operation: str) -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError, *_TRANSPORT_ERRORS) as error:
        raise _translate(operation, error) from error


class _BytesBody(aiohttp.payload.BytesPayload):
    """A request body sent straight from its ``bytes``: aiohttp's ``BytesPayload``
    without the ResourceWarning it raises for bodies over 1 MiB (which suggests
    ``io.BytesIO`` instead; that route costs the copies ``_send_bodies_as_bytes``
    avoids). One write hands the whole body to the transport, which keeps a reference
    to what the socket did not take at once instead of copying it."""

    def __init__(self, value: bytes) -> None:
        aiohttp.payload.Payload.__init__(self, value, content_type="application/octet-stream")
        self._size = len(value)


def _bytes_body_before_send(request: Any, **_: Any) -> None:
    if isinstance(request.body, bytes) and len(request.body) > aiohttp.payload.TOO_LARGE_BYTES_BODY:
        request.body = _BytesBody(request.body)


def _send_bodies_as_bytes(client: Any) -> None:
    """Send PutObject/UploadPart bodies as the ``bytes`` they are.

    botocore wraps a ``bytes`` body in ``io.BytesIO``; aiohttp then copies the whole
    body once to measure it (``BytesIOPayload`` takes a buffer of the BytesIO, which
    un-shares it), botocore's SigV4 payload hash (computed over plain http) reads it
    in 1 MiB copies, and aiohttp sends it in 64 KiB copies: three extra passes over
    every part, about 0.5 CPU s/GiB each. Without the wrapping the SHA-256 runs over
    the bytes themselves and the body goes to the socket in one write. (The wrapper
    also asked for ``Expect: 100-continue``, one more round trip per part.)

    Safe because every attempt is a new botocore call (botocore's own retries, which
    would rewind the body, are off) and the body is never modified."""
    events = client.meta.events
    for operation in ("PutObject", "UploadPart"):
        events.unregister(f"before-parameter-build.s3.{operation}", convert_body_to_file_like_object)
        events.register(f"before-send.s3.{operation}", _bytes_body_before_send)


def _load_botocore_data(session: AioSession) -> None:
    loader = session.get_component("data_loader")
    loader.load_service_model("s3", "service-2")
    loader.load_service_model("s3", "endpoint-rule-set-1")
    for name in ("_retry", "sdk-default-configuration", "partitions"):
        loader.load_data(name)
    session.get_component("endpoint_resolver")
    session.get_scoped_config()


class AioS3Client:
    """``S3Client`` over one aiobotocore S3 client (created by ``connect``)."""

    def __init__(
        self,
        client: Any,
        exit_stack: contextlib.AsyncExitStack | None = None,
        *,
        deadlines: Deadlines | None = None,
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        """``on_timeout`` hears the operation of every request that ran out of time."""
        self._client = client
        self._exit_stack = exit_stack
        self._deadlines = deadlines or Deadlines()
        self._on_timeout = on_timeout

    @contextlib.asynccontextmanager
    async def _request(
        self, operation: str, bucket: str, key: str = "", seconds: float | None = None
    ) -> AsyncIterator[None]:
        """One request: botocore's errors translated, and cut off (``S3Timeout``,
        one log line) when it takes longer than ``seconds`` (default: the plain
        deadline)."""
        limit = self._deadlines.seconds if seconds is None else seconds
        try:
            async with asyncio.timeout(limit):
                with _translated(operation):
                    yield
        except TimeoutError as error:  # only the deadline's: _translated turned all others
            where = f"{bucket}/{key}" if key else bucket
            log.warning("S3 %s of %s timed out after %.1f s", operation, where, limit)
            if self._on_timeout is not None:
                self._on_timeout(operation)
            raise S3Timeout(operation, "Timeout", 0, f"no complete answer within {limit:.1f} s") from error

    @classmethod
    async def connect(
        cls,
        *,
        endpoint_url: str = "",
        region: str = "",
        max_pool_connections: int = 10,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        deadlines: Deadlines | None = None,
        on_timeout: Callable[[str], None] | None = None,
    ) -> AioS3Client:
        """An S3 client with credentials from the standard AWS chain (environment,
        shared files/profile, container and instance metadata).

        Raises ``S3Error`` with code ``"NoCredentials"`` when the chain finds none.
        ``endpoint_url`` selects an S3-compatible service and path-style addressing.
        """
        session = get_session()
        # botocore reads its data files (the S3 model, endpoint rules, the AWS config
        # files) the first time a session needs them: tens of milliseconds idle, over
        # half a second on a loaded host. Read them on a worker thread; the session
        # caches them, so what follows on the event loop reads nothing from disk.
        await asyncio.to_thread(_load_botocore_data, session)
        credentials = await session.get_credentials()
        if credentials is None:
            raise S3Error(
                "Connect", "NoCredentials", 0,
                "no AWS credentials found (looked in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "the shared credentials/config files and profile, and container/instance metadata)",
            )
        region = region or session.get_config_variable("region") or "us-east-1"
        config = AioConfig(
            region_name=region,
            s3={"addressing_style": "path"} if endpoint_url else {},
            # Retries happen once, in RetryingS3Client, where tests can see them.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # We send Content-MD5 ourselves; botocore's default CRC32 on every
            # PutObject/UploadPart would hash each body a second time.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        exit_stack = contextlib.AsyncExitStack()
        client = await exit_stack.enter_async_context(
            session.create_client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)
        )
        _send_bodies_as_bytes(client)
        return cls(client, exit_stack, deadlines=deadlines, on_timeout=on_timeout)

    async def head_bucket(self, bucket: str) -> None:
        async with self._request("HeadBucket", bucket):
            await self._client.head_bucket(Bucket=bucket)

    async def create_multipart_upload(self, bucket: str, key: str, content_type: str | None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        async with self._request("CreateMultipartUpload", bucket, key):
            response = await self._client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
        return str(response["UploadId"])

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: bytes, content_md5: str
    ) -> str:
        async with self._request("UploadPart", bucket, key, self._deadlines.for_body(len(body))):
            response = await self._client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=part_number, Body=body, ContentMD5=content_md5
            )
        return str(response["ETag"])

    async def upload_part_copy(
        self, bucket: str, key: str, upload_id: str, part_number: int, source_key: str, start: int, stop: int
    ) -> str:
        async with self._request("UploadPartCopy", bucket, key, self._deadlines.for_body(stop - start)):
            response = await self._client.upload_part_copy(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=part_number,
                CopySource={"Bucket": bucket, "Key": source_key}, CopySourceRange=f"bytes={start}-{stop - 1}",
            )
        return str(response["CopyPartResult"]["ETag"])

    async def list_multipart_uploads(
        self, bucket: str, prefix: str, marker: tuple[str, str] | None
    ) -> MultipartPage:
        extra = {"KeyMarker": marker[0], "UploadIdMarker": marker[1]} if marker else {}
        async with self._request("ListMultipartUploads", bucket, prefix):
            response = await self._client.list_multipart_uploads(Bucket=bucket, Prefix=prefix, **extra)
        uploads = [
            MultipartEntry(str(item["Key"]), str(item["UploadId"]), item["Initiated"].timestamp())
            for item in response.get("Uploads", [])
        ]
        next_marker = None
        if response.get("IsTruncated"):
            next_marker = (str(response.get("NextKeyMarker", "")), str(response.get("NextUploadIdMarker", "")))
        return MultipartPage(uploads, next_marker)

    async def list_parts(self, bucket: str, key: str, upload_id: str, marker: int | None) -> PartPage:
        extra = {"PartNumberMarker": marker} if marker else {}
        async with self._request("ListParts", bucket, key):
            response = await self._client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, **extra)
        parts = [
            PartEntry(int(part["PartNumber"]), int(part["Size"]), str(part["ETag"]))
            for part in response.get("Parts", [])
        ]
        truncated = bool(response.get("IsTruncated"))
        next_marker = response.get("NextPartNumberMarker")
        return PartPage(parts, int(next_marker) if truncated and next_marker else None)

    async def complete_multipart_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[tuple[int, str]], *, if_absent: bool = False
    ) -> None:
        async with self._request("CompleteMultipartUpload", bucket, key, self._deadlines.complete):
            await self._client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": number, "ETag": etag} for number, etag in parts]},
                **({"IfNoneMatch": "*"} if if_absent else {}),
            )

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        async with self._request("AbortMultipartUpload", bucket, key):
            await self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    async def put_object(self, bucket: str, key: str, body: bytes, content_md5: str) -> str:
        async with self._request("PutObject", bucket, key, self._deadlines.for_body(len(body))):
            response = await self._client.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=content_md5)
        return str(response["ETag"])

    async def get_object(self, bucket: str, key: str) -> bytes:
        async with self._request("GetObject", bucket, key):
            response = await self._client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return bytes(await body.read())

    async def stream_object(self, bucket: str, key: str, start: int, stop: int) -> AsyncGenerator[bytes, None]:
        if start >= stop:
            return
        # The deadline bounds the request and each chunk's read, not the whole
        # download (a slow client may take long to take the bytes).
        async with self._request("GetObject", bucket, key):
            response = await self._client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
        with _translated("GetObject"):
            async with response["Body"] as body:
                while True:
                    async with self._request("GetObject", bucket, key):
                        chunk = await body.read(STREAM_CHUNK_SIZE)
                    if not chunk:
                        return
                    yield bytes(chunk)

    async def head_object(self, bucket: str, key: str) -> ObjectEntry:
        async with self._request("HeadObject", bucket, key):
            response = await self._client.head_object(Bucket=bucket, Key=key)
        return ObjectEntry(key, int(response["ContentLength"]), str(response.get("ETag", "")))

    async def list_objects(self, bucket: str, prefix: str, token: str | None) -> ObjectPage:
        extra = {"ContinuationToken": token} if token else {}
        async with self._request("ListObjectsV2", bucket, prefix):
            response = await self._client.list_objects_v2(Bucket=bucket, Prefix=prefix, **extra)
        objects = [
            ObjectEntry(
                str(item["Key"]), int(item["Size"]), str(item.get("ETag", "")),
                item["LastModified"].timestamp() if "LastModified" in item else None,
            )
            for item in response.get("Contents", [])
        ]
        next_token = response.get("NextContinuationToken") if response.get("IsTruncated") else None
        return ObjectPage(objects, str(next_token) if next_token else None)

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        if not keys:
            return
        async with self._request("DeleteObjects", bucket, keys[0]):
            response = await self._client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True}
            )
        errors = [error for error in response.get("Errors", []) if error.get("Code") != "NoSuchKey"]
        if errors:
            first = errors[0]
            code = str(first.get("Code", "Unknown"))
            error_type = S3TransientError if code in TRANSIENT_ERROR_CODES else S3Error
            raise error_type("DeleteObjects", code, 0, f"{len(errors)} key(s) not deleted, e.g. {first.get('Key')}")

    async def put_object_if(self, bucket: str, key: str, body: bytes, *, if_match: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": if_match}
        async with self._request("PutObject", bucket, key):
            response = await self._client.put_object(Bucket=bucket, Key=key, Body=body, **condition)
        return str(response["ETag"])

    async def delete_object_if(self, bucket: str, key: str, *, if_match: str) -> None:
        async with self._request("DeleteObject", bucket, key):
            await self._client.delete_object(Bucket=bucket, Key=key, IfMatch=if_match)

    async def get_object_stamped(self, bucket: str, key: str) -> StampedObject:
        async with self._request("GetObject", bucket, key):
            response = await self._client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                data = bytes(await body.read())
        date = email.utils.parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return StampedObject(data, str(response["ETag"]), response["LastModified"].timestamp(), date.timestamp())

    async def close(self) -> None:
        if self._exit_stack is not None:
            await self._exit_stack.aclose()
            self._exit_stack = None
