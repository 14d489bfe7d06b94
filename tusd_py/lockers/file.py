"""File locker: per-upload locks shared by the worker processes of one host.

Each worker process has its own ``FileLocker`` on the same directory.

- The lock of upload ``U`` is ``flock(LOCK_EX | LOCK_NB)`` on ``<directory>/U.lock``.
  ``flock`` rather than POSIX ``fcntl``/``lockf`` record locks: record locks belong to
  the process and vanish when *any* descriptor of the file is closed (reading the
  holder's address would drop our own lock); ``flock`` locks belong to one open file
  description, so two descriptors contend even within one process. The kernel drops the
  lock when its holder dies, so a killed worker never leaves a stuck lock.
- The lock file is a small record rewritten in place: ``<address>\n<token>`` while held
  (the holder's release-request socket and the token of its hold), ``\n<token>`` once
  that hold was released. The next holder reads it: a record without an address names
  the hold it directly follows (``held.generation.follows``), so a worker that finds its
  own last token there may reuse the state it kept (no other worker held the lock
  since); a record with an address (its holder was killed) or no record vouches for
  nothing. Files stay between holds (creating and unlinking one per request cost more
  than the lock); each locker removes the lock files unused for ``LOCK_FILE_TTL``,
  unlinking only a file it has locked, and a waiter that locked a file which was
  unlinked meanwhile notices (the inode at the path differs) and tries again.
- Release requests between processes go over Unix datagram sockets: every locker binds
  one (``<directory>/.sock-<pid>-<random>``; in the abstract namespace if that path is
  too long for a socket address) and the holder writes its address into the lock file.
  A waiter sends ``release U`` to it; the holder calls ``on_release_request`` and, when
  it unlocks, answers every waiter that asked with ``released U``, which wakes the
  waiter at once. Waiting needs no busy polling: a waiter sleeps until that answer or a
  short, growing timeout (capped at ``MAX_RETRY_SECONDS``) that covers holders killed
  before they could answer.
- Requests of one process for the same id are serialized in-process first by a
  ``MemoryLocker`` (the same queueing and release-request semantics), so at most one
  request per id and process contends for the file lock.

Lock-file operations (open, flock with LOCK_NB, a few-byte read or write) are local
metadata system calls that never wait for another process, so they run on the event
loop; removing old lock files (a directory scan) runs in a worker thread. A lock held
by this locker cannot be lost while the process lives, so ``held.lost`` is only set by
``close()``. Create the locker in the worker process (after any fork): a forked child
shares its parent's lock descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from tusd_py.lockers.base import (
    HeldLock,
    LockGeneration,
    LockObserver,
    LockTimeout,
    LockUnavailable,
    ReleaseRequest,
    ask_to_release,
    check_lock_name,
    new_lock_token,
    observed,
)
from tusd_py.lockers.memory import MemoryLocker

log = logging.getLogger("tusd_py.lockers.file")

SOCKET_PREFIX = ".sock-"
LOCK_SUFFIX = ".lock"

MAX_SOCKET_PATH_BYTES = 107
"""sun_path holds 108 bytes including the terminating NUL on Linux."""

FIRST_RETRY_SECONDS = 0.005
MAX_RETRY_SECONDS = 0.25
"""A waiter retries the file lock after at most this long even without a "released"
answer: the bound on noticing a holder that was killed (the kernel frees its lock)."""

LOCK_RECORD_SIZE = 256
"""Bytes of a lock file's record, padded with spaces: rewritten in place with one
``pwrite`` (an address is at most 108 bytes, a token 32)."""

LOCK_FILE_TTL = 900.0
"""Seconds a lock file may stay unused before a locker removes it. Removing one costs
only the next holder's reuse of its kept state (it reads the upload back once)."""

SWEEP_EVERY = 4096
"""Acquisitions between two removals of old lock files (and one at start)."""

RESEND_SECONDS = 1.0
"""A waiter repeats its release request this often: datagrams to a full socket
buffer are dropped."""

_Address = str | bytes
"""A Unix socket address: a path, or bytes starting with NUL (abstract namespace)."""


def _encode_address(address: _Address) -> bytes:
    """How an address is written into a lock file: the path, or ``@name``."""
    if isinstance(address, bytes):
        return b"@" + address[1:] if address.startswith(b"\0") else address
    return os.fsencode(address)


def _record(address: _Address | None, token: str) -> bytes:
    """A lock file's record: held by ``address`` (None: released) in hold ``token``."""
    line = _encode_address(address) if address is not None else b""
    return (line + b"\n" + token.encode()).ljust(LOCK_RECORD_SIZE)


def _read_record(raw: bytes) -> tuple[_Address | None, str | None]:
    """The holder's address and the hold's token in a lock file's record."""
    address, _, token = raw.partition(b"\n")
    return _decode_address(address), token.strip().decode("ascii", "replace") or None


def _decode_address(raw: bytes) -> _Address | None:
    raw = raw.strip()
    if not raw:
        return None
    if raw.startswith(b"@"):
        return b"\0" + raw[1:]
    return os.fsdecode(raw)


@dataclass(eq=False)
class _Holding:
    """One lock of this process, from the first attempt to the release."""

    upload_id: str
    on_release_request: ReleaseRequest
    held: HeldLock = field(default_factory=HeldLock)
    fd: int | None = None
    release_requested: bool = False
    """A release request arrived before the file lock was ours; delivered once it is."""
    waiters: set[_Address] = field(default_factory=set)
    """Sockets of other processes that asked; told "released" when we unlock."""

    def request_release(self) -> None:
        if self.fd is None:
            self.release_requested = True
            return
        ask_to_release(self.on_release_request)


class FileLocker:
    """Per-upload exclusive locks shared by the processes of one host (flock).

    ``FileLocker(directory, acquire_timeout)``; ``await start()`` binds the release
    request socket (``lock`` does it on first use), ``await close()`` releases every
    held lock and removes the socket.
    """

    def __init__(self, directory: str, acquire_timeout: float, *, observer: LockObserver | None = None) -> None:
        """``observer`` (optional) is told about lock waits, takeovers and timeouts."""
        self._directory = os.path.abspath(directory)
        self._acquire_timeout = acquire_timeout
        self._observer = observer
        self._local = MemoryLocker(acquire_timeout=acquire_timeout)
        self._socket: socket.socket | None = None
        self._address: _Address | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._holdings: dict[str, _Holding] = {}
        self._released_events: dict[str, asyncio.Event] = {}
        self._closed = False
        self._until_sweep = 0
        self._sweep: asyncio.Task[int] | None = None

    @property
    def address(self) -> _Address | None:
        """This locker's release-request socket address (after ``start``)."""
        return self._address

    async def start(self) -> None:
        """Create the directory, remove sockets of dead lockers, bind our socket."""
        if self._socket is not None:
            return
        if self._closed:
            raise LockUnavailable("file locker is closed")
        try:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
            self._remove_stale_sockets()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as error:
            raise LockUnavailable(f"lock directory {self._directory}: {error}") from error
        name = f"{SOCKET_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        path = os.path.join(self._directory, name)
        address: _Address = path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            # The abstract namespace is shared by the processes of one network
            # namespace, which is what workers of one server are.
            address = b"\0tusd-py" + name.encode()
        try:
            sock.bind(address)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            raise LockUnavailable(f"cannot bind lock socket {address!r}: {error}") from error
        self._socket, self._address = sock, address
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._on_datagrams)

    def _remove_stale_sockets(self) -> None:
        """Unlink sockets whose owner is gone: connecting to them is refused."""
        for name in os.listdir(self._directory):
            if not name.startswith(SOCKET_PREFIX):
                continue
            path = os.path.join(self._directory, name)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                try:
                    probe.connect(path)
                except ConnectionRefusedError:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        log.info("removed stale lock socket %s", path)
                except OSError:
                    continue

    def lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AbstractAsyncContextManager[HeldLock]:
        """Acquire the lock of ``upload_id`` (see ``lockers.base.Locker.lock``)."""
        check_lock_name(upload_id)
        return observed(functools.partial(self._lock, upload_id), on_release_request, self._observer)

    @contextlib.asynccontextmanager
    async def _lock(self, upload_id: str, on_release_request: ReleaseRequest) -> AsyncIterator[HeldLock]:
        if self._closed:
            raise LockUnavailable("file locker is closed")
        await self.start()
        deadline = asyncio.get_running_loop().time() + self._acquire_timeout
        holding = _Holding(upload_id, on_release_request)
        async with self._local.lock(upload_id, holding.request_release):
            await self._acquire(holding, deadline)
            try:
                yield holding.held
            finally:
                self._release(holding)

    # --- acquiring and releasing ------------------------------------------------------

    def _lock_path(self, upload_id: str) -> str:
        return os.path.join(self._directory, upload_id + LOCK_SUFFIX)

    async def _acquire(self, holding: _Holding, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        upload_id = holding.upload_id
        path = self._lock_path(upload_id)
        released = asyncio.Event()
        self._released_events[upload_id] = released
        asked: dict[_Address, float] = {}
        retry = FIRST_RETRY_SECONDS
        self._holdings[upload_id] = holding
        try:
            while True:
                if self._closed:
                    raise LockUnavailable("file locker is closed")
                released.clear()
                fd = self._try_lock(path)
                if fd is not None:
                    break
                holder = self._read_holder(path)
                now = loop.time()
                due = holder is not None and now - asked.get(holder, now - RESEND_SECONDS) >= RESEND_SECONDS
                if holder is not None and holder != self._address and due:
                    asked[holder] = now
                    if not self._send(holder, b"release " + upload_id.encode()):
                        # Its socket is gone: the holder died and the kernel has freed
                        # (or is freeing) its lock. Try again at once.
                        retry = FIRST_RETRY_SECONDS
                        continue
                remaining = deadline - now
                if remaining <= 0:
                    raise LockTimeout(
                        f"upload {upload_id} is locked by another worker process that did not release it "
                        f"within {self._acquire_timeout:g}s"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), min(retry, remaining))
                retry = min(retry * 2, MAX_RETRY_SECONDS)
        except BaseException:
            if self._holdings.get(upload_id) is holding:
                del self._holdings[upload_id]
            raise
        finally:
            if self._released_events.get(upload_id) is released:
                del self._released_events[upload_id]
        holder, last = _read_record(os.pread(fd, LOCK_RECORD_SIZE, 0))
        token = new_lock_token()
        holding.held.generation = LockGeneration(token, last if holder is None else None)
        # Tells waiters where to send release requests.
        os.pwrite(fd, _record(self._address, token), 0)
        holding.fd = fd
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._start_sweep()
        if holding.release_requested:
            holding.request_release()

    def _try_lock(self, path: str) -> int | None:
        """The descriptor of ``path`` locked by us, or None if someone holds it."""
        for _ in range(8):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except OSError as error:
                raise LockUnavailable(f"cannot open lock file {path}: {error}") from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as error:
                os.close(fd)
                raise LockUnavailable(f"cannot lock {path}: {error}") from error
            # The previous holder unlinks the file before unlocking; if that happened
            # after our open, we locked an orphaned inode that protects nothing.
            try:
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return None

    @staticmethod
    def _read_holder(path: str) -> _Address | None:
        try:
            with open(path, "rb") as file:
                return _read_record(file.read(LOCK_RECORD_SIZE))[0]
        except OSError:
            return None

    def _release(self, holding: _Holding) -> None:
        upload_id, fd = holding.upload_id, holding.fd
        if self._holdings.get(upload_id) is holding:
            del self._holdings[upload_id]
        if fd is None:
            return  # already released by close()
        holding.fd = None
        generation = holding.held.generation
        # A released record names this hold for the next holder; a lost lock's
        # (close) names none.
        token = generation.token if generation is not None and not holding.held.lost.is_set() else ""
        try:
            os.pwrite(fd, _record(None, token), 0)
        except OSError as error:  # the record still names a holder: vouches for nothing
            log.warning("cannot update lock file of %s: %s", upload_id, error)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        for waiter in holding.waiters:
            self._send(waiter, b"released " + upload_id.encode())

    # --- old lock files ----------------------------------------------------------------

    def _start_sweep(self) -> None:
        self._until_sweep = SWEEP_EVERY
        if self._sweep is None or self._sweep.done():
            self._sweep = asyncio.ensure_future(
                asyncio.to_thread(remove_old_lock_files, self._directory, time.time() - LOCK_FILE_TTL)
            )
            self._sweep.add_done_callback(_log_sweep)

    # --- datagrams ---------------------------------------------------------------------

    def _send(self, address: _Address, message: bytes) -> bool:
        """Send one datagram; False if nobody is listening at ``address`` any more."""
        if self._socket is None:
            return True
        try:
            self._socket.sendto(message, address)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as error:
            # EAGAIN (its buffer is full) and the like: the waiter re-sends.
            if error.errno not in (errno.EAGAIN, errno.ENOBUFS):
                log.debug("lock socket send to %r failed: %s", address, error)
        return True

    def _on_datagrams(self) -> None:
        assert self._socket is not None
        while True:
            try:
                data, sender = self._socket.recvfrom(512)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.debug("lock socket receive failed: %s", error)
                return
            verb, _, raw_id = data.partition(b" ")
            upload_id = raw_id.decode("ascii", "replace")
            if verb == b"release":
                holding = self._holdings.get(upload_id)
                if holding is not None and holding.fd is not None:
                    if sender:
                        holding.waiters.add(sender)
                    holding.request_release()
                elif sender:
                    # Not (or no longer) ours: let the waiter look again right away.
                    self._send(sender, b"released " + raw_id)
            elif verb == b"released":
                event = self._released_events.get(upload_id)
                if event is not None:
                    event.set()

    async def close(self) -> None:
        """Release every held lock (marking it lost) and remove our socket."""
        if self._closed:
            return
        self._closed = True
        for holding in list(self._holdings.values()):
            holding.held.lost.set()
            self._release(holding)
        await self._local.close()
        if self._sweep is not None:
            self._sweep.cancel()  # the thread finishes its scan; nothing waits for it
        if self._socket is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        if isinstance(self._address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._address)


def remove_old_lock_files(directory: str, unused_since: float) -> int:
    """Unlink the lock files in ``directory`` last written before ``unused_since``
    (epoch seconds) that nobody holds; how many. Each is unlinked while locked by us,
    after checking it is still the file at its path and still old."""
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.endswith(LOCK_SUFFIX):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= unused_since:
                    continue
                fd = os.open(entry.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # gone, or not ours to open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # held
            try:
                stat = os.fstat(fd)
                if stat.st_mtime < unused_since and os.stat(entry.path, follow_symlinks=False).st_ino == stat.st_ino:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                pass
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
    return removed


def _log_sweep(task: asyncio.Task[int]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.warning("could not remove old lock files: %s", error)
    elif task.result():
        log.info("removed %d lock files unused for %.0f s", task.result(), LOCK_FILE_TTL)
