"""The benchmarks' process accounting counts a supervisor's workers
(``server.workers`` > 1): CPU and RSS of the child processes are the server's too."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from benchmarks.accounting import ProcessMonitor, process_tree

MiB = 1024 * 1024

_CHILD = textwrap.dedent("""
    import sys, time
    print("ready", flush=True)
    sys.stdin.readline()                    # the monitor is running
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
    ballast = bytearray(64 * 1024 * 1024)   # touched: resident
    print("done", flush=True)
    sys.stdin.readline()                    # the monitor has stopped
""")

_PARENT = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {_CHILD!r}]))"


def test_cpu_and_rss_of_a_supervisors_workers_count() -> None:
    with subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as parent:
        assert parent.stdin is not None and parent.stdout is not None
        try:
            assert parent.stdout.readline() == "ready\n"
            tree = process_tree(parent.pid)
            assert len(tree) == 2 and tree[0] == parent.pid
            with ProcessMonitor(parent.pid) as monitor:
                parent.stdin.write("go\n")
                parent.stdin.flush()
                assert parent.stdout.readline() == "done\n"
            parent.stdin.write("stop\n")
            parent.stdin.flush()
            assert parent.wait(timeout=30) == 0
        finally:
            parent.kill()
    usage = monitor.usage
    assert usage is not None
    # The parent only waits: nearly all of this is the child's busy loop.
    assert usage.cpu_seconds >= 0.25
    assert usage.peak_rss_bytes >= 64 * MiB
    assert usage.hwm_bytes is None  # per process: not a peak of the sum
