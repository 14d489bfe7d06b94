"""Process accounting for the benchmarks: CPU time and memory of servers, their worker
processes and threads, straight from ``/proc`` (no psutil): CPU time from
``/proc/<pid>/stat`` and memory from ``/proc/<pid>/status``. Only Linux is supported,
which is where the servers are meant to run.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from benchmarks.common import KiB

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
