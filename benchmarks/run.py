#!/usr/bin/env python3
"""Run Cooldown's benchmarks: `.venv/bin/python benchmarks/run.py [--quick] [--only NAME...]`.

Every figure is printed beside the baseline it was compared with in the same run (figures on a
shared, noisy 2-core machine are only meaningful as ratios), and all of it is written to a JSON
file (default benchmarks/results/quick.json or full.json) plus a Markdown table beside it.
Missing a target does not fail the run: the exit status is 1 only if a benchmark crashed.
Benchmarks: core, estimate, proxy, memory, saturation, fullspeed, hostile, cache, policies,
shared
(see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `cooldown` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "addon"))

from benchmarks import (
    bench_cache,
    bench_core,
    bench_estimate,
    bench_fullspeed,
    bench_hostile,
    bench_memory,
    bench_policies,
    bench_proxy,
    bench_saturation,
    bench_shared,
)
from benchmarks.common import (
    REPO,
    BenchResult,
    Figure,
    machine_info,
    print_table,
    raise_nofile,
)
from benchmarks.context import Context

BENCHMARKS = {
    "core": bench_core.run,
    "estimate": bench_estimate.run,
    "proxy": bench_proxy.run,
    "memory": bench_memory.run,
    "saturation": bench_saturation.run,
    "fullspeed": bench_fullspeed.run,
    "hostile": bench_hostile.run,
    "cache": bench_cache.run,
    "policies": bench_policies.run,
    "shared": bench_shared.run,
}


def git_state() -> dict[str, object]:
    """Which code was measured (read-only git queries)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except OSError:
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": [line for line in git("status", "--porcelain").splitlines() if line],
    }


def markdown(results: list[BenchResult], meta: dict[str, object]) -> str:
    lines = [
        f"Run: `{meta['command']}` on {meta['machine']['date']}, "  # type: ignore[index]
        f"{meta['seconds']:.0f} s",
        "",
        "| benchmark | figure | value | baseline (same run) | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if result.error:
            lines.append(f"| {result.name} | **crashed**: {result.error.splitlines()[-1]} |||||| ")
        for figure in result.figures:
            cells = [c.replace("|", "\\|") for c in figure.row()]
            lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    notes = [f"- {r.name} / {f.name}: {f.note}" for r in results for f in r.figures if f.note]
    # A benchmark may add its own tables (details["markdown"]), e.g. one row per path.
    extra = [
        f"\n### {r.name}\n\n{r.details['markdown']}"
        for r in results
        if isinstance(r.details.get("markdown"), str)
    ]
    return "\n".join([*lines, "", *notes, *extra, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 4 minutes)")
    parser.add_argument(
        "--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME", help="run only these"
    )
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy profiles even where targets are met"
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and configs here")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only re-write the Markdown table of a results file",
    )
    args = parser.parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text(encoding="utf-8"))
        loaded = []
        for raw in data.pop("results"):
            figures = [Figure(**f) for f in raw.pop("figures")]
            loaded.append(BenchResult(**raw, figures=figures))
        args.render.with_suffix(".md").write_text(markdown(loaded, data), encoding="utf-8")
        return 0

    out = args.out or REPO / "benchmarks" / "results" / (
        "quick.json" if args.quick else "full.json"
    )
    nofile = raise_nofile(30_000)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cooldown-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(quick=args.quick, workdir=workdir, profile=args.profile)
    names = args.only or list(BENCHMARKS)
    meta: dict[str, object] = {
        "command": " ".join(["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine_info(),
        "git": git_state(),
        "nofile": nofile,
        "workdir": str(workdir),
    }
    print(f"Cooldown benchmarks ({'quick' if args.quick else 'full'}): {', '.join(names)}")
    print(f"logs and configs in {workdir}")
    started = time.monotonic()
    results: list[BenchResult] = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.monotonic()
        try:
            result = BENCHMARKS[name](ctx)
        except Exception:
            result = BenchResult(name, name, error=traceback.format_exc())
            print(result.error, file=sys.stderr)
        result.seconds = time.monotonic() - t0
        results.append(result)
        print(f"{result.title} ({result.seconds:.0f} s)")
        print_table(result)
        sys.stdout.flush()
    meta["seconds"] = time.monotonic() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=2, default=str)
        + "\n",
        encoding="utf-8",
    )
    out.with_suffix(".md").write_text(markdown(results, meta), encoding="utf-8")
    missed = [(r.name, f.name) for r in results for f in r.figures if f.met is False]
    print(f"\nDone in {meta['seconds']:.0f} s; results in {out} and {out.with_suffix('.md')}")
    if missed:
        print("Targets not met: " + "; ".join(f"{b}: {f}" for b, f in missed))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
