"""The blocking-call check of ``loop_watch``: the tests' loops are watched, a call that
blocks one is reported by name, and a test run with such a call fails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loop_watch import DEFAULT_THRESHOLD_SECONDS, PLUGIN_NAME, THRESHOLD_VARIABLE, LoopWatch, threshold_from_environment

TESTS = Path(__file__).parent

# How long the deliberate blocking calls below hold the loop, against the threshold
# they set: far enough apart that the machine's load cannot blur them.
_SHORT_THRESHOLD = 0.05
_BLOCK_SECONDS = 0.2


@pytest.fixture
def watch(request: pytest.FixtureRequest) -> LoopWatch:
    plugin = request.config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        pytest.skip(f"the check is off ({THRESHOLD_VARIABLE}=0)")
    assert isinstance(plugin, LoopWatch)
    return plugin


@pytest.mark.both_loops
async def test_the_tests_loops_report_slow_callbacks(watch: LoopWatch) -> None:
    loop = asyncio.get_running_loop()
    assert loop.get_debug()
    assert loop.slow_callback_duration == watch.threshold


@contextlib.contextmanager
def short_threshold(watch: LoopWatch) -> Iterator[None]:
    """The running loop reports callbacks above ``_SHORT_THRESHOLD`` inside the block."""
    loop = asyncio.get_running_loop()
    loop.slow_callback_duration = _SHORT_THRESHOLD
    try:
        yield
    finally:
        loop.slow_callback_duration = watch.threshold


@pytest.mark.both_loops
async def test_a_blocking_task_step_is_reported_by_name(watch: LoopWatch) -> None:
    with short_threshold(watch):
        time.sleep(_BLOCK_SECONDS)  # noqa: ASYNC251 - the blocking call under test
        await asyncio.sleep(0)  # ends the task step: the loop reports it now
    with pytest.raises(pytest.fail.Exception) as failure:
        watch.check("the test")
    message = str(failure.value)
    assert "the event loop was blocked" in message
    assert "test_a_blocking_task_step_is_reported_by_name" in message
    watch.check("the test")  # reported once: the reports were taken


@pytest.mark.both_loops
async def test_a_blocking_callback_is_reported_by_name(watch: LoopWatch) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    with short_threshold(watch):
        loop.call_soon(time.sleep, _BLOCK_SECONDS)
        loop.call_soon(done.set)
        await done.wait()
    reports = watch.take_reports()
    assert any("<Handle sleep" in report for report in reports), reports


def test_threshold_comes_from_the_environment() -> None:
    assert threshold_from_environment({}) == DEFAULT_THRESHOLD_SECONDS
    assert threshold_from_environment({THRESHOLD_VARIABLE: "0.3"}) == 0.3
    assert threshold_from_environment({THRESHOLD_VARIABLE: "0"}) == 0
    with pytest.raises(pytest.UsageError, match=THRESHOLD_VARIABLE):
        threshold_from_environment({THRESHOLD_VARIABLE: "soon"})
    with pytest.raises(pytest.UsageError, match="negative"):
        threshold_from_environment({THRESHOLD_VARIABLE: "-1"})


def test_a_test_run_with_a_blocking_call_fails(tmp_path: Path) -> None:
    """A real pytest run (uvloop and plain asyncio, the suite's settings): the test
    that blocks fails with the report, the one that awaits the same time passes."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import asyncio

        import uvloop


        def pytest_asyncio_loop_factories(config, item):
            return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    """))
    (tmp_path / "test_blocking.py").write_text(textwrap.dedent(f"""
        import asyncio
        import time


        async def test_blocks_the_loop():
            time.sleep({_BLOCK_SECONDS})
            await asyncio.sleep(0)


        async def test_waits_without_blocking():
            await asyncio.sleep({_BLOCK_SECONDS})
    """))
    (tmp_path / "pytest.ini").write_text(textwrap.dedent("""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = function
        asyncio_debug = true
        filterwarnings = error
    """))
    env = dict(os.environ, PYTHONPATH=str(TESTS), **{THRESHOLD_VARIABLE: str(_SHORT_THRESHOLD)})
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "loop_watch", "-p", "no:cacheprovider", "-q", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2 failed, 2 passed" in output, output
    assert f"the event loop was blocked for more than {_SHORT_THRESHOLD:g} s" in output
    assert "FAILED test_blocking.py::test_blocks_the_loop[uvloop]" in output
    assert "FAILED test_blocking.py::test_blocks_the_loop[asyncio]" in output
    assert "coro=<test_blocks_the_loop()" in output
