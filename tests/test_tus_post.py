"""POST: creation, creation-with-upload, creation-defer-length, Location."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from tus_fakes import BASE, Harness, StaticBody, b64, files_in, header, make_harness, make_request

from tusd_py.config import Config


async def test_creation_returns_201_with_absolute_location(tus: Harness) -> None:
    response = await tus(make_request("POST", BASE, {"Upload-Length": "100"}))
    assert response.status == 201
    location = header(response, "Location")
    assert location is not None
    assert location.startswith("http://tus.example.org/files/")
    upload_id = location.rsplit("/", 1)[-1]
    assert header(response, "Tus-Resumable") == "1.0.0"
    assert header(response, "Upload-Offset") is None  # no creation-with-upload
    assert (tus.directory / f"{upload_id}.info").exists()
    assert await tus.offset(upload_id) == 0


async def test_creation_stores_metadata_as_sent(tus: Harness) -> None:
    metadata = f"filename {b64('report.pdf')},is_confidential"
    upload_id = await tus.create(10, metadata)
    response = await tus.head(upload_id)
    assert header(response, "Upload-Metadata") == metadata


@pytest.mark.both_loops
async def test_creation_with_upload_stores_body_and_answers_offset(tus: Harness) -> None:
    data = b"hello world"
    response = await tus(
        make_request(
            "POST",
            BASE,
            {"Upload-Length": str(len(data)), "Content-Type": "application/offset+octet-stream"},
            StaticBody([data[:5], data[5:]]),
        )
    )
    assert response.status == 201
    assert header(response, "Upload-Offset") == str(len(data))
    upload_id = (header(response, "Location") or "").rsplit("/", 1)[-1]
    assert tus.data(upload_id) == data
    info = (await tus.store.get(upload_id)).info
    assert info.finished


async def test_creation_with_partial_upload(tus: Harness) -> None:
    response = await tus(
        make_request(
            "POST",
            BASE,
            {"Upload-Length": "10", "Content-Type": "application/offset+octet-stream"},
            StaticBody([b"abc"]),
        )
    )
    assert response.status == 201
    assert header(response, "Upload-Offset") == "3"
    upload_id = (header(response, "Location") or "").rsplit("/", 1)[-1]
    assert not (await tus.store.get(upload_id)).info.finished


async def test_creation_with_upload_too_long_body_is_refused_before_reading(tus: Harness) -> None:
    body = StaticBody([b"0123456789"])
    response = await tus(
        make_request("POST", BASE, {"Upload-Length": "4", "Content-Type": "application/offset+octet-stream"}, body)
    )
    assert response.status == 413
    assert body.reads == 0


async def test_body_without_offset_content_type_is_ignored(tus: Harness) -> None:
    body = StaticBody([b"ignored"])
    response = await tus(make_request("POST", BASE, {"Upload-Length": "7", "Content-Type": "text/plain"}, body))
    assert response.status == 201
    assert header(response, "Upload-Offset") is None
    assert body.reads == 0


async def test_zero_length_upload_is_finished_at_creation(tus: Harness) -> None:
    upload_id = await tus.create(0)
    assert (await tus.store.get(upload_id)).info.finished
    response = await tus(make_request("GET", BASE + upload_id))
    assert response.status == 200
    assert header(response, "Content-Length") == "0"


async def test_deferred_length_creation(tus: Harness) -> None:
    upload_id = await tus.create(None)
    response = await tus.head(upload_id)
    assert header(response, "Upload-Defer-Length") == "1"
    assert header(response, "Upload-Length") is None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Upload-Length": "-1"},
        {"Upload-Length": "+5"},
        {"Upload-Length": " 5"},
        {"Upload-Length": "5 "},
        {"Upload-Length": "5_0"},
        {"Upload-Length": "0x10"},
        {"Upload-Length": "abc"},
        {"Upload-Length": ""},
        {"Upload-Length": "99999999999999999999"},
        {"Upload-Defer-Length": "0"},
        {"Upload-Defer-Length": "yes"},
        {"Upload-Defer-Length": "1", "Upload-Length": "5"},
    ],
)
async def test_malformed_lengths_are_400(tus: Harness, headers: dict[str, str]) -> None:
    response = await tus(make_request("POST", BASE, headers))
    assert response.status == 400
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert files_in(tus.directory) == []


@pytest.mark.parametrize(
    "metadata",
    [
        "filename bm90IGJhc2U2NA",  # missing padding
        "filename bm90!",  # bad alphabet
        "filename  YQ==",  # two spaces
        "filename YQ== extra",
        "a YQ==,a Yg==",  # duplicate key
        "a YQ==,,b Yg==",  # empty pair
        ",a YQ==",
        "key\tYQ==",  # tab is not the separator
        "ké YQ==",  # non-ASCII key
        "filename YQ==YQ==",  # padding in the middle
    ],
)
async def test_malformed_metadata_is_400(tus: Harness, metadata: str) -> None:
    response = await tus(make_request("POST", BASE, {"Upload-Length": "1", "Upload-Metadata": metadata}))
    assert response.status == 400, metadata
    assert b"Upload-Metadata" in response.body if isinstance(response.body, bytes) else False


async def test_empty_metadata_value_and_bare_key_are_accepted(tus: Harness) -> None:
    upload_id = await tus.create(1, "flag, name YQ==")
    info = (await tus.store.get(upload_id)).info
    assert info.metadata == {"flag": "", "name": "YQ=="}


async def test_max_size_refuses_large_uploads(tmp_path: Path) -> None:
    config = Config()
    config.server.max_size = 1000  # type: ignore[assignment]
    tus = make_harness(tmp_path, config)
    try:
        response = await tus(make_request("POST", BASE, {"Upload-Length": "1001"}))
        assert response.status == 413
        response = await tus(make_request("POST", BASE, {"Upload-Length": "1000"}))
        assert response.status == 201
    finally:
        await tus.store.close()


async def test_location_uses_host_header_when_not_behind_proxy(tus: Harness) -> None:
    response = await tus(
        make_request(
            "POST",
            BASE,
            {
                "Upload-Length": "1",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.example",
                "Forwarded": "proto=https;host=evil.example",
            },
            host="localhost:1080",
        )
    )
    assert (header(response, "Location") or "").startswith("http://localhost:1080/files/")


@pytest.mark.parametrize(
    ("headers", "prefix"),
    [
        ({"X-Forwarded-Proto": "https"}, "https://tus.example.org/files/"),
        ({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "public.example:8443"}, "https://public.example:8443/files/"),
        ({"Forwarded": 'for=1.2.3.4;proto=https;host="cdn.example"'}, "https://cdn.example/files/"),
        ({"Forwarded": "proto=https;host=a.example, proto=http;host=b.example"}, "https://a.example/files/"),
        ({"Forwarded": "proto=https", "X-Forwarded-Host": "x.example"}, "https://x.example/files/"),
        ({"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "bad host"}, "http://tus.example.org/files/"),
    ],
)
async def test_location_behind_proxy(tmp_path: Path, headers: dict[str, str], prefix: str) -> None:
    config = Config()
    config.server.behind_proxy = True
    tus = make_harness(tmp_path, config)
    try:
        response = await tus(make_request("POST", BASE, {"Upload-Length": "1", **headers}))
        assert response.status == 201
        assert (header(response, "Location") or "").startswith(prefix)
    finally:
        await tus.store.close()


async def test_location_respects_base_path(tmp_path: Path) -> None:
    config = Config()
    config.server.base_path = "/api/uploads/"
    tus = make_harness(tmp_path, config)
    try:
        response = await tus(make_request("POST", "/api/uploads", {"Upload-Length": "1"}))
        assert response.status == 201
        location = header(response, "Location") or ""
        assert location.startswith("http://tus.example.org/api/uploads/")
        head = await tus(make_request("HEAD", location.removeprefix("http://tus.example.org")))
        assert head.status == 200
    finally:
        await tus.store.close()


async def test_missing_host_is_400(tus: Harness) -> None:
    response = await tus(make_request("POST", BASE, {"Upload-Length": "1"}, host=None))
    assert response.status == 400


async def test_checksum_on_creation_with_upload_is_verified(tus: Harness) -> None:
    # An unsupported algorithm is refused before anything is created.
    response = await tus(
        make_request(
            "POST",
            BASE,
            {"Upload-Length": "1", "Content-Type": "application/offset+octet-stream",
             "Upload-Checksum": "crc32 AAAAAA=="},
            StaticBody([b"a"]),
        )
    )
    assert response.status == 400
    assert files_in(tus.directory) == []
    # A mismatch creates the upload but stores none of its bytes; the 460 says where
    # it is, so the client can resume.
    response = await tus(
        make_request(
            "POST",
            BASE,
            {"Upload-Length": "1", "Content-Type": "application/offset+octet-stream",
             "Upload-Checksum": "sha1 " + b64(hashlib.sha1(b"b").digest())},
            StaticBody([b"a"]),
        )
    )
    assert response.status == 460
    location = header(response, "Location")
    assert location is not None
    assert await tus.offset(location.rsplit("/", 1)[-1]) == 0


async def test_created_upload_completes_with_right_digest(tus: Harness) -> None:
    data = bytes(range(256)) * 1000
    response = await tus(
        make_request(
            "POST",
            BASE,
            {"Upload-Length": str(len(data)), "Content-Type": "application/offset+octet-stream"},
            StaticBody([data[i : i + 7000] for i in range(0, len(data), 7000)]),
        )
    )
    upload_id = (header(response, "Location") or "").rsplit("/", 1)[-1]
    assert hashlib.sha256(tus.data(upload_id)).hexdigest() == hashlib.sha256(data).hexdigest()
