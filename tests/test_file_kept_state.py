"""The file store's kept state (``tusd_py.stores.kept``): a HEAD or PATCH whose lock
follows this instance's own last hold of the upload opens it without reading its files
(no thread hand-off); any other hold in between, a failed call, or a lock that cannot
vouch (no generation) makes it read the files again. With the memory locker (one
process) and the file locker (worker processes: each instance has its own, on one
lock directory)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tusd_py.lockers.base import Locker, no_release_request
from tusd_py.lockers.file import FileLocker
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.stores.base import IteratedBody, UploadInfo, UploadNotFound
from tusd_py.stores.file import FileStore


class ClientGone(ConnectionResetError):
    pass


async def _chunks(data: bytes, fail: bool = False) -> AsyncIterator[bytes]:
    yield data
    if fail:
        raise ClientGone("client went away")


class Instance:
    """A file store whose reads of an upload's files are counted, with its locker."""

    def __init__(self, directory: Path, locker: Locker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = FileStore(str(directory))
        self.locker = locker
        self.reads = 0
        read = self.store._directory.read_info_sync

        def counted(upload_id: str) -> Any:
            self.reads += 1
            return read(upload_id)

        monkeypatch.setattr(self.store._directory, "read_info_sync", counted)

    async def create(self, upload_id: str, length: int) -> None:
        async with self.locker.lock(upload_id, no_release_request) as held:
            await self.store.create(UploadInfo(id=upload_id, length=length), generation=held.generation)

    async def patch(self, upload_id: str, data: bytes, *, trust: bool = True, fail: bool = False) -> int:
        async with self.locker.lock(upload_id, no_release_request) as held:
            upload = await self.store.get(upload_id, generation=held.generation if trust else None)
            info = await upload.write(upload.info.offset, IteratedBody(_chunks(data, fail)))
            return info.offset

    async def head(self, upload_id: str) -> int:
        async with self.locker.lock(upload_id, no_release_request) as held:
            return (await self.store.get(upload_id, generation=held.generation)).info.offset

    async def delete(self, upload_id: str) -> None:
        async with self.locker.lock(upload_id, no_release_request):
            await (await self.store.get(upload_id)).terminate()


@pytest.fixture(params=["memory", "file"])
async def new_locker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], Locker]]:
    """The locker of a new instance: the one shared memory locker, or a file locker
    of its own on the shared lock directory."""
    made: list[Locker] = []
    shared = MemoryLocker(acquire_timeout=10.0)

    def new() -> Locker:
        if request.param == "memory":
            return shared
        made.append(FileLocker(str(tmp_path / "locks"), acquire_timeout=10.0))
        return made[-1]

    yield new
    for locker in [shared, *made]:
        await locker.close()


@pytest.fixture
async def one(
    tmp_path: Path, new_locker: Callable[[], Locker], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Instance]:
    instance = Instance(tmp_path / "data", new_locker(), monkeypatch)
    yield instance
    await instance.store.close()


async def test_consecutive_requests_read_no_files(one: Instance) -> None:
    await one.create("up1", 30)
    for step in range(1, 4):
        assert await one.patch("up1", b"0123456789") == 10 * step
        assert await one.head("up1") == 10 * step
    assert one.reads == 0
    assert (await one.store.get("up1")).info.offset == 30  # from the files: they agree


async def test_without_a_generation_every_request_reads_the_files(one: Instance) -> None:
    await one.create("up1", 30)
    for _ in range(3):
        await one.patch("up1", b"0123456789", trust=False)
    assert one.reads == 3


async def test_another_holder_in_between_is_noticed(
    one: Instance, tmp_path: Path, new_locker: Callable[[], Locker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another store on the same directory and lock service (another worker) writes
    between two requests of this one: this one reads the files and sees its bytes."""
    other = Instance(tmp_path / "data", new_locker(), monkeypatch)
    try:
        await one.create("up1", 30)
        assert await one.patch("up1", b"a" * 10) == 10
        assert await other.patch("up1", b"b" * 10) == 20
        reads = one.reads
        assert await one.head("up1") == 20
        assert one.reads == reads + 1
        assert await one.patch("up1", b"c" * 10) == 30
    finally:
        await other.store.close()
    assert (tmp_path / "data" / "up1").read_bytes() == b"a" * 10 + b"b" * 10 + b"c" * 10  # noqa: ASYNC240


async def test_a_failed_write_drops_the_kept_state(one: Instance) -> None:
    await one.create("up1", 30)
    await one.patch("up1", b"a" * 10)
    with pytest.raises(ClientGone):
        await one.patch("up1", b"b" * 5, fail=True)
    reads = one.reads
    assert await one.head("up1") == 15  # the bytes received before the error count
    assert one.reads == reads + 1


async def test_a_deleted_upload_is_not_served_from_memory(one: Instance) -> None:
    await one.create("up1", 30)
    await one.patch("up1", b"a" * 10)
    await one.delete("up1")
    with pytest.raises(UploadNotFound):
        await one.head("up1")


async def test_a_look_without_the_lock_keeps_the_state(one: Instance) -> None:
    """The pre-access hook's look before the lock writes nothing: the next hold still
    follows the last one."""
    await one.create("up1", 30)
    await one.patch("up1", b"a" * 10)
    assert (await one.store.get("up1")).info.offset == 10
    reads = one.reads
    assert await one.patch("up1", b"b" * 10) == 20
    assert one.reads == reads


def test_with_offset_is_replace_with_an_offset() -> None:
    """``UploadInfo.with_offset`` (the file store's per-PATCH snapshot) keeps every
    other field: a field added to ``UploadInfo`` but not to ``with_offset`` fails here."""
    values = {
        "id": "abc", "length": 100, "offset": 7, "metadata": {"k": "dg=="}, "created_at": 1.5,
        "expires_at": 2.5, "is_partial": True, "partial_ids": ("p",), "finished": True,
        "storage": {"part_size": 5}, "owner": "me",
    }
    assert {field.name for field in dataclasses.fields(UploadInfo)} == set(values)
    info = UploadInfo(**values)  # type: ignore[arg-type]
    assert info.with_offset(42) == dataclasses.replace(info, offset=42)
