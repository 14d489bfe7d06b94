"""Concatenation on the file store: partial and final uploads through the handler,
strict parsing of Upload-Concat, and the store's crash-safe assembly."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tus_fakes import BASE, HOST, Harness, StaticBody, b64, body_bytes, files_in, header, make_harness, make_request

from tusd_py.stores.base import IteratedBody, SupportsConcatenation, UploadInfo
from tusd_py.stores.file import FileStore
from tusd_py.tus.concat import PARTIAL, parse_upload_concat
from tusd_py.tus.errors import TusError


async def partial(tus: Harness, data: bytes) -> str:
    """A finished partial upload holding ``data``."""
    upload_id = await tus.create(len(data), **{"Upload-Concat": "partial"})
    if data:
        response = await tus.patch(upload_id, 0, StaticBody([data]))
        assert response.status == 204
    return upload_id


async def final(tus: Harness, concat: str, **extra: str) -> tuple[int, str | None, bytes]:
    response = await tus(make_request("POST", BASE, {"Upload-Concat": concat, **extra}))
    return response.status, header(response, "Location"), await body_bytes(response)


# --- parsing ---------------------------------------------------------------------------


def test_parse_partial_and_final() -> None:
    assert parse_upload_concat("partial", "/files/", HOST) is PARTIAL
    value = f"final;/files/a http://{HOST}/files/b  https://{HOST.upper()}/files/c"
    parsed = parse_upload_concat(value, "/files/", HOST)
    assert parsed.partial_ids == ("a", "b", "c")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "final",
        "final;",
        "final; ",
        "partial;/files/a",
        "Partial",
        "finale;/files/a",
        "final;/files/",  # no id
        "final;/files/../secret",  # a path, not an id
        "final;/files/a/b",
        "final;/files/%2e%2e",  # never decoded
        "final;/etc/passwd",  # not under the base path
        "final;/other/abc",  # another prefix
        "final;files/a",  # relative
        "final;/files/a?x=1",
        "final;/files/a#x",
        "final;http://evil.example/files/a",  # another server
        f"final;http://{HOST}:8080/files/a",  # another port is another server
        f"final;http://user:pw@{HOST}/files/a",
        f"final;ftp://{HOST}/files/a",
        f"final;http://{HOST}/other/a",
        f"final;http://{HOST}:99999/files/a",
        "final;" + " ".join(["/files/a"] * 1001),
    ],
)
def test_parse_rejects(value: str) -> None:
    with pytest.raises(TusError) as caught:
        parse_upload_concat(value, "/files/", HOST)
    assert caught.value.kind.status == 400


# --- through the handler ---------------------------------------------------------------


async def test_final_upload_is_the_partials_in_order(tus: Harness) -> None:
    first, second, third = b"hello ", b"", b"world"
    ids = [await partial(tus, data) for data in (first, second, third)]
    concat = f"final;/files/{ids[0]} http://{HOST}/files/{ids[1]} {BASE}{ids[2]}"
    status, location, _ = await final(tus, concat, **{"Upload-Metadata": f"filename {b64('x.txt')}"})
    assert status == 201 and location is not None
    final_id = location.rsplit("/", 1)[-1]
    assert tus.data(final_id) == b"hello world"

    head = await tus.head(final_id)
    assert head.status == 200
    assert header(head, "Upload-Length") == "11"
    assert header(head, "Upload-Offset") == "11"
    assert header(head, "Upload-Concat") == "final;" + " ".join(f"http://{HOST}/files/{i}" for i in ids)
    assert header(head, "Upload-Metadata") == f"filename {b64('x.txt')}"
    assert header(await tus.head(ids[0]), "Upload-Concat") == "partial"

    download = await tus(make_request("GET", BASE + final_id))
    assert await body_bytes(download) == b"hello world"
    # The partials stay usable (another final can reuse them).
    status, _, _ = await final(tus, f"final;/files/{ids[2]} /files/{ids[2]}")
    assert status == 201


async def test_patch_to_a_final_upload_is_403(tus: Harness) -> None:
    part = await partial(tus, b"abc")
    _, location, _ = await final(tus, f"final;/files/{part}")
    assert location is not None
    final_id = location.rsplit("/", 1)[-1]
    response = await tus.patch(final_id, 3, StaticBody([b"x"]))
    assert response.status == 403
    response = await tus.patch(final_id, 0, StaticBody([b"x"]))
    assert response.status == 403
    assert tus.data(final_id) == b"abc"


async def test_unknown_partial_is_400_naming_it(tus: Harness) -> None:
    part = await partial(tus, b"abc")
    status, location, message = await final(tus, f"final;/files/{part} /files/doesnotexist")
    assert status == 400 and location is None
    assert b"doesnotexist" in message and b"does not exist" in message


async def test_unfinished_partial_is_400(tus: Harness) -> None:
    upload_id = await tus.create(10, **{"Upload-Concat": "partial"})
    await tus.patch(upload_id, 0, StaticBody([b"12345"]))
    status, _, message = await final(tus, f"final;/files/{upload_id}")
    assert status == 400
    assert b"not finished" in message and b"5 of 10" in message


async def test_ordinary_upload_is_not_a_partial(tus: Harness) -> None:
    upload_id = await tus.create(0)
    status, _, message = await final(tus, f"final;/files/{upload_id}")
    assert status == 400
    assert b"not a partial" in message


async def test_final_refuses_length_and_body(tus: Harness) -> None:
    part = await partial(tus, b"abc")
    assert (await final(tus, f"final;/files/{part}", **{"Upload-Length": "3"}))[0] == 400
    assert (await final(tus, f"final;/files/{part}", **{"Upload-Defer-Length": "1"}))[0] == 400
    response = await tus(
        make_request(
            "POST",
            BASE,
            {"Upload-Concat": f"final;/files/{part}", "Content-Type": "application/offset+octet-stream"},
            StaticBody([b"abc"]),
        )
    )
    assert response.status == 400


@pytest.mark.parametrize("concat", ["final;/files/../../etc/passwd", "final;http://other.example/files/abc", "nope"])
async def test_malformed_concat_creates_nothing(tus: Harness, concat: str) -> None:
    status, _, _ = await final(tus, concat)
    assert status == 400
    assert files_in(tus.directory) == []


async def test_final_respects_max_size(tmp_path: Path) -> None:
    tus = make_harness(tmp_path / "data")
    tus.handler._max_size = 5
    try:
        ids = [await partial(tus, b"abc"), await partial(tus, b"def")]
        status, _, _ = await final(tus, f"final;/files/{ids[0]} /files/{ids[1]}")
        assert status == 413
    finally:
        await tus.store.close()


async def test_partial_with_creation_with_upload(tus: Harness) -> None:
    response = await tus(
        make_request(
            "POST",
            BASE,
            {"Upload-Concat": "partial", "Upload-Length": "3", "Content-Type": "application/offset+octet-stream"},
            StaticBody([b"xyz"]),
        )
    )
    assert response.status == 201
    part = (header(response, "Location") or "").rsplit("/", 1)[-1]
    status, location, _ = await final(tus, f"final;/files/{part}")
    assert status == 201 and location is not None
    assert tus.data(location.rsplit("/", 1)[-1]) == b"xyz"


# --- the file store ----------------------------------------------------------------------


async def test_file_store_concatenation_is_invisible_until_done(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    assert isinstance(store, SupportsConcatenation)
    try:
        first = await store.create(UploadInfo(id="a", length=3, is_partial=True))
        assert (await first.write(0, _chunks(b"abc"))).offset == 3
        missing = UploadInfo(id="gone", length=4, is_partial=True, offset=4)
        target = UploadInfo(id="f", length=7, partial_ids=("a", "gone"))
        with pytest.raises(Exception, match="gone"):
            await store.concatenate(target, [(await store.get("a")).info, missing])
        # Nothing of the failed final is left: no data, no info, no temporary file.
        assert sorted(os.listdir(tmp_path)) == ["a", "a.info"]
        big = (bytes(range(256)) * 5000)[:1_000_003]
        second = await store.create(UploadInfo(id="b", length=len(big), is_partial=True))
        await second.write(0, _chunks(big))
        done = await store.concatenate(
            UploadInfo(id="f", length=3 + len(big), partial_ids=("a", "b")),
            [(await store.get("a")).info, (await store.get("b")).info],
        )
        assert done.finished and done.offset == 3 + len(big)
        assert (tmp_path / "f").read_bytes() == b"abc" + big
        assert (await store.get("f")).info.partial_ids == ("a", "b")
    finally:
        await store.close()


def _chunks(data: bytes) -> IteratedBody:
    async def iterate() -> AsyncIterator[bytes]:
        yield data

    return IteratedBody(iterate())
