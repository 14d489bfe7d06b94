"""PATCH: offsets, bounds, interruption, takeover by a second request, shutdown."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from tus_fakes import BASE, Harness, QueueBody, StaticBody, header, make_harness, make_request

from tusd_py.config import Config
from tusd_py.http.types import BodyTimeout, ClientDisconnected


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.both_loops
async def test_patch_appends_and_answers_new_offset(tus: Harness) -> None:
    upload_id = await tus.create(10)
    response = await tus.patch(upload_id, 0, StaticBody([b"01234"]))
    assert response.status == 204
    assert header(response, "Upload-Offset") == "5"
    assert header(response, "Tus-Resumable") == "1.0.0"
    response = await tus.patch(upload_id, 5, StaticBody([b"56", b"789"]))
    assert response.status == 204
    assert header(response, "Upload-Offset") == "10"
    assert tus.data(upload_id) == b"0123456789"
    assert (await tus.store.get(upload_id)).info.finished


async def test_large_patch_in_small_chunks(tus: Harness) -> None:
    data = bytes(range(256)) * 12_000  # ~3 MiB: several write batches
    upload_id = await tus.create(len(data))
    chunks = [data[i : i + 1500] for i in range(0, len(data), 1500)]
    response = await tus.patch(upload_id, 0, StaticBody(chunks))
    assert response.status == 204
    assert sha256(tus.data(upload_id)) == sha256(data)


async def test_offset_mismatch_is_409(tus: Harness) -> None:
    upload_id = await tus.create(10)
    body = StaticBody([b"abc"])
    response = await tus.patch(upload_id, 3, body)
    assert response.status == 409
    assert header(response, "Upload-Offset") == "0"
    assert body.reads == 0


@pytest.mark.parametrize("offset", ["-1", "+5", " 5", "5 ", "five", "", "1e3", "0x0"])
async def test_malformed_offset_is_400(tus: Harness, offset: str) -> None:
    upload_id = await tus.create(10)
    response = await tus.patch(upload_id, 0, StaticBody([b"a"]), **{"Upload-Offset": offset})
    assert response.status == 400


async def test_missing_offset_is_400(tus: Harness) -> None:
    upload_id = await tus.create(10)
    response = await tus(
        make_request("PATCH", BASE + upload_id, {"Content-Type": "application/offset+octet-stream"}, StaticBody([b"a"]))
    )
    assert response.status == 400


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "text/plain"])
async def test_wrong_content_type_is_415(tus: Harness, content_type: str | None) -> None:
    upload_id = await tus.create(10)
    headers = {"Upload-Offset": "0"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await tus(make_request("PATCH", BASE + upload_id, headers, StaticBody([b"a"])))
    assert response.status == 415


async def test_unknown_upload_is_404(tus: Harness) -> None:
    response = await tus.patch("0" * 32, 0, StaticBody([b"a"]))
    assert response.status == 404


async def test_body_past_length_is_refused_before_reading(tus: Harness) -> None:
    upload_id = await tus.create(4)
    body = StaticBody([b"0123456789"])
    response = await tus.patch(upload_id, 0, body)
    assert response.status == 413
    assert body.reads == 0
    assert await tus.offset(upload_id) == 0


async def test_chunked_body_past_length_is_cut_at_length(tus: Harness) -> None:
    upload_id = await tus.create(4)
    response = await tus.patch(upload_id, 0, StaticBody([b"01", b"2345", b"6789"], length=None))
    assert response.status == 413
    assert tus.data(upload_id) == b"0123"
    assert await tus.offset(upload_id) == 4
    assert (await tus.store.get(upload_id)).info.finished


async def test_patch_with_empty_body_on_complete_upload(tus: Harness) -> None:
    upload_id = await tus.create(2)
    await tus.patch(upload_id, 0, StaticBody([b"ab"]))
    response = await tus.patch(upload_id, 2, StaticBody([]))
    assert response.status == 204
    assert header(response, "Upload-Offset") == "2"


@pytest.mark.both_loops
@pytest.mark.parametrize("error", [ClientDisconnected(), BodyTimeout()])
async def test_interrupted_patch_keeps_bytes_and_resumes(tus: Harness, error: Exception) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    upload_id = await tus.create(len(data))
    half = len(data) // 2 + 12345
    first = [data[i : min(i + 65536, half)] for i in range(0, half, 65536)]
    response = await tus.patch(upload_id, 0, StaticBody(first, error=error))
    assert response.status == 204  # the client may be gone; answering must not crash
    assert header(response, "Upload-Offset") == str(half)
    assert await tus.offset(upload_id) == half
    assert not (await tus.store.get(upload_id)).info.finished

    rest = data[half:]
    response = await tus.patch(upload_id, half, StaticBody([rest[i : i + 65536] for i in range(0, len(rest), 65536)]))
    assert response.status == 204
    assert header(response, "Upload-Offset") == str(len(data))
    assert sha256(tus.data(upload_id)) == sha256(data)
    assert (await tus.store.get(upload_id)).info.finished


async def test_interrupted_before_first_byte(tus: Harness) -> None:
    upload_id = await tus.create(10)
    response = await tus.patch(upload_id, 0, StaticBody([], error=ClientDisconnected()))
    assert response.status == 204
    assert header(response, "Upload-Offset") == "0"


@pytest.mark.both_loops
async def test_second_patch_takes_over_a_stalled_one(tus: Harness) -> None:
    """A client stalled mid-PATCH with its socket open is asked to let go when the
    client reconnects; the resumed upload is byte-exact."""
    data = bytes(range(256)) * 400
    upload_id = await tus.create(len(data))
    stalled = QueueBody(length=len(data))
    stalled.feed(data[:1000])
    stalled.feed(data[1000:3000])
    first = asyncio.create_task(tus.patch(upload_id, 0, stalled))
    await stalled.waiting.wait()  # everything fed was read; now the read is stuck

    # The reconnected client asks for the offset (HEAD takes the lock too) ...
    assert await tus.offset(upload_id) == 3000
    response = await first
    assert response.status == 204
    assert header(response, "Upload-Offset") == "3000"
    # ... and resumes. Bytes the stalled client might still send go nowhere.
    stalled.feed(b"X" * 5000)
    response = await tus.patch(upload_id, 3000, StaticBody([data[3000:]]))
    assert response.status == 204
    assert sha256(tus.data(upload_id)) == sha256(data)


@pytest.mark.both_loops
async def test_concurrent_patches_never_corrupt(tus: Harness) -> None:
    data = bytes(range(256)) * 400
    upload_id = await tus.create(len(data))
    first_body = QueueBody(length=len(data))
    first_body.feed(data[:4096])
    first = asyncio.create_task(tus.patch(upload_id, 0, first_body))
    await first_body.waiting.wait()

    # A second PATCH at the same offset 0 asks the first to release, then sees that
    # the offset moved on: 409, nothing written twice.
    second = await tus.patch(upload_id, 0, StaticBody([b"Y" * 100]))
    assert second.status == 409
    assert header(second, "Upload-Offset") == "4096"
    first_response = await first
    assert header(first_response, "Upload-Offset") == "4096"

    third = await tus.patch(upload_id, 4096, StaticBody([data[4096:]]))
    assert third.status == 204
    assert tus.data(upload_id) == data


async def test_lock_timeout_is_423_with_message(tmp_path: Path) -> None:
    tus = make_harness(tmp_path, acquire_timeout=0.05)
    try:
        upload_id = await tus.create(10)
        # Something holds the lock and ignores release requests.
        released = asyncio.Event()
        async with tus.locker.lock(upload_id, released.set):
            response = await tus.patch(upload_id, 0, StaticBody([b"a"]))
        assert released.is_set()
        assert response.status == 423
        assert isinstance(response.body, bytes)
        assert b"locked" in response.body
        assert response.body.startswith(b"upload is locked")
        # HEAD gets the status without a body.
        async with tus.locker.lock(upload_id, released.set):
            head = await tus.head(upload_id)
        assert head.status == 423
        assert head.body == b""
    finally:
        await tus.store.close()


@pytest.mark.both_loops
async def test_release_all_stops_running_patches(tus: Harness) -> None:
    upload_ids = [await tus.create(100) for _ in range(3)]
    bodies = [QueueBody(length=100) for _ in upload_ids]
    for body in bodies:
        body.feed(b"z" * 10)
    tasks = [
        asyncio.create_task(tus.patch(upload_id, 0, body)) for upload_id, body in zip(upload_ids, bodies, strict=True)
    ]
    for body in bodies:
        await body.waiting.wait()
    tus.handler.release_all()
    responses = await asyncio.gather(*tasks)
    assert [r.status for r in responses] == [204, 204, 204]
    assert [header(r, "Upload-Offset") for r in responses] == ["10", "10", "10"]
    # New PATCHes during shutdown are refused without reading.
    late = StaticBody([b"a"])
    response = await tus.patch(upload_ids[0], 10, late)
    assert response.status == 503
    assert late.reads == 0


async def test_lost_lock_stops_the_write(tus: Harness) -> None:
    upload_id = await tus.create(100)
    body = QueueBody(length=100)
    body.feed(b"a" * 10)
    task = asyncio.create_task(tus.patch(upload_id, 0, body))
    await body.waiting.wait()
    entry = tus.locker._entries[upload_id]  # noqa: SLF001 - simulate a Consul session loss
    assert entry.holder is not None
    entry.holder.held.lost.set()
    response = await task
    assert response.status == 503
    assert await tus.offset(upload_id) == 10


async def test_lock_lost_with_a_release_request_answers_503_without_draining(tus: Harness) -> None:
    """Lockers that lose a lock (Consul session gone) also call the holder's release
    request: the PATCH still reports the loss, and stops at once instead of keeping
    bytes that are still arriving (another instance may soon hold the lock)."""
    upload_id = await tus.create(100)
    body = QueueBody(length=100)
    body.feed(b"a" * 10)
    task = asyncio.create_task(tus.patch(upload_id, 0, body))
    await body.waiting.wait()
    entry = tus.locker._entries[upload_id]  # noqa: SLF001 - simulate a Consul session loss
    assert entry.holder is not None
    entry.holder.held.lost.set()
    entry.holder.ask_to_release()
    body.feed(b"b" * 10)  # arrives while stopping: a released PATCH would keep it
    response = await task
    assert response.status == 503
    assert await tus.offset(upload_id) == 10


@pytest.mark.both_loops
async def test_deferred_length_declared_on_patch(tus: Harness) -> None:
    upload_id = await tus.create(None)
    response = await tus.patch(upload_id, 0, StaticBody([b"hello "]))
    assert response.status == 204
    assert header(response, "Upload-Offset") == "6"
    assert not (await tus.store.get(upload_id)).info.finished

    response = await tus.patch(upload_id, 6, StaticBody([b"world"]), **{"Upload-Length": "11"})
    assert response.status == 204
    assert header(response, "Upload-Offset") == "11"
    head = await tus.head(upload_id)
    assert header(head, "Upload-Length") == "11"
    assert header(head, "Upload-Defer-Length") is None
    assert tus.data(upload_id) == b"hello world"
    assert (await tus.store.get(upload_id)).info.finished


async def test_declared_length_rules(tus: Harness) -> None:
    upload_id = await tus.create(None)
    await tus.patch(upload_id, 0, StaticBody([b"hello"]))
    assert (await tus.patch(upload_id, 5, StaticBody([]), **{"Upload-Length": "4"})).status == 400
    assert (await tus.patch(upload_id, 5, StaticBody([]), **{"Upload-Length": "x"})).status == 400
    assert (await tus.patch(upload_id, 5, StaticBody([]), **{"Upload-Length": "8"})).status == 204
    assert (await tus.patch(upload_id, 5, StaticBody([]), **{"Upload-Length": "9"})).status == 400
    assert (await tus.patch(upload_id, 5, StaticBody([b"abc"]), **{"Upload-Length": "8"})).status == 204
    assert tus.data(upload_id) == b"helloabc"


async def test_deferred_upload_is_bounded_by_max_size(tmp_path: Path) -> None:
    config = Config()
    config.server.max_size = 10  # type: ignore[assignment]
    tus = make_harness(tmp_path, config)
    try:
        upload_id = await tus.create(None)
        assert (await tus.patch(upload_id, 0, StaticBody([b"x" * 11]))).status == 413
        response = await tus.patch(upload_id, 0, StaticBody([b"x" * 6, b"y" * 6], length=None))
        assert response.status == 413
        assert await tus.offset(upload_id) == 10
        assert (await tus.patch(upload_id, 10, StaticBody([]), **{"Upload-Length": "11"})).status == 413
    finally:
        await tus.store.close()


async def test_method_override_turns_post_into_patch(tus: Harness) -> None:
    upload_id = await tus.create(3)
    response = await tus(
        make_request(
            "POST",
            BASE + upload_id,
            {
                "X-HTTP-Method-Override": "PATCH",
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": "0",
            },
            StaticBody([b"abc"]),
        )
    )
    assert response.status == 204
    assert tus.data(upload_id) == b"abc"
    response = await tus(make_request("POST", BASE + upload_id, {"X-HTTP-Method-Override": "PA TCH"}))
    assert response.status == 400


async def test_method_override_is_honoured_on_any_method(tus: Harness) -> None:
    """As the tus protocol says and tusd 1.x did: the header replaces the request's
    method whatever it is; the overridden request is checked like a real one."""
    upload_id = await tus.create(3)
    head = await tus(make_request("HEAD", BASE + upload_id))
    as_head = await tus(make_request("GET", BASE + upload_id, {"X-HTTP-Method-Override": "HEAD"}))
    assert (as_head.status, as_head.body) == (head.status, head.body) == (200, b"")
    assert sorted(as_head.headers) == sorted(head.headers)
    assert header(as_head, "Upload-Offset") == "0"
    # A PUT (a method tus does not use) overridden to PATCH appends.
    response = await tus(
        make_request(
            "PUT",
            BASE + upload_id,
            {
                "X-HTTP-Method-Override": "patch",
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": "0",
            },
            StaticBody([b"abc"]),
        )
    )
    assert (response.status, header(response, "Upload-Offset")) == (204, "3")
    # An overridden request still needs what the real method needs (Tus-Resumable).
    response = await tus(make_request("GET", BASE + upload_id, {"X-HTTP-Method-Override": "DELETE"}, tus=False))
    assert response.status == 412
    assert await tus.offset(upload_id) == 3
