"""Who may touch an upload: the pre-access hook and the owner set by pre-create, end to
end. A composed server (``cli.serving``, file store) asks a real HTTP receiver (aiohttp
on a free loopback port) that authenticates bearer tokens: pre-create names the owner,
pre-access lets only the owner in. tuspy uploads; raw requests check HEAD, PATCH, GET
and DELETE with another user's token and without one (tus and the IETF draft), the
partials of a concatenation, a receiver that is down (fail closed, nothing written)
and the allow cache (a fake clock, no sleeps).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import HookReceiver, file_store_config, path_of, stored_bytes, tuspy_upload, upload_id_of

from tests.conftest import free_port
from tests.rawhttp import RawConnection, RawResponse, request
from tusd_py.cli import serving
from tusd_py.hooks import READ, WRITE, HookEvent, Hooks, PreCreateAnswer, Rejection, RequestContext

TOKENS = {"Bearer alice-token": "alice", "Bearer bob-token": "bob"}
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
OCTETS = "application/offset+octet-stream"


class TokenReceiver(HookReceiver):
    """A hook receiver that authenticates bearer tokens: pre-create answers the user as
    the upload's owner (no token: 401), pre-access allows only the owner (403 else).
    ``allow_everyone`` turns the ownership check off. Records every event."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.allow_everyone = False

    async def handle(self, http_request: web.Request) -> web.Response:
        event = await http_request.json()
        self.events.append(event)
        values = (event["request"] or {}).get("headers", {}).get("authorization", [])
        user = TOKENS.get(values[0]) if values else None
        if event["type"] in ("pre-create", "pre-access") and user is None:
            return web.json_response({"reject": True, "status": 401, "message": "log in first"})
        if event["type"] == "pre-create":
            return web.json_response({"owner": user})
        if event["type"] == "pre-access" and event["upload"]["owner"] != user and not self.allow_everyone:
            return web.json_response({"reject": True, "status": 403, "message": f"{user} may not touch this upload"})
        return web.json_response({})

    def accesses(self, mode: str | None = None) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == "pre-access" and mode in (None, event["mode"])]


@pytest.fixture
async def receiver() -> AsyncIterator[TokenReceiver]:
    async with TokenReceiver() as running:
        yield running


def access_config(tmp_path: Path, url: str, **overrides: Any) -> Any:
    return file_store_config(
        tmp_path,
        **{"hooks.url": url, "hooks.events": ["pre-create", "pre-access"], "hooks.retries": 0, **overrides},
    )


class Clock:
    """A monotonic clock the test moves (the allow cache's TTL without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def create(port: int, length: int, token: dict[str, str], **headers: str) -> str:
    created = await request(port, "POST", "/files/", {"Upload-Length": str(length), **token, **headers})
    assert created.status == 201, created
    location = created.header("location")
    assert location is not None
    return path_of(location)


async def patch(port: int, path: str, offset: int, data: bytes, token: dict[str, str]) -> RawResponse:
    headers = {"Content-Type": OCTETS, "Upload-Offset": str(offset), **token}
    return await request(port, "PATCH", path, headers, data)


async def ietf_request(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> RawResponse:
    """A request of the IETF draft (interop 8): no Tus-Resumable."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Upload-Draft-Interop-Version: 8"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    connection = await RawConnection.open(port)
    try:
        await connection.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return await connection.read_response(method)
    finally:
        await connection.close()


# --- uploads by the owner ----------------------------------------------------------------


async def test_tuspy_upload_with_the_right_token_and_the_owner_in_every_hook(
    tmp_path: Path, receiver: TokenReceiver
) -> None:
    data = os.urandom(300 * 1024)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    async with serving(access_config(tmp_path, receiver.url)) as server:
        url = await asyncio.to_thread(tuspy_upload, f"{server.url}/files/", source, 64 * 1024, headers=ALICE)
        path = path_of(url)
        download = await request(server.port, "GET", path, ALICE)
        assert download.status == 200 and download.body == data
    assert stored_bytes(tmp_path, path) == data
    document = json.loads((tmp_path / "data" / f"{upload_id_of(path)}.info").read_text())
    assert document["owner"] == "alice"
    # Five PATCHes, one question: the first allow was cached (hooks.access_cache_ttl).
    writes = receiver.accesses(WRITE)
    assert len(writes) == 1
    event = writes[0]
    assert event["upload"]["owner"] == "alice" and event["upload"]["id"] == upload_id_of(path)
    assert event["upload"]["size"] == len(data) and "offset" in event["upload"]
    assert event["request"]["method"] == "PATCH" and event["request"]["uri"] == path
    assert event["request"]["remote_addr"] == "127.0.0.1"
    assert event["request"]["headers"]["authorization"] == ["Bearer alice-token"]
    # The GET after completion was asked about (completion dropped the cache).
    assert [access["request"]["method"] for access in receiver.accesses(READ)][-1] == "GET"


async def test_no_token_is_rejected_by_pre_create(tmp_path: Path, receiver: TokenReceiver) -> None:
    async with serving(access_config(tmp_path, receiver.url)) as server:
        rejected = await request(server.port, "POST", "/files/", {"Upload-Length": "10"})
        assert rejected.status == 401 and b"log in first" in rejected.body
    assert list((tmp_path / "data").iterdir()) == []


# --- another user's token -------------------------------------------------------------------


async def test_another_users_token_gets_403_on_every_verb_and_changes_nothing(
    tmp_path: Path, receiver: TokenReceiver
) -> None:
    async with serving(access_config(tmp_path, receiver.url)) as server:
        port = server.port
        path = await create(port, 10, ALICE)
        assert (await patch(port, path, 0, b"01234", ALICE)).status == 204
        complete = await create(port, 3, ALICE)
        assert (await patch(port, complete, 0, b"abc", ALICE)).status == 204

        for token in (BOB, {}):
            expected = 403 if token else 401
            head = await request(port, "HEAD", path, token)
            assert head.status == expected and head.header("upload-offset") is None
            refused = await patch(port, path, 5, b"XXXXX", token)
            assert refused.status == expected, refused
            if token:
                assert b"bob may not touch this upload" in refused.body
            assert (await request(port, "GET", complete, token)).status == expected
            assert (await request(port, "DELETE", path, token)).status == expected
            assert (await request(port, "DELETE", complete, token)).status == expected

        # Unchanged: offset, bytes, existence.
        head = await request(port, "HEAD", path, ALICE)
        assert head.status == 200 and head.header("upload-offset") == "5"
        assert stored_bytes(tmp_path, path) == b"01234"
        assert (await request(port, "GET", complete, ALICE)).body == b"abc"
        assert (await patch(port, path, 5, b"56789", ALICE)).status == 204
        assert (await request(port, "DELETE", path, ALICE)).status == 204
        assert (await request(port, "HEAD", path, ALICE)).status == 404
    assert stored_bytes(tmp_path, complete) == b"abc"


async def test_ietf_draft_requests_go_through_pre_access(tmp_path: Path, receiver: TokenReceiver) -> None:
    async with serving(access_config(tmp_path, receiver.url)) as server:
        port = server.port
        created = await ietf_request(
            port, "POST", "/files/", {**ALICE, "Upload-Complete": "?0", "Upload-Length": "6"}, b"abc"
        )
        assert created.status == 201, created
        path = path_of(created.header("location") or "")
        append = {"Content-Type": "application/partial-upload", "Upload-Offset": "3", "Upload-Complete": "?1"}
        for method, headers, body in (("HEAD", {}, b""), ("PATCH", append, b"XYZ"), ("DELETE", {}, b"")):
            refused = await ietf_request(port, method, path, {**headers, **BOB}, body)
            assert refused.status == 403, (method, refused)
            assert b"bob may not touch this upload" in refused.body or method == "HEAD"
        assert stored_bytes(tmp_path, path) == b"abc"
        assert (await ietf_request(port, "HEAD", path, ALICE)).header("upload-offset") == "3"
        assert (await ietf_request(port, "PATCH", path, {**append, **ALICE}, b"def")).status == 200
        assert (await request(port, "GET", path, ALICE)).body == b"abcdef"
    assert {(event["mode"], event["request"]["method"]) for event in receiver.accesses()} >= {
        ("read", "HEAD"), ("write", "PATCH"), ("write", "DELETE")
    }


async def test_each_partial_of_a_concatenation_is_checked(tmp_path: Path, receiver: TokenReceiver) -> None:
    async with serving(access_config(tmp_path, receiver.url)) as server:
        port = server.port
        partial = await create(port, 3, ALICE, **{"Upload-Concat": "partial"})
        assert (await patch(port, partial, 0, b"abc", ALICE)).status == 204
        mine = await create(port, 2, BOB, **{"Upload-Concat": "partial"})
        assert (await patch(port, mine, 0, b"de", BOB)).status == 204
        final = {"Upload-Concat": f"final;{mine} {partial}"}
        refused = await request(port, "POST", "/files/", {**final, **BOB})
        assert refused.status == 403 and b"bob may not touch this upload" in refused.body
        assert not any(event["type"] == "pre-create" and event["upload"]["is_final"] for event in receiver.events)
        receiver.allow_everyone = True
        created = await request(port, "POST", "/files/", {**final, **BOB})
        assert created.status == 201, created
        assert (await request(port, "GET", path_of(created.header("location") or ""), BOB)).body == b"deabc"
    reads = [event for event in receiver.accesses(READ) if event["request"]["method"] == "POST"]
    assert {event["upload"]["id"] for event in reads} == {upload_id_of(partial), upload_id_of(mine)}


# --- failures: closed ---------------------------------------------------------------------


async def test_receiver_down_answers_503_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port_of_receiver = free_port()
    receiver = TokenReceiver()
    receiver.port = port_of_receiver
    url = receiver.url
    async with serving(access_config(tmp_path, url, **{"hooks.access_cache_ttl": 0})) as server:
        async with receiver:
            path = await create(server.port, 10, ALICE)
            assert (await patch(server.port, path, 0, b"01234", ALICE)).status == 204
        # The receiver is gone: nothing is read or written, every verb answers 503.
        with caplog.at_level(logging.DEBUG, logger="tusd_py"):
            refused = await patch(server.port, path, 5, b"56789", ALICE)
            assert refused.status == 503 and b"pre-access hook failed" in refused.body
            assert (await request(server.port, "HEAD", path, ALICE)).status == 503
            assert (await request(server.port, "DELETE", path, ALICE)).status == 503
        assert "pre-access hook failed" in caplog.text
        assert "alice-token" not in caplog.text  # credentials never reach our logs
        assert stored_bytes(tmp_path, path) == b"01234"
        async with receiver:  # back on the same port
            head = await request(server.port, "HEAD", path, ALICE)
            assert head.status == 200 and head.header("upload-offset") == "5"


@pytest.mark.parametrize("answer", [(500, {}), (200, "not an object")])
async def test_failing_receiver_answers_503(tmp_path: Path, answer: tuple[int, object]) -> None:
    status, document = answer

    async def failing(http_request: web.Request) -> web.Response:
        event = await http_request.json()
        if event["type"] == "pre-access":
            return web.json_response(document, status=status)
        return web.json_response({"owner": "alice"})

    app = web.Application()
    app.router.add_post("/hook", failing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        async with serving(access_config(tmp_path, url)) as server:
            path = await create(server.port, 10, ALICE)
            refused = await patch(server.port, path, 0, b"01234", ALICE)
            assert refused.status == 503, refused
        assert stored_bytes(tmp_path, path) == b""
    finally:
        await runner.cleanup()


# --- the allow cache ------------------------------------------------------------------------


async def test_cache_serves_repeated_patches_within_its_ttl_and_asks_after_it(
    tmp_path: Path, receiver: TokenReceiver
) -> None:
    clock = Clock()
    config = access_config(tmp_path, receiver.url, **{"hooks.access_cache_ttl": 30})
    hooks = Hooks(config.hooks, clock=clock)
    try:
        async with serving(config, hooks=hooks) as server:
            port = server.port
            path = await create(port, 100, ALICE)
            for offset in range(0, 30, 10):
                assert (await patch(port, path, offset, b"x" * 10, ALICE)).status == 204
            assert len(receiver.accesses(WRITE)) == 1
            clock.now += 29.9
            assert (await patch(port, path, 30, b"x" * 10, ALICE)).status == 204
            assert len(receiver.accesses(WRITE)) == 1
            clock.now += 0.2  # the TTL has passed: asked again
            assert (await patch(port, path, 40, b"x" * 10, ALICE)).status == 204
            assert len(receiver.accesses(WRITE)) == 2
            # Another client's credentials never use alice's entry; a rejection is not
            # cached: once the receiver changes its mind the next request is let in.
            assert (await patch(port, path, 50, b"y" * 10, BOB)).status == 403
            assert (await patch(port, path, 50, b"y" * 10, BOB)).status == 403
            assert len(receiver.accesses(WRITE)) == 4
            receiver.allow_everyone = True
            assert (await patch(port, path, 50, b"y" * 10, BOB)).status == 204
            # A read is its own entry: asked once.
            assert (await request(port, "HEAD", path, ALICE)).status == 200
            assert (await request(port, "HEAD", path, ALICE)).status == 200
            assert len(receiver.accesses(READ)) == 1
            # Completing the upload forgets it: the next HEAD asks again.
            assert (await patch(port, path, 60, b"z" * 40, ALICE)).status == 204
            assert (await request(port, "HEAD", path, ALICE)).status == 200
            assert len(receiver.accesses(READ)) == 2
            # So does a DELETE.
            alice = RequestContext("HEAD", path, "127.0.0.1", (("authorization", "Bearer alice-token"),))
            assert hooks.access_allowed(upload_id_of(path), READ, alice)
            assert (await request(port, "DELETE", path, ALICE)).status == 204
            assert not hooks.access_allowed(upload_id_of(path), READ, alice)
    finally:
        await hooks.close()


async def test_cache_ttl_zero_asks_every_time(tmp_path: Path, receiver: TokenReceiver) -> None:
    async with serving(access_config(tmp_path, receiver.url, **{"hooks.access_cache_ttl": 0})) as server:
        path = await create(server.port, 100, ALICE)
        for offset in range(0, 30, 10):
            assert (await patch(server.port, path, offset, b"x" * 10, ALICE)).status == 204
    assert len(receiver.accesses(WRITE)) == 3


# --- Python callables ----------------------------------------------------------------------


async def test_python_callables_decide_with_the_owner_and_the_mode(tmp_path: Path) -> None:
    seen: list[tuple[str | None, str | None, str]] = []

    async def pre_create(event: HookEvent) -> PreCreateAnswer:
        return PreCreateAnswer(owner=dict(event.request.headers if event.request else ()).get("x-user"))

    async def pre_access(event: HookEvent) -> Rejection | None:
        user = dict(event.request.headers if event.request else ()).get("x-user")
        seen.append((event.mode, event.upload.owner, event.request.method if event.request else ""))
        return None if user == event.upload.owner else Rejection(404, "no such upload")

    # The cache keys on the headers that say who the client is: here X-User.
    config = file_store_config(tmp_path, **{"hooks.credential_headers": ["x-user"]})
    async with serving(config, hooks={"pre-create": pre_create, "pre-access": pre_access}) as server:
        path = await create(server.port, 3, {"X-User": "carol"})
        assert (await patch(server.port, path, 0, b"abc", {"X-User": "dave"})).status == 404
        assert (await patch(server.port, path, 0, b"abc", {"X-User": "carol"})).status == 204
    assert seen == [("write", "carol", "PATCH"), ("write", "carol", "PATCH")]
