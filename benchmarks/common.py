"""Shared benchmark plumbing: sizes, ports, server subprocesses, reports. What a
process costs is measured by ``benchmarks.accounting``."""

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
import time
from collections.abc import Mapping, Sequence
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


def peer_versions() -> dict[str, str]:
    """Versions of the installed @tus packages that the peer runs."""
    versions = {}
    for package in ("server", "file-store", "s3-store"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            document = json.loads((PEERS_DIR / "node_modules" / "@tus" / package / "package.json").read_text())
            versions[f"@tus/{package}"] = document["version"]
    return versions


def node_version() -> str:
    """``node --version``, or "not installed"."""
    try:
        return subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not installed"


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
