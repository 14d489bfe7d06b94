"""Where a small request's server CPU goes, by phase: the per-request budget.

    python -m benchmarks.phases [--methods HEAD,POST,OPTIONS,PATCH] [--seconds 5]

For each request kind it starts tusd-py on the file store (a fresh directory, one
worker), drives it (HEAD, POST, OPTIONS: 50 keep-alive connections, one request after
the other; PATCH: 1 MiB PATCHes one after the other on one connection), measures the
server's CPU per request from ``/proc`` and samples every thread of the server with
py-spy (https://github.com/benfred/py-spy; ``pip install py-spy``; needs the right to
trace the process, e.g. root). The CPU per request is then split over phases in the
proportion of the samples, each sample going to the phase of its innermost tusd_py
frame:

- parse: request heads and framing (``http/head.py``, ``protocol.py``, ``intake.py``, h11)
- tus: routing, header parsing, events and the handler's own work (``tus/``)
- lock: the locker (``lockers/``)
- store: the store's code on the event loop (``stores/``)
- body: body flow and hand-offs (``http/body.py``, ``splice_control.py``, ``handoff.py``)
- respond: building and writing the response (``http/response.py``)
- log, metrics: logging and Prometheus counters, wherever they are called from
- event loop: no tusd_py frame above the loop: uvloop, system calls, waiting for the GIL
- worker threads: the store's pool and splice threads (file creation, fsync, copies)

py-spy counts a thread waiting for the GIL as busy, so the split is approximate: the
totals come from ``/proc``, the proportions from the samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.accounting import accounted
from benchmarks.common import ServerProcess, free_port
from benchmarks.loads import BASE_PATH, HOST, RequestRate, request_rate, run_client
from benchmarks.rawclient import RawConnection, create_upload, patch_upload

MiB = 1024 * 1024
CONNECTIONS = 50
PATCH_SIZE = MiB

PHASES = ("parse", "tus", "lock", "store", "body", "respond", "log", "metrics", "event loop", "worker threads",
          "other")

_BY_PATH = (
    ("tusd_py/http/head.py", "parse"), ("tusd_py/http/protocol.py", "parse"), ("tusd_py/http/intake.py", "parse"),
    ("tusd_py/http/cycle.py", "parse"), ("tusd_py/http/response.py", "respond"),
    ("tusd_py/http/access_log.py", "log"), ("tusd_py/http/", "body"), ("tusd_py/tus/", "tus"),
    ("tusd_py/lockers/", "lock"), ("tusd_py/stores/", "store"), ("tusd_py/metrics.py", "metrics"),
    ("tusd_py/logs.py", "log"),
)


def phase_of(stack: list[str]) -> str:
    """The phase of one py-spy sample (``stack``: frames outermost first)."""
    if not stack or "threading.py" in stack[0]:  # Thread._bootstrap: not the event loop's thread
        return "worker threads"
    if any("/logging/__init__.py" in frame for frame in stack):
        return "log"
    if any("prometheus_client/" in frame for frame in stack):
        return "metrics"
    for frame in reversed(stack):
        if "tusd_py/" not in frame or "tusd_py/cli.py" in frame:
            continue
        for prefix, phase in _BY_PATH:
            if prefix in frame:
                return phase
        return "other"
    if any("/h11/" in frame for frame in stack):
        return "parse"
    return "event loop"


def phase_shares(raw: str) -> dict[str, float]:
    """Share of the samples per phase, from py-spy's ``--format raw`` output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[phase_of(stack.split(";"))] += int(count)
    total = sum(counts.values()) or 1
    return {phase: counts[phase] / total for phase in PHASES}


async def _patches(port: int, seconds: float) -> tuple[float, int]:
    buffer = memoryview(os.urandom(PATCH_SIZE))
    async with RawConnection(HOST, port, timeout=30.0) as connection:
        path = await create_upload(connection, BASE_PATH, 1 << 50)
        offset, count = 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            offset = await patch_upload(connection, path, offset, PATCH_SIZE, buffer)
            count += 1
        return time.perf_counter() - start, count


async def _requests(port: int, method: str, seconds: float) -> tuple[float, int]:
    elapsed, latencies = await request_rate(port, RequestRate(method, CONNECTIONS, seconds), 30.0)
    return elapsed, len(latencies)


def measure(method: str, seconds: float, py_spy: str, work_dir: Path) -> tuple[float, float, dict[str, float]]:
    """Requests per second, server CPU µs per request, and the phase shares of ``method``."""
    directory = Path(tempfile.mkdtemp(prefix=f"phases-{method}-", dir=work_dir))
    port = free_port(HOST)
    command = [sys.executable, "-m", "tusd_py.cli", "--host", HOST, "--port", str(port), "--directory",
               str(directory), "--log-level", "warning"]
    with ServerProcess(name="tusd-py", command=command, host=HOST, port=port,
                       log_path=work_dir / f"{method}.log") as server:
        assert server.process is not None
        raw_path = work_dir / f"{method}.raw"
        # Sampling starts with the load and stops a little before it ends.
        sampler = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.process.pid), "--duration", str(max(1, int(seconds) - 1)),
             "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(raw_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with accounted(server.process.pid) as cost:
            client = _patches(port, seconds) if method == "PATCH" else _requests(port, method, seconds)
            elapsed, count = run_client(client, server)  # elapsed: the load alone, not its set-up
        if sampler.wait(timeout=60) != 0:
            raise SystemExit(f"py-spy failed (exit {sampler.returncode}); it needs the right to trace processes")
    assert cost.server is not None
    return count / elapsed, cost.server.cpu_seconds / count * 1e6, phase_shares(raw_path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.phases", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="HEAD,POST,OPTIONS,PATCH",
                        help="comma-separated: HEAD, POST, OPTIONS, PATCH (1 MiB)")
    parser.add_argument("--seconds", type=float, default=5.0, help="load per request kind (default 5)")
    args = parser.parse_args(argv)
    methods = [m.strip().upper() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"HEAD", "POST", "OPTIONS", "PATCH"}:
        raise SystemExit(f"--methods takes HEAD, POST, OPTIONS and PATCH, got {args.methods!r}")
    if args.seconds < 2:
        raise SystemExit("--seconds must be at least 2")
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    work_dir = Path(tempfile.mkdtemp(prefix="tusd-py-phases-"))
    try:
        header = "| request | rate | server CPU | " + " | ".join(PHASES) + " |"
        lines = [header, "| --- | ---: | ---: |" + " ---: |" * len(PHASES)]
        for method in methods:
            rate, cpu, shares = measure(method, args.seconds, py_spy, work_dir)
            cells = " | ".join(f"{cpu * shares[phase]:.0f}" for phase in PHASES)
            unit = "PATCH/s" if method == "PATCH" else "req/s"
            lines.append(f"| {method} | {rate:,.0f} {unit} | {cpu:.0f} µs | {cells} |")
            print(lines[-1], file=sys.stderr, flush=True)
        print("server CPU per request by phase, µs (py-spy sample shares of the /proc total)")
        print("\n".join(lines))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
