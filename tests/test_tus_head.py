"""HEAD: offset, length, metadata, caching, not found."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tus_fakes import BASE, Harness, StaticBody, b64, header, make_request

from tusd_py.stores.base import IteratedBody


async def test_head_reports_offset_length_metadata(tus: Harness) -> None:
    metadata = f"filename {b64('a b.txt')},empty"
    upload_id = await tus.create(20, metadata)
    await tus.patch(upload_id, 0, StaticBody([b"0123456"]))
    response = await tus.head(upload_id)
    assert response.status == 200
    assert header(response, "Upload-Offset") == "7"
    assert header(response, "Upload-Length") == "20"
    assert header(response, "Upload-Metadata") == metadata
    assert header(response, "Cache-Control") == "no-store"
    assert header(response, "Tus-Resumable") == "1.0.0"
    assert response.body == b""


async def test_head_without_metadata_has_no_metadata_header(tus: Harness) -> None:
    upload_id = await tus.create(1)
    response = await tus.head(upload_id)
    assert header(response, "Upload-Metadata") is None


async def test_head_of_unknown_upload_is_404_without_body(tus: Harness) -> None:
    response = await tus.head("f" * 32)
    assert response.status == 404
    assert response.body == b""
    assert header(response, "Tus-Resumable") == "1.0.0"


async def test_head_completes_an_upload_whose_finish_failed(tus: Harness) -> None:
    upload_id = await tus.create(3)
    upload = await tus.store.get(upload_id)
    await upload.write(0, _chunks(b"abc"))  # all bytes stored, finish never ran
    assert not (await tus.store.get(upload_id)).info.finished
    response = await tus.head(upload_id)
    assert header(response, "Upload-Offset") == "3"
    assert (await tus.store.get(upload_id)).info.finished


async def test_head_requires_tus_version(tus: Harness) -> None:
    upload_id = await tus.create(1)
    response = await tus(make_request("HEAD", BASE + upload_id, tus=False))
    assert response.status == 412
    assert header(response, "Tus-Version") == "1.0.0"
    assert response.body == b""


def _chunks(data: bytes) -> IteratedBody:
    async def iterate() -> AsyncIterator[bytes]:
        yield data

    return IteratedBody(iterate())
