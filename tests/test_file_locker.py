"""FileLocker: flock-based locks between real processes, with release requests.

A helper process (``HOLDER_SCRIPT``) takes a lock with its own FileLocker and reports
on stdout; it obeys release requests ("obey") or holds until told on stdin ("ignore").
CLOCK_MONOTONIC is system-wide on Linux, so timestamps from the two processes order
events ("the child acquired after the parent released").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tusd_py.lockers.base import LockTimeout, LockUnavailable
from tusd_py.lockers.file import LOCK_FILE_TTL, SOCKET_PREFIX, FileLocker, remove_old_lock_files

HOLDER_SCRIPT = r"""
import asyncio, sys, time
from tusd_py.lockers.file import FileLocker

def locker_token(locker: FileLocker, upload_id: str) -> str:
    generation = locker._holdings[upload_id].held.generation
    return generation.token if generation is not None else "-"

async def main() -> None:
    directory, upload_id, mode, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    def say(*words: object) -> None:
        print(*words, flush=True)

    locker = FileLocker(directory, acquire_timeout=timeout)
    release = asyncio.Event()

    def on_release_request() -> None:
        say("release-requested")
        if mode == "obey":
            release.set()

    async def commands() -> None:
        while line := await stdin.readline():
            if line.strip() == b"release":
                release.set()

    listener = asyncio.create_task(commands())
    await locker.start()
    say("started")
    try:
        async with locker.lock(upload_id, on_release_request):
            say("acquired", repr(time.monotonic()), locker_token(locker, upload_id))
            await release.wait()
            say("releasing", repr(time.monotonic()))
    except Exception as error:
        say("error", type(error).__name__)
    await locker.close()
    say("closed")
    await listener

asyncio.run(main())
"""

pytestmark = pytest.mark.both_loops

STEP_TIMEOUT = 20.0
"""Upper bound for one expected step of a helper process (a bound, not a delay)."""


class Helper:
    """A helper process holding or waiting for a lock."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[list[str]] = []

    @classmethod
    async def start(cls, directory: Path, upload_id: str, mode: str, acquire_timeout: float = 20.0) -> Helper:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER_SCRIPT, str(directory), upload_id, mode, str(acquire_timeout),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        helper = cls(process)
        await helper.expect("started")
        return helper

    async def expect(self, word: str) -> list[str]:
        """Read lines until one starts with ``word``; returns its words."""
        assert self.process.stdout is not None
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"helper exited before {word!r}; saw {self.lines}")
                words = line.decode().split()
                self.lines.append(words)
                if words and words[0] == word:
                    return words

    def saw(self, word: str) -> bool:
        return any(words and words[0] == word for words in self.lines)

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            async with asyncio.timeout(STEP_TIMEOUT):
                await self.process.wait()

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "locks"


def sockets_in(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if name.startswith(SOCKET_PREFIX)}


async def test_release_request_reaches_holder_in_other_process(lock_dir: Path) -> None:
    helper = await Helper.start(lock_dir, "up1", "obey")
    locker = FileLocker(str(lock_dir), acquire_timeout=STEP_TIMEOUT)
    try:
        await helper.expect("acquired")
        asked = []
        async with locker.lock("up1", lambda: asked.append(1)):
            acquired_at = time.monotonic()
        releasing = await helper.expect("releasing")
        assert helper.saw("release-requested")
        # Mutual exclusion: we got the lock only after the helper left its critical section.
        assert float(releasing[1]) < acquired_at
        assert asked == []
    finally:
        await locker.close()
        await helper.stop()


async def test_holder_in_this_process_is_asked_by_other_process(lock_dir: Path) -> None:
    locker = FileLocker(str(lock_dir), acquire_timeout=STEP_TIMEOUT)
    asked = asyncio.Event()
    try:
        async with locker.lock("up1", asked.set):
            helper = await Helper.start(lock_dir, "up1", "obey")
            async with asyncio.timeout(STEP_TIMEOUT):
                await asked.wait()
            assert not helper.saw("acquired")
            released_at = time.monotonic()
        acquired = await helper.expect("acquired")
        assert float(acquired[1]) > released_at
        await helper.send("release")
        await helper.expect("closed")
    finally:
        await locker.close()
    await helper.stop()


async def test_acquire_timeout_when_holder_ignores_release_requests(lock_dir: Path) -> None:
    helper = await Helper.start(lock_dir, "up1", "ignore")
    impatient = FileLocker(str(lock_dir), acquire_timeout=0.3)
    patient = FileLocker(str(lock_dir), acquire_timeout=STEP_TIMEOUT)
    try:
        await helper.expect("acquired")
        with pytest.raises(LockTimeout):
            async with impatient.lock("up1", lambda: None):
                pytest.fail("acquired a lock held by another process")
        await helper.expect("release-requested")
        await helper.send("release")
        async with patient.lock("up1", lambda: None):
            acquired_at = time.monotonic()
        releasing = await helper.expect("releasing")
        assert float(releasing[1]) < acquired_at
    finally:
        await impatient.close()
        await patient.close()
        await helper.stop()


async def test_killed_holder_frees_lock_and_its_stale_socket_is_removed(lock_dir: Path) -> None:
    helper = await Helper.start(lock_dir, "up1", "ignore")
    await helper.expect("acquired")
    stale = sockets_in(lock_dir)
    assert len(stale) == 1
    await helper.kill()
    locker = FileLocker(str(lock_dir), acquire_timeout=STEP_TIMEOUT)
    try:
        await locker.start()
        assert sockets_in(lock_dir).isdisjoint(stale)
        async with locker.lock("up1", lambda: None):
            pass
    finally:
        await locker.close()


async def test_release_request_to_killed_holder_does_not_block(lock_dir: Path) -> None:
    helper = await Helper.start(lock_dir, "up1", "ignore")
    await helper.expect("acquired")
    locker = FileLocker(str(lock_dir), acquire_timeout=STEP_TIMEOUT)
    await locker.start()
    try:
        waiter = asyncio.create_task(_hold_briefly(locker, "up1"))
        await helper.expect("release-requested")
        await helper.kill()  # its socket file stays behind, refusing datagrams
        async with asyncio.timeout(STEP_TIMEOUT):
            await waiter
    finally:
        await locker.close()


async def _hold_briefly(locker: FileLocker, upload_id: str) -> None:
    async with locker.lock(upload_id, lambda: None):
        pass


async def test_two_requests_in_one_process(lock_dir: Path) -> None:
    locker = FileLocker(str(lock_dir), acquire_timeout=STEP_TIMEOUT)
    asked = asyncio.Event()
    order: list[str] = []
    try:
        async with locker.lock("up1", asked.set):
            second = asyncio.create_task(_record(locker, "up1", order, "second"))
            async with asyncio.timeout(STEP_TIMEOUT):
                await asked.wait()
            order.append("first leaves")
        await second
        assert order == ["first leaves", "second"]
    finally:
        await locker.close()


async def _record(locker: FileLocker, upload_id: str, order: list[str], name: str) -> None:
    async with locker.lock(upload_id, lambda: None):
        order.append(name)


async def test_two_lockers_in_one_process_contend_like_processes(lock_dir: Path) -> None:
    first = FileLocker(str(lock_dir), acquire_timeout=0.2)
    second = FileLocker(str(lock_dir), acquire_timeout=0.2)
    asked: list[str] = []
    try:
        async with first.lock("up1", lambda: asked.append("first")):
            with pytest.raises(LockTimeout):
                async with second.lock("up1", lambda: None):
                    pytest.fail("two lockers held the same lock")
            # Other ids are independent.
            async with second.lock("up2", lambda: None):
                pass
        assert asked, "the holder was not asked to release"
        async with second.lock("up1", lambda: None):
            pass
    finally:
        await first.close()
        await second.close()


async def test_old_lock_files_are_removed_unless_held(lock_dir: Path) -> None:
    """Lock files stay between holds (they carry the generation) and are removed
    once unused for LOCK_FILE_TTL; a held one stays, however old."""
    locker = FileLocker(str(lock_dir), acquire_timeout=1)
    try:
        for index in range(3):
            async with locker.lock(f"up{index}", lambda: None):
                pass
        names = sorted(name for name in os.listdir(lock_dir) if name.endswith(".lock"))
        assert names == ["up0.lock", "up1.lock", "up2.lock"]
        old = time.time() - LOCK_FILE_TTL - 1
        for name in names[:2]:
            os.utime(lock_dir / name, (old, old))
        async with locker.lock("up0", lambda: None):
            os.utime(lock_dir / "up0.lock", (old, old))  # held: stays anyway
            assert remove_old_lock_files(str(lock_dir), time.time() - LOCK_FILE_TTL) == 1
        assert sorted(name for name in os.listdir(lock_dir) if name.endswith(".lock")) == ["up0.lock", "up2.lock"]
        # A holder that comes after a removal is told nothing about earlier holds.
        assert await _follows(locker, "up1") is None
    finally:
        await locker.close()


async def _follows(locker: FileLocker, upload_id: str) -> str | None:
    """The hold that a new hold of ``upload_id`` follows."""
    async with locker.lock(upload_id, lambda: None) as held:
        assert held.generation is not None
        return held.generation.follows


async def test_a_hold_names_the_one_before_it_across_processes(lock_dir: Path) -> None:
    """The generation: this process's next hold follows its own last one when nobody
    held the lock in between, another process's when it did, and none when that
    process was killed holding it."""
    locker = FileLocker(str(lock_dir), acquire_timeout=STEP_TIMEOUT)
    try:
        async with locker.lock("up1", lambda: None) as held:
            assert held.generation is not None and held.generation.follows is None  # a new file
            first = held.generation.token
        async with locker.lock("up1", lambda: None) as held:
            assert held.generation is not None and held.generation.follows == first
            mine = held.generation.token

        helper = await Helper.start(lock_dir, "up1", "obey")
        acquired = await helper.expect("acquired")
        assert acquired[2] != mine
        await helper.send("release")
        await helper.expect("closed")
        await helper.stop()
        async with locker.lock("up1", lambda: None) as held:
            assert held.generation is not None and held.generation.follows == acquired[2]

        killed = await Helper.start(lock_dir, "up1", "ignore")
        await killed.expect("acquired")
        await killed.kill()
        assert await _follows(locker, "up1") is None
    finally:
        await locker.close()


async def test_a_hold_released_by_close_names_nothing(lock_dir: Path) -> None:
    first = FileLocker(str(lock_dir), acquire_timeout=1)
    entered = asyncio.Event()

    async def hold() -> None:
        async with first.lock("up1", lambda: None):
            entered.set()
            await asyncio.Event().wait()

    holder = asyncio.create_task(hold())
    await entered.wait()
    await first.close()  # the hold is lost, not cleanly released
    holder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await holder
    second = FileLocker(str(lock_dir), acquire_timeout=1)
    try:
        assert await _follows(second, "up1") is None
    finally:
        await second.close()


async def test_invalid_upload_id_is_rejected(lock_dir: Path) -> None:
    locker = FileLocker(str(lock_dir), acquire_timeout=1)
    try:
        for bad in ("../etc", "a/b", "", ".sock-1", "x y"):
            with pytest.raises(ValueError):
                locker.lock(bad, lambda: None)
    finally:
        await locker.close()


async def test_close_releases_held_locks_and_removes_socket(lock_dir: Path) -> None:
    locker = FileLocker(str(lock_dir), acquire_timeout=1)
    other = FileLocker(str(lock_dir), acquire_timeout=1)
    try:
        context = locker.lock("up1", lambda: None)
        held = await context.__aenter__()
        await locker.close()
        assert held.lost.is_set()
        await context.__aexit__(None, None, None)
        async with other.lock("up1", lambda: None):
            pass
        assert sockets_in(lock_dir) == {os.path.basename(str(other.address))}
        with pytest.raises(LockUnavailable):
            async with locker.lock("up1", lambda: None):
                pass
    finally:
        await other.close()
    assert sockets_in(lock_dir) == set()


async def test_long_directory_falls_back_to_abstract_socket(tmp_path: Path) -> None:
    directory = tmp_path / ("d" * 120)
    first = FileLocker(str(directory), acquire_timeout=STEP_TIMEOUT)
    second = FileLocker(str(directory), acquire_timeout=STEP_TIMEOUT)
    asked = asyncio.Event()
    try:
        async with first.lock("up1", asked.set):
            assert isinstance(first.address, bytes)
            waiter = asyncio.create_task(_hold_briefly(second, "up1"))
            async with asyncio.timeout(STEP_TIMEOUT):
                await asked.wait()
        async with asyncio.timeout(STEP_TIMEOUT):
            await waiter
    finally:
        await first.close()
        await second.close()
