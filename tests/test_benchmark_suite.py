"""Smoke test of the benchmark suite: the one command runs end to end and writes its report.

Runs ``python -m benchmarks.suite --tiny --stores file`` (a few MiB, a handful of
connections) against the real tusd-py file store, the sink and the disk limit, and the
peer (@tus/server) when it is installed. No timing is asserted: timed numbers belong to
the benchmarks, not to tests (DESIGN.md, "Performance method").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_INSTALLED = (REPO_ROOT / "benchmarks" / "peers" / "node_modules" / "@tus" / "server").is_dir()

# Rows the tiny file-store run must produce: (workload, target).
EXPECTED_WORKLOADS = [
    "1x16MiB", "2x8MiB", "16x1MiB", "8 concurrent x 1MiB", "HEAD rate, 4 conns", "POST rate, 4 conns",
    "20 idle + 4 slow (100KiB/s)",
]


def _peer_arguments() -> list[str]:
    """Run the peer when it is installed; skip it locally when not, but never in CI,
    where .ci/run installs it and a missing peer is a broken setup."""
    if PEER_INSTALLED:
        return []
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but benchmarks/peers/node_modules is missing: run npm install --prefix benchmarks/peers")
    return ["--no-peer"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tiny_suite_writes_table_and_plot(tmp_path: Path) -> None:
    peer_arguments = _peer_arguments()
    out = tmp_path / "results"
    # A subprocess, as a user runs it: the suite starts servers, runs its own event
    # loops and imports matplotlib, none of which should leak into pytest.
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--tiny", "--stores", "file", "--out", str(out), *peer_arguments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=220,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    table = (out / "results.md").read_text()
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert (out / "results.json").is_file()
    assert "## Failures" not in table

    targets = ["tusd-py", "loopback"] + ([] if peer_arguments else ["peer"])
    for workload in EXPECTED_WORKLOADS:
        for target in targets:
            assert f"| file | {workload} | {target} |" in table, (workload, target)
        # One figures line per target (plus the disk limit on uploads) and one ratios line.
        assert sum(line.startswith(f"| file | {workload} |") for line in table.splitlines()) == len(targets) + (
            1 if workload.startswith(("1x", "2x", "16x")) else 0) + 1, workload
    assert "| file | 1x16MiB | disk |" in table
    # Progress went to stderr, one line per step with elapsed time and ETA.
    assert "elapsed, ETA" in completed.stderr
