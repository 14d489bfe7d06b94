"""Hooks against a real HTTP receiver (an asyncio server on a free loopback port that
records every request), plus Python callables and progress throttling on a fake clock.

Synchronization is by events and ``Hooks.close()`` (which drains pending deliveries),
never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tusd_py.config import HooksConfig
from tusd_py.hooks import (
    HookError,
    HookEvent,
    Hooks,
    PreCreateAnswer,
    Rejection,
    RequestContext,
)
from tusd_py.http.types import Headers, Request
from tusd_py.metrics import Metrics
from tusd_py.stores.base import UploadInfo


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[["Received", int], Awaitable[tuple[int, bytes]]]


async def accept_all(request: Received, number: int) -> tuple[int, bytes]:
    return 200, b""


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server recording requests; ``respond`` decides the answer
    from the request and its 0-based number."""

    respond: Responder = accept_all
    requests: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hooks"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Received(method, path, headers, body)
                number = len(self.requests)
                self.requests.append(request)
                self._arrived.set()
                status, answer = await self.respond(request, number)
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer
                )
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()

    async def wait_for(self, count: int) -> None:
        """Wait (bounded) until ``count`` requests arrived."""
        async with asyncio.timeout(10):
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def close(self) -> None:
        self.release.set()
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.close()


def answer_with(document: object) -> Responder:
    async def respond(request: Received, number: int) -> tuple[int, bytes]:
        return 200, json.dumps(document).encode()

    return respond


async def hang(request: Received, number: int) -> tuple[int, bytes]:
    """Never answer (until the test ends)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def config(url: str = "", **overrides: Any) -> HooksConfig:
    values: dict[str, Any] = {"url": url, "timeout": 5.0, "retries": 2, "retry_backoff": 0.01}
    values.update(overrides)
    return HooksConfig(**values)


def upload(**overrides: Any) -> UploadInfo:
    values: dict[str, Any] = {
        "id": "abc123",
        "length": 1000,
        "offset": 0,
        "metadata": {"filename": b64("photo.jpg"), "type": b64("image/jpeg")},
    }
    values.update(overrides)
    return UploadInfo(**values)


CONTEXT = RequestContext(
    method="POST",
    uri="/files/",
    remote_addr="192.0.2.7",
    headers=(("host", "uploads.example"), ("tus-resumable", "1.0.0"), ("x-custom", "yes")),
    request_id="req-1",
)


class DummyBody:
    length: int | None = 0
    received = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


async def no_informational(status: int, headers: list[tuple[str, str]]) -> None:
    raise NotImplementedError


def http_request(headers: list[tuple[str, str]], client: tuple[str, int] | None = ("127.0.0.1", 5555)) -> Request:
    return Request("POST", "/files/?x=1", Headers(headers), DummyBody(), no_informational, client, "1.1", "rid-9")


# --- request context ------------------------------------------------------------------


def test_request_context_keeps_credentials_drops_stripped_headers_and_reads_proxy_address() -> None:
    request = http_request(
        [
            ("Host", "uploads.example"),
            ("Authorization", "Bearer s3cr3t"),
            ("Cookie", "session=s3cr3t"),
            ("Proxy-Authorization", "Basic s3cr3t"),
            ("X-Forwarded-For", "203.0.113.9, 198.51.100.1"),
            ("X-Forwarded-For", "192.0.2.50"),
        ]
    )
    direct = RequestContext.from_request(request)
    assert direct.remote_addr == "127.0.0.1"
    assert (direct.method, direct.uri, direct.request_id) == ("POST", "/files/?x=1", "rid-9")
    # Credentials reach the receiver (it authenticates the client with them) unless
    # the operator strips them.
    assert direct.to_json()["headers"]["authorization"] == ["Bearer s3cr3t"]
    assert direct.to_json()["headers"]["cookie"] == ["session=s3cr3t"]
    stripped = direct.to_json(frozenset({"authorization", "cookie", "proxy-authorization"}))
    assert "s3cr3t" not in json.dumps(stripped)
    assert list(stripped["headers"]) == ["host", "x-forwarded-for"]
    assert direct.to_json()["headers"]["host"] == ["uploads.example"]
    assert direct.to_json()["headers"]["x-forwarded-for"] == ["203.0.113.9, 198.51.100.1", "192.0.2.50"]
    # Behind our proxy, the last hop is the address the proxy saw; earlier ones may be forged.
    assert RequestContext.from_request(request, behind_proxy=True).remote_addr == "192.0.2.50"
    assert RequestContext.from_request(http_request([], client=None), behind_proxy=True).remote_addr == ""


# --- post-* events over HTTP ------------------------------------------------------------


async def test_post_events_are_delivered_as_json(receiver: Receiver) -> None:
    metrics = Metrics(process_metrics=False)
    hooks = Hooks(config(receiver.url), metrics=metrics)
    info = upload(offset=0)
    hooks.post_create(info, CONTEXT)
    info = dataclasses.replace(info, offset=1000)
    hooks.post_receive(info, final=True)
    info = dataclasses.replace(info, finished=True)
    hooks.post_finish(info)
    hooks.post_terminate(upload(id="other", length=None, is_partial=True, metadata={}))
    await hooks.close()

    assert len(receiver.requests) == 4
    by_type = {request.json["type"]: request for request in receiver.requests}
    assert set(by_type) == {"post-create", "post-receive", "post-finish", "post-terminate"}
    for request in receiver.requests:
        assert request.method == "POST"
        assert request.path == "/hooks"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["hook-name"] == request.json["type"]
        assert "tusd-py-signature" not in request.headers

    created = by_type["post-create"].json
    assert created["upload"] == {
        "id": "abc123",
        "size": 1000,
        "size_is_deferred": False,
        "offset": 0,
        "metadata": {"filename": "photo.jpg", "type": "image/jpeg"},
        "is_partial": False,
        "is_final": False,
        "partial_uploads": None,
        "finished": False,
        "created_at": info.created_at,
        "expires_at": None,
        "storage": {},
        "owner": None,
    }
    assert created["request"] == {
        "method": "POST",
        "uri": "/files/",
        "remote_addr": "192.0.2.7",
        "request_id": "req-1",
        "headers": {"host": ["uploads.example"], "tus-resumable": ["1.0.0"], "x-custom": ["yes"]},
    }
    # Each event is a snapshot taken when it was emitted, not the info as it is later.
    assert by_type["post-receive"].json["upload"]["offset"] == 1000
    assert by_type["post-receive"].json["upload"]["finished"] is False
    assert by_type["post-finish"].json["upload"]["finished"] is True
    assert by_type["post-finish"].json["request"] is None
    terminated = by_type["post-terminate"].json["upload"]
    assert (terminated["id"], terminated["size"], terminated["size_is_deferred"]) == ("other", None, True)
    assert terminated["is_partial"] is True
    assert len({request.json["event_id"] for request in receiver.requests}) == 4

    body, _ = metrics.render()
    assert b'tusd_py_hook_deliveries_total{event="post-finish",outcome="ok"} 1.0' in body


async def test_only_enabled_events_are_sent(receiver: Receiver) -> None:
    hooks = Hooks(config(receiver.url, events=["post-finish"]))
    assert hooks.wants("post-finish")
    assert not hooks.wants("post-create")
    assert not hooks.wants("pre-create")
    result = await hooks.pre_create(upload(), CONTEXT)
    hooks.post_create(upload())
    hooks.post_receive(upload(), final=True)
    hooks.post_finish(upload(id="done"))
    await hooks.close()
    assert result.info == upload(created_at=result.info.created_at) and result.rejection is None
    assert [request.json["type"] for request in receiver.requests] == ["post-finish"]
    assert receiver.requests[0].json["upload"]["id"] == "done"


async def test_signature_and_basic_auth_from_url(receiver: Receiver) -> None:
    url = receiver.url.replace("http://", "http://hookuser:hookpass@")
    hooks = Hooks(config(url, secret="k3y"))
    hooks.post_finish(upload())
    await hooks.close()
    request = receiver.requests[0]
    expected = hmac.new(b"k3y", request.body, hashlib.sha256).hexdigest()
    assert request.headers["tusd-py-signature"] == f"sha256={expected}"
    assert request.headers["authorization"] == "Basic " + b64("hookuser:hookpass")


# --- pre-create --------------------------------------------------------------------------


async def test_pre_create_sends_request_without_stripped_headers_and_accepts_empty_answer(
    receiver: Receiver,
) -> None:
    hooks = Hooks(config(receiver.url, strip_headers=["Authorization", "cookie"]))
    context = RequestContext.from_request(
        http_request([("Host", "h"), ("Authorization", "Bearer s3cr3t"), ("Cookie", "a=s3cr3t"), ("X-Custom", "1")])
    )
    info = upload()
    result = await hooks.pre_create(info, context)
    await hooks.close()
    assert result.rejection is None
    assert result.info is info
    [request] = receiver.requests
    assert request.json["type"] == "pre-create"
    assert request.json["upload"]["metadata"] == {"filename": "photo.jpg", "type": "image/jpeg"}
    assert request.json["request"]["headers"] == {"host": ["h"], "x-custom": ["1"]}
    assert b"s3cr3t" not in request.body


async def test_pre_create_receives_the_client_credentials_by_default(receiver: Receiver) -> None:
    hooks = Hooks(config(receiver.url))
    context = RequestContext.from_request(
        http_request([("Host", "h"), ("Authorization", "Bearer t0ken"), ("Cookie", "a=b")])
    )
    await hooks.pre_create(upload(), context)
    await hooks.close()
    [request] = receiver.requests
    assert request.json["request"]["headers"] == {"host": ["h"], "authorization": ["Bearer t0ken"], "cookie": ["a=b"]}


@pytest.mark.parametrize(
    ("document", "rejection"),
    [
        ({"reject": True, "status": 413, "message": "quota exceeded"}, Rejection(413, "quota exceeded")),
        ({"reject": True}, Rejection(403, "upload rejected by the server's pre-create hook")),
        # Only 4xx may be answered: a 2xx would claim success, a 5xx makes clients retry.
        ({"reject": True, "status": 200, "message": "no"}, Rejection(403, "no")),
        ({"reject": True, "status": 503, "message": "no"}, Rejection(403, "no")),
        ({"reject": True, "status": "401", "message": "no"}, Rejection(403, "no")),
        ({"reject": True, "message": "x" * 5000}, Rejection(403, "x" * 1024)),
        ({"reject": False, "status": 401}, None),
    ],
)
async def test_pre_create_reject(receiver: Receiver, document: object, rejection: Rejection | None) -> None:
    receiver.respond = answer_with(document)
    hooks = Hooks(config(receiver.url))
    result = await hooks.pre_create(upload(), CONTEXT)
    await hooks.close()
    assert result.rejection == rejection


async def test_pre_create_sets_id_and_metadata(receiver: Receiver) -> None:
    receiver.respond = answer_with(
        {"id": "invoice-42", "metadata": {"owner": "alice", "filename": None, "note": "größe 1,5"},
         "storage": {"Key": "invoices/42.pdf"}}
    )
    hooks = Hooks(config(receiver.url))
    info = upload()
    result = await hooks.pre_create(info, CONTEXT)
    await hooks.close()
    assert result.rejection is None
    assert result.info.id == "invoice-42"
    assert result.info.metadata == {"type": b64("image/jpeg"), "owner": b64("alice"), "note": b64("größe 1,5")}
    assert result.info.metadata_text("note") == "größe 1,5"
    assert result.info.storage == {"Key": "invoices/42.pdf"}  # the S3 store names the object so
    assert result.info.length == info.length
    assert info.id == "abc123" and "owner" not in info.metadata  # the caller's info is not changed


@pytest.mark.parametrize(
    "answer",
    [
        b'{"id": "../../etc/passwd"}',
        b'{"id": ""}',
        b'{"id": 42}',
        b'{"metadata": {"bad key": "x"}}',
        b'{"metadata": {"a,b": "x"}}',
        b'{"metadata": {"size": 5}}',
        b'{"metadata": ["x"]}',
        b'{"storage": {"Key": 7}}',
        b'{"storage": "invoices/42.pdf"}',
        b"[]",
        b"not json",
        b'{"padding": "' + b"x" * 70_000 + b'"}',
    ],
)
async def test_pre_create_invalid_answer_is_an_error(receiver: Receiver, answer: bytes) -> None:
    async def respond(request: Received, number: int) -> tuple[int, bytes]:
        return 200, answer

    receiver.respond = respond
    hooks = Hooks(config(receiver.url))
    with pytest.raises(HookError) as raised:
        await hooks.pre_create(upload(), CONTEXT)
    await hooks.close()
    assert raised.value.status == 500
    assert len(receiver.requests) == 1  # an invalid answer is not retried


async def test_pre_create_unexpected_status_is_not_retried(receiver: Receiver) -> None:
    async def respond(request: Received, number: int) -> tuple[int, bytes]:
        return 404, b"no such hook"

    receiver.respond = respond
    hooks = Hooks(config(receiver.url, retries=3))
    with pytest.raises(HookError) as raised:
        await hooks.pre_create(upload(), CONTEXT)
    await hooks.close()
    assert raised.value.status == 500
    assert "404" in str(raised.value)
    assert len(receiver.requests) == 1


# --- timeouts and retries ------------------------------------------------------------


def fail_first(count: int, then: object) -> Responder:
    async def respond(request: Received, number: int) -> tuple[int, bytes]:
        if number < count:
            return 503, b"busy"
        return 200, json.dumps(then).encode()

    return respond


async def test_retries_until_the_receiver_answers(receiver: Receiver) -> None:
    receiver.respond = fail_first(2, {"id": "after-retries"})
    hooks = Hooks(config(receiver.url, retries=2))
    result = await hooks.pre_create(upload(), CONTEXT)
    await hooks.close()
    assert result.info.id == "after-retries"
    assert len(receiver.requests) == 3
    # A retry repeats the same event: receivers deduplicate on event_id.
    assert len({request.body for request in receiver.requests}) == 1


async def test_gives_up_after_the_retries(receiver: Receiver) -> None:
    receiver.respond = fail_first(2, {})
    metrics = Metrics(process_metrics=False)
    hooks = Hooks(config(receiver.url, retries=1), metrics=metrics)
    with pytest.raises(HookError) as raised:
        await hooks.pre_create(upload(), CONTEXT)
    await hooks.close()
    assert raised.value.status == 503
    assert len(receiver.requests) == 2
    assert b'tusd_py_hook_deliveries_total{event="pre-create",outcome="failed"} 1.0' in metrics.render()[0]


async def test_hanging_receiver_costs_bounded_time(receiver: Receiver) -> None:
    receiver.respond = hang
    hooks = Hooks(config(receiver.url, timeout=0.2, retries=1, retry_backoff=0.01))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(HookError) as raised:
        await hooks.pre_create(upload(), CONTEXT)
    elapsed = loop.time() - started
    assert raised.value.status == 503
    assert "did not answer within 0.2s" in str(raised.value)
    assert len(receiver.requests) == 2
    assert 0.4 <= elapsed < 3.0

    # post-* never make the caller wait, and close() gives up after its drain timeout.
    hooks_two = Hooks(config(receiver.url, timeout=60.0))
    hooks_two.post_finish(upload())
    await receiver.wait_for(3)
    started = loop.time()
    await hooks_two.close(drain_timeout=0.2)
    assert loop.time() - started < 3.0
    await hooks.close()


async def test_unreachable_receiver(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    url = receiver.url.replace("/hooks", "/").replace("http://", "http://user:pw@")
    await receiver.close()  # nothing listens on that port any more
    hooks = Hooks(config(url, retries=1))
    with pytest.raises(HookError) as raised:
        await hooks.pre_create(upload(), CONTEXT)
    assert raised.value.status == 503
    with caplog.at_level(logging.WARNING, logger="tusd_py.hooks"):
        hooks.post_finish(upload())  # logged, not raised
        await hooks.close()
    assert "post-finish hook failed" in caplog.text
    assert "pw" not in caplog.text and "user" not in caplog.text.replace("upload", "")


async def test_full_queue_drops_events(receiver: Receiver) -> None:
    receiver.respond = hang
    metrics = Metrics(process_metrics=False)
    hooks = Hooks(config(receiver.url, max_pending=2, max_concurrent_deliveries=1), metrics=metrics)
    for number in range(5):
        hooks.post_finish(upload(id=f"u{number}"))
    await hooks.close(drain_timeout=0.1)
    body = metrics.render()[0]
    assert b'tusd_py_hook_deliveries_total{event="post-finish",outcome="dropped"} 3.0' in body
    # After close, events are dropped instead of starting new deliveries.
    hooks.post_finish(upload())
    assert b'tusd_py_hook_deliveries_total{event="post-finish",outcome="dropped"} 4.0' in metrics.render()[0]


# --- post-receive throttling -------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_post_receive_is_throttled_per_upload() -> None:
    clock = FakeClock()
    hooks = Hooks(config(progress_interval=1.0, max_concurrent_deliveries=1), clock=clock)
    seen: list[tuple[str, int]] = []

    async def record(event: HookEvent) -> None:
        seen.append((event.upload.id, event.upload.offset))

    hooks.on("post-receive", record)
    one, two = upload(id="one"), upload(id="two")

    def progress(info: UploadInfo, offset: int, at: float) -> None:
        clock.now = 100.0 + at
        hooks.post_receive(dataclasses.replace(info, offset=offset))

    progress(one, 10, at=0.0)  # the PATCH begins: the window starts, no event
    progress(one, 20, at=0.5)
    progress(two, 5, at=0.6)  # another upload has its own window
    progress(one, 30, at=1.0)  # one interval after the start: sent
    progress(one, 40, at=1.9)
    progress(two, 6, at=1.6)  # sent
    progress(one, 50, at=2.0)  # sent
    hooks.post_receive(dataclasses.replace(one, offset=55), final=True)  # always sent
    progress(one, 60, at=2.1)  # a new PATCH: a new window
    progress(one, 70, at=2.2)
    hooks.post_receive(dataclasses.replace(one, offset=70), final=True)
    await hooks.close()
    assert seen == [("one", 30), ("two", 6), ("one", 50), ("one", 55), ("one", 70)]


async def test_post_receive_costs_nothing_when_nobody_listens() -> None:
    clock = FakeClock()
    hooks = Hooks(config(), clock=clock)
    hooks.post_receive(upload())
    hooks.post_receive(upload(), final=True)
    assert not hooks.wants("post-receive")
    await hooks.close()


# --- Python callables ----------------------------------------------------------------


async def test_callables_run_before_the_webhook(receiver: Receiver) -> None:
    receiver.respond = answer_with({"metadata": {"checked": "yes"}})
    hooks = Hooks(config(receiver.url))
    calls: list[str] = []

    async def add_owner(event: HookEvent) -> PreCreateAnswer:
        calls.append(event.type)
        assert event.request is CONTEXT
        return PreCreateAnswer(metadata={"owner": "bob"}, upload_id="chosen-id")

    async def look(event: HookEvent) -> None:
        calls.append("look:" + event.upload.id)

    hooks.on("pre-create", add_owner)
    hooks.on("pre-create", look)
    result = await hooks.pre_create(upload(), CONTEXT)
    await hooks.close()
    assert calls == ["pre-create", "look:chosen-id"]
    assert result.info.id == "chosen-id"
    assert result.info.metadata_text("owner") == "bob"
    assert result.info.metadata_text("checked") == "yes"
    sent = receiver.requests[0].json["upload"]
    assert sent["id"] == "chosen-id"
    assert sent["metadata"]["owner"] == "bob"


async def test_callable_rejection_skips_the_webhook(receiver: Receiver) -> None:
    hooks = Hooks(config(receiver.url))

    async def deny(event: HookEvent) -> PreCreateAnswer:
        return PreCreateAnswer(reject=True, status=401, message="sign in first")

    hooks.on("pre-create", deny)
    result = await hooks.pre_create(upload(), CONTEXT)
    await hooks.close()
    assert result.rejection == Rejection(401, "sign in first")
    assert receiver.requests == []


async def test_callable_errors() -> None:
    hooks = Hooks(config())

    async def broken(event: HookEvent) -> None:
        raise RuntimeError("bug")

    async def bad_id(event: HookEvent) -> PreCreateAnswer:
        return PreCreateAnswer(upload_id="no/slashes")

    hooks.on("pre-create", broken)
    with pytest.raises(HookError) as raised:
        await hooks.pre_create(upload())
    assert raised.value.status == 500

    other = Hooks(config())
    other.on("pre-create", bad_id)
    with pytest.raises(HookError):
        await other.pre_create(upload())
    with pytest.raises(ValueError, match="unknown hook event"):
        other.on("post-upload", bad_id)
    await hooks.close()
    await other.close()


async def test_post_callables_get_snapshots_and_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    hooks = Hooks(config())
    events: list[HookEvent] = []

    async def broken(event: HookEvent) -> None:
        raise RuntimeError("bug in embedder code")

    async def record(event: HookEvent) -> None:
        events.append(event)

    for name in ("post-create", "post-finish", "post-terminate"):
        hooks.on(name, broken)
        hooks.on(name, record)
    info = upload(storage={"key": "abc123"})
    with caplog.at_level(logging.ERROR, logger="tusd_py.hooks"):
        hooks.post_create(info, CONTEXT)
        info = dataclasses.replace(info, offset=1000, storage={"key": "changed"})
        hooks.post_finish(info)
        hooks.post_terminate(info)
        await hooks.close()
    assert sorted(event.type for event in events) == ["post-create", "post-finish", "post-terminate"]
    created = next(event for event in events if event.type == "post-create")
    assert created.upload.offset == 0
    assert created.upload.storage == {"key": "abc123"}
    assert created.request is CONTEXT
    finished = next(event for event in events if event.type == "post-finish")
    assert (finished.upload.offset, finished.upload.storage) == (1000, {"key": "changed"})
    logged = [record for record in caplog.records if record.exc_info and "bug in embedder" in str(record.exc_info[1])]
    assert len(logged) == 3
