"""Addon cost on one CPU, side by side: bare mitmdump against one or more Cooldown scripts.

    .venv/bin/python -m benchmarks.together                       # this checkout's addon
    git worktree add /tmp/base <commit>
    .venv/bin/python -m benchmarks.together --script /tmp/base/addon/cerebras.py --rounds 4
    .venv/bin/python -m benchmarks.together --stub metering --stub answered  # parts' cost

Each round loads bare mitmdump and one addon variant at the same time, both pinned to the
same CPU (benchmark 3's headline phase, `bench_proxy.together_on_one_cpu`), so each ratio is
"addon throughput / bare throughput" under identical conditions; variants alternate between
rounds. An empty addon with the same hooks (`noop_addon.py`) is one of the variants: it shows
what mitmproxy charges for calling a script's hooks at all. Prints the median ratio per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .bench_proxy import CHAT, NOOP_ADDON, addon_config, together_on_one_cpu
from .common import HOST, build_request, start_fast_upstream, start_mitmdump

PARTIAL_ADDON = Path(__file__).with_name("partial_addon.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--script", action="append", default=[], help="another addon script to compare"
    )
    parser.add_argument(
        "--stub",
        action="append",
        default=[],
        metavar="PARTS",
        help="also this addon without PARTS (comma-separated, see benchmarks/partial_addon.py)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="together-")))
        upstream, port = start_fast_upstream(work)
        stack.enter_context(upstream)
        config = work / "cooldown.yaml"
        config.write_text(yaml.safe_dump(addon_config()), encoding="utf-8")

        # Each process is stopped on the way out as soon as it has started, even when a later
        # one fails to.
        def started(name: str, **kwargs: Any) -> Any:
            return stack.enter_context(start_mitmdump(work, name, **kwargs))

        variants = {
            "this addon": started("this", addon_config=addon_config()),
            "empty addon": started("noop", addon_config=None, extra=["-s", str(NOOP_ADDON)]),
        }
        for i, script in enumerate(args.script):
            variants[script] = started(
                f"other-{i}",
                addon_config=None,
                # (mitmdump runs in the work directory: a relative path is the caller's)
                extra=["-s", str(Path(script).resolve()), "--set", f"cerebras_config={config}"],
            )
        for i, parts in enumerate(args.stub):
            variants[f"this addon without {parts}"] = started(
                f"stub-{i}",
                addon_config=None,
                extra=["-s", str(PARTIAL_ADDON), "--set", f"cerebras_config={config}"],
                env={"COOLDOWN_BENCH_STUB": parts},
            )
        bare = started("bare", addon_config=None)
        request = build_request(
            "POST",
            f"http://{HOST}:{port}/v1/chat/completions",
            f"{HOST}:{port}",
            json.dumps(CHAT).encode(),
            {"Content-Type": "application/json"},
        )
        together_on_one_cpu({"bare": bare, **variants}, request, 2.0, (upstream.pid,))  # warm
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            names = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
            for name in names:
                pair = {"bare": bare, name: variants[name]}
                counts = together_on_one_cpu(pair, request, args.seconds, (upstream.pid,))
                ratios[name].append(counts[name]["rps"] / counts["bare"]["rps"])
        for name, values in ratios.items():
            rounds = ", ".join(f"{v:.3f}" for v in values)
            print(f"{name}: {statistics.median(values):.3f} of bare (rounds {rounds})")


if __name__ == "__main__":
    main()
