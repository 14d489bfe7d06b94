"""What the S3 locker costs, against moto: S3 requests and time per request.

- Requests the locker adds per HEAD and per small PATCH (counted by a wrapper around the
  locker's S3 client), and per second a lock is held (renewals every lease/3 and a look
  for release requests every poll_interval).
- The time a HEAD (lock + open the upload) and a small PATCH (lock + open + write
  ``--patch-size``) take through the S3 store with the memory locker and with the S3
  locker: median and p99, and the difference (the lock round-trip).

moto answers on loopback in about a millisecond; against AWS S3 each lock request is a
network round trip (~10-30 ms in-region), so multiply the request counts, not the times.

    python -m benchmarks.s3_lock_costs --runs 200 --hold 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from tusd_py.config import S3StoreConfig
from tusd_py.lockers.base import Locker
from tusd_py.lockers.memory import MemoryLocker
from tusd_py.lockers.s3 import S3Locker
from tusd_py.stores.base import UploadInfo
from tusd_py.stores.s3 import S3Store
from tusd_py.stores.s3_client import AioS3Client, S3Client

KiB = 1024


class CountingClient:
    """An ``S3Client`` that counts calls by method name."""

    def __init__(self, inner: S3Client) -> None:
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


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    credentials = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(credentials)
    env = dict(os.environ)
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("moto did not start")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def timed(runs: int, operation: Callable[[int], Awaitable[None]]) -> list[float]:
    times = []
    for run in range(runs):
        started = time.perf_counter()
        await operation(run)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def measure(endpoint: str, runs: int, hold: float, patch_size: int) -> None:
    raw = await AioS3Client.connect(endpoint_url=endpoint)
    await raw._client.create_bucket(Bucket="lock-bench")  # noqa: SLF001 (benchmark set-up)
    config = S3StoreConfig(bucket="lock-bench", prefix="b/", spool="memory")
    store = S3Store(raw, config)
    lock_client = CountingClient(raw)
    s3_locker = S3Locker(lock_client, "lock-bench", "b/.locks/", lease=15.0, poll_interval=1.0,  # type: ignore[arg-type]
                         request_timeout=3.0)
    memory_locker = MemoryLocker(acquire_timeout=20.0)
    ids = [f"u{index}" for index in range(runs)]
    for upload_id in ids:
        await store.create(UploadInfo(id=upload_id, length=runs * patch_size * 4))
    chunk = os.urandom(patch_size)
    offsets: dict[tuple[str, str], int] = collections.defaultdict(int)

    async def one_byte_body() -> AsyncGenerator[bytes, None]:
        yield chunk

    def head(locker: Locker) -> Callable[[int], Awaitable[None]]:
        async def run(index: int) -> None:
            async with locker.lock(ids[index], lambda: None):
                await store.get(ids[index])
        return run

    def small_patch(locker: Locker, name: str) -> Callable[[int], Awaitable[None]]:
        async def run(index: int) -> None:
            upload_id = ids[index]
            async with locker.lock(upload_id, lambda: None):
                upload = await store.get(upload_id)
                info = await upload.write(upload.info.offset, one_byte_body())
                offsets[(name, upload_id)] = info.offset
        return run

    rows = []
    for label, make in (("HEAD", lambda lk, name: head(lk)), ("PATCH", small_patch)):
        results = {}
        for name, locker in (("memory", memory_locker), ("s3", s3_locker)):
            lock_client.calls.clear()
            results[name] = await timed(runs, make(locker, name))
            if name == "s3":
                requests = sum(lock_client.calls.values()) / runs
                detail = ", ".join(f"{method} {count / runs:g}" for method, count in sorted(lock_client.calls.items()))
        memory, s3 = results["memory"], results["s3"]
        rows.append((label, statistics.median(memory), percentile(memory, 0.99), statistics.median(s3),
                     percentile(s3, 0.99), requests, detail))

    print(f"moto at {endpoint}, {runs} runs each, small PATCH = {patch_size} bytes\n")
    print("| request | memory median ms | memory p99 ms | s3 median ms | s3 p99 ms | added median ms "
          "| S3 requests added | of which |")
    print("|---|---|---|---|---|---|---|---|")
    for label, m50, m99, s50, s99, requests, detail in rows:
        print(f"| {label} | {m50:.2f} | {m99:.2f} | {s50:.2f} | {s99:.2f} | {s50 - m50:.2f} "
              f"| {requests:g} | {detail} |")

    lock_client.calls.clear()
    async with s3_locker.lock("held", lambda: None):
        await asyncio.sleep(hold)
    held = lock_client.calls.copy()
    steady = held["put_object_if"] - 1 + held["get_object_stamped"]  # minus the acquire
    print(f"\nheld {hold:g} s (lease 15 s, poll_interval 1 s): {dict(held)}")
    print(f"S3 requests per held second: {steady / hold:.2f}")
    await s3_locker.close()
    await memory_locker.close()
    await raw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold one lock for the per-second cost")
    parser.add_argument("--patch-size", type=int, default=16 * KiB)
    arguments = parser.parse_args()
    process, endpoint = start_moto()
    try:
        asyncio.run(measure(endpoint, arguments.runs, arguments.hold, arguments.patch_size))
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
