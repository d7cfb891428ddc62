"""Cooldown's benchmark suite: `.venv/bin/python benchmarks/run.py [--quick] [--only NAME...]`.

Not part of the test run's pass/fail; see docs/benchmarks.md. `tests/test_perf_regression.py`
reuses `tools.core_harness`, the decision cycle the core benchmark measures, for a
noise-robust operation-count check.
"""
