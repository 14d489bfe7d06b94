"""store.s3.checksum: every body the S3 store sends carries the configured checksum,
and that checksum is right for the bytes that went out.

moto 5.2 verifies none of them (it stores a part with a wrong Content-MD5 or
x-amz-checksum-* as readily as a right one: ``test_moto_does_not_verify_checksums``
shows it, so that the day it starts to, a corrupting-proxy test can replace this
one). So these tests look at each request as botocore hands it to the connection
(``before-send``): the header names the algorithm, its value is the digest of the
exact body sent, multipart uploads are created for the algorithm and completed with
each part's checksum, as AWS requires.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from awscrt import checksums as crt_checksums

from tests.helpers import data_of, make_bucket, object_bytes
from tests.test_s3_support import FAST_RETRIES, MiB, body, s3_config, upload
from tusd_py.config import Size
from tusd_py.config_checks import validate
from tusd_py.stores.base import UploadInfo, new_upload_id
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_botocore import AioS3Client
from tusd_py.stores.s3_checksum import CHECKSUMS, signs_payload
from tusd_py.stores.s3_client import ChunksBody
from tusd_py.stores.s3_retry import RetryingS3Client
from tusd_py.stores.s3_spool import _SpoolFileBody

HEADERS = {
    "md5": "Content-MD5", "crc32": "x-amz-checksum-crc32", "crc32c": "x-amz-checksum-crc32c",
    "crc64nvme": "x-amz-checksum-crc64nvme", "sha256": "x-amz-checksum-sha256",
}


def _expected(algorithm: str, body: bytes) -> str:
    """The checksum computed here, independently of tusd_py.stores.s3_checksum."""
    if algorithm == "md5":
        digest = hashlib.md5(body).digest()
    elif algorithm == "sha256":
        digest = hashlib.sha256(body).digest()
    elif algorithm == "crc64nvme":
        digest = crt_checksums.crc64nvme(body).to_bytes(8, "big")
    else:
        digest = getattr(crt_checksums, algorithm)(body).to_bytes(4, "big")
    return base64.b64encode(digest).decode()


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    kind: str = ""
    """The body's type as the connection gets it."""


def _body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    value = getattr(body, "_value", None)  # aiohttp payload wrapping the bytes or a StreamedBody
    if isinstance(value, ChunksBody):
        return b"".join(value.chunks)
    if isinstance(value, _SpoolFileBody):
        return value._slot._read_all()  # the spool file, as the pieces will read it
    return bytes(value) if value is not None else b""


async def _store_capturing(
    endpoint: str, bucket: str, checksum: str, sent: list[Sent], *, sign: bool = True
) -> S3Store:
    raw = await AioS3Client.connect(endpoint_url=endpoint, sign_payload=sign)

    def capture(request: Any, **_: Any) -> None:
        headers = {key.lower(): value.decode() if isinstance(value, bytes) else value
                   for key, value in request.headers.items()}
        sent.append(Sent(request.method, request.url, headers, _body_bytes(request.body), type(request.body).__name__))

    raw._client.meta.events.register("before-send.s3", capture)
    config = s3_config(endpoint, bucket, checksum=checksum, part_size=Size(MiB))
    return S3Store(RetryingS3Client(raw, FAST_RETRIES), config)


@pytest.fixture
def sent() -> Iterator[list[Sent]]:
    yield []


@pytest.mark.parametrize(
    ("checksum", "sign"),
    [(checksum, True) for checksum in CHECKSUMS] + [("crc32c", False), ("sha256", False), ("md5", False)],
    ids=[*CHECKSUMS, "crc32c-unsigned", "sha256-unsigned", "md5-unsigned"],
)
async def test_every_body_carries_the_configured_checksum(
    fast_moto: str, checksum: str, sign: bool, sent: list[Sent]
) -> None:
    """Signed, small bodies go whole; a whole part goes in pieces, signed with the
    SHA-256 the spool computed (spool file) or a worker thread did (held in memory,
    ``spool_memory``); unsigned, parts go
    as StreamedBody (from the spool file, or chunk by chunk when a tail segment
    starts them): the checksum must be that of the bytes sent either way."""
    bucket = await make_bucket(fast_moto)
    store = await _store_capturing(fast_moto, bucket, checksum, sent, sign=sign)
    data = data_of(3 * MiB + 700 * 1024)
    try:
        created = await store.create(UploadInfo(id=new_upload_id(), length=len(data)))
        # 1.5 MiB PATCHes: whole parts from the spool and parts that start with a tail segment.
        finished = await upload(store, created.info, data, patch_size=3 * MiB // 2)
        assert finished.storage["checksum"] == checksum
    finally:
        await store.close()
    assert await object_bytes(fast_moto, bucket, created.info.id) == data

    header = HEADERS.get(checksum)
    bodies = [request for request in sent if request.method == "PUT" and request.body]
    parts = [request for request in bodies if "partNumber=" in request.url]
    assert len(parts) == 4 and any(".tail/" in request.url for request in bodies)
    streamed = [request for request in parts if request.kind == "_StreamedPayload"]
    if sign:
        # Signed, a whole part from the spool file goes out in pieces too, signed with
        # the SHA-256 the spool computed: it must be that of the bytes sent.
        for request in streamed:
            assert request.headers["x-amz-content-sha256"] == hashlib.sha256(request.body).hexdigest()
    else:
        assert len(streamed) == len(parts), [request.kind for request in parts]
    for request in bodies:
        present = [name for name in HEADERS.values() if name.lower() in request.headers]
        if header is None:
            assert present == [], request.url
        else:
            assert present == [header], request.url
            assert request.headers[header.lower()] == _expected(checksum, request.body), request.url

    (create,) = [request for request in sent if request.method == "POST" and request.url.endswith("?uploads")]
    (complete,) = [request for request in sent if request.method == "POST" and "uploadId=" in request.url]
    names_parts = checksum not in ("md5", "none")
    assert create.headers.get("x-amz-checksum-algorithm") == (checksum.upper() if names_parts else None)
    if names_parts:
        field = f"Checksum{checksum.upper()}"
        listed = [value.decode() for value in re.findall(rf"<{field}>([^<]+)</{field}>".encode(), complete.body)]
        # Parts a later request listed come without: moto's ListParts names no part
        # checksums (AWS's does, for uploads created with an algorithm).
        assert listed and set(listed) <= {_expected(checksum, part.body) for part in parts}
    if checksum == "crc64nvme":
        assert create.headers.get("x-amz-checksum-type") == "FULL_OBJECT"


async def test_complete_names_every_part_checksum_it_knows(fast_moto: str, sent: list[Sent]) -> None:
    """One PATCH then finish: every part's checksum is known without a listing."""
    bucket = await make_bucket(fast_moto)
    store = await _store_capturing(fast_moto, bucket, "crc32c", sent)
    data = data_of(3 * MiB + 5)
    try:
        created = await store.create(UploadInfo(id=new_upload_id(), length=len(data)))
        await upload(store, created.info, data, patch_size=len(data))
    finally:
        await store.close()
    parts = [request for request in sent if request.method == "PUT" and "partNumber=" in request.url]
    (complete,) = [request for request in sent if request.method == "POST" and "uploadId=" in request.url]
    listed = [value.decode() for value in re.findall(rb"<ChecksumCRC32C>([^<]+)</ChecksumCRC32C>", complete.body)]
    parts.sort(key=lambda request: int(re.search(r"partNumber=(\d+)", request.url).group(1)))  # type: ignore[union-attr]
    assert len(parts) == 4 and listed == [_expected("crc32c", part.body) for part in parts]


async def test_the_part_built_at_finish_carries_the_upload_checksum(fast_moto: str, sent: list[Sent]) -> None:
    """A deferred length declared after the bytes: finish uploads the stored tail as
    the last part, which must carry the upload's algorithm like every other part (AWS
    rejects a part without it in a multipart upload created for an algorithm)."""
    bucket = await make_bucket(fast_moto)
    store = await _store_capturing(fast_moto, bucket, "crc32c", sent)
    data = data_of(MiB + MiB // 2)
    try:
        created = await store.create(UploadInfo(id=new_upload_id(), length=None))
        await created.write(0, body(data, 64 * 1024))
        opened = await store.get(created.info.id)
        await opened.declare_length(len(data))
        await opened.finish()
    finally:
        await store.close()
    assert await object_bytes(fast_moto, bucket, created.info.id) == data
    parts = [request for request in sent if request.method == "PUT" and "partNumber=" in request.url]
    assert len(parts) == 2
    for part in parts:
        assert "content-md5" not in part.headers, part.url
        assert part.headers["x-amz-checksum-crc32c"] == _expected("crc32c", part.body), part.url


def test_list_parts_reads_the_part_checksums_s3_names() -> None:
    from tusd_py.stores.s3_botocore import _listed_checksum
    from tusd_py.stores.s3_client import BodyChecksum

    assert _listed_checksum({"PartNumber": 1, "ChecksumCRC32C": "AAAAAA=="}) == BodyChecksum("crc32c", "AAAAAA==")
    assert _listed_checksum({"PartNumber": 1}) is None


async def test_an_upload_keeps_the_checksum_it_was_created_with(fast_moto: str, sent: list[Sent]) -> None:
    """Changing store.s3.checksum must not break uploads in progress: their multipart
    upload was created for the old algorithm (AWS rejects parts of another)."""
    bucket = await make_bucket(fast_moto)
    data = data_of(2 * MiB + 10)
    first = await _store_capturing(fast_moto, bucket, "sha256", [])
    try:
        created = await first.create(UploadInfo(id=new_upload_id(), length=len(data)))
    finally:
        await first.close()
    second = await _store_capturing(fast_moto, bucket, "crc32c", sent)
    try:
        await upload(second, created.info, data, patch_size=len(data))
    finally:
        await second.close()
    parts = [request for request in sent if request.method == "PUT" and "partNumber=" in request.url]
    assert parts and all(request.headers["x-amz-checksum-sha256"] == _expected("sha256", request.body)
                         for request in parts)
    assert await object_bytes(fast_moto, bucket, created.info.id) == data


async def test_moto_does_not_verify_checksums(fast_moto: str) -> None:
    """Why the tests above check what is sent rather than show S3 rejecting a corrupted
    part: moto stores a body whose Content-MD5 and x-amz-checksum-crc32c are wrong."""
    bucket = await make_bucket(fast_moto)
    raw = await AioS3Client.connect(endpoint_url=fast_moto)
    try:
        client = raw._client
        wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        await client.put_object(Bucket=bucket, Key="md5", Body=b"body", ContentMD5=wrong)
        await client.put_object(Bucket=bucket, Key="crc", Body=b"body", ChecksumCRC32C=_expected("crc32c", b"other"))
    finally:
        await raw.close()
    assert await object_bytes(fast_moto, bucket, "md5") == b"body"


@pytest.mark.parametrize(
    ("endpoint", "checksum", "mode", "signed"),
    [
        ("https://s3.example", "crc32c", "auto", False),
        ("", "crc32c", "auto", False),  # AWS: https
        ("https://s3.example", "none", "auto", True),
        ("http://127.0.0.1:9000", "crc32c", "auto", True),
        ("http://127.0.0.1:9000", "crc32c", "never", False),
        ("https://s3.example", "md5", "always", True),
    ],
)
def test_payload_signing(endpoint: str, checksum: str, mode: str, signed: bool) -> None:
    config = s3_config(endpoint, "bucket", checksum=checksum, payload_signing=mode)
    assert signs_payload(config) is signed


async def test_unsigned_payload_is_sent_when_signing_is_off(fast_moto: str, sent: list[Sent]) -> None:
    """payload_signing = never over http: no SHA-256 of the body (moto accepts
    UNSIGNED-PAYLOAD like S3); the default over http signs it."""
    for sign, expected in ((False, "UNSIGNED-PAYLOAD"), (True, None)):
        raw = await AioS3Client.connect(endpoint_url=fast_moto, sign_payload=sign)
        seen: list[Any] = []

        def capture(request: Any, seen: list[Any] = seen, **_: Any) -> None:
            seen.append(request.headers.get("x-amz-content-sha256"))

        raw._client.meta.events.register("before-send.s3", capture)
        bucket = await make_bucket(fast_moto)
        try:
            await raw.put_object(bucket, "key", b"body", None)
        finally:
            await raw.close()
        value = seen[-1].decode() if isinstance(seen[-1], bytes) else seen[-1]
        if expected is None:
            assert value == hashlib.sha256(b"body").hexdigest()
        else:
            assert value == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"checksum": "crc16"}, "store.s3.checksum must be one of"),
        ({"payload_signing": "sometimes"}, "store.s3.payload_signing must be"),
        ({"payload_signing": "never", "checksum": "none"}, "needs a store.s3.checksum"),
        ({"ca_bundle": "/nonexistent/ca.pem"}, "store.s3.ca_bundle"),
    ],
)
def test_bad_integrity_settings_are_one_line_errors(overrides: dict[str, str], message: str) -> None:
    from tusd_py.config import Config, ConfigError

    config = Config()
    config.store.backend = "s3"
    config.store.s3 = s3_config("http://127.0.0.1:9000", "bucket", part_size=Size(8 * MiB), **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config)
