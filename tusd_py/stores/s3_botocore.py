"""``AioS3Client``: the ``S3Client`` seam over one aiobotocore S3 client.

It translates botocore's exceptions into the ``S3Error`` family of ``s3_client`` and
never retries (botocore's own retries are switched off so that retrying happens in
exactly one place, ``s3_retry``). Every request runs under its deadline (``Deadlines``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import aiohttp
import aiohttp.payload
import botocore.auth
import botocore.crt.auth
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.handlers import convert_body_to_file_like_object, set_operation_specific_signer

from tusd_py.stores.s3_botocore_data import trimming_loader
from tusd_py.stores.s3_client import (
    NOT_FOUND_ERROR_CODES,
    STREAM_CHUNK_SIZE,
    TRANSIENT_ERROR_CODES,
    BodyChecksum,
    ChunksBody,
    Deadlines,
    MultipartEntry,
    MultipartPage,
    ObjectEntry,
    ObjectPage,
    PartBody,
    PartEntry,
    PartPage,
    S3Error,
    S3NotFound,
    S3PreconditionFailed,
    S3Timeout,
    S3TransientError,
    StampedObject,
    StreamedBody,
)

log = logging.getLogger("tusd_py.stores.s3")


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
    avoids), and without joining all of it with the request head. The rest goes to
    the transport as views of the body, in slices (``_write_in_slices``), not copied."""

    def __init__(self, value: bytes) -> None:
        aiohttp.payload.Payload.__init__(self, value, content_type="application/octet-stream")
        self._size = len(value)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        # aiohttp sends the request head together with the first body write, joined
        # into one new bytes (on Python < 3.12.9): a copy of a whole 8 MiB part, about
        # 0.3 CPU s/GiB. A small first piece keeps that join small; the rest goes to
        # the transport as a view of the body, not copied.
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        await writer.write(view[:_FIRST_PIECE])
        await _write_in_slices(writer, view[_FIRST_PIECE:])


_FIRST_PIECE = 16 * 1024
"""Body bytes sent joined with the request head (see ``_BytesBody.write_with_length``)."""
_SEND_SLICE = 256 * 1024
"""Most body bytes handed to the transport in one write. Over TLS the transport
encrypts all it is given at once and holds the ciphertext until the socket takes it:
a whole part (or piece) written at once would be in memory twice."""


async def _write_in_slices(writer: Any, view: memoryview) -> None:
    """Write ``view`` in slices of at most ``_SEND_SLICE`` bytes, each once the
    transport took the last (aiohttp's writer drains above 64 KiB)."""
    for start in range(0, len(view), _SEND_SLICE):
        await writer.write(view[start:start + _SEND_SLICE])


class _StreamedParameter:
    """A ``StreamedBody`` as botocore's ``Body`` parameter: botocore checks that a
    body it does not know has ``read`` and measures it with ``len``; it must not read
    it (it would only to sign it: a streamed body goes unsigned, or signed with the
    SHA-256 it carries, see ``_KnownPayloadS3Auth``): ``before-send`` puts the
    ``_StreamedPayload`` in its place."""

    def __init__(self, body: StreamedBody) -> None:
        self.body = body

    def __len__(self) -> int:
        return len(self.body)

    def read(self, *_: Any) -> bytes:
        raise RuntimeError("a streamed part body was to be read whole by botocore")

    def seek(self, offset: int, whence: int = 0) -> int:
        """For botocore's CRT signer, which wraps a body with ``seek`` as a stream
        and, for an unsigned payload, never reads it."""
        return 0


def _known_sha256(request: Any) -> str | None:
    body = request.body
    return body.body.sha256 if isinstance(body, _StreamedParameter) else None


class _KnownPayloadS3Auth(botocore.auth.S3SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """botocore's SigV4 for S3, except that a streamed body that knows its SHA-256
    (computed while it was spooled) is signed with it instead of being read whole
    first: a signed part (plain http) is then sent in pieces like an unsigned one.
    Any other body is signed as botocore does."""

    def payload(self, request: Any) -> str:
        known = _known_sha256(request)
        if known is not None and self._should_sha256_sign_payload(request):
            return known
        return str(super().payload(request))


class _KnownPayloadCrtS3Auth(botocore.crt.auth.CrtS3SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """``_KnownPayloadS3Auth`` for botocore's CRT signer (botocore's choice when awscrt
    is installed, as it is here): it signs a SHA-256 it is given and never reads the
    body for it."""

    def _get_existing_sha256(self, request: Any) -> str | None:
        return _known_sha256(request)


_KNOWN_PAYLOAD_SIGNER = "s3v4-tusd-py-known-payload"
"""The name ``choose-signer`` gives our signer in botocore's table of signers (a name
of our own, so no other client is affected): the CRT one where botocore signs S3
requests with the CRT, else the Python one."""
botocore.auth.AUTH_TYPE_MAPS.setdefault(
    _KNOWN_PAYLOAD_SIGNER,
    _KnownPayloadCrtS3Auth if issubclass(botocore.auth.AUTH_TYPE_MAPS["s3v4"], botocore.crt.auth.CrtS3SigV4Auth)
    else _KnownPayloadS3Auth,
)


def _choose_known_payload_signer(context: Any, signing_name: str, **kwargs: Any) -> Any:
    """UploadPart's signer: botocore's choice (this handler runs before botocore's
    own, which it calls), with ours in place of plain SigV4 for S3 (any other, e.g.
    S3 Express or SigV4a, stays)."""
    chosen = set_operation_specific_signer(context=context, signing_name=signing_name, **kwargs)
    return _KNOWN_PAYLOAD_SIGNER if chosen == "s3v4" else chosen


class _StreamedPayload(aiohttp.payload.Payload):
    """A ``StreamedBody`` sent piece by piece, each in slices (``_write_in_slices``):
    the memory of one part in flight is one piece, not the part."""

    def __init__(self, body: StreamedBody) -> None:
        aiohttp.payload.Payload.__init__(self, body, content_type="application/octet-stream")
        self._size = len(body)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a streamed part body is not text")

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        first = True
        async with contextlib.aclosing(self._value.pieces()) as pieces:
            async for piece in pieces:
                view = memoryview(piece)
                if first:  # keep the join with the request head small (see _BytesBody)
                    first = False
                    await writer.write(view[:_FIRST_PIECE])
                    view = view[_FIRST_PIECE:]
                await _write_in_slices(writer, view)
                # Let go of this piece before the next is read: held through the read,
                # every part in flight kept two pieces in memory.
                del piece, view


def _bytes_body_before_send(request: Any, **_: Any) -> None:
    if isinstance(request.body, _StreamedParameter):
        request.body = _StreamedPayload(request.body.body)
        del request.headers["Expect"]  # botocore asks for 100-continue for bodies with ``read``
    elif isinstance(request.body, bytes) and len(request.body) > _FIRST_PIECE:
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
    events.register("choose-signer.s3.UploadPart", _choose_known_payload_signer)


SIGN_IN_THREAD_SIZE = 256 * 1024
"""A signed body at least this large gets the SHA-256 that SigV4 signs from a worker
thread (``_with_sha256``): botocore would hash it on the event loop, about 7 ms for an
8 MiB part here. Smaller bodies are hashed in place."""


async def _with_sha256(body: PartBody) -> ChunksBody:
    """``body`` with its SHA-256 computed in a worker thread: then sent as it is, in
    chunks, with that digest signed (``_KnownPayloadS3Auth``)."""
    if isinstance(body, ChunksBody):
        chunks = body.chunks
    else:
        chunks = [body if isinstance(body, bytes) else await body.read_all()]
    return ChunksBody(chunks, await asyncio.to_thread(_sha256_hex, chunks))


def _sha256_hex(chunks: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


_CHECKSUM_ALGORITHMS = {"crc64nvme": "CRC64NVME", "crc32c": "CRC32C", "crc32": "CRC32", "sha256": "SHA256"}
"""``store.s3.checksum`` values that are S3 "additional checksums", by S3's name."""


def _checksum_parameters(checksum: BodyChecksum | None) -> dict[str, str]:
    """botocore's parameter for ``checksum``: ``ContentMD5`` or ``Checksum<NAME>``."""
    if checksum is None:
        return {}
    if checksum.algorithm == "md5":
        return {"ContentMD5": checksum.value}
    return {f"Checksum{_CHECKSUM_ALGORITHMS[checksum.algorithm]}": checksum.value}


def _listed_checksum(part: dict[str, Any]) -> BodyChecksum | None:
    """The additional checksum ListParts names for ``part``, if any."""
    for algorithm, name in _CHECKSUM_ALGORITHMS.items():
        value = part.get(f"Checksum{name}")
        if value:
            return BodyChecksum(algorithm, str(value))
    return None


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
        streams_bodies: bool = False,
    ) -> None:
        """``on_timeout`` hears the operation of every request that ran out of time.
        ``streams_bodies``: send a ``StreamedBody`` in pieces (only when bodies are not
        signed: SigV4 hashes the whole body before the request goes out)."""
        self._client = client
        self._exit_stack = exit_stack
        self._deadlines = deadlines or Deadlines()
        self._on_timeout = on_timeout
        self._streams_bodies = streams_bodies

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
        sign_payload: bool = True,
        ca_bundle: str = "",
    ) -> AioS3Client:
        """An S3 client with credentials from the standard AWS chain (environment,
        shared files/profile, container and instance metadata).

        Raises ``S3Error`` with code ``"NoCredentials"`` when the chain finds none.
        ``endpoint_url`` selects an S3-compatible service and path-style addressing.
        ``sign_payload`` False sends bodies as UNSIGNED-PAYLOAD (no SHA-256 of each
        body for SigV4; their checksum, and TLS, protect them instead). ``ca_bundle``:
        a PEM file of trusted CAs (empty: AWS_CA_BUNDLE, else the system's).
        """
        session = get_session()
        # Only the data this client needs stays in memory (s3_botocore_data).
        session.register_component("data_loader", trimming_loader(session.get_config_variable("data_path")))
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
            s3={"payload_signing_enabled": sign_payload} | ({"addressing_style": "path"} if endpoint_url else {}),
            # Retries happen once, in RetryingS3Client, where tests can see them.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # We send the checksum (store.s3.checksum) ourselves; botocore's default
            # CRC32 on every PutObject/UploadPart would hash each body a second time.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        exit_stack = contextlib.AsyncExitStack()
        client = await exit_stack.enter_async_context(
            session.create_client(
                "s3", endpoint_url=endpoint_url or None, region_name=region, config=config, verify=ca_bundle or None
            )
        )
        _send_bodies_as_bytes(client)
        return cls(client, exit_stack, deadlines=deadlines, on_timeout=on_timeout, streams_bodies=not sign_payload)

    async def head_bucket(self, bucket: str) -> None:
        async with self._request("HeadBucket", bucket):
            await self._client.head_bucket(Bucket=bucket)

    async def create_multipart_upload(
        self, bucket: str, key: str, content_type: str | None, checksum_algorithm: str = ""
    ) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        if checksum_algorithm in _CHECKSUM_ALGORITHMS:
            extra["ChecksumAlgorithm"] = _CHECKSUM_ALGORITHMS[checksum_algorithm]
            if checksum_algorithm == "crc64nvme":  # S3 knows CRC64NVME only as a full-object checksum
                extra["ChecksumType"] = "FULL_OBJECT"
        async with self._request("CreateMultipartUpload", bucket, key):
            response = await self._client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
        return str(response["UploadId"])

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, part_number: int, body: PartBody, checksum: BodyChecksum | None
    ) -> str:
        if not self._streams_bodies and (isinstance(body, bytes) or body.sha256 is None):
            if len(body) >= SIGN_IN_THREAD_SIZE:
                body = await _with_sha256(body)
            elif not isinstance(body, bytes):
                body = await body.read_all()  # botocore hashes a small body to sign it
        sent: bytes | _StreamedParameter = body if isinstance(body, bytes) else _StreamedParameter(body)
        async with self._request("UploadPart", bucket, key, self._deadlines.for_body(len(body))):
            response = await self._client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=part_number, Body=sent,
                ContentLength=len(body), **_checksum_parameters(checksum),
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
            PartEntry(int(part["PartNumber"]), int(part["Size"]), str(part["ETag"]), _listed_checksum(part))
            for part in response.get("Parts", [])
        ]
        truncated = bool(response.get("IsTruncated"))
        next_marker = response.get("NextPartNumberMarker")
        return PartPage(parts, int(next_marker) if truncated and next_marker else None)

    async def complete_multipart_upload(
        self, bucket: str, key: str, upload_id: str, parts: Sequence[PartEntry], *, if_absent: bool = False
    ) -> None:
        completed = [
            {"PartNumber": part.number, "ETag": part.etag}
            | (_checksum_parameters(part.checksum) if part.checksum and part.checksum.algorithm != "md5" else {})
            for part in parts
        ]
        async with self._request("CompleteMultipartUpload", bucket, key, self._deadlines.complete):
            await self._client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": completed},
                **({"IfNoneMatch": "*"} if if_absent else {}),
            )

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        async with self._request("AbortMultipartUpload", bucket, key):
            await self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    async def put_object(self, bucket: str, key: str, body: bytes, checksum: BodyChecksum | None) -> str:
        async with self._request("PutObject", bucket, key, self._deadlines.for_body(len(body))):
            response = await self._client.put_object(
                Bucket=bucket, Key=key, Body=body, **_checksum_parameters(checksum)
            )
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
