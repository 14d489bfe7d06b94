"""``benchmarks.phases``: each py-spy sample goes to the phase of its innermost tusd_py
frame, and the shares come out of py-spy's raw format."""

from __future__ import annotations

from benchmarks.phases import PHASES, phase_of, phase_shares

LOOP = ["_run_module_as_main (<frozen runpy>:198)", "_run_worker (/x/tusd_py/cli.py:421)"]


def test_innermost_tusd_py_frame_decides() -> None:
    handler = [*LOOP, "TusHandler._dispatch (/x/tusd_py/tus/handler.py:238)"]
    assert phase_of(handler) == "tus"
    assert phase_of([*handler, "dumps (json/__init__.py:231)"]) == "tus"
    assert phase_of([*handler, "MemoryLocker._acquire (/x/tusd_py/lockers/memory.py:95)"]) == "lock"
    assert phase_of([*handler, "ResponseWriter.write (/x/tusd_py/http/response.py:151)"]) == "respond"
    assert phase_of([*LOOP, "parse_simple_head (/x/tusd_py/http/head.py:66)"]) == "parse"
    assert phase_of([*LOOP, "WorkerCall.__init__ (/x/tusd_py/http/handoff.py:56)"]) == "body"


def test_loop_threads_logging_and_metrics() -> None:
    assert phase_of(LOOP) == "event loop"
    assert phase_of(["Thread._bootstrap (threading.py:1002)", "fsync (/x/tusd_py/stores/file.py:241)"]) == (
        "worker threads")
    assert phase_of([*LOOP, "TusHandler._post (/x/tusd_py/tus/handler.py:294)",
                     "Logger.info (/usr/lib/python3.11/logging/__init__.py:1489)"]) == "log"
    assert phase_of([*LOOP, "Metrics.observe (/x/tusd_py/metrics.py:90)",
                     "Histogram.observe (/site-packages/prometheus_client/metrics.py:667)"]) == "metrics"


def test_shares_count_samples() -> None:
    raw = "\n".join([
        ";".join([*LOOP, "parse_simple_head (/x/tusd_py/http/head.py:66)"]) + " 3",
        ";".join(LOOP) + " 1",
        "",
    ])
    shares = phase_shares(raw)
    assert set(shares) == set(PHASES)
    assert shares["parse"] == 0.75 and shares["event loop"] == 0.25
