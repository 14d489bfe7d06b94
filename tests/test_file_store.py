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
from tusd_py.stores import file_io
from tusd_py.stores.base import (
    IteratedBody,
    Store,
    StoreError,
    StoreUnavailable,
    SupportsConcatenation,
    SupportsExpiration,
    Upload,
    UploadExists,
    UploadInfo,
    UploadNotFound,
)
from tusd_py.stores.file import FileStore
from tusd_py.stores.file_io import WRITE_AHEAD_LIMIT, WRITE_BATCH_SIZE


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FileStore]:
    file_store = FileStore(str(tmp_path / "uploads" / "nested"))
    yield file_store
    await file_store.close()


def chunks(parts: Iterable[bytes], error: BaseException | None = None) -> IteratedBody:
    """A write body of ``parts``, optionally ending with ``error`` instead of EOF."""

    async def iterate() -> AsyncIterator[bytes]:
        for part in parts:
            await asyncio.sleep(0)
            yield part
        if error is not None:
            raise error

    return IteratedBody(iterate())


async def read_all(upload: Upload, start: int, stop: int) -> bytes:
    return b"".join([chunk async for chunk in upload.read(start, stop)])


async def test_capabilities(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    try:
        for protocol in (Store, SupportsConcatenation, SupportsExpiration):
            assert isinstance(store, protocol)
        # Termination, deferred length and downloads are on every upload handle.
        upload = await store.create(UploadInfo(id="caps", length=None))
        for method in ("write", "finish", "declare_length", "terminate", "read"):
            assert callable(getattr(upload, method))
    finally:
        await store.close()


@pytest.mark.both_loops
async def test_create_write_read(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="abc", length=10, metadata={"k": "dg=="}))
    assert upload.info.offset == 0 and upload.info.length == 10
    directory = Path(store.directory)
    document = json.loads((directory / "abc.info").read_text())
    assert document["length"] == 10 and document["metadata"] == {"k": "dg=="}
    assert files_in(directory) == ["abc.info"]  # the data file comes with the first bytes

    upload = await store.get("abc")
    assert upload.info.offset == 0
    assert (await upload.write(0, chunks([b"01234", b"567"]))).offset == 8
    assert files_in(directory) == ["abc", "abc.info"]
    upload = await store.get("abc")
    assert upload.info.offset == 8
    assert (await upload.write(8, chunks([b"89"]))).offset == 10
    upload = await store.get("abc")
    assert (await upload.finish()).finished
    assert (await store.get("abc")).info.finished
    assert await read_all(upload, 0, 10) == b"0123456789"
    assert await read_all(upload, 3, 5) == b"34"


async def test_large_write_is_exact(store: FileStore) -> None:
    data = bytes(range(256)) * (WRITE_BATCH_SIZE // 256 * 3 + 17)
    upload = await store.create(UploadInfo(id="big", length=len(data)))
    parts = [data[i : i + 4000] for i in range(0, len(data), 4000)]
    assert (await upload.write(0, chunks(parts))).offset == len(data)
    assert (Path(store.directory) / "big").read_bytes() == data
    assert await read_all(upload, 0, len(data)) == data


async def test_tiny_chunks_are_batched_by_count(store: FileStore) -> None:
    data = bytes(range(256)) * 10
    upload = await store.create(UploadInfo(id="tiny", length=len(data)))
    assert (await upload.write(0, chunks([data[i : i + 1] for i in range(len(data))]))).offset == len(data)
    assert (Path(store.directory) / "tiny").read_bytes() == data


async def test_interrupted_write_keeps_every_byte_and_reraises(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="cut", length=100))
    with pytest.raises(ConnectionError):
        await upload.write(0, chunks([b"a" * 30, b"b" * 20], error=ConnectionError()))
    assert upload.info.offset == 50
    assert (await store.get("cut")).info.offset == 50
    assert (Path(store.directory) / "cut").read_bytes() == b"a" * 30 + b"b" * 20


async def test_cancelled_write_keeps_received_bytes(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="cancel", length=100))
    stalled = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 40
        stalled.set()
        await asyncio.Event().wait()  # a read that never completes
        yield b""  # pragma: no cover

    task = asyncio.create_task(upload.write(0, IteratedBody(body())))
    await stalled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert upload.info.offset == 40
    assert (await store.get("cancel")).info.offset == 40


async def test_write_never_goes_past_length(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="bound", length=5))
    assert (await upload.write(0, chunks([b"abc", b"defgh"]))).offset == 5
    assert (Path(store.directory) / "bound").read_bytes() == b"abcde"


async def test_offset_is_capped_at_length(store: FileStore) -> None:
    await store.create(UploadInfo(id="over", length=3))
    (Path(store.directory) / "over").write_bytes(b"abcdef")  # e.g. written by hand
    assert (await store.get("over")).info.offset == 3


async def test_deferred_length(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="defer", length=None))
    assert (await upload.write(0, chunks([b"abc"]))).offset == 3
    declared = await (await store.get("defer")).declare_length(6)
    assert declared.length == 6 and declared.offset == 3
    info = (await store.get("defer")).info
    assert info.length == 6 and info.offset == 3


async def test_terminate(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="gone", length=1))
    await upload.terminate()
    assert files_in(store.directory) == []
    with pytest.raises(UploadNotFound):
        await store.get("gone")
    with pytest.raises(UploadNotFound):
        await upload.terminate()


@pytest.mark.parametrize("upload_id", ["../x", "..", "a/b", "", "a.info", "%2e%2e", "x" * 129, "a\x00b"])
async def test_invalid_ids_never_reach_the_file_system(store: FileStore, upload_id: str) -> None:
    with pytest.raises(UploadNotFound):
        await store.get(upload_id)
    with pytest.raises(UploadNotFound):
        await store.create(UploadInfo(id=upload_id, length=1))
    assert files_in(store.directory) == []


async def test_unknown_and_orphan_uploads(store: FileStore) -> None:
    with pytest.raises(UploadNotFound):
        await store.get("nothing")
    (Path(store.directory) / "orphan").write_bytes(b"data without info")
    with pytest.raises(UploadNotFound):
        await store.get("orphan")


async def test_corrupt_info_is_a_store_error(store: FileStore) -> None:
    await store.create(UploadInfo(id="bad", length=1))
    (Path(store.directory) / "bad.info").write_text("{not json")
    with pytest.raises(StoreError):
        await store.get("bad")


async def test_finish_is_idempotent(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="fin", length=0))
    assert (await upload.finish()).finished
    assert (await upload.finish()).finished
    assert (await (await store.get("fin")).finish()).finished  # a fresh handle of a finished upload
    assert (await store.get("fin")).info.finished


async def test_duplicate_create_fails(store: FileStore) -> None:
    await store.create(UploadInfo(id="dup", length=1))
    with pytest.raises(UploadExists):
        await store.create(UploadInfo(id="dup", length=1))


async def test_a_creation_cut_short_is_no_upload_and_is_swept(store: FileStore) -> None:
    """A crash between making a new info document and writing it leaves it empty: the
    creation was never announced, so it is no upload, and the orphan sweep removes it
    (a written one is left alone)."""
    directory = Path(store.directory)
    (directory / "cut.info").write_bytes(b"")
    await store.create(UploadInfo(id="whole", length=1))
    with pytest.raises(UploadNotFound):
        await store.get("cut")
    assert [info.id async for info in store.list_uploads()] == ["whole"]
    assert await store.remove_orphans(time.time() + 1) == 1
    assert files_in(directory) == ["whole.info"]
    assert (await store.create(UploadInfo(id="cut", length=2))).info.length == 2


async def test_an_orphan_data_file_keeps_its_id_taken(store: FileStore) -> None:
    """Data left by a crashed termination would count as a new upload's bytes."""
    (Path(store.directory) / "stale").write_bytes(b"old bytes")
    with pytest.raises(UploadExists):
        await store.create(UploadInfo(id="stale", length=20))
    assert files_in(store.directory) == ["stale"]


async def test_an_upload_with_nothing_written_reads_and_concatenates(store: FileStore) -> None:
    upload = await store.create(UploadInfo(id="empty", length=0))
    empty = await upload.finish()
    assert await read_all(upload, 0, 0) == b""
    other = await store.create(UploadInfo(id="other", length=3))
    await other.write(0, chunks([b"abc"]))
    final = await store.concatenate(UploadInfo(id="final", length=3), [empty, other.info])
    assert final.finished and await read_all(await store.get("final"), 0, 3) == b"abc"


# -- the write pipeline: batches written by a pool thread while the next is gathered --


def slow_writes(monkeypatch: pytest.MonkeyPatch, fail_on_call: int | None = None) -> list[int]:
    """Make every batch write take a while (so receiving runs ahead of the disk), and
    make write number ``fail_on_call`` store half its bytes, then fail like a full
    disk. Returns the size of every batch written."""
    original = file_io._write_chunks
    sizes: list[int] = []

    def write_chunks(fd: int, chunks: list[bytes], position: int) -> None:
        time.sleep(0.01)
        size = sum(len(chunk) for chunk in chunks)
        sizes.append(size)
        if len(sizes) == fail_on_call:
            original(fd, [b"".join(chunks)[: size // 2]], position)
            raise StoreUnavailable("cannot write upload data: [Errno 28] No space left on device")
        original(fd, chunks, position)

    monkeypatch.setattr(file_io, "_write_chunks", write_chunks)
    return sizes


async def test_body_ending_early_with_writes_in_flight_keeps_every_byte(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = slow_writes(monkeypatch)
    parts = [bytes([n]) * (256 * 1024 + n) for n in range(80)]  # ~20 MiB, uneven chunks
    data = b"".join(parts)
    upload = await store.create(UploadInfo(id="early", length=len(data) + 100))
    with pytest.raises(ConnectionError):
        await upload.write(0, chunks(parts, error=ConnectionError()))
    assert upload.info.offset == len(data)
    assert (await store.get("early")).info.offset == len(data)
    assert (Path(store.directory) / "early").read_bytes() == data
    # Receiving ran ahead of the slow disk: batches grew, up to the write-ahead limit.
    assert max(sizes) > WRITE_BATCH_SIZE
    assert max(sizes) < WRITE_AHEAD_LIMIT + 300 * 1024


async def test_failed_write_surfaces_with_a_truthful_offset(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = slow_writes(monkeypatch, fail_on_call=3)
    parts = [bytes([n % 251]) * 100_000 for n in range(200)]
    data = b"".join(parts)
    upload = await store.create(UploadInfo(id="full", length=len(data)))
    with pytest.raises(StoreUnavailable):
        await upload.write(0, chunks(parts))
    stored = sizes[0] + sizes[1] + sizes[2] // 2
    assert len(sizes) == 3, "nothing may be written after a failed write (it would leave a gap)"
    assert upload.info.offset <= stored  # the handle never counts bytes that are not stored
    assert (await store.get("full")).info.offset == stored
    assert (Path(store.directory) / "full").read_bytes() == data[:stored]
    # The upload resumes at that offset.
    upload = await store.get("full")
    monkeypatch.undo()
    assert (await upload.write(stored, chunks([data[stored:]]))).offset == len(data)
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
    upload = await store.create(UploadInfo(id="short", length=len(data)))
    assert (await upload.write(0, chunks(parts))).offset == len(data)
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
    await asyncio.gather(*(loop.run_in_executor(store._directory.pool, barrier.wait, 10.0) for _ in range(threads)))


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")


@needs_proc
async def test_kept_file_is_reused_and_closed_when_the_upload_completes(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = file_io.open_for_writing

    def counting_open(path: str, create: bool) -> Any:
        opened.append(path)
        return real_open(path, create)

    monkeypatch.setattr(file_store_module, "open_for_writing", counting_open)
    await store.create(UploadInfo(id="kept", length=6))
    offset = (await (await store.get("kept")).write(0, chunks([b"abc"]))).offset
    data_path = os.path.join(store.directory, "kept")
    assert open_data_files(store.directory) == [data_path]  # kept for the next PATCH
    await (await store.get("kept")).write(3, chunks([b"def"]))
    assert offset == 3
    assert opened == [data_path]  # the second PATCH used the kept descriptor
    assert await read_all(await store.get("kept"), 0, 6) == b"abcdef"
    await closed_on_the_pool(store)
    assert open_data_files(store.directory) == []


@needs_proc
async def test_kept_file_of_an_upload_recreated_elsewhere_is_not_written(store: FileStore, tmp_path: Path) -> None:
    """Another instance deletes the upload and creates one with the same id (a
    pre-create hook may choose ids): this instance's kept descriptor points at the
    deleted file, and the next PATCH must land in the new one."""
    await store.create(UploadInfo(id="same", length=None))
    await (await store.get("same")).write(0, chunks([b"old bytes"]))
    other = FileStore(store.directory)
    try:
        await (await other.get("same")).terminate()
        await other.create(UploadInfo(id="same", length=None))
        upload = await store.get("same")
        assert upload.info.offset == 0
        assert (await upload.write(0, chunks([b"new"]))).offset == 3
        assert await read_all(await other.get("same"), 0, 3) == b"new"
    finally:
        await other.close()
    assert not [path for path in open_data_files(store.directory) if path.endswith("(deleted)")]


@needs_proc
async def test_terminate_closes_the_kept_file(store: FileStore) -> None:
    await store.create(UploadInfo(id="gone", length=10))
    await (await store.get("gone")).write(0, chunks([b"12345"]))
    await (await store.get("gone")).terminate()
    await closed_on_the_pool(store)
    assert open_data_files(store.directory) == []


@needs_proc
async def test_kept_files_are_bounded(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_io, "OPEN_FILES_LIMIT", 3)
    for number in range(6):
        upload_id = f"u{number}"
        await store.create(UploadInfo(id=upload_id, length=100))
        await (await store.get(upload_id)).write(0, chunks([b"x"]))
    await closed_on_the_pool(store)
    kept = sorted(os.path.basename(path) for path in open_data_files(store.directory))
    assert kept == ["u3", "u4", "u5"]  # the least recently used were closed
    for number in range(6):  # every upload still takes its next bytes
        upload_id = f"u{number}"
        assert (await (await store.get(upload_id)).write(1, chunks([b"y"]))).offset == 2


@needs_proc
async def test_idle_kept_files_are_closed(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.create(UploadInfo(id="idle", length=100))
    await store.create(UploadInfo(id="busy", length=100))
    await (await store.get("idle")).write(0, chunks([b"x"]))
    monkeypatch.setattr(file_io, "OPEN_FILE_IDLE_SECONDS", 0.0)
    await (await store.get("busy")).write(0, chunks([b"x"]))  # sweeps the idle one
    await closed_on_the_pool(store)
    assert [os.path.basename(path) for path in open_data_files(store.directory)] == ["busy"]


async def test_unchanged_info_document_is_parsed_once(store: FileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = await store.create(UploadInfo(id="cached", length=10, metadata={"a": "b"}))
    await upload.write(0, chunks([b"abc"]))
    parsed: list[object] = []
    real_from_json = UploadInfo.from_json

    def counting(document: Any) -> UploadInfo:
        parsed.append(document)
        return real_from_json(document)

    monkeypatch.setattr(UploadInfo, "from_json", staticmethod(counting))
    first = (await store.get("cached")).info
    second = (await store.get("cached")).info
    assert len(parsed) == 1
    assert first == second and second.offset == 3 and second.metadata == {"a": "b"}


async def test_info_document_replaced_elsewhere_is_read_again(store: FileStore, tmp_path: Path) -> None:
    # Another worker (another FileStore on the same directory) declares the length:
    # this store's cached document is stale and must not be used.
    await store.create(UploadInfo(id="shared", length=None, metadata={}))
    assert (await store.get("shared")).info.length is None
    other = FileStore(store.directory)
    try:
        await (await other.get("shared")).declare_length(5)
    finally:
        await other.close()
    assert (await store.get("shared")).info.length == 5
    os.unlink(os.path.join(store.directory, "shared.info"))
    with pytest.raises(UploadNotFound):
        await store.get("shared")
