"""FileStore: layout, atomic info, offsets from data, interrupted writes, bounds."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from tus_fakes import files_in

from tusd_py.stores import file as file_store_module
from tusd_py.stores.base import (
    Store,
    StoreError,
    StoreUnavailable,
    SupportsDeferredLength,
    SupportsDownload,
    SupportsTermination,
    UploadExists,
    UploadInfo,
    UploadNotFound,
)
from tusd_py.stores.file import WRITE_AHEAD_LIMIT, WRITE_BATCH_SIZE, FileStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FileStore]:
    file_store = FileStore(str(tmp_path / "uploads" / "nested"))
    yield file_store
    await file_store.close()


async def chunks(parts: Iterable[bytes], error: BaseException | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(0)
        yield part
    if error is not None:
        raise error


async def read_all(store: FileStore, info: UploadInfo, start: int, stop: int) -> bytes:
    return b"".join([chunk async for chunk in store.read(info, start, stop)])


def test_capabilities(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    for protocol in (Store, SupportsTermination, SupportsDeferredLength, SupportsDownload):
        assert isinstance(store, protocol)


@pytest.mark.both_loops
async def test_create_write_read(store: FileStore) -> None:
    info = await store.create(UploadInfo(id="abc", length=10, metadata={"k": "dg=="}))
    directory = Path(store.directory)
    assert (directory / "abc").read_bytes() == b""
    document = json.loads((directory / "abc.info").read_text())
    assert document["length"] == 10 and document["metadata"] == {"k": "dg=="}
    assert files_in(directory) == ["abc", "abc.info"]

    info = await store.get_info("abc")
    assert info.offset == 0
    assert await store.write(info, chunks([b"01234", b"567"])) == 8
    info = await store.get_info("abc")
    assert info.offset == 8
    assert await store.write(info, chunks([b"89"])) == 10
    info = await store.finish(await store.get_info("abc"))
    assert (await store.get_info("abc")).finished
    assert await read_all(store, info, 0, 10) == b"0123456789"
    assert await read_all(store, info, 3, 5) == b"34"


async def test_large_write_is_exact(store: FileStore) -> None:
    data = bytes(range(256)) * (WRITE_BATCH_SIZE // 256 * 3 + 17)
    info = await store.create(UploadInfo(id="big", length=len(data)))
    parts = [data[i : i + 4000] for i in range(0, len(data), 4000)]
    assert await store.write(info, chunks(parts)) == len(data)
    assert (Path(store.directory) / "big").read_bytes() == data
    assert await read_all(store, info, 0, len(data)) == data


async def test_tiny_chunks_are_batched_by_count(store: FileStore) -> None:
    data = bytes(range(256)) * 10
    info = await store.create(UploadInfo(id="tiny", length=len(data)))
    assert await store.write(info, chunks([data[i : i + 1] for i in range(len(data))])) == len(data)
    assert (Path(store.directory) / "tiny").read_bytes() == data


async def test_interrupted_write_keeps_every_byte_and_reraises(store: FileStore) -> None:
    info = await store.create(UploadInfo(id="cut", length=100))
    with pytest.raises(ConnectionError):
        await store.write(info, chunks([b"a" * 30, b"b" * 20], error=ConnectionError()))
    assert (await store.get_info("cut")).offset == 50
    assert (Path(store.directory) / "cut").read_bytes() == b"a" * 30 + b"b" * 20


async def test_cancelled_write_keeps_received_bytes(store: FileStore) -> None:
    info = await store.create(UploadInfo(id="cancel", length=100))
    stalled = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 40
        stalled.set()
        await asyncio.Event().wait()  # a read that never completes
        yield b""  # pragma: no cover

    task = asyncio.create_task(store.write(info, body()))
    await stalled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await store.get_info("cancel")).offset == 40


async def test_write_never_goes_past_length(store: FileStore) -> None:
    info = await store.create(UploadInfo(id="bound", length=5))
    assert await store.write(info, chunks([b"abc", b"defgh"])) == 5
    assert (Path(store.directory) / "bound").read_bytes() == b"abcde"


async def test_offset_is_capped_at_length(store: FileStore) -> None:
    await store.create(UploadInfo(id="over", length=3))
    (Path(store.directory) / "over").write_bytes(b"abcdef")  # e.g. written by hand
    assert (await store.get_info("over")).offset == 3


async def test_deferred_length(store: FileStore) -> None:
    info = await store.create(UploadInfo(id="defer", length=None))
    assert await store.write(info, chunks([b"abc"])) == 3
    info = await store.declare_length(await store.get_info("defer"), 6)
    info = await store.get_info("defer")
    assert info.length == 6 and info.offset == 3


async def test_terminate(store: FileStore) -> None:
    info = await store.create(UploadInfo(id="gone", length=1))
    await store.terminate(info)
    assert files_in(store.directory) == []
    with pytest.raises(UploadNotFound):
        await store.get_info("gone")
    with pytest.raises(UploadNotFound):
        await store.terminate(info)


@pytest.mark.parametrize("upload_id", ["../x", "..", "a/b", "", "a.info", "%2e%2e", "x" * 129, "a\x00b"])
async def test_invalid_ids_never_reach_the_file_system(store: FileStore, upload_id: str) -> None:
    with pytest.raises(UploadNotFound):
        await store.get_info(upload_id)
    with pytest.raises(UploadNotFound):
        await store.create(UploadInfo(id=upload_id, length=1))
    assert files_in(store.directory) == []


async def test_unknown_and_orphan_uploads(store: FileStore) -> None:
    with pytest.raises(UploadNotFound):
        await store.get_info("nothing")
    (Path(store.directory) / "orphan").write_bytes(b"data without info")
    with pytest.raises(UploadNotFound):
        await store.get_info("orphan")


async def test_corrupt_info_is_a_store_error(store: FileStore) -> None:
    await store.create(UploadInfo(id="bad", length=1))
    (Path(store.directory) / "bad.info").write_text("{not json")
    with pytest.raises(StoreError):
        await store.get_info("bad")


async def test_finish_is_idempotent(store: FileStore) -> None:
    info = await store.create(UploadInfo(id="fin", length=0))
    info = await store.finish(info)
    info = await store.finish(info)
    assert (await store.get_info("fin")).finished


async def test_duplicate_create_fails(store: FileStore) -> None:
    await store.create(UploadInfo(id="dup", length=1))
    with pytest.raises(UploadExists):
        await store.create(UploadInfo(id="dup", length=1))


# -- the write pipeline: batches written by a pool thread while the next is gathered --


def slow_writes(monkeypatch: pytest.MonkeyPatch, fail_on_call: int | None = None) -> list[int]:
    """Make every batch write take a while (so receiving runs ahead of the disk), and
    make write number ``fail_on_call`` store half its bytes, then fail like a full
    disk. Returns the size of every batch written."""
    original = file_store_module._write_chunks
    sizes: list[int] = []

    def write_chunks(fd: int, chunks: list[bytes], position: int) -> None:
        time.sleep(0.01)
        size = sum(len(chunk) for chunk in chunks)
        sizes.append(size)
        if len(sizes) == fail_on_call:
            original(fd, [b"".join(chunks)[: size // 2]], position)
            raise StoreUnavailable("cannot write upload data: [Errno 28] No space left on device")
        original(fd, chunks, position)

    monkeypatch.setattr(file_store_module, "_write_chunks", write_chunks)
    return sizes


async def test_body_ending_early_with_writes_in_flight_keeps_every_byte(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = slow_writes(monkeypatch)
    parts = [bytes([n]) * (256 * 1024 + n) for n in range(80)]  # ~20 MiB, uneven chunks
    data = b"".join(parts)
    info = await store.create(UploadInfo(id="early", length=len(data) + 100))
    with pytest.raises(ConnectionError):
        await store.write(info, chunks(parts, error=ConnectionError()))
    assert (await store.get_info("early")).offset == len(data)
    assert (Path(store.directory) / "early").read_bytes() == data
    # Receiving ran ahead of the slow disk: batches grew, up to the write-ahead limit.
    assert max(sizes) > WRITE_BATCH_SIZE
    assert max(sizes) < WRITE_AHEAD_LIMIT + 300 * 1024


async def test_failed_write_surfaces_with_a_truthful_offset(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = slow_writes(monkeypatch, fail_on_call=3)
    parts = [bytes([n % 251]) * 100_000 for n in range(200)]
    data = b"".join(parts)
    info = await store.create(UploadInfo(id="full", length=len(data)))
    with pytest.raises(StoreUnavailable):
        await store.write(info, chunks(parts))
    stored = sizes[0] + sizes[1] + sizes[2] // 2
    assert len(sizes) == 3, "nothing may be written after a failed write (it would leave a gap)"
    assert (await store.get_info("full")).offset == stored
    assert (Path(store.directory) / "full").read_bytes() == data[:stored]
    # The upload resumes at that offset.
    info = await store.get_info("full")
    monkeypatch.undo()
    assert await store.write(info, chunks([data[stored:]])) == len(data)
    assert (Path(store.directory) / "full").read_bytes() == data


async def test_short_writes_are_continued(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    pwritev = os.pwritev

    def short_pwritev(fd: int, buffers: list[bytes], position: int) -> int:
        # At most 1000 bytes per call: ends inside a buffer and on a buffer's edge.
        limited: list[bytes | memoryview] = []
        room = 1000
        for buffer in buffers:
            if room <= 0:
                break
            limited.append(memoryview(buffer)[:room])
            room -= len(limited[-1])
        return pwritev(fd, limited, position)

    monkeypatch.setattr(os, "pwritev", short_pwritev)
    parts = [bytes([n]) * (300 + 7 * n) for n in range(40)]
    data = b"".join(parts)
    info = await store.create(UploadInfo(id="short", length=len(data)))
    assert await store.write(info, chunks(parts)) == len(data)
    assert (Path(store.directory) / "short").read_bytes() == data


# --- data files kept open between PATCHes ---------------------------------------------------


def open_data_files(directory: str) -> list[str]:
    """Paths of this process's open descriptors inside ``directory`` (deleted ones
    end in " (deleted)")."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory + os.sep):
            found.append(target)
    return found


async def closed_on_the_pool(store: FileStore) -> None:
    """Return once every close already handed to the store's pool has run: kept
    files are closed there without the request waiting for it. Each pool thread
    takes work in order, so once all of them meet at a barrier submitted after the
    closes, the closes are done."""
    threads = file_store_module.IO_THREADS
    barrier = threading.Barrier(threads)
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(store._pool, barrier.wait, 10.0) for _ in range(threads)))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


@needs_proc
async def test_kept_file_is_reused_and_closed_when_the_upload_completes(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = file_store_module._open_for_writing

    def counting_open(path: str) -> Any:
        opened.append(path)
        return real_open(path)

    monkeypatch.setattr(file_store_module, "_open_for_writing", counting_open)
    await store.create(UploadInfo(id="kept", length=6))
    offset = await store.write(await store.get_info("kept"), chunks([b"abc"]))
    data_path = os.path.join(store.directory, "kept")
    assert open_data_files(store.directory) == [data_path]  # kept for the next PATCH
    await store.write(await store.get_info("kept"), chunks([b"def"]))
    assert offset == 3
    assert opened == [data_path]  # the second PATCH used the kept descriptor
    assert await read_all(store, await store.get_info("kept"), 0, 6) == b"abcdef"
    await closed_on_the_pool(store)
    assert open_data_files(store.directory) == []


@needs_proc
async def test_kept_file_of_an_upload_recreated_elsewhere_is_not_written(store: FileStore, tmp_path: Path) -> None:
    """Another instance deletes the upload and creates one with the same id (a
    pre-create hook may choose ids): this instance's kept descriptor points at the
    deleted file, and the next PATCH must land in the new one."""
    await store.create(UploadInfo(id="same", length=None))
    await store.write(await store.get_info("same"), chunks([b"old bytes"]))
    other = FileStore(store.directory)
    try:
        await other.terminate(await other.get_info("same"))
        await other.create(UploadInfo(id="same", length=None))
        info = await store.get_info("same")
        assert info.offset == 0
        assert await store.write(info, chunks([b"new"])) == 3
        assert await read_all(other, await other.get_info("same"), 0, 3) == b"new"
    finally:
        await other.close()
    assert not [path for path in open_data_files(store.directory) if path.endswith("(deleted)")]


@needs_proc
async def test_terminate_closes_the_kept_file(store: FileStore) -> None:
    await store.create(UploadInfo(id="gone", length=10))
    await store.write(await store.get_info("gone"), chunks([b"12345"]))
    await store.terminate(await store.get_info("gone"))
    await closed_on_the_pool(store)
    assert open_data_files(store.directory) == []


@needs_proc
async def test_kept_files_are_bounded(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_store_module, "OPEN_FILES_LIMIT", 3)
    for number in range(6):
        upload_id = f"u{number}"
        await store.create(UploadInfo(id=upload_id, length=100))
        await store.write(await store.get_info(upload_id), chunks([b"x"]))
    await closed_on_the_pool(store)
    kept = sorted(os.path.basename(path) for path in open_data_files(store.directory))
    assert kept == ["u3", "u4", "u5"]  # the least recently used were closed
    for number in range(6):  # every upload still takes its next bytes
        upload_id = f"u{number}"
        assert await store.write(await store.get_info(upload_id), chunks([b"y"])) == 2


@needs_proc
async def test_idle_kept_files_are_closed(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.create(UploadInfo(id="idle", length=100))
    await store.create(UploadInfo(id="busy", length=100))
    await store.write(await store.get_info("idle"), chunks([b"x"]))
    monkeypatch.setattr(file_store_module, "OPEN_FILE_IDLE_SECONDS", 0.0)
    await store.write(await store.get_info("busy"), chunks([b"x"]))  # sweeps the idle one
    await closed_on_the_pool(store)
    assert [os.path.basename(path) for path in open_data_files(store.directory)] == ["busy"]
