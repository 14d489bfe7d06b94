"""Operator robustness of the S3 store (issue 15): a stalled S3 endpoint, leaked
multipart uploads, zero-length deferred uploads, the start-up bucket check and a
schemeless endpoint URL."""

from __future__ import annotations

import pytest
from helpers import make_bucket, object_bytes
from test_s3_extensions import Tus
from test_s3_support import open_store, s3_config
from tus_fakes import BASE, Harness, StaticBody, header, make_request

KiB = 1024
MiB = 1024 * KiB


# --- zero-length upload with deferred length -------------------------------------------


async def _create_deferred(handler: Tus | Harness) -> str:
    response = await handler.handler(make_request("POST", BASE, {"Upload-Defer-Length": "1"}))
    assert response.status == 201, response.status
    return (header(response, "Location") or "").rsplit("/", 1)[-1]


async def _empty_patch(handler: Tus | Harness, upload_id: str, offset: int) -> None:
    headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
    response = await handler.handler(make_request("PATCH", BASE + upload_id, headers, StaticBody()))
    assert response.status == 204, (response.status, response.body)
    assert header(response, "Upload-Offset") == str(offset)


async def _declare_zero(handler: Tus | Harness, upload_id: str) -> None:
    headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0", "Upload-Length": "0"}
    response = await handler.handler(make_request("PATCH", BASE + upload_id, headers, StaticBody()))
    assert response.status == 204, (response.status, response.body)
    assert header(response, "Upload-Offset") == "0"
    head = await handler.handler(make_request("HEAD", BASE + upload_id))
    assert head.status == 200
    assert (header(head, "Upload-Offset"), header(head, "Upload-Length")) == ("0", "0")
    await _empty_patch(handler, upload_id, 0)  # repeated (the answer was lost): same answer


async def test_zero_length_deferred_upload_on_the_file_store(tus: Harness) -> None:
    upload_id = await _create_deferred(tus)
    await _declare_zero(tus, upload_id)
    assert tus.data(upload_id) == b""


async def test_zero_length_deferred_upload_on_s3(fast_moto: str) -> None:
    bucket = await make_bucket(fast_moto)
    store = await open_store(s3_config(fast_moto, bucket))
    try:
        tus = Tus(store)
        upload_id = await _create_deferred(tus)
        await _declare_zero(tus, upload_id)
        assert await object_bytes(fast_moto, bucket, upload_id) == b""
    finally:
        await store.close()


async def test_empty_patch_to_a_finished_upload_on_s3(fast_moto: str) -> None:
    """The last PATCH repeated without bytes (its answer was lost) is answered like on
    the file store."""
    store = await open_store(s3_config(fast_moto, await make_bucket(fast_moto)))
    try:
        tus = Tus(store)
        upload_id = await tus.create(10)
        assert (await tus.patch(upload_id, 0, b"0123456789")).status == 204
        await _empty_patch(tus, upload_id, 10)
    finally:
        await store.close()
