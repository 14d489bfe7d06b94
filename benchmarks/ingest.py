"""Ingest benchmark: how fast tusd-py's file store takes PATCH bodies over loopback.

Workloads (``--size`` defaults to 1 GiB, ``--patch-size`` to 16 MiB):

- ``1x1GiB``: one upload, one PATCH carrying all of it.
- ``64x16MiB``: one upload of the same size sent as 64 PATCHes of 16 MiB, one after the
  other on one keep-alive connection. That is what a tus client does with a 16 MiB
  ``chunkSize``, and it adds the per-request costs (lock, upload info read and written,
  response) to the same bytes, so the two workloads differ only in request count.

Targets, all fed by the same raw-socket client (``benchmarks/rawclient.py``) from one
preallocated buffer:

- ``loopback``: the discard sink (``benchmarks/sink.py``) in its own process: the
  loopback limit for this client on this machine.
- ``disk``: a plain sequential file write of the same bytes, with the same write size,
  in the same file system: the disk limit (see ``--disk-write-size``, ``--disk-fsync``).
- ``tusd-py``: ``python -m tusd_py.cli`` with the file store.
- ``peer`` (with ``--peer``): @tus/server + @tus/file-store on Node
  (``benchmarks/peers/tus_server.mjs``).

Every run measures every target on every workload, so each ratio compares numbers from
the same run; the summary reports the median over runs of each figure and of each
per-run ratio. See ``benchmarks/README.md`` for what each figure means.

    python -m benchmarks.ingest --runs 3 --peer --json benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.accounting import accounted
from benchmarks.common import (
    MB,
    PEERS_DIR,
    GiB,
    MiB,
    ServerFailed,
    ServerGroup,
    ServerProcess,
    clear_directory,
    command_from_template,
    environment,
    finish_report,
    flush_page_cache,
    format_size,
    free_port,
    load_average,
    median,
    parse_size,
    random_buffer,
    retire_files,
    warm_free_memory,
)
from benchmarks.measurement import (
    HEADER,
    Measurement,
    Workload,
    find_measurement,
    format_row,
    median_figures,
    median_row,
)
from benchmarks.rawclient import HTTPError, RawConnection, create_upload, patch_upload, upload_offset

HOST = "127.0.0.1"
BASE_PATH = "/files/"

DEFAULT_SERVER_CMD = (
    f"{sys.executable} -m tusd_py.cli --host {{host}} --port {{port}} --directory {{directory}} --log-level warning"
)
DEFAULT_PEER_CMD = f"node {PEERS_DIR / 'tus_server.mjs'} --host {{host}} --port {{port}} --directory {{directory}}"
SINK_CMD = f"{sys.executable} -m benchmarks.sink --host {{host}} --port {{port}}"

# Targets from the foundation issue: tusd-py must reach this share of the slower limit,
THROUGHPUT_TARGET = 0.60
# and stay under this peak RSS while it takes the single large PATCH.
DISK_PASSES = 2
"""Passes of the disk limit per run; the faster one is the limit (see FileTargets.measure)."""
RSS_TARGET_BYTES = 100 * MiB

LIMIT_TARGETS = ("loopback", "disk")


def file_store_write_size() -> int:
    """The file store's write size (``WRITE_BATCH_SIZE``: it coalesces received chunks
    into writes of this size), so the disk limit writes the way the store does. 1 MiB,
    its value when this was written, if it cannot be read."""
    try:
        from tusd_py.stores import file_io
    except ImportError:
        return MiB
    return int(getattr(file_io, "WRITE_BATCH_SIZE", MiB))


@dataclass
class Options:
    """What to run, from the command line."""

    runs: int
    workloads: list[Workload]
    targets: list[str]
    data_dir: Path
    server_cmd: str
    peer_cmd: str
    client_buffer: int
    disk_write_size: int
    disk_fsync: str
    timeout: float
    warmup: bool
    warm_memory: bool


@dataclass
class Results:
    """Everything measured, as written to ``--json``."""

    meta: dict[str, Any]
    runs: list[list[Measurement]] = field(default_factory=list)


# --- measuring one target ------------------------------------------------------------------

async def _upload(port: int, workload: Workload, buffer: memoryview, request_timeout: float) -> tuple[float, int]:
    """Create an upload and PATCH it whole; return (seconds spent in PATCHes, reconnects).

    The POST and the verifying HEAD are outside the timed span: the figure is ingest
    throughput, and one POST is noise next to a gigabyte.
    """
    async with RawConnection(HOST, port, timeout=request_timeout) as connection:
        upload_path = await create_upload(connection, BASE_PATH, workload.size)
        offset = 0
        start = time.perf_counter()
        for length in workload.patch_lengths():
            offset = await patch_upload(connection, upload_path, offset, length, buffer)
        seconds = time.perf_counter() - start
        stored = await upload_offset(connection, upload_path)
        if stored != workload.size:
            raise HTTPError(f"HEAD {upload_path}: Upload-Offset {stored}, expected {workload.size}")
        return seconds, connection.reconnects


def upload_to(server: ServerProcess, workload: Workload, buffer: memoryview, timeout: float) -> tuple[float, int]:
    """``_upload`` to ``server``; any failure becomes ``ServerFailed`` with the server's log."""
    try:
        return asyncio.run(_upload(server.port, workload, buffer, timeout))
    except (HTTPError, OSError, TimeoutError) as error:
        server.check_alive()  # a crash explains the error best
        raise ServerFailed(f"{server.name} failed {workload.name}: {error}\n{server.log_tail()}") from error


def measure_server(
    server: ServerProcess, workload: Workload, buffer: memoryview, timeout: float, backend_pid: int | None = None,
) -> Measurement:
    """Send ``workload`` to ``server`` and account for the server's CPU and memory (and
    for the CPU of ``backend_pid``, the storage behind the server, when given)."""
    with accounted(server.pid, backend_pid) as cost:
        seconds, reconnects = upload_to(server, workload, buffer, timeout)
    server.check_alive()
    usage = cost.server
    assert usage is not None
    gib = workload.size / GiB
    return Measurement(
        target=server.name,
        workload=workload.name,
        bytes=workload.size,
        seconds=seconds,
        mb_per_s=workload.size / MB / seconds,
        server_cpu_s_per_gib=usage.cpu_seconds / gib,
        server_main_thread_busy=usage.main_thread_cpu_seconds / cost.wall_seconds,
        server_peak_rss_mib=usage.peak_rss_bytes / MiB,
        server_hwm_mib=usage.hwm_bytes / MiB if usage.hwm_bytes is not None else None,
        rss_samples=usage.samples,
        client_cpu_s_per_gib=cost.client_cpu_seconds / gib,
        other_cpu_s=cost.other_cpu_seconds,
        reconnects=reconnects,
        backend_cpu_s_per_gib=cost.backend.cpu_seconds / gib if cost.backend is not None else None,
        server_cpu_s_per_gib_by_thread={
            name: round(seconds / gib, 3) for name, seconds in usage.cpu_seconds_by_thread.items()
        },
    )


def measure_disk(directory: Path, workload: Workload, buffer: memoryview, write_size: int, fsync: str) -> Measurement:
    """Write the workload's bytes to a file the way a file store would: the file is
    created first (like POST), then each PATCH opens it, writes its bytes sequentially
    at its offset in ``write_size`` pieces, and closes it. ``fsync``: "none", "patch"
    (after each PATCH) or "end" (once, after the last PATCH)."""
    path = directory / "disk-limit.bin"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    piece = buffer[:write_size]
    with accounted(None) as cost:
        _write_like_a_store(path, workload, piece, fsync)
    path.unlink()
    return Measurement(
        target="disk",
        workload=workload.name,
        bytes=workload.size,
        seconds=cost.wall_seconds,
        mb_per_s=workload.size / MB / cost.wall_seconds,
        # The writer is the harness itself: its CPU is the "server" CPU of this limit.
        server_cpu_s_per_gib=cost.client_cpu_seconds / (workload.size / GiB),
        server_main_thread_busy=None,
        server_peak_rss_mib=None,
        server_hwm_mib=None,
        rss_samples=0,
        client_cpu_s_per_gib=None,
        other_cpu_s=cost.other_cpu_seconds,
    )


def _write_like_a_store(path: Path, workload: Workload, piece: memoryview, fsync: str) -> None:
    offset = 0
    for length in workload.patch_lengths():
        fd = os.open(path, os.O_WRONLY)
        try:
            end = offset + length
            while offset < end:
                offset += os.pwrite(fd, piece[: end - offset], offset)
            if fsync == "patch" or (fsync == "end" and offset == workload.size):
                os.fsync(fd)
        finally:
            os.close(fd)


# --- the whole benchmark ---------------------------------------------------------------------

class FileTargets(ServerGroup):
    """The file-store targets of one benchmark run: starts the servers (sink, tusd-py,
    peer) on entry, warms each up, and measures one target on one workload at a time.

    ``ingest.py`` and the suite share it, so both prepare every measurement the same way.
    """

    def __init__(self, options: Options, buffer: memoryview) -> None:
        super().__init__()
        self.options = options
        self.buffer = buffer
        self.disk_dir = options.data_dir / "disk"
        for target in options.targets:
            if target in self._templates:
                self.data_dir(target).mkdir(parents=True, exist_ok=True)
                self.servers[target] = self._server(target)

    @property
    def _templates(self) -> dict[str, str]:
        return {"loopback": SINK_CMD, "tusd-py": self.options.server_cmd, "peer": self.options.peer_cmd}

    def _server(self, target: str) -> ServerProcess:
        """A new (not started) server process for ``target`` on a free port."""
        port = free_port(HOST)
        command = command_from_template(self._templates[target], host=HOST, port=port,
                                        directory=self.data_dir(target))
        return ServerProcess(name=target, command=command, host=HOST, port=port,
                             log_path=self.options.data_dir / f"{target}.log")

    def data_dir(self, target: str) -> Path:
        """Where ``target`` keeps its uploads."""
        return self.options.data_dir / target

    def __enter__(self) -> FileTargets:
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        self.start_all()
        try:
            for server in self.servers.values():
                self._warm_up(server, min(16 * MiB, self.options.client_buffer))
        except BaseException:
            self.stop_all()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def _warm_up(self, server: ServerProcess, size: int) -> None:
        """One small upload, unmeasured: imports, first-request paths and the page cache
        of the data directory are warm before the first measurement."""
        if self.options.warmup:
            upload_to(server, Workload(size=size, patch_size=size), self.buffer, self.options.timeout)
            clear_directory(self.data_dir(server.name))

    def restart(self, target: str) -> ServerProcess:
        """Replace ``target``'s server with a fresh, lightly warmed-up process: for
        memory measurements, whose baseline must not carry what earlier workloads left
        in the heap."""
        server = self.replace(target, self._server(target))
        self._warm_up(server, MiB)
        return server

    def prepare(self, target: str, size: int) -> None:
        """Untimed, before a measurement: no old uploads, no dirty pages, and ``size``
        bytes of warm free memory (see ``warm_free_memory``)."""
        if target in self.servers:
            clear_directory(self.data_dir(target))
        flush_page_cache()
        if self.options.warm_memory:
            warm_free_memory(self.disk_dir, size, self.buffer)

    def retire_uploads(self, target: str) -> None:
        """Move ``target``'s uploads out of its data directory without deleting them
        (see ``retire_files``)."""
        retire_files(self.data_dir(target), self.options.data_dir / "retired")

    def measure(self, target: str, workload: Workload) -> Measurement:
        """Measure ``target`` taking ``workload`` once, prepared like every other one."""
        if target == "disk":
            # The faster of DISK_PASSES passes, each prepared like any measurement: a
            # limit is what the machine can do, and on the benchmark VM an occasional
            # pass runs at a fifth of the usual speed with five times the CPU (the
            # host faulting in memory it took back), which would understate the limit
            # and flatter every ratio to it.
            passes = []
            for _ in range(DISK_PASSES):
                self.prepare(target, workload.size)
                passes.append(measure_disk(self.disk_dir, workload, self.buffer, self.options.disk_write_size,
                                           self.options.disk_fsync))
            return max(passes, key=lambda m: m.mb_per_s)
        self.prepare(target, workload.size)
        measurement = measure_server(self.servers[target], workload, self.buffer, self.options.timeout)
        clear_directory(self.data_dir(target))
        return measurement


def run_benchmark(options: Options) -> Results:
    """Start the servers, measure every target on every workload ``runs`` times, stop."""
    results = Results(meta={
        **environment(),
        "runs": options.runs,
        "workloads": [asdict(w) | {"name": w.name} for w in options.workloads],
        "targets": options.targets,
        "data_dir": str(options.data_dir),
        "client_buffer": options.client_buffer,
        "disk_write_size": options.disk_write_size,
        "disk_fsync": options.disk_fsync,
        "warm_memory": options.warm_memory,
        "server_cmd": options.server_cmd,
        "peer_cmd": options.peer_cmd if "peer" in options.targets else None,
        "tusd_py_env": {k: v for k, v in os.environ.items() if k.startswith("TUSD_PY_")},
        "load_average_before": load_average(),
    })
    # Random bytes: no store or disk can shortcut them (compression, zero pages). The
    # buffer is made once and every byte sent or written comes from it.
    buffer = random_buffer(options.client_buffer)
    targets = FileTargets(options, buffer)
    try:
        with targets:
            for run in range(options.runs):
                measurements: list[Measurement] = []
                for workload in options.workloads:
                    for target in options.targets:
                        measurement = targets.measure(target, workload)
                        measurements.append(measurement)
                        print(format_row(run + 1, measurement), flush=True)
                results.runs.append(measurements)
    finally:
        results.meta["server_exit_codes"] = targets.exit_codes
        results.meta["load_average_after"] = load_average()
    return results


# --- reporting -------------------------------------------------------------------------------------

def summarize(results: Results, options: Options) -> dict[str, Any]:
    """Medians of each figure and of each same-run ratio, plus the pass/fail of targets."""
    summary: dict[str, Any] = {"medians": {}, "ratios": {}, "targets_met": True}
    for workload in options.workloads:
        medians: dict[str, dict[str, float]] = {}
        for target in options.targets:
            runs = [m for run in results.runs if (m := find_measurement(run, target, workload.name)) is not None]
            medians[target] = median_figures(runs)
            medians[target]["max_peak_rss_mib"] = max(
                (m.server_peak_rss_mib for m in runs if m.server_peak_rss_mib is not None), default=float("nan"),
            )
        summary["medians"][workload.name] = medians

        ratios: dict[str, Any] = {}
        limit_ratio: list[float] = []
        loopback_ratio: list[float] = []
        peer_ratio: list[float] = []
        for run in results.runs:
            tusd = find_measurement(run, "tusd-py", workload.name)
            limits = [m.mb_per_s for t in LIMIT_TARGETS if (m := find_measurement(run, t, workload.name)) is not None]
            loopback = find_measurement(run, "loopback", workload.name)
            peer = find_measurement(run, "peer", workload.name)
            if tusd is not None and limits:
                limit_ratio.append(tusd.mb_per_s / min(limits))
            if tusd is not None and loopback is not None:
                loopback_ratio.append(tusd.mb_per_s / loopback.mb_per_s)
            if tusd is not None and peer is not None:
                peer_ratio.append(tusd.mb_per_s / peer.mb_per_s)
        if limit_ratio:
            ratios["tusd_py_over_limit"] = {"per_run": limit_ratio, "median": median(limit_ratio),
                                            "target": THROUGHPUT_TARGET}
            met = median(limit_ratio) >= THROUGHPUT_TARGET
            ratios["tusd_py_over_limit"]["met"] = met
            summary["targets_met"] &= met
        if loopback_ratio:
            ratios["tusd_py_over_loopback"] = {"per_run": loopback_ratio, "median": median(loopback_ratio)}
        if peer_ratio:
            ratios["tusd_py_over_peer"] = {"per_run": peer_ratio, "median": median(peer_ratio)}
        summary["ratios"][workload.name] = ratios

    single = options.workloads[0]
    if single.patches == 1 and "tusd-py" in options.targets:
        peak = summary["medians"][single.name]["tusd-py"]["max_peak_rss_mib"]
        met = peak < RSS_TARGET_BYTES / MiB
        summary["rss"] = {"workload": single.name, "max_peak_rss_mib_over_runs": peak,
                          "target_mib": RSS_TARGET_BYTES / MiB, "met": met}
        summary["targets_met"] &= met
    return summary


def print_summary(summary: dict[str, Any], options: Options) -> None:
    """The medians table and the ratios, in plain text."""
    print(f"\nmedians over {options.runs} run(s)")
    print(HEADER)
    for workload, by_target in summary["medians"].items():
        for target, figures in by_target.items():
            print(format_row("med", median_row(target, workload, figures)))
    print("\nratios (median of per-run ratios; each ratio uses numbers from one run)")
    for workload, ratios in summary["ratios"].items():
        if "tusd_py_over_limit" in ratios:
            r = ratios["tusd_py_over_limit"]
            verdict = "ok" if r["met"] else "BELOW TARGET"
            per_run = ", ".join(f"{v:.2f}" for v in r["per_run"])
            print(f"  {workload:<10} tusd-py / min(loopback, disk) = {r['median']:.2f} "
                  f"(target >= {r['target']:.2f}: {verdict}; runs: {per_run})")
        if "tusd_py_over_loopback" in ratios:
            r = ratios["tusd_py_over_loopback"]
            per_run = ", ".join(f"{v:.2f}" for v in r["per_run"])
            print(f"  {workload:<10} tusd-py / loopback alone      = {r['median']:.2f} (runs: {per_run})")
        if "tusd_py_over_peer" in ratios:
            r = ratios["tusd_py_over_peer"]
            per_run = ", ".join(f"{v:.2f}" for v in r["per_run"])
            print(f"  {workload:<10} tusd-py / peer (@tus/server)  = {r['median']:.2f} (runs: {per_run})")
    if "rss" in summary:
        r = summary["rss"]
        verdict = "ok" if r["met"] else "ABOVE TARGET"
        print(f"  {r['workload']:<10} tusd-py peak RSS (max over runs) = {r['max_peak_rss_mib_over_runs']:.1f} MiB "
              f"(target < {r['target_mib']:.0f} MiB: {verdict})")


# --- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description="Ingest throughput, CPU and memory of tusd-py's file store next to the loopback and disk "
                    "limits (and @tus/server with --peer).",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    parser.add_argument("--size", type=parse_size, default=GiB, help="upload size (default 1GiB)")
    parser.add_argument("--patch-size", type=parse_size, default=16 * MiB,
                        help="PATCH size of the chunked workload (default 16MiB)")
    parser.add_argument("--workloads", default="single,chunked",
                        help="comma-separated: single (one PATCH), chunked (PATCHes of --patch-size)")
    parser.add_argument("--peer", action="store_true", help="also measure @tus/server + @tus/file-store")
    parser.add_argument("--targets", default="loopback,disk,tusd-py",
                        help="comma-separated subset of loopback,disk,tusd-py,peer (default: all but peer)")
    parser.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD,
                        help="tusd-py command; {host}, {port} and {directory} are filled in (default: %(default)s)")
    parser.add_argument("--peer-cmd", default=DEFAULT_PEER_CMD, help="peer command, same placeholders")
    parser.add_argument("--data-dir", type=Path,
                        help="where uploads are written (default: a new temp dir, removed at the end)")
    parser.add_argument("--json", type=Path, help="write all per-run figures, medians and ratios here")
    parser.add_argument("--client-buffer", type=parse_size, default=16 * MiB,
                        help="the client's preallocated send buffer (default 16MiB)")
    parser.add_argument("--disk-write-size", type=parse_size, default=file_store_write_size(),
                        help="write size of the disk limit (default: the file store's WRITE_BATCH_SIZE, %(default)s)")
    # The file store never fsyncs upload data (only its small .info documents), so the
    # disk limit by default does not either: both measure writing into the page cache.
    parser.add_argument("--disk-fsync", choices=["none", "patch", "end"], default="none",
                        help="when the disk limit fsyncs the data; keep it equal to the file store's (default none)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request (default 600)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up upload per server")
    parser.add_argument("--no-warm-memory", action="store_true",
                        help="do not write+delete a scratch file before each measurement (see README)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a tusd-py target is missed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.peer and "peer" not in targets:
        targets.append("peer")
    unknown = set(targets) - {"loopback", "disk", "tusd-py", "peer"}
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    if "peer" in targets and not (PEERS_DIR / "node_modules" / "@tus" / "server").is_dir():
        raise SystemExit(f"the peer is not installed: npm install --prefix {PEERS_DIR}")
    workloads = []
    for name in (w.strip() for w in args.workloads.split(",") if w.strip()):
        if name == "single":
            workloads.append(Workload(size=args.size, patch_size=args.size))
        elif name == "chunked":
            workloads.append(Workload(size=args.size, patch_size=args.patch_size))
        else:
            raise SystemExit(f"unknown workload {name!r} (single, chunked)")
    if args.disk_write_size > args.client_buffer:
        raise SystemExit("--disk-write-size must not exceed --client-buffer (the bytes come from that buffer)")

    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="tusd-py-ingest-")) if temporary else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    options = Options(
        runs=args.runs, workloads=workloads, targets=targets, data_dir=data_dir, server_cmd=args.server_cmd,
        peer_cmd=args.peer_cmd, client_buffer=args.client_buffer, disk_write_size=args.disk_write_size,
        disk_fsync=args.disk_fsync, timeout=args.timeout, warmup=not args.no_warmup,
        warm_memory=not args.no_warm_memory,
    )
    print(f"data dir {data_dir}; load average {load_average()}; disk limit: {format_size(args.disk_write_size)} "
          f"writes, fsync {args.disk_fsync}")
    print(HEADER)
    try:
        results = run_benchmark(options)
    except ServerFailed as error:
        print(f"\nserver failed: {error}", file=sys.stderr)
        return 2
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    summary = summarize(results, options)
    print_summary(summary, options)
    finish_report(results.meta, results.runs, summary, args.json)
    return 1 if args.check and not summary["targets_met"] else 0


if __name__ == "__main__":
    sys.exit(main())
