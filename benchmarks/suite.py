"""The benchmark suite: one command for the whole performance table.

    python -m benchmarks.suite                       # 3 runs, full sizes (~15 min on 2 cores)
    python -m benchmarks.suite --quick               # 1 run, small sizes (< 3 min)
    python -m benchmarks.suite --runs 5 --out benchmarks/results/today

It measures, on the same client and in the same run, tusd-py, the limit and the peer
(@tus/server with @tus/file-store or @tus/s3-store):

1. one large upload in one PATCH (file store 1 GiB; S3 store 512 MiB on moto);
2. the same bytes in 8 MiB and in 1 MiB PATCHes;
3. 200 concurrent uploads of 4 MiB (file store);
4. HEAD and POST requests per second on 50 keep-alive connections (file store), and
   HEADs again while 10,000 idle keep-alive connections are held open;
5. 10,000 idle keep-alive connections plus 100 uploads sent at 100 KiB/s (file store):
   peak RSS and RSS per connection (the fd limit is raised to its hard limit, and
   tusd-py's server.max_connections to 20,000, for 10,100 connections);

plus, once, the S3 traffic (bytes to and from moto) of the 1 MiB-PATCH workload. It
writes ``results.md`` (tables), ``results.png`` (one bar chart per workload) and
``results.json`` (every run's figures) to ``--out``, and prints progress to stderr.
``benchmarks/README.md`` explains every workload and column.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shlex
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import ingest, s3
from benchmarks.common import (
    MB,
    PEERS_DIR,
    REPO_ROOT,
    GiB,
    KiB,
    MiB,
    Progress,
    ServerFailed,
    ServerProcess,
    environment,
    format_size,
    load_average,
    node_version,
    peer_versions,
    random_buffer,
    source_digest,
)
from benchmarks.loads import (
    Concurrent,
    IdleAndSlow,
    RequestRate,
    measure_concurrent,
    measure_idle_and_slow,
    measure_request_rate,
)
from benchmarks.measurement import Measurement, Workload
from benchmarks.report import (
    MB_PER_S,
    PEER,
    TUSD_PY,
    Row,
    Target,
    figures_table,
    medians,
    plot,
    ratios,
    ratios_table,
)

FILE, S3 = "file", "s3"
S3_LIMIT = "limit (moto)"
"""The S3 limit's name in the table: a direct aiobotocore multipart upload to moto, so it
is moto's limit (near 100 MB/s), not S3's."""

FILE_LIMITS = ("loopback", "disk")
# The sink is the limit of the many-connection workloads: the disk has no connections.
CONNECTION_LIMIT = "loopback"

# Goals from the issues and DESIGN.md, checked against the ratios.
FILE_THROUGHPUT_GOAL = Target("limit", ingest.THROUGHPUT_TARGET, "≥ 0.60 of min(loopback, disk)")
# Many small PATCHes (issue 14): half the limit.
FILE_SMALL_PATCH_GOAL = Target("limit", 0.5, "≥ 0.5 of min(loopback, disk)")
SMALL_PATCH = 1 * MiB
# Small requests (issue 14), one worker, against @tus/server in the same run.
RATE_GOAL = Target("peer", 1.5, "≥ 1.5x @tus/server")
S3_TIME_GOAL = Target("limit", 1 / 1.15, "time ≤ 1.15x the limit's (ratio ≥ 0.87)")
S3_PEER_GOAL = Target("peer", 1.0, "faster than @tus/s3-store (> 1)")
# Each byte of a 1 MiB-PATCH upload reaches S3 at most twice (once in a tail segment,
# once in a part); 10% more covers request heads. Quadratic handling would grow with
# the part size / PATCH size ratio instead.
S3_TRAFFIC_GOAL_RATIO = 2.2


@dataclass(frozen=True)
class Sizes:
    """Everything a mode (full, quick, tiny) decides."""

    runs: int
    file_size: int
    s3_size: int
    patch_sizes: tuple[int, ...]
    concurrent: Concurrent
    rates: tuple[RequestRate, ...]
    idle: IdleAndSlow


FULL = Sizes(
    runs=3, file_size=GiB, s3_size=512 * MiB, patch_sizes=(8 * MiB, MiB),
    concurrent=Concurrent(uploads=200, size=4 * MiB),
    rates=(RequestRate("HEAD", 50, 5.0), RequestRate("POST", 50, 5.0), RequestRate("HEAD", 50, 5.0, 10_000)),
    idle=IdleAndSlow(idle=10_000, slow=100, bytes_per_second=100 * KiB, seconds=10.0),
)
QUICK = Sizes(
    runs=1, file_size=256 * MiB, s3_size=64 * MiB, patch_sizes=(8 * MiB, MiB),
    concurrent=Concurrent(uploads=200, size=MiB),
    rates=(RequestRate("HEAD", 50, 2.0), RequestRate("POST", 50, 2.0), RequestRate("HEAD", 50, 2.0, 1000)),
    idle=IdleAndSlow(idle=1000, slow=100, bytes_per_second=100 * KiB, seconds=3.0),
)
TINY = Sizes(
    runs=1, file_size=16 * MiB, s3_size=16 * MiB, patch_sizes=(8 * MiB, MiB),
    concurrent=Concurrent(uploads=8, size=MiB),
    rates=(RequestRate("HEAD", 4, 0.5), RequestRate("POST", 4, 0.5), RequestRate("HEAD", 4, 0.5, 20)),
    idle=IdleAndSlow(idle=20, slow=4, bytes_per_second=100 * KiB, seconds=1.0),
)

CLIENT_BUFFER = 16 * MiB
"""The client's preallocated send buffer (as in ingest.py): every body byte comes from it."""


@dataclass
class SuiteResults:
    """Everything the suite measured, and what went wrong."""

    meta: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    traffic: list[s3.Traffic] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# --- the plan -------------------------------------------------------------------------------

@dataclass
class Step:
    """One measurement (or setup) the suite will do, with a duration estimate for the ETA."""

    label: str
    seconds: float
    action: Callable[[], Row | None]
    """Returns the step's row (None for steps that record something else)."""


def _throughput_workloads(size: int, sizes: Sizes) -> list[Workload]:
    return [Workload(size=size, patch_size=size), *(Workload(size=size, patch_size=p) for p in sizes.patch_sizes)]


def _row_from(measurement: Measurement, store: str, run: int, target: str) -> Row:
    return Row(store=store, workload=measurement.workload, target=target, run=run, value=measurement.mb_per_s,
               unit=MB_PER_S, server_cpu=measurement.server_cpu_s_per_gib,
               client_cpu=measurement.client_cpu_s_per_gib, peak_rss_mib=measurement.server_peak_rss_mib,
               backend_cpu=measurement.backend_cpu_s_per_gib, other_cpu_s=measurement.other_cpu_s)


class Suite:
    """Builds the list of steps for the chosen stores and sizes, then runs it."""

    def __init__(self, sizes: Sizes, stores: list[str], peer: bool, work_dir: Path, results: SuiteResults,
                 only: list[str] | None = None) -> None:
        self.sizes = sizes
        self.only = only
        """Substrings of step labels to keep (None: every step)."""
        self.stores = stores
        self.peer = peer
        self.work_dir = work_dir
        self.results = results
        self.buffer = random_buffer(CLIENT_BUFFER)

    def _failed(self, what: str, error: Exception) -> None:
        """Record a failed step (its first message line) and show all of it on stderr."""
        first_line = str(error).splitlines()[0] if str(error) else repr(error)
        self.results.failures.append(f"{what}: {first_line}")
        print(f"  FAILED {what}: {error}", file=sys.stderr, flush=True)

    # file store ---------------------------------------------------------------------------

    def file_phase(self) -> tuple[Callable[[], contextlib.AbstractContextManager[Any]], list[Step]]:
        """The file-store servers (as a context factory) and the steps that use them."""
        targets_names = ["loopback", "disk", TUSD_PY] + ([PEER] if self.peer else [])
        options = ingest.Options(
            runs=self.sizes.runs, workloads=[], targets=targets_names, data_dir=self.work_dir / "file",
            server_cmd=ingest.DEFAULT_SERVER_CMD, peer_cmd=ingest.DEFAULT_PEER_CMD, client_buffer=CLIENT_BUFFER,
            disk_write_size=ingest.file_store_write_size(), disk_fsync="none", timeout=600.0, warmup=True,
            warm_memory=True,
        )
        holder: dict[str, ingest.FileTargets] = {}

        @contextlib.contextmanager
        def servers() -> Iterator[ingest.FileTargets]:
            options.data_dir.mkdir(parents=True, exist_ok=True)
            with ingest.FileTargets(options, self.buffer) as targets:
                holder["targets"] = targets
                yield targets
            self.results.meta["file_exit_codes"] = targets.exit_codes

        def throughput(target: str, workload: Workload, run: int) -> Callable[[], Row]:
            def action() -> Row:
                targets = holder["targets"]
                if target in targets.servers:
                    targets.restart(target)  # see on_server
                return _row_from(targets.measure(target, workload), FILE, run, target)
            return action

        def on_server(target: str, size: int, measure: Callable[[ServerProcess], Row],
                      retire: bool = False) -> Callable[[], Row]:
            """``measure(server)`` on a freshly started server, between two cleanups of its
            data directory (``size``: how much warm free memory the measurement needs;
            ``retire``: move the uploads away after it instead, see ``retire_files``).

            Fresh, because a server's heap keeps what an earlier workload grew it to
            (glibc rarely returns it): without a restart, every peak RSS after the 200
            concurrent uploads would be that workload's, not its own."""
            def action() -> Row:
                targets = holder["targets"]
                server = targets.restart(target)
                targets.prepare(target, size)
                try:
                    return measure(server)
                finally:
                    if retire:
                        targets.retire_uploads(target)
                    targets.prepare(target, 0)
            return action

        steps: list[Step] = []
        sizes = self.sizes
        connection_targets = [t for t in targets_names if t != "disk"]
        for run in range(1, sizes.runs + 1):
            tag = f"run {run}/{sizes.runs}"
            for workload in _throughput_workloads(sizes.file_size, sizes):
                for target in targets_names:
                    steps.append(Step(f"file {workload.name} {target} ({tag})", 3 + workload.size / (400 * MB),
                                      throughput(target, workload, run)))
            concurrent, idle = sizes.concurrent, sizes.idle
            for target in connection_targets:
                measure = partial(measure_concurrent, store=FILE, run=run, load=concurrent, buffer=self.buffer)
                steps.append(Step(f"file {concurrent.name} {target} ({tag})", 3.5 + concurrent.total / (300 * MB),
                                  on_server(target, concurrent.total, measure)))
            for rate in sizes.rates:
                for target in connection_targets:
                    measure = partial(measure_request_rate, store=FILE, run=run, load=rate)
                    steps.append(Step(f"file {rate.name} {target} ({tag})", rate.seconds + 2.5 + rate.held_idle / 2000,
                                      on_server(target, 0, measure, retire=True)))
            for target in connection_targets:
                measure = partial(measure_idle_and_slow, store=FILE, run=run, load=idle, buffer=self.buffer)
                steps.append(Step(f"file {idle.name} {target} ({tag})", idle.seconds + 5,
                                  on_server(target, 0, measure)))
        return servers, steps

    # S3 store -------------------------------------------------------------------------------

    def s3_phase(self) -> tuple[Callable[[], contextlib.AbstractContextManager[Any]], list[Step]]:
        """moto and the S3 servers (as a context factory) and the steps that use them."""
        targets_names = ["limit", TUSD_PY] + ([PEER] if self.peer else [])
        workloads = _throughput_workloads(self.sizes.s3_size, self.sizes)
        options = s3.Options(
            runs=self.sizes.runs, workloads=workloads, targets=targets_names, part_size=8 * MiB, concurrency=8,
            server_cmd=s3.DEFAULT_SERVER_CMD, peer_cmd=s3.DEFAULT_PEER_CMD, client_buffer=CLIENT_BUFFER,
            timeout=600.0, work_dir=self.work_dir / "s3",
        )
        holder: dict[str, s3.S3Targets] = {}

        @contextlib.contextmanager
        def servers() -> Iterator[s3.S3Targets]:
            options.work_dir.mkdir(parents=True, exist_ok=True)
            with s3.S3Targets(options, self.buffer) as targets:
                holder["targets"] = targets
                yield targets
            self.results.meta["s3_exit_codes"] = targets.exit_codes

        def throughput(target: str, workload: Workload, run: int) -> Callable[[], Row]:
            def action() -> Row:
                targets = holder["targets"]
                if target in targets.servers:
                    targets.restart(target)  # a fresh heap, as in the file phase
                name = S3_LIMIT if target == "limit" else target
                return _row_from(targets.measure(target, workload), S3, run, name)
            return action

        def traffic(target: str, workload: Workload) -> Callable[[], None]:
            return lambda: self.results.traffic.append(holder["targets"].measure_traffic(target, workload))

        steps: list[Step] = []
        for run in range(1, self.sizes.runs + 1):
            for workload in workloads:
                for target in targets_names:
                    # moto takes ~100 MB/s; small PATCHes cost the servers extra calls.
                    estimate = 4 + workload.size / (60 * MB) * (2 if workload.patch_size <= MiB else 1)
                    steps.append(Step(f"s3 {workload.name} {target} (run {run}/{self.sizes.runs})", estimate,
                                      throughput(target, workload, run)))
        smallest = workloads[-1]
        for target in targets_names:
            steps.append(Step(f"s3 traffic {smallest.name} {target}", 4 + 2 * smallest.size / (40 * MB),
                              traffic(target, smallest)))
        return servers, steps

    # running ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Run every phase's steps with a progress line per step."""
        phases = []
        if FILE in self.stores:
            phases.append((FILE, *self.file_phase()))
        if S3 in self.stores:
            phases.append((S3, *self.s3_phase()))
        if self.only is not None:
            only = self.only
            phases = [(name, servers, [s for s in steps if any(o in s.label for o in only)])
                      for name, servers, steps in phases]
            phases = [phase for phase in phases if phase[2]]
        startup = 5.0  # seconds to start and warm up one phase's servers
        weights = [w for _name, _servers, steps in phases for w in (startup, *(s.seconds for s in steps))]
        progress = Progress(weights)
        for name, servers, steps in phases:
            progress.step(f"{name}: start and warm up the servers")
            try:
                with servers():
                    progress.done()
                    for step in steps:
                        progress.step(step.label)
                        try:
                            row = step.action()
                        except ServerFailed as error:
                            # Keep going: one broken target or store must not cost the
                            # rest of the table.
                            self._failed(step.label, error)
                        else:
                            if row is not None:
                                self.results.rows.append(row)
                        progress.done()
            except ServerFailed as error:
                # A phase whose servers cannot start (or whose store fails under the
                # warm-up) is recorded and skipped; the other phase still runs.
                self._failed(f"{name}: starting the servers", error)
        print(f"done in {progress.elapsed:.0f} s", file=sys.stderr, flush=True)


# --- output ---------------------------------------------------------------------------------

def _goals(results: SuiteResults, median_rows: list[Row], sizes: Sizes) -> list[str]:
    """Goals that are not ratios: the file store's peak RSS and the S3 traffic."""
    lines = []
    single = f"1x{format_size(sizes.file_size)}"
    for row in median_rows:
        if (row.store, row.workload, row.target) == (FILE, single, TUSD_PY) and row.peak_rss_mib is not None:
            met = row.peak_rss_mib < ingest.RSS_TARGET_BYTES / MiB
            lines.append(f"- file {single}: tusd-py peak RSS {row.peak_rss_mib:.1f} MiB "
                         f"(goal < {ingest.RSS_TARGET_BYTES // MiB} MiB: {'met' if met else '**missed**'})")
    lines += _connection_goals(median_rows, sizes)
    for traffic in results.traffic:
        if traffic.target == "tusd-py":
            met = traffic.up_ratio <= S3_TRAFFIC_GOAL_RATIO
            lines.append(f"- s3 {traffic.workload}: tusd-py sent {traffic.up_ratio:.2f}x the upload to S3 "
                         f"(goal ≤ {S3_TRAFFIC_GOAL_RATIO}x, linear: {'met' if met else '**missed**'})")
    return lines


IDLE_KIB_GOAL = 16.0
HELD_RATE_GOAL = 0.9


def _connection_goals(median_rows: list[Row], sizes: Sizes) -> list[str]:
    """Issue 14's idle-connection goals: RSS per idle connection, and the HEAD rate
    while idle connections are held against the rate without them."""
    lines = []
    ours = [row for row in median_rows if row.store == FILE and row.target == TUSD_PY]
    for row in ours:
        if row.rss_per_idle_kib is not None:
            met = row.rss_per_idle_kib <= IDLE_KIB_GOAL
            lines.append(f"- file {row.workload}: tusd-py {row.rss_per_idle_kib:.1f} KiB per idle connection "
                         f"(goal ≤ {IDLE_KIB_GOAL:.0f} KiB: {'met' if met else '**missed**'})")
    rates = {row.workload: row.value for row in ours}
    for rate in sizes.rates:
        alone = RequestRate(rate.method, rate.connections, rate.seconds).name
        if rate.held_idle and rate.name in rates and rates.get(alone):
            share = rates[rate.name] / rates[alone]
            met = share >= HELD_RATE_GOAL
            lines.append(f"- file {rate.name}: tusd-py at {share:.2f} of its rate without them "
                         f"(goal ≥ {HELD_RATE_GOAL}: {'met' if met else '**missed**'})")
    return lines


def _traffic_table(results: SuiteResults) -> str:
    lines = ["| workload | target | to S3 / upload | from S3 / upload | S3 requests |",
             "| --- | --- | ---: | ---: | --- |"]
    for traffic in results.traffic:
        requests = ", ".join(f"{method} {count}" for method, count in sorted(traffic.requests.items())) or "-"
        name = S3_LIMIT if traffic.target == "limit" else traffic.target
        lines.append(f"| {traffic.workload} | {name} | {traffic.up_ratio:.2f} "
                     f"| {traffic.bytes_from_s3 / traffic.bytes:.2f} | {requests} |")
    return "\n".join(lines)


def write_results(results: SuiteResults, sizes: Sizes, out: Path) -> None:
    """results.md, results.png and results.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    median_rows = medians(results.rows)
    ratio_items = ratios(
        results.rows, {FILE: FILE_LIMITS, S3: (S3_LIMIT,)},
        _ratio_goals(sizes),
    )
    meta = results.meta
    # The many-connection workloads have one limit, the sink; the ratios helper takes
    # the slower of the limits present in a run, and the disk is absent there.
    text = [
        "# tusd-py benchmark suite",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git {meta['git']}; tusd_py sources digest {meta['source_digest_before']}",
        f"- machine: {meta['cpus']} CPUs, {meta['platform']}; Python {meta['python']}; node {meta['node']}; "
        + (", ".join(f"{k} {v}" for k, v in meta["peer_versions"].items()) or "no peer"),
        f"- load average (1, 5, 15 min) before {_load(meta['load_average_before'])}, "
        f"after {_load(meta.get('load_average_after'))}",
        f"- medians of {sizes.runs} run(s); ratios are medians of per-run ratios (numbers of one run each)",
        "",
        "## Figures (medians)",
        "",
        figures_table(median_rows),
        "",
        "`limit (moto)` is a direct aiobotocore multipart upload to the same moto server: moto's limit (near",
        "100 MB/s), not S3's. `srv CPU` and `client CPU` are per GiB for uploads, per request for request",
        "rates, and seconds over the whole workload for idle connections.",
        "",
        "## Ratios (above 1: tusd-py did better; for RSS the ratio is reference / tusd-py)",
        "",
        ratios_table(ratio_items),
        "",
    ]
    goals = _goals(results, median_rows, sizes)
    if goals:
        text += ["## Other goals", "", *goals, ""]
    if results.traffic:
        text += ["## S3 traffic (one upload through a counting proxy, untimed)", "", _traffic_table(results), ""]
    if results.failures:
        text += ["## Failures", "", *(f"- {failure}" for failure in results.failures), ""]
    (out / "results.md").write_text("\n".join(text))
    if median_rows:
        server_version = meta["peer_versions"].get("@tus/server")
        workers = meta.get("tusd_py_workers", 1)
        plot(median_rows, out / "results.png",
             f"tusd-py suite {meta['date']} ({sizes.runs} run(s), medians; load {_load(meta['load_average_before'])})"
             + (f"; tusd-py with {workers} workers" if workers > 1 else ""),
             peer_label=f"@tus/server {server_version}" if server_version else PEER)
    document = {"meta": meta, "rows": [asdict(r) for r in results.rows],
                "medians": [asdict(r) for r in median_rows],
                "ratios": [asdict(r) for r in ratio_items],
                "traffic": [asdict(t) for t in results.traffic], "failures": results.failures}
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str) + "\n")


def _ratio_goals(sizes: Sizes) -> dict[tuple[str, str], list[Target]]:
    goals: dict[tuple[str, str], list[Target]] = {}
    for workload in _throughput_workloads(sizes.file_size, sizes):
        small = workload.patch_size <= SMALL_PATCH < workload.size
        goals[(FILE, workload.name)] = [FILE_SMALL_PATCH_GOAL if small else FILE_THROUGHPUT_GOAL]
    for rate in sizes.rates:
        if not rate.held_idle:
            goals[(FILE, rate.name)] = [RATE_GOAL]
    for workload in _throughput_workloads(sizes.s3_size, sizes):
        goals[(S3, workload.name)] = [S3_TIME_GOAL, S3_PEER_GOAL]
    return goals


def _load(value: Any) -> str:
    return "-" if not value else ", ".join(f"{v:.2f}" for v in value)


# --- command line ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description="Run every benchmark workload against tusd-py, its limits and @tus/server; write results.md, "
                    "results.png and results.json.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, 1 run: a sanity run in under 3 minutes")
    mode.add_argument("--tiny", action="store_true", help="a few MiB and a handful of connections (smoke test)")
    parser.add_argument("--runs", type=int, help="runs; medians are reported (default 3, or 1 with --quick/--tiny)")
    parser.add_argument("--stores", default="file,s3", help="comma-separated: file, s3 (default both)")
    parser.add_argument("--no-peer", action="store_true", help="leave out @tus/server")
    parser.add_argument("--only", help="comma-separated substrings of workload names to run (e.g. 'rate,idle'); "
                                       "default every workload")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<date-time>)")
    parser.add_argument("--workers", type=int, default=1,
                        help="tusd-py's server.workers (default 1); above 1 with lock.backend \"file\", "
                             "as several processes need")
    return parser


IDLE_MAX_CONNECTIONS = "20000"
"""tusd-py's server.max_connections in the suite: above the idle workload's 10,100."""


def _allow_many_connections() -> None:
    """Raise the fd limit to the hard limit (the client and the servers it starts hold
    10,100 sockets each in the idle workload) and let tusd-py accept that many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.environ.setdefault("TUSD_PY_SERVER_MAX_CONNECTIONS", IDLE_MAX_CONNECTIONS)


def _tusd_py_workers(workers: int) -> None:
    """Run every tusd-py server with ``workers`` processes (environment variables,
    which the servers inherit). Its CPU and RSS are then the sums over the supervisor
    and its workers (``ProcessMonitor``)."""
    if workers < 1:
        raise SystemExit("--workers must be at least 1")
    if workers > 1:
        os.environ["TUSD_PY_SERVER_WORKERS"] = str(workers)
        os.environ["TUSD_PY_LOCK_BACKEND"] = "file"


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 when every measurement succeeded, 1 when some failed."""
    args = _parser().parse_args(argv)
    _allow_many_connections()
    _tusd_py_workers(args.workers)
    sizes = QUICK if args.quick else TINY if args.tiny else FULL
    if args.runs is not None:
        if args.runs < 1:
            raise SystemExit("--runs must be at least 1")
        sizes = Sizes(**{**sizes.__dict__, "runs": args.runs})
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if not stores or set(stores) - {FILE, S3}:
        raise SystemExit(f"--stores takes file and/or s3, got {args.stores!r}")
    peer = not args.no_peer
    if peer and not (PEERS_DIR / "node_modules" / "@tus" / "server").is_dir():
        raise SystemExit(f"the peer is not installed: npm install --prefix {PEERS_DIR} (or pass --no-peer)")
    now = datetime.datetime.now(datetime.UTC)
    out = args.out or REPO_ROOT / "benchmarks" / "results" / now.strftime("%Y%m%d-%H%M%S")
    results = SuiteResults(meta={
        **environment(),
        "command": shlex.join(["python", "-m", "benchmarks.suite", *(argv if argv is not None else sys.argv[1:])]),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "node": node_version(),
        "peer_versions": peer_versions() if peer else {},
        "sizes": asdict(sizes),
        "stores": stores,
        "tusd_py_workers": args.workers,
        "load_average_before": load_average(),
        "source_digest_before": source_digest(),
    })
    work_dir = Path(tempfile.mkdtemp(prefix="tusd-py-suite-"))
    print(f"load average {_load(results.meta['load_average_before'])}; work dir {work_dir}; results to {out}",
          file=sys.stderr, flush=True)
    try:
        only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
        Suite(sizes, stores, peer, work_dir, results, only).run()
    except KeyboardInterrupt:
        results.failures.append("interrupted")
    except Exception:  # a bug in the harness: keep what was measured, and say so
        results.failures.append("harness error: " + traceback.format_exc().strip().splitlines()[-1])
        traceback.print_exc()
    finally:
        results.meta["load_average_after"] = load_average()
        results.meta["source_digest_after"] = source_digest()
        before, after = results.meta["source_digest_before"], results.meta["source_digest_after"]
        if after != before:
            results.failures.append(f"tusd_py/ changed during the run (sources digest {before} -> {after}): "
                                    "servers started after the edit ran other code; rerun on a quiet tree")
        shutil.rmtree(work_dir, ignore_errors=True)
        write_results(results, sizes, out)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.md'}, {out / 'results.png'}, {out / 'results.json'}", file=sys.stderr)
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
