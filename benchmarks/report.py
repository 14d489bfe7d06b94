"""Rows, medians, ratios, the Markdown table and the plot of the benchmark suite.

Every measurement of every workload becomes a ``Row`` with one primary figure (MB/s,
requests per second, or MiB of RSS) and the same cost columns, so one table and one
plot cover throughput, request rate and memory workloads alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import median

# Units of the primary figure. For RSS, lower is better; for the others, higher.
MB_PER_S = "MB/s"
REQUESTS_PER_S = "req/s"
RSS_MIB = "MiB"

TUSD_PY = "tusd-py"
PEER = "peer"


@dataclass
class Row:
    """One target taking one workload once (or, after ``medians``, the median of runs)."""

    store: str
    """"file" or "s3": which tusd-py store, and which peer store, the row is about."""
    workload: str
    target: str
    """"tusd-py", "peer", or a limit ("loopback", "disk", "limit")."""
    run: int
    value: float
    """The primary figure, in ``unit``."""
    unit: str
    server_cpu: float | None = None
    """Server CPU per unit of work: seconds per GiB, microseconds per request, or seconds
    for the whole idle workload (``cpu_unit`` says which)."""
    cpu_unit: str = "s/GiB"
    client_cpu: float | None = None
    """The harness's CPU (client, sampler thread) in ``cpu_unit``: shows the client was
    not the bottleneck."""
    peak_rss_mib: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_per_idle_kib: float | None = None
    """RSS each idle keep-alive connection added (workload 5)."""
    rss_per_slow_kib: float | None = None
    """RSS each slow upload added on top of the idle connections (workload 5)."""
    backend_cpu: float | None = None
    """moto's CPU (s/GiB) on the S3 workloads."""
    other_cpu_s: float = 0.0

    @property
    def lower_is_better(self) -> bool:
        return self.unit == RSS_MIB


_NUMERIC = ("value", "server_cpu", "client_cpu", "peak_rss_mib", "p50_ms", "p99_ms", "rss_per_idle_kib",
            "rss_per_slow_kib", "backend_cpu", "other_cpu_s")


def _key(row: Row) -> tuple[str, str, str]:
    return row.store, row.workload, row.target


def medians(rows: Iterable[Row]) -> list[Row]:
    """One row per (store, workload, target): the median of each figure over runs, in
    the order the rows were first measured. ``run`` becomes the number of runs."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)
    result = []
    for group in groups.values():
        first = group[0]
        values = {}
        for name in _NUMERIC:
            present = [v for row in group if (v := getattr(row, name)) is not None]
            values[name] = median(present) if present else None
        result.append(Row(store=first.store, workload=first.workload, target=first.target, run=len(group),
                          unit=first.unit, cpu_unit=first.cpu_unit, **values))  # type: ignore[arg-type]
    return result


@dataclass
class Target:
    """A goal a workload's ratio is checked against (from the issues and DESIGN.md)."""

    ratio: str
    """"limit" or "peer": which ratio the goal is about."""
    minimum: float
    text: str


@dataclass
class Ratio:
    """Median over runs of tusd-py's primary figure divided by a reference's, each
    quotient taken within one run (same machine state)."""

    store: str
    workload: str
    unit: str
    over_limit: float | None
    over_peer: float | None
    per_run_limit: list[float]
    per_run_peer: list[float]
    targets: list[Target]

    def met(self, target: Target) -> bool | None:
        value = self.over_limit if target.ratio == "limit" else self.over_peer
        return None if value is None or math.isnan(value) else value >= target.minimum


def ratios(rows: Sequence[Row], limits: dict[str, Sequence[str]], targets: dict[tuple[str, str], list[Target]],
           ) -> list[Ratio]:
    """tusd-py / limit and tusd-py / peer per (store, workload), medians of per-run ratios.

    ``limits[store]`` names the limit targets; with several (loopback and disk), the
    binding one is the slower (or, for RSS, the smaller). For RSS the ratio is inverted
    (reference / tusd-py), so above 1 always means tusd-py did better.
    """
    order: list[tuple[str, str]] = []
    by_run: dict[tuple[str, str, int], dict[str, Row]] = {}
    for row in rows:
        if (row.store, row.workload) not in order:
            order.append((row.store, row.workload))
        by_run.setdefault((row.store, row.workload, row.run), {})[row.target] = row
    result = []
    for store, workload in order:
        over_limit: list[float] = []
        over_peer: list[float] = []
        unit = ""
        for (row_store, row_workload, _run), targets_of_run in by_run.items():
            if (row_store, row_workload) != (store, workload) or TUSD_PY not in targets_of_run:
                continue
            tusd = targets_of_run[TUSD_PY]
            unit = tusd.unit
            limit_rows = [targets_of_run[name] for name in limits.get(store, ()) if name in targets_of_run]
            if limit_rows:
                if tusd.lower_is_better:
                    over_limit.append(min(r.value for r in limit_rows) / tusd.value)
                else:
                    over_limit.append(tusd.value / min(r.value for r in limit_rows))
            if PEER in targets_of_run:
                peer = targets_of_run[PEER]
                over_peer.append(peer.value / tusd.value if tusd.lower_is_better else tusd.value / peer.value)
        result.append(Ratio(store=store, workload=workload, unit=unit,
                            over_limit=median(over_limit) if over_limit else None,
                            over_peer=median(over_peer) if over_peer else None,
                            per_run_limit=over_limit, per_run_peer=over_peer,
                            targets=targets.get((store, workload), [])))
    return result


# --- Markdown -------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _value(row: Row) -> str:
    return f"{_fmt(row.value, 0 if row.unit != RSS_MIB else 1)} {row.unit}"


def figures_table(rows: Sequence[Row]) -> str:
    """The medians as a Markdown table, one line per (store, workload, target)."""
    lines = [
        "| store | workload | target | result | srv CPU | client CPU | peak RSS MiB | p50 / p99 ms "
        "| RSS KiB per idle / slow conn | moto CPU s/GiB | other CPU s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        latency = "-" if row.p50_ms is None else f"{_fmt(row.p50_ms, 1)} / {_fmt(row.p99_ms, 1)}"
        per_connection = ("-" if row.rss_per_idle_kib is None
                          else f"{_fmt(row.rss_per_idle_kib, 1)} / {_fmt(row.rss_per_slow_kib, 1)}")
        cpu = "-" if row.server_cpu is None else f"{_fmt(row.server_cpu)} {row.cpu_unit}"
        client = "-" if row.client_cpu is None else f"{_fmt(row.client_cpu)} {row.cpu_unit}"
        lines.append(
            f"| {row.store} | {row.workload} | {row.target} | {_value(row)} | {cpu} | {client} "
            f"| {_fmt(row.peak_rss_mib, 1)} | {latency} | {per_connection} "
            f"| {_fmt(row.backend_cpu)} | {_fmt(row.other_cpu_s, 1)} |"
        )
    return "\n".join(lines)


def ratios_table(items: Sequence[Ratio]) -> str:
    """tusd-py / limit and tusd-py / peer per workload, with the goals and whether they were met."""
    lines = [
        "| store | workload | tusd-py / limit | tusd-py / peer | runs (limit; peer) | goal |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for item in items:
        goals = []
        for target in item.targets:
            met = item.met(target)
            verdict = "n/a" if met is None else ("met" if met else "**missed**")
            goals.append(f"{target.text}: {verdict}")
        runs = (", ".join(f"{v:.2f}" for v in item.per_run_limit) or "-") + "; " + (
            ", ".join(f"{v:.2f}" for v in item.per_run_peer) or "-")
        lines.append(f"| {item.store} | {item.workload} | {_fmt(item.over_limit)} | {_fmt(item.over_peer)} "
                     f"| {runs} | {'; '.join(goals) or '-'} |")
    return "\n".join(lines)


# --- plot -----------------------------------------------------------------------------------

_COLORS = {TUSD_PY: "#1f77b4", PEER: "#ff7f0e"}
_LIMIT_COLOR = "#7f7f7f"


def plot(rows: Sequence[Row], path: Path, title: str, peer_label: str = PEER) -> None:
    """One bar chart per (store, workload) of the median primary figure of each target;
    the peer's bar is labelled ``peer_label`` (e.g. "@tus/server 2.4.5").

    Request-rate panels leave the limit out of the bars and name its figure in the
    title: a loopback sink answers ~100k req/s, a scale on which tusd-py and the peer
    (a few thousand) cannot be told apart."""
    import matplotlib

    # Agg: no display on servers and in CI; must be chosen before pyplot is imported.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str]] = []
    for row in rows:
        if (row.store, row.workload) not in panels:
            panels.append((row.store, row.workload))
    columns = min(4, max(1, len(panels)))
    lines = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    for index, (store, workload) in enumerate(panels):
        axis = axes[index // columns][index % columns]
        panel_rows = [r for r in rows if (r.store, r.workload) == (store, workload)]
        subtitle = ""
        if panel_rows[0].unit == REQUESTS_PER_S:
            limits = [r for r in panel_rows if r.target not in (TUSD_PY, PEER)]
            if len(limits) < len(panel_rows):
                panel_rows = [r for r in panel_rows if r.target in (TUSD_PY, PEER)]
                subtitle = "".join(f"\n{r.target} {_fmt(r.value, 0)} {r.unit} (not drawn)" for r in limits)
        names = [peer_label if r.target == PEER else r.target for r in panel_rows]
        values = [r.value for r in panel_rows]
        colors = [_COLORS.get(r.target, _LIMIT_COLOR) for r in panel_rows]
        bars = axis.bar(names, values, color=colors)
        axis.bar_label(bars, labels=[_fmt(v, 0 if panel_rows[0].unit != RSS_MIB else 1) for v in values],
                       fontsize=8)
        better = "lower is better" if panel_rows[0].lower_is_better else "higher is better"
        axis.set_title(f"{store}: {workload}{subtitle}", fontsize=9)
        axis.set_ylabel(f"{panel_rows[0].unit} ({better})", fontsize=8)
        axis.tick_params(axis="x", labelsize=8, labelrotation=20)
        axis.tick_params(axis="y", labelsize=8)
    for index in range(len(panels), lines * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

