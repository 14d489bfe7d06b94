"""DELETE (termination)."""

from __future__ import annotations

import asyncio

from tus_fakes import BASE, Harness, QueueBody, StaticBody, files_in, header, make_request


async def test_delete_removes_upload(tus: Harness) -> None:
    upload_id = await tus.create(10)
    await tus.patch(upload_id, 0, StaticBody([b"abc"]))
    response = await tus(make_request("DELETE", BASE + upload_id))
    assert response.status == 204
    assert header(response, "Tus-Resumable") == "1.0.0"
    assert files_in(tus.directory) == []
    assert (await tus.head(upload_id)).status == 404
    assert (await tus.patch(upload_id, 3, StaticBody([b"d"]))).status == 404
    assert (await tus(make_request("DELETE", BASE + upload_id))).status == 404


async def test_delete_of_unknown_upload_is_404(tus: Harness) -> None:
    response = await tus(make_request("DELETE", BASE + "a" * 32))
    assert response.status == 404


async def test_delete_stops_a_running_patch_first(tus: Harness) -> None:
    upload_id = await tus.create(100)
    body = QueueBody(length=100)
    body.feed(b"a" * 10)
    patch = asyncio.create_task(tus.patch(upload_id, 0, body))
    await body.waiting.wait()
    response = await tus(make_request("DELETE", BASE + upload_id))
    assert response.status == 204
    assert (await patch).status == 204
    assert files_in(tus.directory) == []


async def test_delete_requires_tus_version(tus: Harness) -> None:
    upload_id = await tus.create(1)
    response = await tus(make_request("DELETE", BASE + upload_id, tus=False))
    assert response.status == 412
    assert (await tus.head(upload_id)).status == 200


async def test_method_override_delete(tus: Harness) -> None:
    upload_id = await tus.create(1)
    response = await tus(make_request("POST", BASE + upload_id, {"X-HTTP-Method-Override": "delete"}))
    assert response.status == 204
    assert (await tus.head(upload_id)).status == 404
