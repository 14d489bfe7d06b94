"""One measurement of one target taking one workload, and how the benchmarks print
rows of them (``ingest.py``, ``s3.py`` and the suite share these)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.common import format_size, median


@dataclass(frozen=True)
class Workload:
    """One upload of ``size`` bytes sent as PATCHes of ``patch_size`` bytes."""

    size: int
    patch_size: int

    @property
    def patches(self) -> int:
        return math.ceil(self.size / self.patch_size)

    @property
    def name(self) -> str:
        return f"{self.patches}x{format_size(self.patch_size)}"

    def patch_lengths(self) -> list[int]:
        """Length of each PATCH body in order (the last may be shorter)."""
        return [min(self.patch_size, self.size - offset) for offset in range(0, self.size, self.patch_size)]


@dataclass
class Measurement:
    """One target taking one workload once."""

    target: str
    workload: str
    bytes: int
    seconds: float
    mb_per_s: float
    server_cpu_s_per_gib: float | None
    """CPU (user + system) of the receiving process per GiB; for ``disk``, of the writer."""
    server_main_thread_busy: float | None
    """CPU of the receiving process's main thread (the event loop) / wall time of the
    measurement: near 1.0 means the loop is saturated."""
    server_peak_rss_mib: float | None
    server_hwm_mib: float | None
    """VmHWM after the workload, reset at its start (None when it could not be reset)."""
    rss_samples: int
    client_cpu_s_per_gib: float | None
    other_cpu_s: float
    """CPU seconds used by other programs on the machine during the measurement."""
    reconnects: int = 0
    backend_cpu_s_per_gib: float | None = None
    """CPU of the storage backend behind the server (moto, in the S3 benchmark) per GiB."""
    server_cpu_s_per_gib_by_thread: dict[str, float] = field(default_factory=dict)
    """The server's CPU per GiB split by thread family (event loop = "main", I/O pools,
    ...): where the server's CPU goes. Only in the JSON."""


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


HEADER = (f"{'run':>3}  {'workload':<10} {'target':<9} {'MB/s':>8} {'srv CPU s/GiB':>13} {'srv main busy':>13} "
           f"{'peak RSS MiB':>12} {'client CPU s/GiB':>16} {'other CPU s':>11}")


def format_row(run: int | str, m: Measurement) -> str:
    return (f"{run!s:>3}  {m.workload:<10} {m.target:<9} {m.mb_per_s:>8.0f} {fmt(m.server_cpu_s_per_gib):>13} "
            f"{fmt(m.server_main_thread_busy):>13} {fmt(m.server_peak_rss_mib, 1):>12} "
            f"{fmt(m.client_cpu_s_per_gib):>16} {fmt(m.other_cpu_s, 1):>11}")


def find_measurement(measurements: list[Measurement], target: str, workload: str) -> Measurement | None:
    for measurement in measurements:
        if measurement.target == target and measurement.workload == workload:
            return measurement
    return None


FIGURE_KEYS = ("mb_per_s", "server_cpu_s_per_gib", "server_main_thread_busy", "server_peak_rss_mib",
               "client_cpu_s_per_gib", "other_cpu_s", "backend_cpu_s_per_gib")


def median_figures(rows: list[Measurement]) -> dict[str, float]:
    """The median of each figure over ``rows`` (one target and workload, several runs)."""
    return {key: median([value for m in rows if (value := getattr(m, key)) is not None]) for key in FIGURE_KEYS}


def median_row(target: str, workload: str, figures: dict[str, float]) -> Measurement:
    """A Measurement holding ``median_figures``, for printing with ``format_row``."""
    return Measurement(
        target=target, workload=workload, bytes=0, seconds=0.0, mb_per_s=figures["mb_per_s"],
        server_cpu_s_per_gib=figures["server_cpu_s_per_gib"],
        server_main_thread_busy=figures["server_main_thread_busy"],
        server_peak_rss_mib=figures["server_peak_rss_mib"], server_hwm_mib=None, rss_samples=0,
        client_cpu_s_per_gib=figures["client_cpu_s_per_gib"], other_cpu_s=figures["other_cpu_s"],
        backend_cpu_s_per_gib=figures["backend_cpu_s_per_gib"],
    )
