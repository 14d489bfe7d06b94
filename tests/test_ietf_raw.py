"""The IETF resumable-upload draft (interop version 8) over raw sockets against the
composed server (``cli.serving``), on the file store and, when moto runs, the S3 store.

Raw sockets show what a client library would hide: every 104 interim response, the
exact header values, interrupted and stalled bodies.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import file_store_config, make_bucket, path_of, sha256

from tests.rawhttp import RawConnection, RawResponse
from tusd_py.cli import Running, serving
from tusd_py.config import MiB

MAX_SIZE = 64 * MiB
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"


@pytest.fixture(params=["file", "s3"])
def s3_endpoint(request: pytest.FixtureRequest) -> str | None:
    """The moto endpoint for the S3 run, None for the file store. A sync fixture: it
    may start moto, which waits for the port, so it must not run on the event loop."""
    return str(request.getfixturevalue("moto_endpoint")) if request.param == "s3" else None


@pytest.fixture
async def server(s3_endpoint: str | None, tmp_path: Path) -> AsyncIterator[Running]:
    overrides: dict[str, object] = {"server.max_size": MAX_SIZE}
    if s3_endpoint is not None:
        endpoint = s3_endpoint
        overrides.update(
            {
                "store.backend": "s3",
                "store.s3.bucket": await make_bucket(endpoint),
                "store.s3.endpoint_url": endpoint,
                "store.s3.part_size": 5 * MiB,
                "store.s3.spool": "memory",
            }
        )
    async with serving(file_store_config(tmp_path, **overrides)) as running:
        yield running


# --- a small draft client over raw sockets ------------------------------------------


@dataclass
class Exchange:
    """Every response head of one request: the interim (1xx) ones, then the final."""

    interim: list[RawResponse]
    final: RawResponse

    @property
    def status(self) -> int:
        return self.final.status

    def header(self, name: str) -> str | None:
        return self.final.header(name)

    def problem(self) -> dict[str, object]:
        assert self.header("content-type") == "application/problem+json", self.final
        document = json.loads(self.final.body)
        assert isinstance(document, dict)
        return document


def _head(method: str, path: str, headers: dict[str, str], version: str | None = "8") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if version is not None:
        lines.append(f"Upload-Draft-Interop-Version: {version}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_exchange(connection: RawConnection, method: str) -> Exchange:
    interim: list[RawResponse] = []
    while True:
        head = await connection.read_informational(timeout=30)
        if 100 <= head.status < 200:
            interim.append(head)
            continue
        break
    body = b""
    if method != "HEAD" and head.status not in (204, 304) and head.header("content-length"):
        body = await asyncio.wait_for(connection.reader.readexactly(int(head.header("content-length") or 0)), 30)
    return Exchange(interim, RawResponse(head.status, head.reason, head.headers, body))


async def call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    version: str | None = "8",
) -> Exchange:
    """One request with a Content-Length body on a fresh connection."""
    all_headers = dict(headers or {})
    if body or method in ("POST", "PUT", "PATCH"):
        all_headers.setdefault("Content-Length", str(len(body)))
    connection = await RawConnection.open(port)
    try:
        await connection.send(_head(method, path, all_headers, version) + body)
        return await _read_exchange(connection, method)
    finally:
        await connection.close()


def _chunked(data: bytes, piece: int = 100_000) -> bytes:
    out = b"".join(
        b"%x\r\n" % len(data[i : i + piece]) + data[i : i + piece] + b"\r\n" for i in range(0, len(data), piece)
    )
    return out + b"0\r\n\r\n"


def _path(location: str | None) -> str:
    assert location is not None and location.startswith("http://localhost/files/"), location
    return path_of(location)


async def _download(port: int, path: str) -> bytes:
    """The stored bytes through a plain GET (tus download, no draft header)."""
    exchange = await call(port, "GET", path, version=None)
    assert exchange.status == 200, exchange.final
    return exchange.final.body


async def _append(port: int, path: str, offset: int, body: bytes, *, complete: bool) -> Exchange:
    """An interop-8 append: PATCH with ``application/partial-upload``."""
    headers = {
        "Upload-Offset": str(offset),
        "Upload-Complete": "?1" if complete else "?0",
        "Content-Type": "application/partial-upload",
    }
    return await call(port, "PATCH", path, headers, body)


async def _offset(port: int, path: str) -> Exchange:
    exchange = await call(port, "HEAD", path)
    assert exchange.status == 204, exchange.final
    return exchange


# --- creation ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["8", "6", "5"])
async def test_creation_with_complete_body_announces_with_104_and_stores_it(server: Running, version: str) -> None:
    data = os.urandom(300_000)
    exchange = await call(
        server.port,
        "POST",
        "/files/",
        {"Upload-Complete": "?1", "Content-Type": "image/png", "Content-Disposition": 'inline; filename="a.png"'},
        data,
        version=version,
    )
    assert exchange.status == 201, exchange.final
    assert [interim.status for interim in exchange.interim] == [104]
    announced = exchange.interim[0]
    assert announced.reason == "Upload Resumption Supported"
    assert announced.header("upload-draft-interop-version") == version
    assert announced.header("location") == exchange.header("location")
    if version == "5":  # draft -03 has no Upload-Limit
        assert announced.header("upload-limit") is None
    else:
        assert announced.header("upload-limit") == f"max-size={MAX_SIZE}"
    assert exchange.header("upload-complete") == "?1"
    assert exchange.header("upload-offset") == str(len(data))
    assert exchange.header("tus-resumable") is None
    path = _path(exchange.header("location"))
    assert sha256(await _download(server.port, path)) == sha256(data)
    download = await call(server.port, "GET", path, version=None)
    assert download.header("content-type") == "image/png"
    assert 'filename="a.png"' in (download.header("content-disposition") or "")


async def test_104_comes_before_100_continue_which_is_still_sent(server: Running) -> None:
    connection = await RawConnection.open(server.port)
    try:
        head = _head("POST", "/files/", {"Upload-Complete": "?1", "Content-Length": "5", "Expect": "100-continue"})
        await connection.send(head)
        announced = await connection.read_informational()
        assert announced.status == 104  # before the client sends a byte of content
        # Section "104": a 104 does not replace 100 (Continue).
        assert (await connection.read_informational()).status == 100
        await connection.send(b"hello")
        exchange = await _read_exchange(connection, "POST")
    finally:
        await connection.close()
    assert exchange.status == 201
    assert exchange.header("location") == announced.header("location")
    assert await _download(server.port, _path(exchange.header("location"))) == b"hello"


async def test_no_104_for_an_unknown_interop_version(server: Running) -> None:
    data = b"x" * 1000
    exchange = await call(server.port, "POST", "/files/", {"Upload-Complete": "?1"}, data, version="7")
    # The draft forbids a 104 on a mismatching version; the upload itself works.
    assert exchange.interim == []
    assert exchange.status == 201
    assert exchange.header("upload-complete") == "?1"
    assert await _download(server.port, _path(exchange.header("location"))) == data


async def test_creation_with_incomplete_body_then_offset_append_and_completion(server: Running) -> None:
    data = os.urandom(200_000)
    created = await call(
        server.port, "POST", "/files/", {"Upload-Complete": "?0", "Upload-Length": str(len(data))}, data[:50_000]
    )
    assert created.status == 201, created.final
    assert created.header("upload-complete") == "?0"
    assert created.header("upload-offset") == "50000"
    assert created.header("upload-limit") == f"max-size={MAX_SIZE}"
    path = _path(created.header("location"))

    head = await _offset(server.port, path)
    assert head.header("upload-offset") == "50000"
    assert head.header("upload-complete") == "?0"
    assert head.header("upload-length") == str(len(data))
    assert head.header("upload-limit") == f"max-size={MAX_SIZE}"
    assert head.header("cache-control") == "no-store"

    appended = await _append(server.port, path, 50_000, data[50_000:120_000], complete=False)
    assert appended.status == 204, appended.final
    assert appended.header("upload-complete") == "?0"
    assert appended.header("upload-offset") == "120000"

    completed = await _append(server.port, path, 120_000, data[120_000:], complete=True)
    assert completed.status == 200, completed.final
    assert completed.header("upload-complete") == "?1"
    assert completed.header("upload-offset") == str(len(data))
    head = await _offset(server.port, path)
    assert head.header("upload-complete") == "?1"
    assert sha256(await _download(server.port, path)) == sha256(data)


async def test_empty_creation_then_appends_with_get_as_offset_retrieval(server: Running) -> None:
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?0"})
    assert created.status == 201
    assert [interim.status for interim in created.interim] == [104]
    path = _path(created.header("location"))
    retrieved = await call(server.port, "GET", path)
    assert retrieved.status == 204
    assert retrieved.header("upload-offset") == "0"
    assert retrieved.header("upload-length") is None  # not known yet
    appended = await _append(server.port, path, 0, b"hello", complete=True)
    assert appended.status == 200
    assert appended.header("upload-complete") == "?1"
    assert await _download(server.port, path) == b"hello"


# --- deferred length -----------------------------------------------------------------


async def test_deferred_length_ending_with_complete_chunked_request_stores_the_tail(server: Running) -> None:
    # Crosses the S3 store's 5 MiB part boundary and ends in a tail that is not a
    # full part: the final request's bytes must be stored before the length is set.
    data = os.urandom(7 * MiB + 12_345)
    first = 6 * MiB + 1
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?0"}, data[:first])
    assert created.status == 201, created.final
    path = _path(created.header("location"))
    assert created.header("upload-offset") == str(first)

    connection = await RawConnection.open(server.port)
    try:
        head = _head(
            "PATCH",
            path,
            {
                "Upload-Offset": str(first),
                "Upload-Complete": "?1",
                "Content-Type": "application/partial-upload",
                "Transfer-Encoding": "chunked",
            },
        )
        await connection.send(head + _chunked(data[first:]))
        completed = await _read_exchange(connection, "PATCH")
    finally:
        await connection.close()
    assert completed.status == 200, completed.final
    assert completed.header("upload-complete") == "?1"
    assert completed.header("upload-offset") == str(len(data))

    head_exchange = await _offset(server.port, path)
    assert head_exchange.header("upload-length") == str(len(data))
    assert head_exchange.header("upload-complete") == "?1"
    assert sha256(await _download(server.port, path)) == sha256(data)


async def test_deferred_length_completed_by_an_empty_request(server: Running) -> None:
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?0"}, b"abc")
    path = _path(created.header("location"))
    completed = await call(
        server.port,
        "PATCH",
        path,
        {"Upload-Offset": "3", "Upload-Complete": "?1", "Content-Type": "application/partial-upload"},
    )
    assert completed.status == 200
    assert completed.header("upload-complete") == "?1"
    assert (await _offset(server.port, path)).header("upload-length") == "3"
    assert await _download(server.port, path) == b"abc"


# --- errors --------------------------------------------------------------------------


async def test_offset_mismatch_is_a_problem_document(server: Running) -> None:
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?0"}, b"0123456789")
    path = _path(created.header("location"))
    exchange = await _append(server.port, path, 4, b"xyz", complete=False)
    assert exchange.status == 409
    assert exchange.header("upload-offset") == "10"
    assert exchange.header("upload-complete") == "?0"
    assert exchange.problem() == {
        "type": PROBLEM_TYPES + "mismatching-upload-offset",
        "title": "offset from request does not match offset of resource",
        "expected-offset": 10,
        "provided-offset": 4,
    }
    assert (await _offset(server.port, path)).header("upload-offset") == "10"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Upload-Complete": "?1", "Upload-Length": "10"}, b"12345"),  # Content-Length says 5
        ({"Upload-Complete": "?0", "Upload-Length": "3"}, b"12345"),  # content past the length
    ],
)
async def test_inconsistent_length_on_creation(server: Running, headers: dict[str, str], body: bytes) -> None:
    exchange = await call(server.port, "POST", "/files/", headers, body)
    assert exchange.status == 400
    assert exchange.header("upload-complete") == "?0"
    assert exchange.problem()["type"] == PROBLEM_TYPES + "inconsistent-upload-length"
    assert exchange.interim == []  # refused before any upload resource exists


async def test_inconsistent_length_on_append(server: Running) -> None:
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?0", "Upload-Length": "10"}, b"01234")
    path = _path(created.header("location"))
    exchange = await call(
        server.port,
        "PATCH",
        path,
        {"Upload-Offset": "5", "Upload-Complete": "?1", "Content-Type": "application/partial-upload"},
        b"567",  # completes at 8, but the length is 10
    )
    assert exchange.status == 400
    assert exchange.problem()["type"] == PROBLEM_TYPES + "inconsistent-upload-length"
    assert (await _offset(server.port, path)).header("upload-offset") == "5"


async def test_completed_upload_cannot_be_appended_but_completion_replays(server: Running) -> None:
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?1"}, b"done")
    path = _path(created.header("location"))
    append = {"Upload-Offset": "4", "Content-Type": "application/partial-upload"}
    again = await call(server.port, "PATCH", path, {**append, "Upload-Complete": "?1"})
    assert again.status == 200  # the lost final response, replayed
    assert again.header("upload-complete") == "?1"
    more = await call(server.port, "PATCH", path, {**append, "Upload-Complete": "?0"}, b"!")
    assert more.status == 400
    assert more.header("upload-complete") == "?0"
    assert more.problem()["type"] == PROBLEM_TYPES + "completed-upload"
    assert await _download(server.port, path) == b"done"


async def test_limits_are_advertised_and_enforced(server: Running) -> None:
    options = await call(server.port, "OPTIONS", "/files/")
    assert options.status == 204
    assert options.header("upload-limit") == f"max-size={MAX_SIZE}"
    too_large = await call(
        server.port, "POST", "/files/", {"Upload-Complete": "?0", "Upload-Length": str(MAX_SIZE + 1)}
    )
    assert too_large.status == 413
    assert too_large.header("upload-limit") == f"max-size={MAX_SIZE}"
    assert too_large.problem()["code"] == "ERR_MAX_SIZE_EXCEEDED"


async def test_cancellation(server: Running) -> None:
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?0"}, b"abc")
    path = _path(created.header("location"))
    assert (await call(server.port, "DELETE", path)).status == 204
    gone = await call(server.port, "HEAD", path)
    assert gone.status == 404
    assert gone.header("upload-complete") == "?0"
    assert gone.final.body == b""


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("POST", {"Upload-Complete": "?2"}, 400),
        ("POST", {"Upload-Complete": "1"}, 400),
        ("POST", {"Upload-Complete": "true"}, 400),
        ("POST", {}, 400),  # Upload-Complete is what makes a creation request
        ("POST", {"Upload-Complete": "?1;note=x, ?0"}, 400),  # two items
        ("POST", {"Upload-Complete": "?0", "Upload-Length": "+5"}, 400),
        ("POST", {"Upload-Complete": "?0", "Upload-Length": "5.0"}, 400),
        ("POST", {"Upload-Complete": "?0", "Upload-Length": "-1"}, 400),
        ("POST", {"Upload-Complete": "?0", "Upload-Length": "1234567890123456"}, 400),  # 16 digits
    ],
)
async def test_malformed_structured_fields_are_400(
    server: Running, method: str, headers: dict[str, str], status: int
) -> None:
    exchange = await call(server.port, method, "/files/", headers)
    assert exchange.status == status
    assert exchange.problem()["status"] == status
    assert exchange.interim == []


async def test_structured_field_parameters_and_spaces_are_accepted(server: Running) -> None:
    exchange = await call(
        server.port, "POST", "/files/", {"Upload-Complete": " ?0;x=1 ", "Upload-Length": "3;y"}, b"ab"
    )
    assert exchange.status == 201, exchange.final
    assert exchange.header("upload-offset") == "2"


async def test_append_needs_partial_upload_media_type_and_offset(server: Running) -> None:
    created = await call(server.port, "POST", "/files/", {"Upload-Complete": "?0"})
    path = _path(created.header("location"))
    wrong_type = await call(
        server.port, "PATCH", path, {"Upload-Offset": "0", "Upload-Complete": "?0", "Content-Type": "text/plain"}, b"a"
    )
    assert wrong_type.status == 415
    no_offset = await call(
        server.port, "PATCH", path, {"Upload-Complete": "?0", "Content-Type": "application/partial-upload"}, b"a"
    )
    assert no_offset.status == 400
    bad_version = await call(server.port, "HEAD", path, version="eight")
    assert bad_version.status == 400
    # Interop 5 (draft -03) predates the media type.
    old_draft = await call(
        server.port, "PATCH", path, {"Upload-Offset": "0", "Upload-Complete": "?0"}, b"a", version="5"
    )
    assert old_draft.status == 204
    assert old_draft.header("upload-offset") == "1"


async def test_tus_requests_are_unaffected(server: Running) -> None:
    exchange = await call(
        server.port, "POST", "/files/", {"Tus-Resumable": "1.0.0", "Upload-Length": "5"}, version=None
    )
    assert exchange.status == 201
    assert exchange.header("tus-resumable") == "1.0.0"
    assert exchange.interim == []
    # Both version headers: tus wins (the draft's header alone selects the draft).
    both = await call(server.port, "POST", "/files/", {"Tus-Resumable": "1.0.0", "Upload-Length": "5"})
    assert both.status == 201
    assert both.header("tus-resumable") == "1.0.0"
    assert both.interim == []


# --- interruption and resumption -----------------------------------------------------


async def test_stalled_creation_is_taken_over_by_offset_retrieval_and_resumed(server: Running) -> None:
    data = os.urandom(2 * MiB)
    half = MiB
    creator = await RawConnection.open(server.port)
    try:
        head = _head("POST", "/files/", {"Upload-Complete": "?1", "Content-Length": str(len(data))})
        await creator.send(head)
        announced = await creator.read_informational()
        assert announced.status == 104
        path = _path(announced.header("location"))
        await creator.send(data[:half])  # ... and then the client stalls, socket open

        # Section "Concurrency": the new request makes the stalled one stop, store
        # what arrived and answer; the offset it reports can be used at once.
        retrieved = await _offset(server.port, path)
        offset = int(retrieved.header("upload-offset") or -1)
        assert 0 <= offset <= half
        assert retrieved.header("upload-complete") == "?0"
        stalled = await _read_exchange(creator, "POST")
        assert stalled.status == 201
        assert stalled.header("upload-complete") == "?0"
        assert stalled.header("upload-offset") == str(offset)
    finally:
        creator.abort()

    resumed = await _append(server.port, path, offset, data[offset:], complete=True)
    assert resumed.status == 200, resumed.final
    assert resumed.header("upload-complete") == "?1"
    assert sha256(await _download(server.port, path)) == sha256(data)


async def test_aborted_creation_resumes_from_the_announced_location(server: Running) -> None:
    data = os.urandom(3 * MiB)
    creator = await RawConnection.open(server.port)
    head = _head("PUT", "/files/", {"Upload-Complete": "?1", "Content-Length": str(len(data))})
    await creator.send(head)
    announced = await creator.read_informational()
    path = _path(announced.header("location"))
    await creator.send(data[: 2 * MiB])
    creator.abort()  # RST mid-body: a crashed client

    # Until the server noticed, the creation holds the lock; the HEAD asks it to let go.
    offset = int((await _offset(server.port, path)).header("upload-offset") or -1)
    assert 0 <= offset <= 2 * MiB
    resumed = await _append(server.port, path, offset, data[offset:], complete=True)
    assert resumed.status == 200, resumed.final
    assert sha256(await _download(server.port, path)) == sha256(data)


@pytest.mark.parametrize(
    ("behind_proxy", "interim_responses", "announced"),
    [
        (False, "auto", True),
        (True, "auto", False),  # a proxy may take a 104 for the final response
        (True, "always", True),
        (False, "never", False),
    ],
)
async def test_server_interim_responses_decides_whether_a_104_is_sent(
    tmp_path: Path, behind_proxy: bool, interim_responses: str, announced: bool
) -> None:
    config = file_store_config(
        tmp_path, **{"server.behind_proxy": behind_proxy, "server.interim_responses": interim_responses}
    )
    async with serving(config) as running:
        data = b"x" * 1000
        exchange = await call(running.port, "POST", "/files/", {"Upload-Complete": "?1"}, data, version="6")
        assert [interim.status for interim in exchange.interim] == ([104] if announced else [])
        assert exchange.status == 201
        assert await _download(running.port, _path(exchange.header("location"))) == data
