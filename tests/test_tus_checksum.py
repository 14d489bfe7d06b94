"""The checksum extension on the file store: verified bodies are stored, anything
else (mismatch, interruption, oversize) stores nothing of the request."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tus_fakes import BASE, Harness, QueueBody, StaticBody, body_bytes, header, make_harness, make_request

from tusd_py.config import Config, Size
from tusd_py.http.types import ClientDisconnected
from tusd_py.tus.checksum import parse_upload_checksum
from tusd_py.tus.errors import TusError


def checksum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


@pytest.fixture
async def tus(tmp_path: Path) -> AsyncIterator[Harness]:
    config = Config()
    config.checksum.max_buffered_size = Size(1000)
    harness = make_harness(tmp_path / "data", config)
    yield harness
    await harness.close()


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256"])
async def test_matching_checksum_stores_the_body(tus: Harness, algorithm: str) -> None:
    upload_id = await tus.create(10)
    response = await tus.patch(
        upload_id, 0, StaticBody([b"hello", b" wor"]), **{"Upload-Checksum": checksum(algorithm, b"hello wor")}
    )
    assert response.status == 204
    assert header(response, "Upload-Offset") == "9"
    response = await tus.patch(upload_id, 9, StaticBody([b"d"]), **{"Upload-Checksum": checksum(algorithm, b"d")})
    assert response.status == 204
    assert tus.data(upload_id) == b"hello word"
    assert (await tus.store.get(upload_id)).info.finished


@pytest.mark.both_loops
async def test_mismatch_is_460_and_stores_nothing(tus: Harness) -> None:
    upload_id = await tus.create(10)
    await tus.patch(upload_id, 0, StaticBody([b"abc"]))
    response = await tus.patch(upload_id, 3, StaticBody([b"defg"]), **{"Upload-Checksum": checksum("sha1", b"DEFG")})
    assert response.status == 460
    assert response.reason == "Checksum Mismatch"
    assert header(response, "Upload-Offset") == "3"
    assert b"mismatch" in await body_bytes(response)
    assert await tus.offset(upload_id) == 3
    assert tus.data(upload_id) == b"abc"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sha1", b"invalid Upload-Checksum"),  # no algorithm / no digest
        ("qvAq5MNy6hB1sK4wK8cTN0oF4A4=", b"invalid Upload-Checksum"),  # digest without algorithm
        ("sha1 not*base64!", b"base64"),
        ("sha1 aGVsbG8=", b"20 bytes"),  # valid base64, wrong digest length
        ("sha1  qvAq5MNy6hB1sK4wK8cTN0oF4A4=", b"invalid Upload-Checksum"),
        ("crc32 AAAAAA==", b"unsupported"),
        ("sha512 AAAA", b"unsupported"),
    ],
)
async def test_bad_checksum_headers_are_400_before_reading(tus: Harness, value: str, message: bytes) -> None:
    upload_id = await tus.create(10)
    body = StaticBody([b"abc"])
    response = await tus.patch(upload_id, 0, body, **{"Upload-Checksum": value})
    assert response.status == 400
    assert message in await body_bytes(response)
    assert body.reads == 0
    assert await tus.offset(upload_id) == 0


def test_parse_accepts_upper_case_algorithm_names() -> None:
    parsed = parse_upload_checksum("SHA256 " + base64.b64encode(bytes(32)).decode())
    assert parsed is not None and parsed.algorithm == "sha256"
    with pytest.raises(TusError):
        parse_upload_checksum("")


async def test_interrupted_patch_with_checksum_stores_nothing(tus: Harness) -> None:
    upload_id = await tus.create(10)
    body = StaticBody([b"abcde"], error=ClientDisconnected())
    response = await tus.patch(upload_id, 0, body, **{"Upload-Checksum": checksum("md5", b"abcdefghij")})
    assert body.received == 5  # the bytes arrived ...
    assert response.status == 204
    assert header(response, "Upload-Offset") == "0"  # ... and none of them was stored
    assert await tus.offset(upload_id) == 0
    # Without a checksum the same interruption keeps what arrived.
    await tus.patch(upload_id, 0, StaticBody([b"abcde"], error=ClientDisconnected()))
    assert await tus.offset(upload_id) == 5


async def test_released_patch_with_checksum_stores_nothing(tus: Harness) -> None:
    upload_id = await tus.create(10)
    stalled = QueueBody(length=10)
    stalled.feed(b"abcd")
    first = asyncio.create_task(tus.patch(upload_id, 0, stalled, **{"Upload-Checksum": checksum("md5", b"abcdefghij")}))
    await stalled.waiting.wait()
    assert await tus.offset(upload_id) == 0  # HEAD asks the PATCH to release
    response = await first
    assert response.status == 204
    assert header(response, "Upload-Offset") == "0"


async def test_body_above_the_bound_is_413(tus: Harness) -> None:
    upload_id = await tus.create(5000)
    # Declared: refused before a byte is read.
    body = StaticBody([b"x" * 1001])
    response = await tus.patch(upload_id, 0, body, **{"Upload-Checksum": checksum("md5", b"x" * 1001)})
    assert response.status == 413
    assert b"max_buffered_size" in await body_bytes(response)
    assert body.reads == 0
    # Chunked: refused when the bound is crossed; nothing stored.
    body = StaticBody([b"x" * 600, b"x" * 600], length=None)
    response = await tus.patch(upload_id, 0, body, **{"Upload-Checksum": checksum("md5", b"x" * 1200)})
    assert response.status == 413
    assert await tus.offset(upload_id) == 0
    # Without a checksum there is no such bound.
    response = await tus.patch(upload_id, 0, StaticBody([b"x" * 1200]))
    assert response.status == 204


async def test_checksum_over_a_body_running_past_the_length_stores_nothing(tus: Harness) -> None:
    upload_id = await tus.create(4)
    body = StaticBody([b"abcdef"], length=None)
    response = await tus.patch(upload_id, 0, body, **{"Upload-Checksum": checksum("sha1", b"abcdef")})
    assert response.status == 413
    assert await tus.offset(upload_id) == 0


async def test_options_advertises_the_algorithms(tus: Harness) -> None:
    response = await tus(make_request("OPTIONS", BASE))
    assert "checksum" in (header(response, "Tus-Extension") or "").split(",")
    assert header(response, "Tus-Checksum-Algorithm") == "md5,sha1,sha256"
