"""Performance regression check that is robust to noise: operation counts, never absolute times.

A release decision must stay O(log n) in the number of held requests. With 10,000 held, one
decision cycle (settle one, release one, submit one; see tools/core_harness.py) must do the same
small, constant number of heap operations, limiter calls and Python-level function calls as
with 100 held: an O(n) scan sneaking into the decision path (iterating the held tickets,
rebuilding a heap, sorting) shows up as thousands of extra calls per decision. The counts are
deterministic (fixed seed, fake clock), so the slack only has to absorb amortized compaction.

The timing ratio (10,000 vs 100 held) is checked too, with generous slack and the best of
several interleaved repeats, as a second line of defence for O(n) work done inside C calls.
Full figures: `.venv/bin/python benchmarks/run.py --only core` (docs/benchmarks.md).
"""

from __future__ import annotations

from tools.core_harness import count_operations, time_core

CYCLES = 1_000


def test_operations_per_decision_do_not_grow_with_the_queue():
    small = count_operations(100, CYCLES).per_decision
    large = count_operations(10_000, CYCLES).per_decision
    assert large["heap.total_ops"] <= 6, large
    assert large.get("heap.heapify_elements", 0.0) <= 3, large  # amortized compaction only
    assert large["limiter.total_calls"] <= 40, large
    assert large["python_calls"] <= 300, large
    # 10,000 held must not cost more operations per decision than 100 held (+ slack).
    for name in ("heap.total_ops", "limiter.total_calls", "python_calls", "c_calls"):
        assert large[name] <= small[name] * 1.5 + 2, (name, small[name], large[name])


def test_decision_time_ratio_10000_vs_100_held():
    best = time_core([100, 10_000], cycles=1_000, repeats=5)
    ratio = best[10_000].cpu_seconds_per_decision / best[100].cpu_seconds_per_decision
    assert ratio < 5, f"a decision with 10,000 held costs {ratio:.1f}x one with 100 held"
