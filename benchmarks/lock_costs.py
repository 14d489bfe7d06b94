"""What a lock costs: the round trip each locker adds to a HEAD and to a small PATCH,
and the S3 requests the s3 locker adds.

Every request that reads or changes an upload holds its lock, so a locker's acquire and
release are on the path of every request. This runs one tusd-py process (one worker)
per locker and times, on one keep-alive connection, ``--requests`` HEADs and
``--requests`` small PATCHes (``--patch-size``, default 1 KiB) of one upload, one at a
time, so each time is one request's latency with nothing queued before it. The table
gives the median and p99 per locker and the difference of the medians from the memory
locker on the same store (which takes no I/O): that difference is the lock's round trip.

- memory, file, redis, consul: file store. redis is Debian's redis-server on loopback;
  consul is the fake Consul of tests/consul_fake.py (imported from there, served by a
  thread of this process): it measures the locker's requests, not a Consul agent.
- memory (s3 store), s3: the S3 store against moto on loopback (the s3 locker needs
  it). Then, in this process, the S3 requests the s3 locker makes per lock (acquire
  and release) and per second a lock is held (renewals, looks for release requests),
  counted by a wrapper around its S3 client.

    python -m benchmarks.lock_costs                        # every locker
    python -m benchmarks.lock_costs --lockers memory,redis --requests 2000

A locker is a ``LockerSetup``: a name, and a context manager that runs what it needs
and yields its settings (store and lock). Add a locker by adding one to ``SETUPS``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, ServerProcess, free_port, median, new_event_loop, port_accepts
from benchmarks.rawclient import RawConnection, create_upload, patch_upload, upload_offset

LockSettings = dict[str, dict[str, Any]]
"""Config sections by dotted name (``"lock.redis"``) -> key -> value."""


@dataclass
class LockerSetup:
    """How to run tusd-py with one locker: ``service(workdir)`` is entered around the
    measurement and yields the ``[lock...]`` settings (the service's address in them)."""

    name: str
    service: Callable[[Path], contextlib.AbstractContextManager[LockSettings]]
    note: str = ""
    baseline: str = "memory"
    """The setup whose medians this one's are compared with (same store, no lock I/O)."""


@contextlib.contextmanager
def _settings_only(settings: LockSettings) -> Iterator[LockSettings]:
    yield settings


@contextlib.contextmanager
def _redis_server(workdir: Path) -> Iterator[LockSettings]:
    """redis-server (Debian's package) on a free loopback port, no persistence."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
        yield {"lock": {"backend": "redis"}, "lock.redis": {"url": f"redis://127.0.0.1:{port}/0"}}
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def _fake_consul(_: Path) -> Iterator[LockSettings]:
    """tests/consul_fake.py's FakeConsul on a free loopback port, served by an event
    loop in a thread of this process."""
    from tests.consul_fake import FakeConsul

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-consul", daemon=True)
    thread.start()
    fake = FakeConsul()
    try:
        asyncio.run_coroutine_threadsafe(fake.start(), loop).result(10)
        yield {"lock": {"backend": "consul"}, "lock.consul": {"address": fake.address, "session_ttl": 15}}
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def _moto(workdir: Path) -> Iterator[str]:
    """moto's server on a free loopback port with one bucket; its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_clean_environment(),
    )
    try:
        _wait_for_port(port, process, timeout=30.0)
        endpoint = f"http://127.0.0.1:{port}"
        # Create the bucket (moto's server takes an unsigned PUT).
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=30).close()
        yield endpoint
    finally:
        process.terminate()
        process.wait(10)


def _clean_environment() -> dict[str, str]:
    """Ours without ``AWS_*``/``TUSD_PY_*`` variables, with moto's fixed credentials."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "TUSD_PY_"))}
    env.update(MOTO_CREDENTIALS)
    return env


def _s3_store_settings(endpoint: str) -> LockSettings:
    return {"store": {"backend": "s3"},
            "store.s3": {"bucket": BUCKET, "endpoint_url": endpoint, "region": "us-east-1"}}


@contextlib.contextmanager
def _moto_with(lock: LockSettings, workdir: Path) -> Iterator[LockSettings]:
    with _moto(workdir) as endpoint:
        yield {**_s3_store_settings(endpoint), **lock}


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_accepts("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"service did not listen on port {port}")
        time.sleep(0.02)  # a readiness poll


SETUPS: dict[str, LockerSetup] = {
    "memory": LockerSetup("memory", lambda _: _settings_only({"lock": {"backend": "memory"}}), "one process, no I/O"),
    "file": LockerSetup("file", lambda _: _settings_only({"lock": {"backend": "file"}}), "flock + lock file"),
    "redis": LockerSetup("redis", _redis_server, "redis-server on loopback"),
    "consul": LockerSetup("consul", _fake_consul, "tests/consul_fake.py, not an agent"),
    "memory-s3": LockerSetup(
        "memory-s3", lambda workdir: _moto_with({"lock": {"backend": "memory"}}, workdir), "S3 store on moto",
        "memory-s3",
    ),
    "s3": LockerSetup(
        "s3", lambda workdir: _moto_with({"lock": {"backend": "s3"}}, workdir), "S3 store on moto", "memory-s3"
    ),
}
BUCKET = "lock-costs"
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Timings:
    locker: str
    head: list[float] = field(default_factory=list)
    patch: list[float] = field(default_factory=list)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _toml(settings: LockSettings) -> str:
    lines: list[str] = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


async def _time_requests(port: int, requests: int, patch_size: int) -> tuple[list[float], list[float]]:
    clock = time.perf_counter  # uvloop's loop.time() counts whole milliseconds
    buffer = memoryview(bytes(patch_size))
    heads: list[float] = []
    patches: list[float] = []
    async with RawConnection("127.0.0.1", port, timeout=60.0) as connection:
        path = await create_upload(connection, "/files/", (requests + 50) * patch_size)
        offset = 0
        for index in range(requests + 50):  # the first 50 of each warm up (not counted)
            started = clock()
            await upload_offset(connection, path)
            head_seconds = clock() - started
            started = clock()
            offset = await patch_upload(connection, path, offset, patch_size, buffer)
            patch_seconds = clock() - started
            if index >= 50:
                heads.append(head_seconds)
                patches.append(patch_seconds)
    return heads, patches


def measure(setup: LockerSetup, requests: int, patch_size: int) -> Timings:
    """Run tusd-py with ``setup``'s locker and time the requests."""
    with tempfile.TemporaryDirectory(prefix=f"lock-costs-{setup.name}-") as name:
        workdir = Path(name)
        with setup.service(workdir) as lock_settings:
            port = free_port()
            settings: LockSettings = {
                "server": {"host": "127.0.0.1", "port": port},
                "store.file": {"directory": str(workdir / "data")},
                "log": {"level": "warning"},
                "metrics": {"enabled": False},
                **lock_settings,
            }
            if settings.get("store", {}).get("backend") == "s3":
                del settings["store.file"]
            config = workdir / "tusd-py.toml"
            config.write_text(_toml(settings))
            server = ServerProcess(
                f"tusd-py ({setup.name} locker)", [sys.executable, "-m", "tusd_py.cli", "--config", str(config)],
                "127.0.0.1", port, workdir / "tusd-py.log", cwd=REPO_ROOT, env=_clean_environment(),
            )
            with server:
                loop = new_event_loop()
                try:
                    heads, patches = loop.run_until_complete(_time_requests(port, requests, patch_size))
                finally:
                    loop.close()
    return Timings(setup.name, heads, patches)


def table(results: list[Timings]) -> str:
    """Markdown: median and p99 (ms) of HEAD and PATCH per locker, and the median's
    difference from the memory locker's."""
    by_name = {result.locker: result for result in results}

    def cell(values: list[float], reference: list[float] | None) -> str:
        text = f"{median(values) * 1000:.3f} / {_percentile(values, 0.99) * 1000:.3f}"
        if reference is not None:
            text += f" ({(median(values) - median(reference)) * 1000:+.3f})"
        return text

    lines = [
        "| locker | store | HEAD ms, median / p99 (added median) | small PATCH ms, median / p99 (added median) |",
        "| --- | --- | --- | --- |",
    ]
    for result in results:
        setup = SETUPS[result.locker]
        base = by_name.get(setup.baseline)
        store = "s3 (moto)" if setup.baseline == "memory-s3" or setup.name == "memory-s3" else "file"
        lines.append(
            f"| {result.locker} ({setup.note}) | {store} | {cell(result.head, base.head if base else None)} "
            f"| {cell(result.patch, base.patch if base else None)} |"
        )
    return "\n".join(lines)


class CountingClient:
    """An ``S3Client`` that counts calls by method name."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not callable(method) or name == "close":
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return method(*args, **kwargs)

        return counted


async def _count_s3_requests(endpoint: str, locks: int, hold: float) -> str:
    """The S3 requests of ``locks`` lock/release pairs and of one lock held ``hold``
    seconds (default lease 15 s, poll_interval 1 s), by the s3 locker in this process."""
    from tusd_py.lockers.s3 import S3Locker
    from tusd_py.stores.s3_botocore import AioS3Client

    os.environ.update(MOTO_CREDENTIALS)
    raw = await AioS3Client.connect(endpoint_url=endpoint)
    counting = CountingClient(raw)
    locker = S3Locker(counting, BUCKET, ".locks/", lease=15.0, poll_interval=1.0, request_timeout=3.0)  # type: ignore[arg-type]
    try:
        for index in range(locks):
            async with locker.lock(f"upload-{index}", lambda: None):
                pass
        per_lock = {name: count / locks for name, count in sorted(counting.calls.items())}
        counting.calls.clear()
        async with locker.lock("held", lambda: None):
            await asyncio.sleep(hold)  # the span measured, not a synchronisation
        held = dict(counting.calls)
    finally:
        await locker.close()
        await raw.close()
    steady = sum(held.values()) - sum(per_lock.values())  # minus the acquire and release
    return (
        f"s3 locker, S3 requests per lock (acquire + release, no contention): {sum(per_lock.values()):g} "
        f"({', '.join(f'{name} {count:g}' for name, count in per_lock.items())})\n"
        f"s3 locker, one lock held {hold:g} s (lease 15 s, poll_interval 1 s): {held}; "
        f"{steady / hold:.2f} S3 requests per held second"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lockers", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--requests", type=int, default=1000, help="HEADs and PATCHes timed per locker")
    parser.add_argument("--patch-size", type=int, default=1024, help="bytes per PATCH")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds one s3 lock is held to count its requests")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.lockers.split(",") if name.strip()]
    unknown = [name for name in names if name not in SETUPS]
    if unknown:
        parser.error(f"unknown locker {unknown[0]!r}; expected some of {', '.join(SETUPS)}")
    results = []
    for name in names:
        print(f"measuring the {name} locker ({args.requests} HEADs and PATCHes)", file=sys.stderr)
        results.append(measure(SETUPS[name], args.requests, args.patch_size))
    print(f"{args.requests} sequential requests per locker, one keep-alive connection, "
          f"{args.patch_size}-byte PATCHes; added = median minus the memory locker's on the same store\n")
    print(table(results))
    if "s3" in names:
        print(file=sys.stderr)
        print(f"counting the s3 locker's S3 requests (holding one lock {args.hold:g} s)", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="lock-costs-count-") as name, _moto(Path(name)) as endpoint:
            loop = new_event_loop()
            try:
                print("\n" + loop.run_until_complete(_count_s3_requests(endpoint, 100, args.hold)))
            finally:
                loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
