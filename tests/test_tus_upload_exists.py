"""A pre-create hook that chooses the id of an existing upload gets 409 Conflict on
both stores, and the existing upload is left exactly as it was."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import make_bucket
from test_s3_support import open_store, s3_config
from tus_fakes import BASE, HOST, StaticBody, body_bytes, header, make_request

from tusd_py.cli import tus_options
from tusd_py.config import Config
from tusd_py.hooks import HookEvent, Hooks, PreCreateAnswer
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.stores.base import Store
from tusd_py.stores.file import FileStore
from tusd_py.tus.handler import TusHandler


class ChosenId:
    """A pre-create hook that gives the next upload the id in ``upload_id`` (if set)."""

    def __init__(self) -> None:
        self.upload_id: str | None = None

    async def __call__(self, event: HookEvent) -> PreCreateAnswer | None:
        return None if self.upload_id is None else PreCreateAnswer(upload_id=self.upload_id)


@pytest.fixture(params=["file", "s3"])
def s3_endpoint(request: pytest.FixtureRequest) -> str | None:
    """The moto endpoint for the S3 run, None for the file store. A sync fixture: it
    may start moto, which waits for the port, so it must not run on the event loop."""
    return str(request.getfixturevalue("fast_moto")) if request.param == "s3" else None


@pytest.fixture
async def store(s3_endpoint: str | None, tmp_path: Path) -> AsyncIterator[Store]:
    if s3_endpoint is None:
        the_store: Store = FileStore(str(tmp_path / "data"))
    else:
        the_store = await open_store(s3_config(s3_endpoint, await make_bucket(s3_endpoint)))
    yield the_store
    await the_store.close()


@pytest.fixture
def chosen() -> ChosenId:
    return ChosenId()


@pytest.fixture
async def handler(store: Store, chosen: ChosenId) -> AsyncIterator[TusHandler]:
    config = Config()
    hooks = Hooks(config.hooks)
    hooks.on("pre-create", chosen)
    locker = MemoryLocker(acquire_timeout=5.0)
    yield TusHandler(store, locker, tus_options(config), hooks=hooks)
    await locker.close()
    await hooks.close()


async def _create(handler: TusHandler, data: bytes, **extra: str) -> str:
    headers = {"Upload-Length": str(len(data)), "Content-Type": "application/offset+octet-stream", **extra}
    response = await handler(make_request("POST", BASE, headers, StaticBody([data])))
    assert response.status == 201, (response.status, response.body)
    return (header(response, "Location") or "").rsplit("/", 1)[-1]


async def _assert_untouched(handler: TusHandler, upload_id: str, data: bytes) -> None:
    response = await handler(make_request("GET", BASE + upload_id))
    assert response.status == 200
    assert await body_bytes(response) == data


async def test_creation_with_an_existing_id_is_409(handler: TusHandler, chosen: ChosenId) -> None:
    existing = await _create(handler, b"first upload")
    chosen.upload_id = existing
    response = await handler(make_request("POST", BASE, {"Upload-Length": "5"}))
    assert response.status == 409, (response.status, response.body)
    assert b"already exists" in await body_bytes(response)
    await _assert_untouched(handler, existing, b"first upload")


async def test_final_upload_with_an_existing_id_is_409(handler: TusHandler, chosen: ChosenId) -> None:
    existing = await _create(handler, b"someone else's")
    partial = await _create(handler, b"part", **{"Upload-Concat": "partial"})
    concat = f"final;http://{HOST}{BASE}{partial}"
    for taken in (existing, partial):  # a partial's id is locked by the request itself
        chosen.upload_id = taken
        response = await handler(make_request("POST", BASE, {"Upload-Concat": concat}))
        assert response.status == 409, (taken, response.status, response.body)
    await _assert_untouched(handler, existing, b"someone else's")
    await _assert_untouched(handler, partial, b"part")
