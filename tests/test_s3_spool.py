"""The spool ring's file slots: writev batching and hashing on the way in, and the
S3 client's bodies sent as bytes (no BytesIO copies)."""

from __future__ import annotations

import gc
import hashlib
import os
from typing import Any

import pytest
from botocore.handlers import convert_body_to_file_like_object

from tusd_py.stores import s3_spool
from tusd_py.stores.s3_botocore import _bytes_body_before_send, _BytesBody, _send_bodies_as_bytes
from tusd_py.stores.s3_spool import FileSlot, MemorySlot, SpoolBudget, SpoolRing


async def test_file_slot_hashes_every_byte_it_spools(tmp_path: Any) -> None:
    data = os.urandom(3 * s3_spool.FILE_FLUSH_SIZE + 12345)
    slot = FileSlot(str(tmp_path), hashlib.md5)
    # Many tiny chunks: one flush holds more than one writev call's buffers.
    for start in range(0, len(data), 997):
        await slot.append(data[start:start + 997])
    assert b"".join(await slot.read_chunks()) == data
    assert slot.digest() == hashlib.md5(data).digest()
    await slot.close()


async def test_slots_without_a_complete_hash_report_none(tmp_path: Any) -> None:
    small = FileSlot(str(tmp_path), hashlib.md5)
    await small.append(b"below one flush")  # never reaches the file
    assert await small.read_chunks() == [b"below one flush"]
    assert small.digest() is None
    await small.close()
    unhashed = FileSlot(str(tmp_path))
    await unhashed.append(os.urandom(s3_spool.FILE_FLUSH_SIZE))
    await unhashed.read_chunks()
    assert unhashed.digest() is None
    await unhashed.close()
    memory = MemorySlot()
    await memory.append(b"x")
    assert memory.digest() is None


async def test_a_body_of_one_flush_never_reaches_the_file(tmp_path: Any) -> None:
    """A 1 MiB PATCH's bytes (the slot's head) stay in memory: they are read back for
    the tail segment without a write and a read of the spool file."""
    data = os.urandom(s3_spool.MEMORY_HEAD_SIZE)
    slot = FileSlot(str(tmp_path), hashlib.md5)
    for start in range(0, len(data), 64 * 1024):
        await slot.append(data[start:start + 64 * 1024])
    assert slot._file is None
    assert b"".join(await slot.read_chunks()) == data
    await slot.append(b"+")  # one byte more: the head goes to the file
    assert slot._file is not None
    assert b"".join(await slot.read_chunks()) == data + b"+"
    await slot.close()


async def test_ring_gives_file_slots_its_hasher(tmp_path: Any) -> None:
    seen: list[int] = []
    ring = SpoolRing(1, "file", str(tmp_path), seen.append, hasher=hashlib.md5)
    slot = await ring.acquire()
    data = os.urandom(s3_spool.MEMORY_HEAD_SIZE + 1)
    await slot.append(data)
    await slot.read_chunks()
    assert slot.digest() == hashlib.md5(data).digest()
    await slot.close()
    ring.release()
    assert seen == [1, -1]


async def test_file_rings_hold_slots_in_memory_while_the_budget_has_a_part_left(tmp_path: Any) -> None:
    budget = SpoolBudget(2 * 1000)
    first = SpoolRing(4, "file", str(tmp_path), budget=budget, slot_size=1000)
    second = SpoolRing(4, "file", str(tmp_path), budget=budget, slot_size=1000)
    a = await first.acquire()
    b = await second.acquire()
    c = await first.acquire()  # the budget is spent: a file
    assert (type(a), type(b), type(c)) == (MemorySlot, MemorySlot, FileSlot)
    await b.close()  # its share goes back ...
    d = await second.acquire()
    assert isinstance(d, MemorySlot)  # ... and the next slot gets it
    for slot in (a, c, d):
        await slot.close()
    await a.close()  # a second close gives nothing back twice
    assert budget.take(2 * 1000) and not budget.take(1)  # all of it was given back, once


async def test_a_memory_slot_never_closed_gives_its_budget_back_when_collected(tmp_path: Any) -> None:
    budget = SpoolBudget(1000)
    ring = SpoolRing(4, "file", str(tmp_path), budget=budget, slot_size=1000)
    slot = await ring.acquire()
    assert isinstance(slot, MemorySlot) and not budget.take(1)
    del slot  # e.g. a writer cancelled while it freed its slots
    gc.collect()
    assert budget.take(1000)


async def test_a_budget_smaller_than_a_part_gives_only_file_slots(tmp_path: Any) -> None:
    ring = SpoolRing(4, "file", str(tmp_path), budget=SpoolBudget(999), slot_size=1000)
    slot = await ring.acquire()
    assert isinstance(slot, FileSlot)
    await slot.close()


def test_large_bodies_go_to_aiohttp_as_bytes() -> None:
    class Events:
        def __init__(self) -> None:
            self.unregistered: list[tuple[str, Any]] = []
            self.registered: list[tuple[str, Any]] = []

        def unregister(self, event: str, handler: Any) -> None:
            self.unregistered.append((event, handler))

        def register(self, event: str, handler: Any) -> None:
            self.registered.append((event, handler))

    class Client:
        class meta:  # noqa: N801
            events = Events()

    _send_bodies_as_bytes(Client())
    events = Client.meta.events
    assert {event for event, _ in events.unregistered} == {
        "before-parameter-build.s3.PutObject", "before-parameter-build.s3.UploadPart"}
    assert all(handler is convert_body_to_file_like_object for _, handler in events.unregistered)

    class Request:
        body: Any = None

    request = Request()
    request.body = small = b"x" * 100
    _bytes_body_before_send(request)
    assert request.body is small
    request.body = large = os.urandom(2 * 1024 * 1024)
    _bytes_body_before_send(request)
    assert isinstance(request.body, _BytesBody)
    assert request.body.size == len(large)


@pytest.mark.filterwarnings("error")
def test_bytes_body_raises_no_resource_warning() -> None:
    _BytesBody(b"\0" * (4 * 1024 * 1024))
