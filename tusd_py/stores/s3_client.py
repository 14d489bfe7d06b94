"""The narrow S3 client seam of the S3 store.

``S3Client`` lists only the S3 calls the store makes, with plain Python types in and
out, so tests can wrap it to inject faults after any call or to count the bytes moved.
Each method is exactly one S3 request (pagination is the caller's job), which keeps
"crash after call i" meaningful.

Implementations: ``s3_botocore.AioS3Client`` over an aiobotocore client (it translates
botocore's exceptions into the small ``S3Error`` family below and never retries), and
``s3_retry.RetryingS3Client``, which wraps any ``S3Client`` and retries transient
failures with exponential backoff and full jitter.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
class BodyChecksum:
    """The integrity checksum of one request body, which S3 verifies: ``algorithm`` is
    a ``store.s3.checksum`` value (``md5`` goes as Content-MD5, the others as
    ``x-amz-checksum-<algorithm>``), ``value`` the base64 digest."""

    algorithm: str
    value: str


class StreamedBody(Protocol):
    """A part body read, while it is sent, in pieces from where it waits (a spool
    file): a part is then never whole in memory. ``pieces`` starts over at the first
    byte on every call (one call per attempt); ``read_all`` is for a client that
    must see the whole body before sending (to sign it) unless ``sha256`` gives the
    SHA-256 the signature needs."""

    @property
    def sha256(self) -> str | None:
        """The hex SHA-256 of the whole body when it is known without reading it
        (computed while it was spooled), else None."""
        ...

    def __len__(self) -> int: ...

    def pieces(self) -> AsyncIterator[bytes]: ...

    async def read_all(self) -> bytes: ...


class ChunksBody:
    """A body already in memory in several chunks, as a ``StreamedBody``: sent chunk by
    chunk instead of joined into one new bytes first (a copy of the whole part)."""

    def __init__(self, chunks: Sequence[bytes], sha256: str | None = None) -> None:
        self.chunks = chunks
        self._size = sum(len(chunk) for chunk in chunks)
        self._sha256 = sha256

    @property
    def sha256(self) -> str | None:
        return self._sha256

    def __len__(self) -> int:
        return self._size

    async def pieces(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    async def read_all(self) -> bytes:
        return b"".join(self.chunks)


PartBody = bytes | StreamedBody
"""What ``S3Client.upload_part`` sends."""


@dataclass(frozen=True, slots=True)
class PartEntry:
    """One uploaded part of a multipart upload."""

    number: int
    size: int
    etag: str
    checksum: BodyChecksum | None = None
    """Its additional checksum (``x-amz-checksum-*``) as sent or as ListParts names it;
    CompleteMultipartUpload must repeat it for uploads created with an algorithm."""


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

    async def create_multipart_upload(
        self, bucket: str, key: str, content_type: str | None, checksum_algorithm: str = ""
    ) -> str:
        """Start a multipart upload of ``key`` whose parts carry ``checksum_algorithm``
        (a ``store.s3.checksum`` value; empty, md5 or none: no additional checksum);
        returns its upload id."""
        ...

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        """Upload one part (``checksum`` of ``body``, verified by S3); returns its ETag."""
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
        self, bucket: str, key: str, upload_id: str, parts: Sequence[PartEntry], *, if_absent: bool = False
    ) -> None:
        """Assemble the object from ``parts`` (number, ETag and additional checksum, if
        any), in order; with ``if_absent`` only where no object has the key (else
        ``S3PreconditionFailed``)."""
        ...

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        """Abort a multipart upload and discard its parts."""
        ...

    async def put_object(self, bucket: str, key: str, body: bytes, checksum: BodyChecksum | None) -> str:
        """Store a whole object (verified by S3 against ``checksum``); returns its ETag."""
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


def content_md5(body: bytes) -> BodyChecksum:
    """The Content-MD5 checksum of ``body`` (base64 of the binary digest)."""
    return BodyChecksum("md5", base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode("ascii"))
