"""Shared test fixtures (shared plain helpers are in ``helpers.py``).

- Async tests run on uvloop (the production loop); tests marked ``both_loops`` also run
  on plain asyncio (pytest-asyncio's loop-factory hook parametrizes them).
- ``moto_endpoint``: a moto S3 server in its own process on a free loopback port,
  reached over real HTTP, with S3's 5 MiB minimum part size (``fast_moto``,
  its own server, lowers it to 1 MiB); ``bucket``: a fresh bucket in it.
- ``tus``: the tus handler over a file store, called directly (``tus_fakes``).
- ``nginx_installed``: skips a test without nginx (fails it in CI).
- ``captured_logs``: tusd-py's own JSON logging, into a buffer.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import nginx_support
import pytest
from helpers import make_bucket
from redis_support import RedisServer, require_redis_server
from tus_fakes import Harness, make_harness

from tusd_py.config import LogConfig
from tusd_py.logs import setup_logging

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, LoopFactory]:
    factories: dict[str, LoopFactory] = {}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    if item.get_closest_marker("both_loops") is not None or uvloop is None:
        factories["asyncio"] = asyncio.new_event_loop
    return factories


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on 127.0.0.1:port (a readiness
    check, not a sleep: it returns as soon as the server is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_aws_env() -> Iterator[None]:
    """Never reach a real AWS account: drop AWS_* variables, set fake credentials."""
    saved = {key: value for key, value in os.environ.items() if key.startswith("AWS_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(AWS_TEST_ENV)
    os.environ.setdefault("AWS_CONFIG_FILE", os.devnull)
    os.environ.setdefault("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    yield
    for key in [key for key in os.environ if key.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(saved)


def start_moto(part_min_size: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a moto S3 server process; returns (process, endpoint_url)."""
    port = free_port()
    env = dict(os.environ)
    env.update(AWS_TEST_ENV)
    if part_min_size is not None:
        env["S3_UPLOAD_PART_MIN_SIZE"] = str(part_min_size)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process=process)
    endpoint = f"http://127.0.0.1:{port}"
    return process, endpoint


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server with S3's real 5 MiB minimum part size."""
    process, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        stop_process(process)


def reset_moto(endpoint: str) -> None:
    """Forget every bucket and object in the moto server (between tests)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


@pytest.fixture
async def bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket in ``moto_endpoint``."""
    return await make_bucket(moto_endpoint)


@pytest.fixture(scope="module")
def fast_moto() -> Iterator[str]:
    """A moto server whose minimum part size is 1 MiB (S3's is 5 MiB), so tests can
    use 1 MiB parts and small files while EntityTooSmall is still enforced."""
    process, endpoint = start_moto(part_min_size=1024 * 1024)
    try:
        yield endpoint
    finally:
        stop_process(process)


@pytest.fixture
async def tus(tmp_path: Path) -> AsyncIterator[Harness]:
    """The tus handler over a FileStore in ``tmp_path/data`` and a MemoryLocker."""
    harness = make_harness(tmp_path / "data")
    yield harness
    await harness.close()


@pytest.fixture
def nginx_installed() -> None:
    """Skip the test when Debian's nginx is missing; in CI (CI=true), fail it."""
    try:
        nginx_support.nginx_binary()
    except nginx_support.NginxUnavailable as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{error}; .ci/run must install it")
        pytest.skip(str(error))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Debian's redis-server on a free port, no persistence, for this test (skipped
    when not installed; failed in CI). ``restart``/``stop``/``start`` block: call them
    through ``asyncio.to_thread`` from async tests."""
    require_redis_server()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo ``setup_logging`` (``cli.main`` calls it) after each test: it stops the
    ``tusd_py`` logger from propagating, which would hide later tests' records from
    ``caplog``."""
    logger = logging.getLogger("tusd_py")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture
def captured_logs(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """tusd-py's own logging set-up (JSON, debug) writing into a buffer."""
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    setup_logging(LogConfig(level="debug", format="json"))
    return buffer


# --- A call that blocks the event loop fails the test (tests/loop_watch.py) -----------


def pytest_configure(config: pytest.Config) -> None:
    from loop_watch import register

    register(config)


@pytest.fixture(scope="session", autouse=True)
def _botocore_data_read_once() -> Iterator[None]:
    """Every new botocore session reads S3's service model and the endpoint data (JSON
    files) from disk again: 0.1-0.2 s per S3 client on an idle machine. tusd-py's own
    client reads them on a worker thread; the tests' helper clients would read them on
    the loop, and the tests open stores and clients by the hundred, so they share one
    loader (the data files are read once per test process)."""
    import botocore.session

    create_loader = botocore.session.create_loader
    loaders: dict[str | None, object] = {}

    def shared_loader(search_path_string: str | None = None) -> object:
        if search_path_string not in loaders:
            loaders[search_path_string] = create_loader(search_path_string)
        return loaders[search_path_string]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(botocore.session, "create_loader", shared_loader)
        yield
