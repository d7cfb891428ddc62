"""Benchmark 1: cost of a release decision with 1, 100 and 10,000 held requests."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tools.core_harness import count_operations, time_core, time_gate

from .common import REPO, BenchResult, Figure
from .context import Context

SIZES = [1, 100, 10_000]
TARGET_RATE = 50_000  # decisions per second with 10,000 held
MAX_LOG_RATIO = 2.0  # 10,000 vs 1 held: log2(10,000) ~ 13, so "logarithmic" is far below 13x


def _instructions(held: int, cycles: int) -> int | None:
    """Instructions executed (valgrind cachegrind; deterministic) for setup + `cycles`."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "tools.core_harness",
        str(held),
        str(cycles),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    match = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    return int(match.group(1).replace(",", "")) if match else None


def run(ctx: Context) -> BenchResult:
    result = BenchResult("core", "Core decisions: scheduler + limiter with N held")
    cycles = int(ctx.pick(5_000, 20_000))
    repeats = int(ctx.pick(5, 9))
    core = time_core(SIZES, cycles, repeats)
    gate = time_gate(SIZES, cycles // 2, repeats)
    base = core[1].seconds_per_decision
    gate_base = gate[1].seconds_per_decision
    for n in SIZES:
        t = core[n]
        result.add(
            Figure(
                f"core: decisions/s, {n:,} held",
                1 / t.seconds_per_decision,
                "/s",
                1 / base,
                "1 held",
                t.seconds_per_decision / base,
                f">= {TARGET_RATE:,}/s" if n == 10_000 else "",
                (1 / t.seconds_per_decision >= TARGET_RATE) if n == 10_000 else None,
                note=(
                    f"{t.seconds_per_decision * 1e6:.1f} us/decision wall, "
                    f"{t.cpu_seconds_per_decision * 1e6:.1f} us CPU (best of {repeats})"
                )
                if n == 10_000
                else "",
            )
        )
    ratio = core[10_000].seconds_per_decision / base
    result.add(
        Figure(
            "core: time per decision, 10,000 vs 1 held",
            ratio,
            "x",
            target=f"<= {MAX_LOG_RATIO:g}x (log2 ratio would be {math.log2(10_000):.1f}x)",
            met=ratio <= MAX_LOG_RATIO,
        )
    )
    result.add(
        Figure(
            "core: time per decision, 10,000 vs 100 held",
            core[10_000].seconds_per_decision / core[100].seconds_per_decision,
            "x",
        )
    )
    for n in SIZES:
        t = gate[n]
        result.add(
            Figure(
                f"gate (event loop, timer): decisions/s, {n:,} held",
                1 / t.seconds_per_decision,
                "/s",
                1 / gate_base,
                "1 held",
                t.seconds_per_decision / gate_base,
            )
        )
    counts = {n: count_operations(n, int(ctx.pick(2_000, 5_000))) for n in SIZES}
    base_calls = counts[1].per_decision["python_calls"]
    for n in SIZES:
        per = counts[n].per_decision
        result.add(
            Figure(
                f"Python function calls per decision, {n:,} held (deterministic)",
                per["python_calls"],
                "",
                base_calls,
                "1 held",
                per["python_calls"] / base_calls,
                note=(
                    f"heap ops {per['heap.total_ops']:.2f} "
                    f"(+{per.get('heap.heapify_elements', 0):.2f} elements re-heapified, "
                    f"amortized), limiter calls {per['limiter.total_calls']:.1f}, "
                    f"C calls {per['c_calls']:.1f}"
                ),
            )
        )
    result.details["timing_core"] = {
        n: {
            "us_per_decision": core[n].seconds_per_decision * 1e6,
            "cpu_us_per_decision": core[n].cpu_seconds_per_decision * 1e6,
            "decisions_timed": core[n].decisions,
        }
        for n in SIZES
    }
    result.details["timing_gate"] = {
        n: {
            "us_per_decision": gate[n].seconds_per_decision * 1e6,
            "cpu_us_per_decision": gate[n].cpu_seconds_per_decision * 1e6,
        }
        for n in SIZES
    }
    result.details["operation_counts"] = {n: counts[n].per_decision for n in SIZES}
    result.details["cycles_per_repeat"] = cycles
    result.details["repeats"] = repeats

    if shutil.which("valgrind"):
        vg_cycles = int(ctx.pick(600, 3_000))
        jobs = [(n, c) for n in SIZES for c in (0, vg_cycles)]
        with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two valgrinds at a time
            counted = dict(zip(jobs, pool.map(lambda job: _instructions(*job), jobs), strict=True))
        instructions = {}
        for n in SIZES:
            setup, total = counted[(n, 0)], counted[(n, vg_cycles)]
            if setup is not None and total is not None:
                instructions[n] = (total - setup) / vg_cycles
        result.details["instructions_per_decision"] = instructions
        if 1 in instructions:
            for n in SIZES:
                if n in instructions:
                    result.add(
                        Figure(
                            f"instructions/decision (cachegrind), {n:,} held",
                            instructions[n],
                            "",
                            instructions[1],
                            "1 held",
                            instructions[n] / instructions[1],
                        )
                    )
    else:
        result.details["instructions_per_decision"] = "valgrind not installed"
    return result
