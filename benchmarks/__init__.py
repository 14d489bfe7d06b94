"""Benchmarks for tusd-py: load generators, limits and peer comparisons.

Run from the repository root as modules, e.g. ``python -m benchmarks.suite``; see
``benchmarks/README.md``. Nothing here is imported by the server; the tests only run the
suite's tiny mode as a subprocess (``tests/test_benchmark_suite.py``).
"""
