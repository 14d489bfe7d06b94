"""Shared benchmark plumbing: sizes, ports, server subprocesses and /proc accounting.

Process figures come straight from ``/proc`` (no psutil): CPU time from
``/proc/<pid>/stat`` and memory from ``/proc/<pid>/status``. Only Linux is supported,
which is where the servers are meant to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
PEERS_DIR = BENCHMARKS_DIR / "peers"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
"""Throughput is quoted in decimal megabytes per second, as disk and network tools do."""

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": MB,
    "g": GiB, "gib": GiB, "gb": 1000 * MB,
}


def parse_size(text: str) -> int:
    """``"16MiB"`` -> 16777216. Binary units for K/M/G and KiB/MiB/GiB, decimal for KB/MB/GB."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 1GiB, 16MiB, 65536)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    """16777216 -> ``"16MiB"``; the largest binary unit that divides ``size``."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{name}"
    return f"{size}B"


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (NaN when empty, so a missing figure stays visible)."""
    return statistics.median(values) if values else float("nan")


def random_buffer(size: int) -> memoryview:
    """``size`` random bytes to send from. Random so no store, disk or proxy can take a
    shortcut (compression, zero pages); made once, and every byte sent comes from it."""
    return memoryview(bytearray(os.urandom(size)))


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed (as the servers under test use it), else
    asyncio's default one. For ``asyncio.Runner(loop_factory=...)``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


# --- ports -----------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. The server binds it itself, so there is a small
    race with other programs; on a benchmark machine that is acceptable."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def port_accepts(host: str, port: int) -> bool:
    """True when a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# --- /proc accounting --------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds used so far by all threads of process ``pid``, or by its
    thread ``tid`` only."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, "rb") as file:
        stat = file.read()
    # The command name (field 2) is in parentheses and may itself contain spaces or
    # parentheses, so split after the last ')'. Fields then start at field 3 (state);
    # utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` value (``VmRSS``, ``VmHWM``, ...) from ``/proc/<pid>/status``, in KiB."""
    prefix = key.encode() + b":"
    with open(f"/proc/{pid}/status", "rb") as file:
        for line in file:
            if line.startswith(prefix):
                return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs),
    so VmHWM read later is the peak of the measured interval only. Needs the right to
    write the file (same user or root); returns False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervisor's workers), from each thread's
    ``/proc/<pid>/task/<tid>/children``."""
    tree = [pid]
    for parent in tree:  # grows while it is walked: breadth first
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:  # the process ended while we looked
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as file:
                    tree.extend(int(child) for child in file.read().split())
            except OSError:
                continue
    return tree


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Thread id -> (thread name, CPU seconds so far) for every thread of ``pid``."""
    threads: dict[int, tuple[str, float]] = {}
    for entry in os.scandir(f"/proc/{pid}/task"):
        tid = int(entry.name)
        try:
            with open(f"{entry.path}/comm") as file:
                name = file.read().strip()
            threads[tid] = (name, cpu_seconds(pid, tid))
        except (OSError, ValueError):  # the thread ended while we looked
            continue
    return threads


def _thread_family(name: str) -> str:
    """Pool threads are numbered (``tusd-file_0``, ``asyncio_3``): group them by family."""
    return re.sub(r"[_-]?[0-9]+$", "", name) or name


@dataclass
class ProcessUsage:
    """What one process used during a measured interval."""

    cpu_seconds: float
    main_thread_cpu_seconds: float
    """CPU of the process's first thread: for asyncio servers, the event loop (plus
    whatever runs on it). Close to the wall time means the loop is the bottleneck."""
    peak_rss_bytes: int
    """max(sampled VmRSS, VmHWM at the end); VmHWM counts only when it was reset at the
    start, otherwise it is the process's lifetime peak and only samples are used."""
    sampled_peak_rss_bytes: int
    hwm_bytes: int | None
    """VmHWM at the end, None when it could not be reset at the start."""
    samples: int
    cpu_seconds_by_thread: dict[str, float] = field(default_factory=dict)
    """CPU per thread family (name without its pool number; the main thread is
    "main"). Threads that ended during the interval are missing."""


class ProcessMonitor:
    """Measures a process's CPU time and peak RSS over a ``with`` block, with the
    processes it had started when the block began (``server.workers`` > 1: the
    supervisor and its workers; RSS is then the peak of the sampled sum).

    A background thread samples ``VmRSS`` every ``interval`` seconds; a thread rather
    than an asyncio task because the client's event loop is busy sending and would
    sample late exactly when memory grows fastest. Each sample costs a few microseconds
    of the harness's time, so it does not slow the client measurably.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.usage: ProcessUsage | None = None
        self._stop = threading.Event()
        self._peak_kib = 0
        self._samples = 0
        self._thread: threading.Thread | None = None
        self._hwm_reset = False
        self._cpu_start = 0.0
        self._main_cpu_start = 0.0
        self._threads_start: dict[int, tuple[str, float]] = {}
        self._tree = [pid]

    def _tree_cpu_seconds(self) -> float:
        total = 0.0
        for pid in self._tree:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def _sample_forever(self) -> None:
        while not self._stop.is_set():
            self._sample()
            # Event.wait as a periodic timer: it returns early when the block ends.
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        try:
            rss = sum(status_kib(pid, "VmRSS") for pid in self._tree)
        except (OSError, KeyError):  # a process ended; the harness reports that
            return
        self._samples += 1
        self._peak_kib = max(self._peak_kib, rss)

    def __enter__(self) -> ProcessMonitor:
        self._tree = process_tree(self.pid)
        # VmHWM is per process: with several processes only the sampled sum is a peak.
        self._hwm_reset = len(self._tree) == 1 and reset_peak_rss(self.pid)
        self._cpu_start = self._tree_cpu_seconds()
        self._main_cpu_start = cpu_seconds(self.pid, self.pid)
        self._threads_start = thread_cpu_seconds(self.pid)
        self._sample()
        self._thread = threading.Thread(target=self._sample_forever, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        cpu = self._tree_cpu_seconds() - self._cpu_start
        main_cpu = cpu_seconds(self.pid, self.pid) - self._main_cpu_start
        by_thread: dict[str, float] = {}
        for tid, (name, seconds) in thread_cpu_seconds(self.pid).items():
            family = "main" if tid == self.pid else _thread_family(name)
            start = self._threads_start.get(tid, (name, 0.0))[1]
            by_thread[family] = by_thread.get(family, 0.0) + seconds - start
        hwm = status_kib(self.pid, "VmHWM") * KiB if self._hwm_reset else None
        sampled = self._peak_kib * KiB
        self.usage = ProcessUsage(
            cpu_seconds=cpu,
            main_thread_cpu_seconds=main_cpu,
            peak_rss_bytes=max(sampled, hwm or 0),
            sampled_peak_rss_bytes=sampled,
            hwm_bytes=hwm,
            samples=self._samples,
            cpu_seconds_by_thread={name: round(value, 3) for name, value in sorted(by_thread.items())},
        )


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: user, nice, system,
    irq, softirq, steal). Its change over a measurement, less what the client and server
    used, is what other programs took: the figure that says whether the run was noisy."""
    with open("/proc/stat", "rb") as file:
        fields = file.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this (harness/client) process, all threads."""
    return time.process_time()


@dataclass
class Accounting:
    """What a measured block cost: wall time, the server's (and its backend's) usage,
    the harness's own CPU, and what the rest of the machine used meanwhile."""

    wall_seconds: float = 0.0
    server: ProcessUsage | None = None
    backend: ProcessUsage | None = None
    """The process behind the server (moto for the S3 store), when one was given."""
    client_cpu_seconds: float = 0.0
    other_cpu_seconds: float = 0.0
    """Machine busy time less server, backend and client: non-zero means other programs
    ran during the measurement and the figures are noisy."""


@contextlib.contextmanager
def accounted(server_pid: int | None, backend_pid: int | None = None) -> Iterator[Accounting]:
    """Account for the block: the yielded ``Accounting`` is filled in when it ends.

    The one place that turns /proc readings into a measurement's cost, so every
    benchmark computes "server CPU", "client CPU" and "other CPU" the same way.
    """
    result = Accounting()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ProcessMonitor(server_pid)) if server_pid is not None else None
        backend = stack.enter_context(ProcessMonitor(backend_pid)) if backend_pid is not None else None
        client_start = own_cpu_seconds()
        busy_start = machine_busy_seconds()
        wall_start = time.perf_counter()
        yield result
        result.wall_seconds = time.perf_counter() - wall_start
        busy = machine_busy_seconds() - busy_start
        result.client_cpu_seconds = own_cpu_seconds() - client_start
    # The monitors have exited here, so their usage is final.
    result.server = server.usage if server is not None else None
    result.backend = backend.usage if backend is not None else None
    measured = result.client_cpu_seconds + sum(
        usage.cpu_seconds for usage in (result.server, result.backend) if usage is not None
    )
    result.other_cpu_seconds = max(0.0, busy - measured)


class Progress:
    """One line per step on stderr: step count, elapsed time, ETA and what runs next.

    The ETA weighs each step by an estimate of its duration given up front (the plan
    knows sizes and rates), scaled by how long the finished steps really took, so a
    slow machine corrects the estimate as the run goes.
    """

    def __init__(self, weights: Sequence[float], stream: IO[str] | None = None) -> None:
        self._weights = list(weights)
        self._stream = stream if stream is not None else sys.stderr
        self._done = 0
        self._done_weight = 0.0
        self._start = time.monotonic()

    @staticmethod
    def _clock(seconds: float) -> str:
        minutes, seconds = divmod(int(seconds), 60)
        return f"{minutes:02d}:{seconds:02d}"

    def step(self, label: str) -> None:
        """Announce the next step; call before it starts."""
        elapsed = time.monotonic() - self._start
        total_weight = sum(self._weights)
        if self._done_weight > 0:
            eta = self._clock(elapsed / self._done_weight * (total_weight - self._done_weight))
        else:
            eta = "--:--"
        width = len(str(len(self._weights)))
        print(f"[{self._done + 1:>{width}}/{len(self._weights)}] {self._clock(elapsed)} elapsed, ETA {eta}  {label}",
              file=self._stream, flush=True)

    def done(self) -> None:
        """The step announced last has finished."""
        if self._done < len(self._weights):
            self._done_weight += self._weights[self._done]
        self._done += 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start


# --- server subprocesses -------------------------------------------------------------------

class ServerFailed(RuntimeError):
    """A server subprocess could not start or died; the message carries its log tail."""


@dataclass
class ServerProcess:
    """A server started as a subprocess, listening on ``host:port``.

    ``command`` is run without a shell, so ``pid`` is the server itself (what we measure),
    not a wrapper. Its stdout and stderr go to ``log_path``.
    """

    name: str
    command: list[str]
    host: str
    port: int
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path = REPO_ROOT
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.process is not None, "server not started"
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server wrote (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self, ready_timeout: float = 30.0) -> None:
        """Start the server and return once its port accepts connections."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, env=dict(self.env) if self.env is not None else None,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ready_timeout
        # Readiness is the port accepting a connection. The servers print nothing at
        # log level "warning", so polling the port is the one signal they all give; the
        # loop ends as soon as it succeeds, fails fast if the process exits, and is
        # bounded by ready_timeout.
        while not port_accepts(self.host, self.port):
            code = self.process.poll()
            if code is not None:
                raise ServerFailed(f"{self.name} exited with {code} before listening:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"{self.name} did not listen on {self.host}:{self.port} "
                                   f"within {ready_timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def check_alive(self) -> None:
        """Raise ``ServerFailed`` when the server process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
        code: int | None = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServerGroup:
    """Named server processes started together, replaceable one at a time, stopped
    together: the common part of the benchmarks' target sets."""

    def __init__(self) -> None:
        self.servers: dict[str, ServerProcess] = {}
        self.exit_codes: dict[str, int | None] = {}
        """Exit code of every server stopped so far (SIGTERM should give 0)."""

    def start_all(self) -> None:
        """Start every server in order; on failure stop the ones already started."""
        try:
            for server in self.servers.values():
                server.start()
        except BaseException:
            self.stop_all()
            raise

    def stop_all(self) -> None:
        """SIGTERM every server, in reverse order of starting, and keep the exit codes."""
        for server in reversed(self.servers.values()):
            self.exit_codes[server.name] = server.stop()

    def replace(self, name: str, server: ServerProcess) -> ServerProcess:
        """Stop the server called ``name`` and start ``server`` in its place."""
        self.exit_codes[f"{name} (replaced)"] = self.servers[name].stop()
        self.servers[name] = server
        server.start()
        return server


def command_from_template(template: str, **values: object) -> list[str]:
    """Split a command line like a shell would and fill ``{port}``-style placeholders in
    each word (so paths with spaces stay one argument)."""
    return [word.format(**values) for word in shlex.split(template)]


# --- files -------------------------------------------------------------------------------------

def clear_directory(directory: Path) -> int:
    """Delete the regular files directly in ``directory`` (uploads and their info files);
    leave sub-directories (lock directories) alone. Returns the bytes freed."""
    freed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                freed += entry.stat(follow_symlinks=False).st_size
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
    return freed


def retire_files(directory: Path, graveyard: Path) -> None:
    """Move the regular files directly in ``directory`` into a new folder under
    ``graveyard`` instead of deleting them (they are deleted with the work folder).

    Why: deleting the ~10,000-30,000 files of a request-rate run made the file
    creations of the next run, whichever server's, scan ext4's recently deleted inodes
    (perf: ``recently_deleted``, a fifth of the machine's CPU; one create then cost
    ~350 µs of kernel time instead of ~10), so a POST rate depended on what ran just
    before it. A rename frees no inode."""
    graveyard.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=graveyard))
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                os.rename(entry.path, folder / entry.name)


def flush_page_cache() -> None:
    """Write all dirty pages to disk (untimed, between phases) so one phase's writeback
    does not run during, and slow down, the next one."""
    os.sync()


def warm_free_memory(directory: Path, size: int, buffer: memoryview) -> None:
    """Write ``size`` bytes to a scratch file and delete it, so about that much freshly
    used memory is free when the next measurement starts.

    Why: on VMs with free page reporting (virtio-balloon), memory that stays free for
    about two seconds is handed back to the hypervisor, and the next touch of each page
    faults on the host: writing a new file then costs ~1 CPU s/GiB instead of ~0.2
    (measured on the 2-core benchmark VM: 1.0 vs 5.7 GB/s). Whether a measurement began
    right after another one freed memory or after a pause decided its speed by 5x. After
    this call every measurement begins in the same state, the one a machine without
    page reporting is always in. Measurements longer than ~2 s still reach reported
    pages towards their end, which penalizes slow targets a little.
    """
    path = directory / "warm-free-memory.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        position = 0
        while position < size:
            position += os.pwrite(fd, buffer[: size - position], position)
    finally:
        os.close(fd)
        # Unlinked before writeback: the dirty pages are dropped, no disk I/O follows.
        path.unlink()


# --- environment ---------------------------------------------------------------------------------

def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages: how busy the machine was (quoted with results)."""
    return os.getloadavg()


def git_revision() -> str:
    """The checked-out commit plus "-dirty" when the tree has changes (read-only git)."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("-dirty" if dirty else "")


def source_digest(directory: Path = REPO_ROOT / "tusd_py") -> str:
    """A short SHA-256 of the server's Python sources (paths and contents). Taken at the
    start and the end of a run: on a shared working tree someone may edit the server
    mid-run, and servers started after the edit (the suite restarts them) would run
    other code than the ones before."""
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.py")):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict[str, Any]:
    """Facts about the machine that a reader of the numbers needs."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "git": git_revision(),
        "argv": sys.argv,
    }



def finish_report(meta: Mapping[str, Any], runs: Sequence[Sequence[Any]], summary: Any, json_path: Path | None) -> None:
    """The closing lines every benchmark prints (load average, exit codes) and its
    optional JSON document (``meta``, every run's measurements, the summary)."""
    print(f"\nload average before {meta['load_average_before']}, after {meta['load_average_after']}; "
          f"server exit codes {meta.get('server_exit_codes')}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        document = {"meta": meta, "runs": [[asdict(m) for m in run] for run in runs], "summary": summary}
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {json_path}")
