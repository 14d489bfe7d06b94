"""The blocking-call check of ``loop_watch``: a call that blocks a test loop is
reported with the line it was blocked in, a stopped loop is not mistaken for a
blocked one, and a test run with a blocking call fails."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from loop_watch import (
    DEFAULT_THRESHOLD_SECONDS,
    PLUGIN_NAME,
    THRESHOLD_VARIABLE,
    LoopFactory,
    LoopWatch,
    threshold_from_environment,
)

TESTS = Path(__file__).parent

# How long the deliberate blocking calls below hold the loop, against the threshold
# they set: far enough apart that the machine's load cannot blur them.
_SHORT_THRESHOLD = 0.05
_BLOCK_SECONDS = 0.3

LOOPS: dict[str, LoopFactory] = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture
def short_watch() -> Iterator[LoopWatch]:
    """A watch of its own with a short threshold (the suite's stays untouched)."""
    watch = LoopWatch(_SHORT_THRESHOLD)
    watch.start()
    yield watch
    watch.stop()


def _block_the_loop() -> None:
    time.sleep(_BLOCK_SECONDS)


async def _blocking_step() -> None:
    _block_the_loop()
    await asyncio.sleep(0)


def _run(watch: LoopWatch, factory: LoopFactory, coroutine_function: object) -> None:
    loop = watch.watched(factory)()
    try:
        loop.run_until_complete(coroutine_function())  # type: ignore[operator]
    finally:
        loop.close()


def test_the_suite_watches_its_loops(request: pytest.FixtureRequest) -> None:
    plugin = request.config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        pytest.skip(f"the check is off ({THRESHOLD_VARIABLE}=0)")
    assert isinstance(plugin, LoopWatch)
    assert plugin.threshold == threshold_from_environment()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_blocking_task_step_is_reported_with_its_line(short_watch: LoopWatch, loop_name: str) -> None:
    _run(short_watch, LOOPS[loop_name], _blocking_step)
    with pytest.raises(pytest.fail.Exception) as failure:
        short_watch.check("the test")
    message = str(failure.value)
    assert "the event loop was blocked" in message
    assert "in _block_the_loop" in message and "in _blocking_step" in message, message
    short_watch.check("the test")  # reported once: the reports were taken


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_blocking_callback_is_reported(short_watch: LoopWatch, loop_name: str) -> None:
    async def schedule_blocking_callback() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        loop.call_soon(_block_the_loop)
        loop.call_soon(done.set)
        await done.wait()

    _run(short_watch, LOOPS[loop_name], schedule_blocking_callback)
    reports = short_watch.take_reports()
    assert len(reports) == 1 and "in _block_the_loop" in reports[0], reports


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_stopped_loop_is_not_blocked(short_watch: LoopWatch, loop_name: str) -> None:
    """pytest-asyncio runs a test's loop only while a coroutine runs: the time between
    (sync fixtures, pytest's own work) is no block, however long."""
    loop = short_watch.watched(LOOPS[loop_name])()
    try:
        loop.run_until_complete(asyncio.sleep(_SHORT_THRESHOLD))
        time.sleep(_BLOCK_SECONDS)  # the loop is not running
        loop.run_until_complete(asyncio.sleep(_SHORT_THRESHOLD * 4))
    finally:
        loop.close()
    assert short_watch.take_reports() == []


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
    assert "in test_blocks_the_loop" in output
