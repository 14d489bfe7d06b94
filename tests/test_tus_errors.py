"""Routing, version negotiation and the error table: every status, one shape."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tus_fakes import BASE, Harness, StaticBody, files_in, header, make_request

from tusd_py.cli import tus_options
from tusd_py.config import Config
from tusd_py.lockers.base import HeldLock, LockUnavailable, ReleaseRequest
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.stores.base import StoreUnavailable, UploadInfo
from tusd_py.stores.file import FileStore, FileUpload
from tusd_py.tus.handler import TusHandler


class RecordingStore(FileStore):
    """A FileStore that records the upload ids it was asked about."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.touched: list[str] = []

    async def get(self, upload_id: str, **_: object) -> FileUpload:
        self.touched.append(upload_id)
        return await super().get(upload_id)

    async def create(self, info: UploadInfo, **_: object) -> FileUpload:
        self.touched.append(info.id)
        return await super().create(info)


@pytest.mark.parametrize(
    "target",
    [
        "/files/../etc/passwd",
        "/files/..%2f..%2fetc%2fpasswd",
        "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/files/%2E%2E",
        "/files/..",
        "/files/.",
        "/files/abc/def",
        "/files/abc/",
        "/files/abc.info",
        "/files/" + "a" * 129,
        "/files/a%00b",
        "/files/a b",
        "/other/abc",
        "/",
        "/filesabc",
    ],
)
@pytest.mark.parametrize("method", ["HEAD", "PATCH", "DELETE", "GET", "POST"])
async def test_bad_paths_are_404_and_never_reach_the_store(tmp_path: Path, target: str, method: str) -> None:
    store = RecordingStore(str(tmp_path))
    handler = TusHandler(store, MemoryLocker(1.0), tus_options(Config()))
    try:
        response = await handler(
            make_request(
                method,
                target,
                {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0", "Upload-Length": "1"},
                StaticBody([b"a"]),
            )
        )
        assert response.status == 404
        assert store.touched == []
        assert files_in(tmp_path) == []
    finally:
        await store.close()


async def test_query_string_is_ignored_for_routing(tus: Harness) -> None:
    upload_id = await tus.create(1)
    assert (await tus(make_request("HEAD", f"{BASE}{upload_id}?x=1"))).status == 200


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("PUT", BASE, "POST, OPTIONS"),
        ("PATCH", BASE, "POST, OPTIONS"),
        ("DELETE", BASE, "POST, OPTIONS"),
        ("POST", BASE + "abc", "HEAD, PATCH, OPTIONS, DELETE, GET"),
        ("PUT", BASE + "abc", "HEAD, PATCH, OPTIONS, DELETE, GET"),
    ],
)
async def test_wrong_method_is_405_with_allow(tus: Harness, method: str, target: str, allow: str) -> None:
    response = await tus(make_request(method, target))
    assert response.status == 405
    assert header(response, "Allow") == allow


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0", "1.0.0 ", "2.0.0"])
@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH", "DELETE"])
async def test_unsupported_version_is_412(tus: Harness, version: str | None, method: str) -> None:
    upload_id = await tus.create(1)
    headers = {"Upload-Length": "1"} if version is None else {"Upload-Length": "1", "Tus-Resumable": version}
    target = BASE if method == "POST" else BASE + upload_id
    response = await tus(make_request(method, target, headers, tus=False))
    assert response.status == 412
    assert header(response, "Tus-Version") == "1.0.0"
    assert header(response, "Tus-Resumable") == "1.0.0"


async def test_error_body_is_short_text(tus: Harness) -> None:
    response = await tus(make_request("HEAD", BASE + "a" * 32))
    assert response.body == b""
    response = await tus(make_request("PATCH", BASE + "a" * 32, {"Content-Type": "application/offset+octet-stream"}))
    assert response.status == 400
    assert header(response, "Content-Type") == "text/plain; charset=utf-8"
    assert response.body == b"missing or invalid Upload-Offset header\n"


class BrokenStore(FileStore):
    def __init__(self, directory: str, error: Exception) -> None:
        super().__init__(directory)
        self.error = error

    async def get(self, upload_id: str, **_: object) -> FileUpload:
        raise self.error


async def test_store_unavailable_is_503(tmp_path: Path) -> None:
    store = BrokenStore(str(tmp_path), StoreUnavailable("s3 down: secret-key-should-not-leak"))
    handler = TusHandler(store, MemoryLocker(1.0), tus_options(Config()))
    try:
        response = await handler(make_request("DELETE", BASE + "a" * 32))
        assert response.status == 503
        assert isinstance(response.body, bytes) and b"secret" not in response.body
    finally:
        await store.close()


async def test_unexpected_error_is_500_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = BrokenStore(str(tmp_path), ZeroDivisionError("boom"))
    handler = TusHandler(store, MemoryLocker(1.0), tus_options(Config()))
    try:
        with caplog.at_level(logging.ERROR, logger="tusd_py.tus"):
            response = await handler(make_request("HEAD", BASE + "a" * 32))
            assert response.status == 500
            assert response.body == b""
            response = await handler(make_request("DELETE", BASE + "a" * 32))
            assert response.status == 500
            assert response.body == b"internal server error\n"
        records = [r for r in caplog.records if r.name == "tusd_py.tus" and r.exc_info]
        assert len(records) == 2
        assert "ZeroDivisionError" in caplog.text
    finally:
        await store.close()


class UnavailableLocker:
    def lock(
        self, upload_id: str, on_release_request: ReleaseRequest
    ) -> contextlib.AbstractAsyncContextManager[HeldLock]:
        return self._lock()

    @contextlib.asynccontextmanager
    async def _lock(self) -> AsyncIterator[HeldLock]:
        raise LockUnavailable("consul unreachable")
        yield HeldLock()  # pragma: no cover

    async def close(self) -> None:
        return None


async def test_lock_unavailable_is_503_and_nothing_is_written(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    handler = TusHandler(store, UnavailableLocker(), tus_options(Config()))
    try:
        body = StaticBody([b"abc"])
        headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        response = await handler(make_request("PATCH", BASE + "a" * 32, headers, body))
        assert response.status == 503
        assert body.reads == 0
    finally:
        await store.close()


async def test_unknown_upload_statuses(tus: Harness) -> None:
    unknown = BASE + "b" * 32
    assert (await tus(make_request("HEAD", unknown))).status == 404
    assert (await tus(make_request("DELETE", unknown))).status == 404
    assert (await tus(make_request("GET", unknown, tus=False))).status == 404


async def test_store_size_limit_is_413(tmp_path: Path) -> None:
    from tusd_py.stores.base import UploadTooLarge

    store = BrokenStore(str(tmp_path), UploadTooLarge("deferred-length ceiling"))
    handler = TusHandler(store, MemoryLocker(1.0), tus_options(Config()))
    try:
        headers = {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        response = await handler(make_request("PATCH", BASE + "a" * 32, headers, StaticBody([b"a"])))
        assert response.status == 413
    finally:
        await store.close()
