"""Run Debian's ``redis-server`` on a free loopback port, without persistence, for
the Redis locker tests (``apt-get install -y redis-server``; .ci/run installs it).

``RedisServer.start``/``stop`` block (process start, port wait): call them from sync
fixtures, or from async tests through ``asyncio.to_thread``. ``stop`` then ``start``
is a Redis restart on the same port with an empty dataset (no persistence).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


class RedisUnavailable(RuntimeError):
    """redis-server is not installed."""


def redis_binary() -> str:
    # Debian installs it in /usr/bin; /usr/sbin and the like may be off a test's PATH.
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found is None:
        raise RedisUnavailable("redis-server is not installed (Debian: apt-get install -y redis-server)")
    return found


def require_redis_server() -> None:
    """Skip the calling test when redis-server is missing; in CI (CI=true), fail it."""
    try:
        redis_binary()
    except RedisUnavailable as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{error}; .ci/run must install it")
        pytest.skip(str(error))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1:``port`` (a free port picked once, kept
    across restarts), with its working directory and log in ``directory``."""

    def __init__(self, directory: Path, password: str = "") -> None:
        self.directory = directory
        self.password = password
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and return once it answers PING."""
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"), "--daemonize", "no",
        ]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        """Poll with PING until ``+PONG`` (or ``-NOAUTH``: up, with a password)."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.02)  # a readiness poll, not synchronization
        raise TimeoutError(f"redis-server not ready on port {self.port} after {START_TIMEOUT}s")

    def stop(self) -> None:
        """Stop redis-server (SIGTERM; SIGKILL after 10 s); no-op when stopped."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port: every key is gone (no persistence)."""
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""
