"""OPTIONS discovery and CORS."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

from tus_fakes import BASE, Harness, StaticBody, header, make_harness, make_request

from tusd_py.config import Config
from tusd_py.http.types import Headers, Response
from tusd_py.stores.base import (
    Store,
    SupportsConcatenation,
    SupportsExpiration,
    UploadBody,
    UploadExists,
    UploadInfo,
    UploadNotFound,
)


def all_headers(response: Response, name: str) -> list[str]:
    return Headers(response.headers).get_all(name)


async def test_options_lists_version_and_extensions(tus: Harness) -> None:
    response = await tus(make_request("OPTIONS", BASE, tus=False))
    assert response.status == 204
    assert header(response, "Tus-Version") == "1.0.0"
    assert header(response, "Tus-Extension") == (
        "creation,creation-with-upload,creation-defer-length,termination,concatenation,checksum"
    )
    assert header(response, "Tus-Checksum-Algorithm") == "md5,sha1,sha256"
    assert header(response, "Tus-Max-Size") is None
    assert header(response, "Tus-Resumable") == "1.0.0"


async def test_options_ignores_the_client_version(tus: Harness) -> None:
    response = await tus(make_request("OPTIONS", BASE, {"Tus-Resumable": "0.2.2"}))
    assert response.status == 204


async def test_options_shows_max_size(tmp_path: Path) -> None:
    config = Config()
    config.server.max_size = 1 << 30  # type: ignore[assignment]
    tus = make_harness(tmp_path, config)
    try:
        response = await tus(make_request("OPTIONS", BASE))
        assert header(response, "Tus-Max-Size") == str(1 << 30)
    finally:
        await tus.store.close()


class _CoreOnlyUpload:
    """An upload of ``_CoreOnlyStore``: infos in a dict, no bytes."""

    def __init__(self, store: _CoreOnlyStore, info: UploadInfo) -> None:
        self._store = store
        self._info = info

    @property
    def info(self) -> UploadInfo:
        return self._info

    async def write(self, offset: int, body: UploadBody) -> UploadInfo:
        raise NotImplementedError

    async def finish(self) -> UploadInfo:
        self._info = self._store.uploads[self._info.id] = dataclasses.replace(self._info, finished=True)
        return self._info

    async def declare_length(self, length: int) -> UploadInfo:
        self._info = self._store.uploads[self._info.id] = dataclasses.replace(self._info, length=length)
        return self._info

    async def terminate(self) -> None:
        if self._store.uploads.pop(self._info.id, None) is None:
            raise UploadNotFound(self._info.id)

    def read(self, start: int, stop: int) -> AsyncIterator[bytes]:
        raise NotImplementedError


class _CoreOnlyStore:
    """A store with no optional capability: only the core ``Store`` protocol."""

    def __init__(self) -> None:
        self.uploads: dict[str, UploadInfo] = {}

    async def create(self, info: UploadInfo, **_: object) -> _CoreOnlyUpload:
        if info.id in self.uploads:
            raise UploadExists(info.id)
        info = self.uploads[info.id] = dataclasses.replace(info, offset=0)
        return _CoreOnlyUpload(self, info)

    async def get(self, upload_id: str, **_: object) -> _CoreOnlyUpload:
        try:
            return _CoreOnlyUpload(self, self.uploads[upload_id])
        except KeyError:
            raise UploadNotFound(upload_id) from None

    async def close(self) -> None:
        return None


async def test_extensions_follow_store_capabilities() -> None:
    from tusd_py.cli import tus_options
    from tusd_py.lockers.memory import MemoryLocker
    from tusd_py.tus.handler import TusHandler

    store = _CoreOnlyStore()
    assert isinstance(store, Store)
    assert not isinstance(store, SupportsConcatenation | SupportsExpiration)
    handler = TusHandler(store, MemoryLocker(1.0), tus_options(Config()))
    response = await handler(make_request("OPTIONS", BASE))
    # Every store offers creation-defer-length and termination (on its upload
    # handles); checksum is verified by the handler, so every store offers it.
    assert header(response, "Tus-Extension") == (
        "creation,creation-with-upload,creation-defer-length,termination,checksum"
    )
    response = await handler(make_request("POST", BASE, {"Upload-Concat": "partial", "Upload-Length": "1"}))
    assert response.status == 501
    assert store.uploads == {}
    # DELETE is routed to the store (not 405): unknown upload 404, a known one is gone.
    response = await handler(make_request("DELETE", BASE + "a" * 32))
    assert response.status == 404
    assert header(response, "Allow") is None
    response = await handler(make_request("POST", BASE, {"Upload-Defer-Length": "1"}))
    assert response.status == 201
    upload_id = (header(response, "Location") or "").rsplit("/", 1)[-1]
    assert store.uploads[upload_id].length is None
    response = await handler(make_request("DELETE", BASE + upload_id))
    assert response.status == 204
    assert store.uploads == {}


async def test_cors_preflight(tus: Harness) -> None:
    response = await tus(
        make_request(
            "OPTIONS",
            BASE,
            {
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "PATCH",
                "Access-Control-Request-Headers": "tus-resumable, upload-offset",
            },
            tus=False,
        )
    )
    assert response.status == 204
    assert header(response, "Access-Control-Allow-Origin") == "https://app.example"
    assert "PATCH" in (header(response, "Access-Control-Allow-Methods") or "")
    allowed = (header(response, "Access-Control-Allow-Headers") or "").lower()
    for name in ("tus-resumable", "upload-offset", "upload-length", "upload-metadata", "x-http-method-override"):
        assert name in allowed
    assert header(response, "Access-Control-Max-Age") == "86400"
    assert header(response, "Vary") == "Origin"


async def test_preflight_for_upload_url(tus: Harness) -> None:
    upload_id = await tus.create(1)
    response = await tus(
        make_request(
            "OPTIONS",
            BASE + upload_id,
            {"Origin": "https://app.example", "Access-Control-Request-Method": "DELETE"},
            tus=False,
        )
    )
    assert response.status == 204
    assert header(response, "Access-Control-Allow-Origin") == "https://app.example"


async def test_responses_expose_tus_headers(tus: Harness) -> None:
    response = await tus(make_request("POST", BASE, {"Upload-Length": "1", "Origin": "https://app.example"}))
    assert response.status == 201
    assert header(response, "Access-Control-Allow-Origin") == "https://app.example"
    exposed = [name.strip() for name in (header(response, "Access-Control-Expose-Headers") or "").split(",")]
    for name in (
        "Upload-Offset", "Location", "Upload-Length", "Tus-Version", "Tus-Resumable", "Tus-Max-Size",
        "Tus-Extension", "Upload-Metadata", "Upload-Defer-Length", "Upload-Concat", "Upload-Expires",
        "Upload-Checksum",
    ):
        assert name in exposed
    # Errors carry CORS headers too, or the browser hides the status from the app.
    error = await tus(make_request("HEAD", BASE + "0" * 32, {"Origin": "https://app.example"}))
    assert error.status == 404
    assert header(error, "Access-Control-Allow-Origin") == "https://app.example"


async def test_disallowed_origin_gets_no_cors_headers(tmp_path: Path) -> None:
    config = Config()
    config.cors.allow_origins = ["https://good.example"]
    config.cors.allow_credentials = True
    tus = make_harness(tmp_path, config)
    try:
        bad = await tus(
            make_request("OPTIONS", BASE, {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        )
        assert header(bad, "Access-Control-Allow-Origin") is None
        assert header(bad, "Tus-Version") == "1.0.0"  # answered as a plain OPTIONS
        good = await tus(
            make_request("OPTIONS", BASE, {"Origin": "https://good.example", "Access-Control-Request-Method": "POST"})
        )
        assert header(good, "Access-Control-Allow-Origin") == "https://good.example"
        assert header(good, "Access-Control-Allow-Credentials") == "true"
        upload_id = await tus.create(1, **{"Origin": "https://evil.example"})
        head = await tus(make_request("HEAD", BASE + upload_id, {"Origin": "https://evil.example"}))
        assert all_headers(head, "Access-Control-Allow-Origin") == []
    finally:
        await tus.store.close()


async def test_cors_disabled(tmp_path: Path) -> None:
    config = Config()
    config.cors.enabled = False
    tus = make_harness(tmp_path, config)
    try:
        response = await tus(
            make_request("OPTIONS", BASE, {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        )
        assert header(response, "Access-Control-Allow-Origin") is None
        body = StaticBody([b"a"])
        response = await tus(
            make_request(
                "POST",
                BASE,
                {"Upload-Length": "1", "Content-Type": "application/offset+octet-stream", "Origin": "https://a.example"},
                body,
            )
        )
        assert response.status == 201
        assert header(response, "Access-Control-Expose-Headers") is None
    finally:
        await tus.store.close()


async def test_configured_headers_are_added_to_the_built_in_lists(tmp_path: Path) -> None:
    config = Config()
    config.cors.allow_headers = ["X-Api-Key", "upload-offset"]
    config.cors.expose_headers = ["X-Quota-Left"]
    tus = make_harness(tmp_path, config)
    try:
        preflight = await tus(
            make_request(
                "OPTIONS",
                BASE,
                {
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "tus-resumable, upload-length, x-api-key",
                },
                tus=False,
            )
        )
        assert preflight.status == 204
        allowed_value = header(preflight, "Access-Control-Allow-Headers") or ""
        allowed = [name.strip().lower() for name in allowed_value.split(",")]
        for name in ("tus-resumable", "upload-length", "x-api-key"):
            assert name in allowed
        assert allowed.count("upload-offset") == 1  # a built-in name listed again is not repeated
        created = await tus(make_request("POST", BASE, {"Upload-Length": "1", "Origin": "https://app.example"}))
        exposed = [name.strip() for name in (header(created, "Access-Control-Expose-Headers") or "").split(",")]
        assert "X-Quota-Left" in exposed and "Upload-Offset" in exposed
    finally:
        await tus.store.close()
