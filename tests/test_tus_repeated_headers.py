"""A tus header that may appear once, sent twice with different values, is a 400:
taking either value would guess where the client's bytes belong."""

from __future__ import annotations

from tus_fakes import BASE, Harness, StaticBody, header, make_request

from tusd_py.http.types import Headers


async def test_patch_with_two_different_upload_offsets_is_400(tus: Harness) -> None:
    upload_id = await tus.create(10)
    headers = [("Content-Type", "application/offset+octet-stream"), ("Upload-Offset", "0"), ("Upload-Offset", "5")]
    body = StaticBody([b"abcde"])
    response = await tus(make_request("PATCH", BASE + upload_id, headers, body))
    assert response.status == 400
    assert b"Upload-Offset" in response.body and b"2 different values" in response.body  # type: ignore[operator]
    assert body.reads == 0
    assert await tus.offset(upload_id) == 0


async def test_patch_with_two_different_upload_lengths_is_400(tus: Harness) -> None:
    upload_id = await tus.create(None)
    headers = [
        ("Content-Type", "application/offset+octet-stream"),
        ("Upload-Offset", "0"),
        ("Upload-Length", "3"),
        ("Upload-Length", "4"),
    ]
    response = await tus(make_request("PATCH", BASE + upload_id, headers, StaticBody([b"abc"])))
    assert response.status == 400
    assert header(await tus.head(upload_id), "Upload-Defer-Length") == "1"


async def test_post_with_two_different_upload_lengths_is_400(tus: Harness) -> None:
    response = await tus(make_request("POST", BASE, [("Upload-Length", "3"), ("Upload-Length", "30")]))
    assert response.status == 400
    response = await tus(make_request("POST", BASE, [("Upload-Defer-Length", "1"), ("Upload-Defer-Length", "2")]))
    assert response.status == 400


async def test_a_repeated_identical_value_counts_once(tus: Harness) -> None:
    response = await tus(make_request("POST", BASE, [("Upload-Length", "3"), ("Upload-Length", "3")]))
    assert response.status == 201
    upload_id = Headers(response.headers).get("location", "").rsplit("/", 1)[-1]
    headers = [("Content-Type", "application/offset+octet-stream"), ("Upload-Offset", "0"), ("Upload-Offset", "0")]
    response = await tus(make_request("PATCH", BASE + upload_id, headers, StaticBody([b"abc"])))
    assert (response.status, header(response, "Upload-Offset")) == (204, "3")


async def test_ietf_append_with_two_upload_offsets_is_400(tus: Harness) -> None:
    """The draft's fields are structured fields: two lines are one list, not an
    Integer (RFC 8941), so the draft handler already refuses them."""
    upload_id = await tus.create(10)
    headers = [
        ("Upload-Draft-Interop-Version", "6"),
        ("Content-Type", "application/partial-upload"),
        ("Upload-Complete", "?0"),
        ("Upload-Offset", "0"),
        ("Upload-Offset", "5"),
    ]
    response = await tus(make_request("PATCH", BASE + upload_id, headers, StaticBody([b"abcde"]), tus=False))
    assert response.status == 400
    assert await tus.offset(upload_id) == 0
