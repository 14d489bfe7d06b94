"""GET downloads: whole, ranges, content type allowlist, Content-Disposition."""

from __future__ import annotations

import pytest
from tus_fakes import BASE, Harness, StaticBody, b64, body_bytes, header, make_request

DATA = bytes(range(256)) * 2000  # 512000 bytes: two read chunks and a bit


async def upload(tus: Harness, data: bytes = DATA, metadata: str | None = None) -> str:
    upload_id = await tus.create(len(data), metadata)
    response = await tus.patch(upload_id, 0, StaticBody([data]))
    assert response.status == 204
    return upload_id


@pytest.mark.both_loops
async def test_get_whole_upload(tus: Harness) -> None:
    upload_id = await upload(tus)
    response = await tus(make_request("GET", BASE + upload_id, tus=False))
    assert response.status == 200
    assert header(response, "Content-Length") == str(len(DATA))
    assert header(response, "Accept-Ranges") == "bytes"
    assert header(response, "Content-Type") == "application/octet-stream"
    assert header(response, "X-Content-Type-Options") == "nosniff"
    assert await body_bytes(response) == DATA


@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=10-19", 10, 20),
        ("bytes=500000-", 500000, len(DATA)),
        ("bytes=-100", len(DATA) - 100, len(DATA)),
        ("bytes=-99999999", 0, len(DATA)),
        ("bytes=100-99999999", 100, len(DATA)),
        ("bytes=262140-262150", 262140, 262151),  # across a read chunk boundary
    ],
)
async def test_single_ranges_are_206(tus: Harness, range_header: str, start: int, stop: int) -> None:
    upload_id = await upload(tus)
    response = await tus(make_request("GET", BASE + upload_id, {"Range": range_header}, tus=False))
    assert response.status == 206
    assert header(response, "Content-Range") == f"bytes {start}-{stop - 1}/{len(DATA)}"
    assert header(response, "Content-Length") == str(stop - start)
    assert await body_bytes(response) == DATA[start:stop]


@pytest.mark.parametrize("range_header", [f"bytes={len(DATA)}-", "bytes=999999999-", "bytes=-0"])
async def test_unsatisfiable_range_is_416(tus: Harness, range_header: str) -> None:
    upload_id = await upload(tus)
    response = await tus(make_request("GET", BASE + upload_id, {"Range": range_header}, tus=False))
    assert response.status == 416
    assert header(response, "Content-Range") == f"bytes */{len(DATA)}"


@pytest.mark.parametrize("range_header", ["bytes=5-2", "items=0-1", "bytes=0-1,5-6", "bytes=-", "bytes=a-b", "0-1"])
async def test_ignored_ranges_give_the_whole_upload(tus: Harness, range_header: str) -> None:
    upload_id = await upload(tus)
    response = await tus(make_request("GET", BASE + upload_id, {"Range": range_header}, tus=False))
    assert response.status == 200
    assert await body_bytes(response) == DATA


async def test_unfinished_upload_is_404(tus: Harness) -> None:
    upload_id = await tus.create(10)
    await tus.patch(upload_id, 0, StaticBody([b"abc"]))
    response = await tus(make_request("GET", BASE + upload_id, tus=False))
    assert response.status == 404
    assert isinstance(response.body, bytes) and b"not finished" in response.body
    deferred = await tus.create(None)
    assert (await tus(make_request("GET", BASE + deferred, tus=False))).status == 404


async def test_unknown_upload_is_404(tus: Harness) -> None:
    assert (await tus(make_request("GET", BASE + "1" * 32, tus=False))).status == 404


@pytest.mark.parametrize(
    "filetype",
    ["image/png", "image/jpeg", "image/gif", "image/webp", "video/mp4", "audio/mpeg", "text/plain", "application/pdf"],
)
async def test_allowlisted_types_are_served_inline(tus: Harness, filetype: str) -> None:
    upload_id = await upload(tus, b"x", f"filetype {b64(filetype)},filename {b64('photo.png')}")
    response = await tus(make_request("GET", BASE + upload_id, tus=False))
    assert header(response, "Content-Type") == filetype
    assert header(response, "Content-Disposition") == 'inline; filename="photo.png"'


@pytest.mark.parametrize(
    "filetype", ["text/html", "image/svg+xml", "application/javascript", "text/html; x=image/png", "IMAGE/SVG+XML"]
)
async def test_other_types_are_attachments(tus: Harness, filetype: str) -> None:
    upload_id = await upload(tus, b"<script>", f"filetype {b64(filetype)},filename {b64('page.html')}")
    response = await tus(make_request("GET", BASE + upload_id, tus=False))
    assert header(response, "Content-Type") == "application/octet-stream"
    assert header(response, "Content-Disposition") == 'attachment; filename="page.html"'


async def test_filetype_parameters_are_dropped(tus: Harness) -> None:
    upload_id = await upload(tus, b"x", f"filetype {b64('text/plain; charset=utf-8')}")
    response = await tus(make_request("GET", BASE + upload_id, tus=False))
    assert header(response, "Content-Type") == "text/plain"
    assert header(response, "Content-Disposition") is None


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("../../etc/passwd", 'attachment; filename="passwd"'),
        ("C:\\Users\\me\\report.doc", 'attachment; filename="report.doc"'),
        ('evil"\r\nSet-Cookie: x=1.txt', "attachment; filename=\"evil_Set-Cookie_ x=1.txt\"; "
         "filename*=UTF-8''evil%22Set-Cookie%3A%20x%3D1.txt"),
        ("résumé.pdf", "attachment; filename=\"resume.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"),
        ("日本.txt", "attachment; filename=\"__.txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.txt"),
        # One visible character per non-ASCII one: never a run of spaces (U+3000 is a
        # wide space, which NFKD would turn into plain spaces), never two for one (ﬁ).
        ("resume\u3000\u3000.bin",
         "attachment; filename=\"resume__.bin\"; filename*=UTF-8''resume%E3%80%80%E3%80%80.bin"),
        ("ﬁle Ω.txt", "attachment; filename=\"_le _.txt\"; filename*=UTF-8''%EF%AC%81le%20%CE%A9.txt"),
    ],
)
async def test_filename_is_sanitized(tus: Harness, filename: str, expected: str) -> None:
    upload_id = await upload(tus, b"x", f"filename {b64(filename)}")
    response = await tus(make_request("GET", BASE + upload_id, tus=False))
    value = header(response, "Content-Disposition")
    assert value == expected
    assert value is not None and "\r" not in value and "\n" not in value
    value.encode("latin-1")


async def test_missing_filename_uses_upload_id(tus: Harness) -> None:
    upload_id = await upload(tus, b"x")
    response = await tus(make_request("GET", BASE + upload_id, tus=False))
    assert header(response, "Content-Disposition") == f'attachment; filename="{upload_id}"'


async def test_get_on_collection_is_405(tus: Harness) -> None:
    response = await tus(make_request("GET", BASE, tus=False))
    assert response.status == 405
    assert header(response, "Allow") == "POST, OPTIONS"
