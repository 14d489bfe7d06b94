"""Whole parts waiting in a spool file go to S3 in pieces read from the file while the
request is sent (``StreamedBody``), when bodies are not signed (over https with a
checksum, or ``payload_signing = "never"``): a part in flight then holds one piece in
memory, not the part. Here over moto's plain http with ``payload_signing = "never"``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import botocore.crt.auth
from awscrt import checksums as crt_checksums
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from tests.helpers import data_of, make_bucket, object_bytes
from tests.test_s3_spool_memory import count_spool_writes
from tests.test_s3_support import FAST_RETRIES, MiB, SeamWrapper, s3_config, upload
from tusd_py.config import Size
from tusd_py.stores import s3_botocore
from tusd_py.stores.base import UploadInfo, new_upload_id
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_botocore import (
    AioS3Client,
    _BytesBody,
    _KnownPayloadCrtS3Auth,
    _KnownPayloadS3Auth,
    _StreamedParameter,
    _StreamedPayload,
)
from tusd_py.stores.s3_client import S3Client, S3TransientError
from tusd_py.stores.s3_retry import RetryingS3Client
from tusd_py.stores.s3_spool import STREAM_PIECE_SIZE


def _crc32c(data: bytes) -> str:
    return base64.b64encode(crt_checksums.crc32c(data).to_bytes(4, "big")).decode()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _store(
    endpoint: str, bucket: str, *, sign: bool, part_size: int, seen: list[Any] | None = None,
    inner_wrap: Callable[[S3Client], S3Client] | None = None, **overrides: Any,
) -> S3Store:
    raw = await AioS3Client.connect(endpoint_url=endpoint, sign_payload=sign)
    if seen is not None:
        def capture(request: Any, **_: Any) -> None:
            if "partNumber=" in request.url:
                seen.append(request)

        raw._client.meta.events.register("before-send.s3", capture)
    client: S3Client = raw if inner_wrap is None else inner_wrap(raw)
    config = s3_config(
        endpoint, bucket, checksum="crc32c", payload_signing="always" if sign else "never",
        part_size=Size(part_size), **({"spool_memory": Size(0)} | overrides),
    )
    return S3Store(RetryingS3Client(client, FAST_RETRIES), config)


async def _upload_all(store: S3Store, data: bytes) -> str:
    """Upload ``data`` in one PATCH, then close ``store``; the upload's id."""
    try:
        created = await store.create(UploadInfo(id=new_upload_id(), length=len(data)))
        await upload(store, created.info, data, patch_size=len(data))
    finally:
        await store.close()
    return created.info.id


async def test_whole_spooled_parts_are_streamed_when_unsigned(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    seen: list[Any] = []
    part = 3 * MiB  # three pieces each
    store = await _store(fast_moto, bucket, sign=False, part_size=part, seen=seen)
    data = data_of(3 * part + 1000)
    upload_id = await _upload_all(store, data)
    assert await object_bytes(fast_moto, bucket, upload_id) == data

    streamed = [request for request in seen if type(request.body).__name__ == "_StreamedPayload"]
    # The last 1000 bytes never reached the spool file: sent from memory.
    assert len(streamed) == 3 and len(seen) == 4, [(type(r.body).__name__, r.headers["Content-Length"]) for r in seen]
    for request in streamed:
        number = int(request.url.split("partNumber=")[1].split("&")[0])
        expected = data[(number - 1) * part:number * part]
        assert _text(request.headers["Content-Length"]) == str(len(expected))
        assert "Expect" not in request.headers
        assert _text(request.headers["x-amz-checksum-crc32c"]) == _crc32c(expected)


def _assert_two_signed_parts_streamed(seen: list[Any], data: bytes, part: int) -> None:
    """Of the three parts sent, the two whole ones went in pieces, each signed with
    the SHA-256 of its bytes."""
    streamed = [request for request in seen if type(request.body).__name__ == "_StreamedPayload"]
    assert len(streamed) == 2 and len(seen) == 3, [(type(r.body).__name__, r.headers["Content-Length"]) for r in seen]
    for request in streamed:
        number = int(request.url.split("partNumber=")[1].split("&")[0])
        expected = data[(number - 1) * part:number * part]
        assert _text(request.headers["X-Amz-Content-SHA256"]) == hashlib.sha256(expected).hexdigest()
        assert "x-amz-content-sha256" in _text(request.headers["Authorization"])  # a signed header


async def test_signed_spooled_parts_are_streamed_with_the_sha256_of_the_spool(fast_moto: str) -> None:
    """SigV4 signs the SHA-256 of the body before the request goes out: the spool
    computed it while it wrote the part, so the part still goes in pieces."""
    bucket = await make_bucket(fast_moto)
    seen: list[Any] = []
    part = 3 * MiB
    store = await _store(fast_moto, bucket, sign=True, part_size=part, seen=seen)
    data = data_of(2 * part + 3)
    upload_id = await _upload_all(store, data)
    assert await object_bytes(fast_moto, bucket, upload_id) == data
    _assert_two_signed_parts_streamed(seen, data, part)


async def test_signed_parts_held_in_memory_are_hashed_off_the_event_loop(fast_moto: str, monkeypatch: Any) -> None:
    """A part held in memory (``spool_memory``) and signed gets its SHA-256 from a
    worker thread, not from botocore on the event loop: it goes in chunks with that
    digest signed; only the short last part is hashed in place."""
    loop_thread = threading.get_ident()
    hashed: list[tuple[int, bool]] = []
    sha256_hex = s3_botocore._sha256_hex

    def watched(chunks: Any) -> str:
        hashed.append((sum(len(chunk) for chunk in chunks), threading.get_ident() != loop_thread))
        return sha256_hex(chunks)

    monkeypatch.setattr(s3_botocore, "_sha256_hex", watched)
    bucket = await make_bucket(fast_moto)
    seen: list[Any] = []
    part = 3 * MiB
    store = await _store(fast_moto, bucket, sign=True, part_size=part, seen=seen, spool_memory=Size(4 * part))
    data = data_of(2 * part + 3)
    upload_id = await _upload_all(store, data)
    assert await object_bytes(fast_moto, bucket, upload_id) == data
    assert hashed == [(part, True), (part, True)]
    _assert_two_signed_parts_streamed(seen, data, part)


def test_a_streamed_body_is_signed_as_botocores_crt_signer_signs_its_bytes(monkeypatch: Any) -> None:
    """The CRT signer (botocore's with awscrt installed) given the spool's SHA-256
    signs a streamed part as it signs the same bytes, without reading the body."""
    data = data_of(100_000)
    monkeypatch.setattr(botocore.crt.auth, "get_current_datetime", lambda **_: datetime.datetime(2026, 1, 1))
    credentials = Credentials("testing", "testing")

    class Streamed:
        sha256 = hashlib.sha256(data).hexdigest()

        def __len__(self) -> int:
            return len(data)

    def signed(auth: Any, body: Any) -> str:
        made = AWSRequest("PUT", "http://127.0.0.1:9/bucket/key?partNumber=1&uploadId=u", data=body)
        made.context["client_config"] = Config(s3={"payload_signing_enabled": True})
        auth.add_auth(made)
        return str(made.headers["Authorization"])

    expected = signed(botocore.crt.auth.CrtS3SigV4Auth(credentials, "s3", "us-east-1"), data)
    assert signed(_KnownPayloadCrtS3Auth(credentials, "s3", "us-east-1"), _StreamedParameter(Streamed())) == expected  # type: ignore[arg-type]


def test_a_streamed_body_is_signed_as_botocore_signs_its_bytes() -> None:
    """The signer of streamed parts computes the canonical request that botocore's
    SigV4 computes over the same bytes; other bodies it signs as botocore does."""
    data = data_of(100_000)
    credentials = Credentials("testing", "testing")

    class Streamed:
        sha256 = hashlib.sha256(data).hexdigest()

        def __len__(self) -> int:
            return len(data)

    def request(body: Any) -> AWSRequest:
        made = AWSRequest("PUT", "http://127.0.0.1:9/bucket/key?partNumber=1&uploadId=u", data=body)
        made.context["client_config"] = Config(s3={"payload_signing_enabled": True})
        made.context["timestamp"] = "20260101T000000Z"
        return made

    def canonical(auth: S3SigV4Auth, made: AWSRequest) -> str:
        auth._modify_request_before_signing(made)
        return str(auth.canonical_request(made))

    ours = _KnownPayloadS3Auth(credentials, "s3", "us-east-1")
    botocores = S3SigV4Auth(credentials, "s3", "us-east-1")
    expected = canonical(botocores, request(data))
    assert canonical(ours, request(_StreamedParameter(Streamed()))) == expected  # type: ignore[arg-type]
    assert canonical(ours, request(data)) == expected


class _FailsMidBody(SeamWrapper):
    """The first UploadPart attempt reads part of its streamed body, then fails like a
    connection reset; the retry must send the body from its first byte."""

    def __init__(self, inner: S3Client) -> None:
        super().__init__(inner)
        self.failed = False

    async def upload_part(self, bucket: str, key: str, upload_id: str, part_number: int, body: Any,
                          checksum: Any) -> str:
        if not self.failed and not isinstance(body, bytes):
            self.failed = True
            async for _ in body.pieces():
                break  # one piece went out
            raise S3TransientError("UploadPart", "ConnectionError", 0, "connection reset mid-body")
        return await self.inner.upload_part(bucket, key, upload_id, part_number, body, checksum)


async def test_a_retried_streamed_part_is_sent_from_its_start(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    wrappers: list[_FailsMidBody] = []

    def wrap(inner: S3Client) -> S3Client:
        wrappers.append(_FailsMidBody(inner))
        return wrappers[-1]

    store = await _store(fast_moto, bucket, sign=False, part_size=3 * STREAM_PIECE_SIZE, inner_wrap=wrap)
    data = data_of(6 * STREAM_PIECE_SIZE + 7)
    upload_id = await _upload_all(store, data)
    assert wrappers[0].failed
    assert await object_bytes(fast_moto, bucket, upload_id) == data


async def _peak_traced_while_uploading(endpoint: str, *, sign: bool) -> int:
    bucket = await make_bucket(endpoint)
    part = 8 * MiB
    store = await _store(endpoint, bucket, sign=sign, part_size=part, max_concurrent_part_uploads=2)
    data = data_of(4 * part)
    try:
        created = await store.create(UploadInfo(id=new_upload_id(), length=len(data)))
        tracemalloc.start()
        try:
            await upload(store, created.info, data, patch_size=len(data))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        await store.close()
    assert await object_bytes(endpoint, bucket, created.info.id) == data
    return peak


async def test_a_streamed_part_in_flight_holds_pieces_not_the_part(fast_moto: str) -> None:
    """Python allocations while 4 parts of 8 MiB go out, 2 at a time, signed (plain
    http) or not: never a whole 8 MiB part in memory, only a few pieces."""
    unsigned = await _peak_traced_while_uploading(fast_moto, sign=False)
    signed = await _peak_traced_while_uploading(fast_moto, sign=True)
    print(f"\npeak traced: unsigned {unsigned / MiB:.1f} MiB, signed {signed / MiB:.1f} MiB")
    assert unsigned < 6 * MiB
    assert signed < 6 * MiB


class _RecordingWriter:
    """aiohttp's request writer as a body payload sees it: records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, chunk: Any) -> None:
        self.writes.append(bytes(chunk))


class _Pieces:
    def __init__(self, data: bytes, piece: int) -> None:
        self._data = data
        self._piece = piece

    @property
    def sha256(self) -> str | None:
        return None

    def __len__(self) -> int:
        return len(self._data)

    async def pieces(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self._data), self._piece):
            yield self._data[start:start + self._piece]

    async def read_all(self) -> bytes:
        return self._data


async def test_bodies_reach_the_transport_in_slices_not_whole_pieces() -> None:
    """Over TLS the transport encrypts all it is given at once and keeps the
    ciphertext until the socket takes it: a body handed over in 1 MiB pieces (or a
    whole part) would be held in memory twice. Both kinds of body go in slices."""
    data = data_of(3 * MiB + 5)
    for payload in (_StreamedPayload(_Pieces(data, MiB)), _BytesBody(data)):
        writer = _RecordingWriter()
        await payload.write_with_length(writer, None)
        assert b"".join(writer.writes) == data
        assert max(len(write) for write in writer.writes) <= 256 * 1024, [len(w) for w in writer.writes]


async def test_parts_within_the_spool_memory_budget_never_touch_a_spool_file(
    fast_moto: str, monkeypatch: Any,
) -> None:
    """With ``spool_memory`` room for the ring's slots, a PATCH's parts wait in memory
    (no write to a spool file and no read back); without it, in files."""
    written = count_spool_writes(monkeypatch)
    part = 3 * MiB
    data = data_of(3 * part + 1000)
    for budget, spooled in ((4 * part, 0), (0, 3 * part)):
        written.clear()
        bucket = await make_bucket(fast_moto)
        store = await _store(fast_moto, bucket, sign=False, part_size=part, spool_memory=Size(budget))
        upload_id = await _upload_all(store, data)
        assert await object_bytes(fast_moto, bucket, upload_id) == data
        assert sum(written) == spooled, budget
