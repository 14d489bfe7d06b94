"""Benchmarks for tusd-py: load generators, limits and peer comparisons.

Run from the repository root as modules, e.g. ``python -m benchmarks.ingest``; see
``benchmarks/README.md``. Nothing here is imported by the server or by the tests.
"""
