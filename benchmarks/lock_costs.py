"""What a lock costs: the round trip each locker adds to a HEAD and to a small PATCH.

Every request that reads or changes an upload holds its lock, so a locker's acquire and
release are on the path of every request. This runs one tusd-py process (file store,
one worker) per locker and times, on one keep-alive connection, ``--requests`` HEADs
and ``--requests`` small PATCHes (``--patch-size``, default 1 KiB) of one upload, one
at a time, so each time is one request's latency with nothing queued before it. The
table gives the median and p99 per locker and the difference of the medians from the
memory locker (which takes no I/O): that difference is the lock's round trip.

    python -m benchmarks.lock_costs                        # memory, file, redis
    python -m benchmarks.lock_costs --lockers memory,redis --requests 2000

A locker is a ``LockerSetup``: a name, the config it needs and, when it needs a
service (redis-server from Debian's package), a context manager that runs it. Add a
locker by adding one to ``SETUPS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
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
}


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
            config = workdir / "tusd-py.toml"
            config.write_text(_toml(settings))
            server = ServerProcess(
                f"tusd-py ({setup.name} locker)", [sys.executable, "-m", "tusd_py.cli", "--config", str(config)],
                "127.0.0.1", port, workdir / "tusd-py.log", cwd=REPO_ROOT,
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
    base = next((r for r in results if r.locker == "memory"), None)

    def cell(values: list[float], reference: list[float] | None) -> str:
        text = f"{median(values) * 1000:.3f} / {_percentile(values, 0.99) * 1000:.3f}"
        if reference is not None:
            text += f" ({(median(values) - median(reference)) * 1000:+.3f})"
        return text

    lines = [
        "| locker | HEAD ms, median / p99 (median vs memory) | small PATCH ms, median / p99 (median vs memory) |",
        "| --- | --- | --- |",
    ]
    for result in results:
        lines.append(
            f"| {result.locker} | {cell(result.head, base.head if base else None)} "
            f"| {cell(result.patch, base.patch if base else None)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lockers", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--requests", type=int, default=1000, help="HEADs and PATCHes timed per locker")
    parser.add_argument("--patch-size", type=int, default=1024, help="bytes per PATCH")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.lockers.split(",") if name.strip()]
    unknown = [name for name in names if name not in SETUPS]
    if unknown:
        parser.error(f"unknown locker {unknown[0]!r}; expected some of {', '.join(SETUPS)}")
    results = []
    for name in names:
        print(f"measuring the {name} locker ({args.requests} HEADs and PATCHes)", file=sys.stderr)
        results.append(measure(SETUPS[name], args.requests, args.patch_size))
    print(f"{args.requests} sequential requests per locker, one keep-alive connection, file store, "
          f"{args.patch_size}-byte PATCHes\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
