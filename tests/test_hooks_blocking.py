"""The blocking pre-finish and pre-terminate hooks, end to end: a composed server
(``cli.serving``, file store) asks a real HTTP receiver (aiohttp on a free loopback
port) before it answers the request that completes an upload and before it deletes
one, through the tus protocol and the IETF draft. Plus the ``Hooks`` methods alone
against the same receiver, and Python callables.

No sleeps: the server's exit drains pending post-* deliveries, so what the receiver
got is complete once ``serving`` returned.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import HookReceiver, file_store_config, object_bytes, path_of

from tests.conftest import free_port
from tests.rawhttp import RawConnection, RawResponse, request
from tusd_py.cli import serving
from tusd_py.config import DEFAULT_HOOK_EVENTS, HOOK_EVENT_NAMES, HooksConfig
from tusd_py.hooks import HookError, HookEvent, Hooks, Rejection
from tusd_py.stores.base import IteratedBody, UploadInfo
from tusd_py.stores.file import FileStore

SECRET = "blocking-hook-secret"


class Receiver(HookReceiver):
    """A webhook receiver answering per event (``answers[Hook-Name] = (status,
    document)``; default ``200 {}``) and recording every delivery."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, tuple[int, object]] = {}
        self.deliveries: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, http_request: web.Request) -> web.Response:
        body = await http_request.read()
        self.deliveries.append((dict(http_request.headers), body))
        status, document = self.answers.get(http_request.headers["Hook-Name"], (200, {}))
        return web.json_response(document, status=status)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [json.loads(body) for headers, body in self.deliveries if headers["Hook-Name"] == event]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as running:
        yield running


def hooked_config(tmp_path: Path, url: str, **overrides: Any) -> Any:
    return file_store_config(
        tmp_path,
        **{
            "hooks.url": url,
            "hooks.events": list(HOOK_EVENT_NAMES),
            "hooks.secret": SECRET,
            "hooks.retries": 0,
            **overrides,
        },
    )


async def create(port: int, length: int) -> str:
    created = await request(port, "POST", "/files/", {"Upload-Length": str(length)})
    assert created.status == 201, created
    location = created.header("location")
    assert location is not None
    return path_of(location)


async def patch(port: int, path: str, offset: int, data: bytes) -> RawResponse:
    headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
    return await request(port, "PATCH", path, headers, data)


async def assert_intact(port: int, path: str, data: bytes) -> None:
    """The upload is complete: HEAD says every byte is stored, GET returns them."""
    head = await request(port, "HEAD", path)
    assert head.status == 200, head
    assert head.header("upload-offset") == head.header("upload-length") == str(len(data))
    download = await request(port, "GET", path)
    assert download.status == 200 and download.body == data


def assert_signed(receiver: Receiver) -> None:
    assert receiver.deliveries
    for headers, body in receiver.deliveries:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["Tusd-Py-Signature"], expected)


# --- pre-finish, tus ------------------------------------------------------------------


async def test_pre_finish_accepts_then_post_finish(tmp_path: Path, receiver: Receiver) -> None:
    data = os.urandom(1000)
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        path = await create(server.port, len(data))
        assert (await patch(server.port, path, 0, data[:400])).status == 204
        assert receiver.of("pre-finish") == []  # not complete yet
        done = await patch(server.port, path, 400, data[400:])
        assert done.status == 204 and done.header("upload-offset") == "1000"
    pre_finish = receiver.of("pre-finish")
    assert len(pre_finish) == 1
    upload = pre_finish[0]["upload"]
    assert upload["offset"] == upload["size"] == 1000 and upload["finished"] is True
    assert pre_finish[0]["request"]["method"] == "PATCH"
    assert len(receiver.of("post-finish")) == 1
    assert_signed(receiver)


async def test_pre_finish_rejection_answers_the_final_patch_and_keeps_the_upload(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.answers["pre-finish"] = (200, {"reject": True, "status": 422, "message": "virus found"})
    data = os.urandom(5000)
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        path = await create(server.port, len(data))
        rejected = await patch(server.port, path, 0, data)
        assert rejected.status == 422
        assert b"virus found" in rejected.body
        assert rejected.header("upload-offset") == "5000"  # everything is stored
        await assert_intact(server.port, path, data)
        # Asked once: the HEAD and GET above found it finished and did not ask again.
        assert len(receiver.of("pre-finish")) == 1
    assert receiver.of("post-finish") == []


@pytest.mark.parametrize("failure", ["500", "invalid-json", "down"])
async def test_pre_finish_failure_is_500_and_keeps_the_upload(
    tmp_path: Path, receiver: Receiver, failure: str
) -> None:
    url, events = receiver.url, list(HOOK_EVENT_NAMES)
    if failure == "500":
        receiver.answers["pre-finish"] = (500, {})
    elif failure == "invalid-json":
        receiver.answers["pre-finish"] = (200, "not an object")
    else:
        url, events = f"http://127.0.0.1:{free_port()}/hook", ["pre-finish"]  # nothing listens there
    data = os.urandom(300)
    async with serving(hooked_config(tmp_path, url, **{"hooks.events": events})) as server:
        path = await create(server.port, len(data))
        failed = await patch(server.port, path, 0, data)
        assert failed.status == 500, failed
        assert b"pre-finish hook failed" in failed.body
        assert failed.header("upload-offset") == "300"
        await assert_intact(server.port, path, data)
    assert receiver.of("post-finish") == []


async def test_pre_finish_answers_the_head_that_finishes_an_interrupted_completion(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.answers["pre-finish"] = (200, {"reject": True, "status": 422, "message": "too late"})
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        path = await create(server.port, 3)
    # Every byte stored but the finish never ran (as after a crash between the two):
    # written through a store over the same directory while no server runs.
    store = FileStore(str(tmp_path / "data"))
    try:
        stored = await store.get(path.rsplit("/", 1)[1])
        await stored.write(0, IteratedBody(one_chunk(b"abc")))
    finally:
        await store.close()
    assert receiver.of("pre-finish") == []
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        head = await request(server.port, "HEAD", path)
        assert head.status == 422  # HEAD: the status, no body
        assert head.header("upload-offset") == "3"
        await assert_intact(server.port, path, b"abc")
        assert len(receiver.of("pre-finish")) == 1
        assert receiver.of("pre-finish")[0]["request"]["method"] == "HEAD"


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_pre_finish_for_an_empty_upload_answers_its_creation(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answers["pre-finish"] = (200, {"reject": True, "status": 409, "message": "empty files are not wanted"})
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        created = await request(server.port, "POST", "/files/", {"Upload-Length": "0"})
        assert created.status == 409 and b"empty files are not wanted" in created.body
        assert len(receiver.of("pre-finish")) == 1
        assert len(receiver.of("post-create")) == 1


async def test_pre_finish_and_pre_terminate_are_opt_in(tmp_path: Path, receiver: Receiver) -> None:
    assert "pre-finish" not in DEFAULT_HOOK_EVENTS and "pre-terminate" not in DEFAULT_HOOK_EVENTS
    receiver.answers["pre-finish"] = receiver.answers["pre-terminate"] = (200, {"reject": True})
    config = file_store_config(tmp_path, **{"hooks.url": receiver.url})
    async with serving(config) as server:
        path = await create(server.port, 3)
        assert (await patch(server.port, path, 0, b"abc")).status == 204
        assert (await request(server.port, "DELETE", path)).status == 204
    assert {headers["Hook-Name"] for headers, _ in receiver.deliveries} == {
        "pre-create", "post-create", "post-receive", "post-finish", "post-terminate"
    }


# --- pre-terminate, tus ---------------------------------------------------------------


async def test_pre_terminate_allows_the_delete(tmp_path: Path, receiver: Receiver) -> None:
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        path = await create(server.port, 10)
        assert (await patch(server.port, path, 0, b"12345")).status == 204
        assert (await request(server.port, "DELETE", path)).status == 204
        assert (await request(server.port, "HEAD", path)).status == 404
    pre_terminate = receiver.of("pre-terminate")
    assert len(pre_terminate) == 1
    assert pre_terminate[0]["upload"]["offset"] == 5 and pre_terminate[0]["request"]["method"] == "DELETE"
    assert len(receiver.of("post-terminate")) == 1
    assert_signed(receiver)


@pytest.mark.parametrize(
    ("answer", "status", "message"),
    [
        ((200, {"reject": True, "status": 423, "message": "legal hold"}), 423, b"legal hold"),
        # An unusable status still rejects, with 403.
        ((200, {"reject": True, "status": 200}), 403, b"pre-terminate"),
        ((404, {}), 500, b"nothing was deleted"),
    ],
)
async def test_pre_terminate_refusal_deletes_nothing(
    tmp_path: Path, receiver: Receiver, answer: tuple[int, object], status: int, message: bytes
) -> None:
    receiver.answers["pre-terminate"] = answer
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        path = await create(server.port, 10)
        assert (await patch(server.port, path, 0, b"12345")).status == 204
        refused = await request(server.port, "DELETE", path)
        assert refused.status == status, refused
        assert message in refused.body
        head = await request(server.port, "HEAD", path)
        assert head.status == 200 and head.header("upload-offset") == "5"
        assert (await patch(server.port, path, 5, b"67890")).status == 204  # still usable
    assert receiver.of("post-terminate") == []


async def test_pre_terminate_receiver_down_fails_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    config = hooked_config(tmp_path, url, **{"hooks.events": ["pre-terminate"]})
    async with serving(config) as server:
        path = await create(server.port, 4)
        refused = await request(server.port, "DELETE", path)
        assert refused.status == 503
        assert b"pre-terminate hook unavailable" in refused.body
        assert (await request(server.port, "HEAD", path)).status == 200
    assert any("pre-terminate hook failed" in record.getMessage() for record in caplog.records)


# --- the IETF draft -------------------------------------------------------------------


async def ietf(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> RawResponse:
    """One interop-8 request (no Tus-Resumable header) on a fresh connection."""
    all_headers = {"Host": "localhost", "Upload-Draft-Interop-Version": "8", **headers}
    if method in ("POST", "PATCH"):
        all_headers["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items()) + "\r\n"
    connection = await RawConnection.open(port)
    try:
        await connection.send(head.encode("latin-1") + body)
        return await connection.read_response(method)
    finally:
        await connection.close()


async def test_ietf_pre_finish_rejection_keeps_the_upload(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answers["pre-finish"] = (200, {"reject": True, "status": 422, "message": "not a PDF"})
    data = os.urandom(2000)
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        created = await ietf(server.port, "POST", "/files/", {"Upload-Complete": "?0"}, data[:1000])
        assert created.status == 201, created
        location = created.header("location")
        assert location is not None
        path = path_of(location)
        append = {"Upload-Offset": "1000", "Upload-Complete": "?1", "Content-Type": "application/partial-upload"}
        rejected = await ietf(server.port, "PATCH", path, append, data[1000:])
        assert rejected.status == 422 and b"not a PDF" in rejected.body
        assert rejected.header("upload-offset") == "2000"
        offset = await ietf(server.port, "HEAD", path, {})
        assert offset.status == 204
        assert offset.header("upload-offset") == "2000" and offset.header("upload-complete") == "?1"
        download = await request(server.port, "GET", path)
        assert download.status == 200 and download.body == data
    assert len(receiver.of("pre-finish")) == 1 and receiver.of("post-finish") == []


async def test_ietf_cancellation_asks_pre_terminate(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answers["pre-terminate"] = (200, {"reject": True, "status": 403, "message": "keep it"})
    async with serving(hooked_config(tmp_path, receiver.url)) as server:
        created = await ietf(server.port, "POST", "/files/", {"Upload-Complete": "?0"}, b"abc")
        location = created.header("location")
        assert created.status == 201 and location is not None
        path = path_of(location)
        refused = await ietf(server.port, "DELETE", path, {})
        assert refused.status == 403 and b"keep it" in refused.body
        assert (await ietf(server.port, "HEAD", path, {})).header("upload-offset") == "3"
        receiver.answers.pop("pre-terminate")
        assert (await ietf(server.port, "DELETE", path, {})).status == 204
        assert (await request(server.port, "HEAD", path)).status == 404
    assert len(receiver.of("pre-terminate")) == 2 and len(receiver.of("post-terminate")) == 1


# --- Hooks alone: callables and answers ----------------------------------------------


def info() -> UploadInfo:
    return UploadInfo(id="abc", length=3, offset=3, finished=True)


async def test_callables_decide_before_the_webhook(receiver: Receiver) -> None:
    hooks = Hooks(HooksConfig(url=receiver.url, events=list(HOOK_EVENT_NAMES), retries=0))
    seen: list[str] = []

    async def accept(event: HookEvent) -> None:
        seen.append(event.type)

    async def refuse(event: HookEvent) -> Rejection:
        seen.append(event.type)
        return Rejection(451, "")

    hooks.on("pre-finish", accept)
    hooks.on("pre-terminate", refuse)
    try:
        assert await hooks.pre_finish(info()) is None
        rejection = await hooks.pre_terminate(info())
        assert rejection == Rejection(451, "rejected by the server's pre-terminate hook")
    finally:
        await hooks.close()
    assert seen == ["pre-finish", "pre-terminate"]
    # The webhook was asked after the accepting callable only.
    assert [headers["Hook-Name"] for headers, _ in receiver.deliveries] == ["pre-finish"]


async def test_raising_callable_is_a_hook_error() -> None:
    hooks = Hooks(HooksConfig())

    async def broken(event: HookEvent) -> None:
        raise RuntimeError("boom")

    hooks.on("pre-finish", broken)
    with pytest.raises(HookError):
        await hooks.pre_finish(info())
    await hooks.close()


@pytest.mark.parametrize("answer", [{}, {"reject": False, "status": 400}, {"message": "fine"}])
async def test_webhook_accepts(receiver: Receiver, answer: object) -> None:
    receiver.answers["pre-terminate"] = (200, answer)
    hooks = Hooks(HooksConfig(url=receiver.url, events=["pre-terminate"], retries=0))
    try:
        assert await hooks.pre_terminate(info()) is None
    finally:
        await hooks.close()
    assert json.loads(receiver.deliveries[0][1])["upload"]["id"] == "abc"


# --- on the S3 store (moto over HTTP) --------------------------------------------------


async def test_on_the_s3_store_pre_finish_rejection_keeps_the_object_and_pre_terminate_refusal_deletes_nothing(
    tmp_path: Path, receiver: Receiver, moto_endpoint: str, bucket: str
) -> None:
    receiver.answers["pre-finish"] = (200, {"reject": True, "status": 422, "message": "virus found"})
    receiver.answers["pre-terminate"] = (200, {"reject": True, "status": 423, "message": "legal hold"})
    config = hooked_config(
        tmp_path, receiver.url,
        **{"store.backend": "s3", "store.s3.bucket": bucket, "store.s3.endpoint_url": moto_endpoint},
    )
    data = os.urandom(2000)
    async with serving(config) as server:
        path = await create(server.port, len(data))
        rejected = await patch(server.port, path, 0, data)
        assert rejected.status == 422 and b"virus found" in rejected.body
        assert rejected.header("upload-offset") == str(len(data))
        await assert_intact(server.port, path, data)
        refused = await request(server.port, "DELETE", path)
        assert refused.status == 423 and b"legal hold" in refused.body
        await assert_intact(server.port, path, data)  # the object is still there
    upload_id = path.rsplit("/", 1)[1]
    assert await object_bytes(moto_endpoint, bucket, upload_id) == data
    storage = receiver.of("pre-finish")[0]["upload"]["storage"]
    assert (storage["Type"], storage["Bucket"], storage["Key"]) == ("s3store", bucket, upload_id)
    assert receiver.of("post-finish") == [] and receiver.of("post-terminate") == []
