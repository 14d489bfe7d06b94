"""The IETF draft handler called directly (FileStore, MemoryLocker): the 104 interim
responses it asks the HTTP layer to send, takeover of a stalled append, shutdown,
lost locks, and the upload events (metrics) it shares with tus."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tus_fakes import BASE, HOST, Harness, QueueBody, StaticBody, header, make_request

from tusd_py.cli import tus_options
from tusd_py.config import Config
from tusd_py.http.types import Request, Response
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.stores.file import FileStore
from tusd_py.tus.handler import TusHandler

PARTIAL = "application/partial-upload"


@dataclass
class Counter:
    """An UploadObserver that counts."""

    created: int = 0
    finished: int = 0
    terminated: int = 0

    def upload_created(self) -> None:
        self.created += 1

    def upload_finished(self) -> None:
        self.finished += 1

    def upload_terminated(self) -> None:
        self.terminated += 1


@dataclass
class Interim:
    """Records the informational responses a request sent."""

    sent: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    fail: bool = False

    async def __call__(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self.fail:
            raise ConnectionResetError("peer gone")
        self.sent.append((status, {name.lower(): value for name, value in headers}))


@pytest.fixture
async def counter() -> Counter:
    return Counter()


@pytest.fixture
async def tus(tmp_path: Path, counter: Counter) -> AsyncIterator[Harness]:
    config = Config()
    store = FileStore(str(tmp_path / "data"))
    locker = MemoryLocker(acquire_timeout=5.0)
    handler = TusHandler(store, locker, tus_options(config), metrics=counter)
    harness = Harness(handler, store, locker, config, tmp_path / "data")
    yield harness
    await harness.close()


def ietf_request(
    method: str,
    target: str = BASE,
    headers: dict[str, str] | None = None,
    body: StaticBody | QueueBody | None = None,
    version: str = "8",
    interim: Interim | None = None,
) -> Request:
    request = make_request(
        method, target, {"Upload-Draft-Interop-Version": version, **(headers or {})}, body, tus=False
    )
    if interim is not None:
        request.send_informational = interim
    return request


def upload_id_of(response: Response) -> str:
    location = header(response, "Location")
    assert location is not None and location.startswith(f"http://{HOST}{BASE}")
    return location.rsplit("/", 1)[-1]


async def test_creation_sends_one_104_with_location_version_and_limit(tus: Harness, counter: Counter) -> None:
    interim = Interim()
    response = await tus(
        ietf_request("POST", headers={"Upload-Complete": "?1"}, body=StaticBody([b"abc"]), interim=interim)
    )
    assert response.status == 201
    assert interim.sent == [
        (
            104,
            {
                "location": header(response, "Location"),
                "upload-draft-interop-version": "8",
                "upload-limit": "min-size=0",
            },
        )
    ]
    assert header(response, "Tus-Resumable") is None
    assert tus.data(upload_id_of(response)) == b"abc"
    assert (counter.created, counter.finished) == (1, 1)


@pytest.mark.parametrize("version", ["4", "7", "9", "-8"])
async def test_no_104_for_other_versions(tus: Harness, version: str) -> None:
    interim = Interim()
    response = await tus(
        ietf_request(
            "POST", headers={"Upload-Complete": "?1"}, body=StaticBody([b"abc"]), version=version, interim=interim
        )
    )
    assert response.status == 201
    assert interim.sent == []


async def test_a_104_that_cannot_be_sent_does_not_fail_the_upload(tus: Harness) -> None:
    interim = Interim(fail=True)
    response = await tus(
        ietf_request("POST", headers={"Upload-Complete": "?1"}, body=StaticBody([b"abc"]), interim=interim)
    )
    assert response.status == 201
    assert tus.data(upload_id_of(response)) == b"abc"


async def test_stalled_append_is_taken_over_by_offset_retrieval(tus: Harness) -> None:
    created = await tus(ietf_request("POST", headers={"Upload-Complete": "?0"}))
    upload_id = upload_id_of(created)
    body = QueueBody(length=100)
    append = asyncio.ensure_future(
        tus(
            ietf_request(
                "PATCH",
                BASE + upload_id,
                {"Upload-Offset": "0", "Upload-Complete": "?1", "Content-Type": PARTIAL},
                body,
            )
        )
    )
    body.feed(b"x" * 30)
    body.feed(b"y" * 12)
    await body.waiting.wait()  # the handler read both chunks and waits for more

    head = await tus(ietf_request("HEAD", BASE + upload_id))
    assert head.status == 204
    assert header(head, "Upload-Offset") == "42"
    assert header(head, "Upload-Complete") == "?0"
    stopped = await append
    assert stopped.status == 204  # appended, not complete: the client may continue
    assert header(stopped, "Upload-Complete") == "?0"
    assert header(stopped, "Upload-Offset") == "42"
    assert tus.data(upload_id) == b"x" * 30 + b"y" * 12
    # The upload's length was recorded from Content-Length + Upload-Complete: ?1.
    assert (await tus.store.get(upload_id)).info.length == 100


async def _stalled_append(tus: Harness) -> tuple[str, asyncio.Future[Response]]:
    """A new upload and an append to it that sent 3 bytes and is now stalled reading."""
    created = await tus(ietf_request("POST", headers={"Upload-Complete": "?0"}))
    upload_id = upload_id_of(created)
    body = QueueBody()
    append = asyncio.ensure_future(
        tus(
            ietf_request(
                "PATCH",
                BASE + upload_id,
                {"Upload-Offset": "0", "Upload-Complete": "?0", "Content-Type": PARTIAL},
                body,
            )
        )
    )
    body.feed(b"abc")
    await body.waiting.wait()
    return upload_id, append


async def test_shutdown_refuses_new_uploads_and_stops_running_ones(tus: Harness) -> None:
    _, append = await _stalled_append(tus)
    tus.handler.release_all()
    stopped = await append
    assert stopped.status == 204
    assert header(stopped, "Upload-Offset") == "3"

    refused = await tus(ietf_request("POST", headers={"Upload-Complete": "?1"}, body=StaticBody([b"abc"])))
    assert refused.status == 503
    assert header(refused, "Content-Type") == "application/problem+json"
    assert json.loads(refused.body if isinstance(refused.body, bytes) else b"")["code"] == "ERR_SHUTTING_DOWN"


async def test_lost_lock_answers_503_problem(tus: Harness) -> None:
    upload_id, append = await _stalled_append(tus)
    entry = tus.locker._entries[upload_id]  # noqa: SLF001 - simulate a Consul session loss
    assert entry.holder is not None
    entry.holder.held.lost.set()
    response = await append
    assert response.status == 503
    assert header(response, "Upload-Complete") == "?0"


async def test_cancellation_and_events(tus: Harness, counter: Counter) -> None:
    created = await tus(ietf_request("POST", headers={"Upload-Complete": "?0"}, body=StaticBody([b"ab"])))
    upload_id = upload_id_of(created)
    assert (counter.created, counter.finished) == (1, 0)
    response = await tus(ietf_request("DELETE", BASE + upload_id))
    assert response.status == 204
    assert counter.terminated == 1
    assert (await tus(ietf_request("HEAD", BASE + upload_id))).status == 404


async def test_method_override_reaches_the_draft_handler(tus: Harness) -> None:
    created = await tus(ietf_request("POST", headers={"Upload-Complete": "?0"}))
    upload_id = upload_id_of(created)
    response = await tus(
        ietf_request(
            "POST",
            BASE + upload_id,
            {"X-HTTP-Method-Override": "PATCH", "Upload-Offset": "0", "Upload-Complete": "?1", "Content-Type": PARTIAL},
            StaticBody([b"abc"]),
        )
    )
    assert response.status == 200
    assert header(response, "Upload-Complete") == "?1"


async def test_unknown_paths_and_methods(tus: Harness) -> None:
    assert (await tus(ietf_request("POST", "/elsewhere", {"Upload-Complete": "?1"}))).status == 404
    not_allowed = await tus(ietf_request("GET", BASE))
    assert not_allowed.status == 405
    assert header(not_allowed, "Allow") == "POST, PUT, PATCH, OPTIONS"
    created = await tus(ietf_request("POST", headers={"Upload-Complete": "?0"}))
    on_upload = await tus(ietf_request("PUT", BASE + upload_id_of(created)))
    assert on_upload.status == 405
    assert header(on_upload, "Allow") == "HEAD, GET, PATCH, OPTIONS, DELETE"
