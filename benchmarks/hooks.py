"""The addon's hooks in-process: CPU per flow of each hook, and a cProfile of the hot path.

No sockets, no mitmdump: mitmproxy's test context (`taddons`) and test flows (`tflow`) carry
the benchmark's chat request (bench_proxy.CHAT) through `request`, `responseheaders` and
`response`, answered as benchmarks/fast_upstream.py answers. What it measures is Cooldown's
own work per flow, the part of the proxy benchmark's gap to bare mitmdump that is ours.

    .venv/bin/python -m benchmarks.hooks                 # µs per hook: median of the quietest batch
    .venv/bin/python -m benchmarks.hooks --profile 30    # plus the 30 busiest functions
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from mitmproxy.test import taddons, tflow, tutils

from cooldown.addon import Cooldown

from .bench_proxy import CHAT, addon_config
from .fast_upstream import BODY, LIMIT

HOST = "127.0.0.1"
UPSTREAM_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"x-ratelimit-limit-requests-day", str(LIMIT).encode()),
    (b"x-ratelimit-limit-tokens-minute", str(LIMIT).encode()),
    (b"x-ratelimit-remaining-requests-day", str(LIMIT).encode()),
    (b"x-ratelimit-remaining-tokens-minute", str(LIMIT).encode()),
    (b"x-ratelimit-reset-requests-day", b"0.000"),
    (b"x-ratelimit-reset-tokens-minute", b"0.000"),
]
REQUEST_BODY = json.dumps(CHAT).encode()
HOOKS = ("request", "responseheaders", "response")
BATCH = 200


def _flow() -> Any:
    f = tflow.tflow()
    f.request.host = HOST
    f.request.port = 80
    f.request.scheme = "http"
    f.request.method = "POST"
    f.request.path = "/v1/chat/completions"
    f.request.headers["authorization"] = "Bearer sk-bench"
    f.request.headers["content-type"] = "application/json"
    f.request.content = REQUEST_BODY
    return f


async def _one_flow(cooldown: Cooldown, timings: dict[str, list[float]] | None) -> None:
    metering, f = cooldown.metering, _flow()
    response = tutils.tresp(content=BODY, headers=UPSTREAM_HEADERS)
    clock: Callable[[], float] = time.thread_time

    start = clock()
    await metering.request(f)
    assert f.response is None, "the benchmark flow was not released at once"
    after_request = clock()
    f.response = response
    metering.responseheaders(f)
    after_headers = clock()
    await metering.response(f)
    end = clock()
    if timings is not None:
        timings["request"].append(after_request - start)
        timings["responseheaders"].append(after_headers - after_request)
        timings["response"].append(end - after_headers)


async def run(flows: int, profile_top: int) -> dict[str, float]:
    cooldown = Cooldown()
    with tempfile.TemporaryDirectory() as workdir, taddons.context(*cooldown.addons) as tctx:
        config = Path(workdir) / "cooldown.yaml"
        config.write_text(yaml.safe_dump(addon_config()))
        tctx.configure(cooldown.settings, cerebras_config=str(config))
        for _ in range(500):  # warm the caches (token counts, host match, per-model limits)
            await _one_flow(cooldown, None)
        # The machine is shared and noisy: the quietest batch says what a hook costs.
        best: dict[str, float] = {}
        for _ in range(max(1, flows // BATCH)):
            timings: dict[str, list[float]] = {hook: [] for hook in HOOKS}
            for _ in range(BATCH):
                await _one_flow(cooldown, timings)
            for hook, values in timings.items():
                best[hook] = min(best.get(hook, float("inf")), statistics.median(values))
        if profile_top:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(flows):
                await _one_flow(cooldown, None)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(profile_top)
    micros = {hook: value * 1e6 for hook, value in best.items()}
    micros["total"] = sum(micros.values())
    return micros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=4000)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP")
    args = parser.parse_args()
    medians = asyncio.run(run(args.flows, args.profile))
    print("  ".join(f"{hook} {value:.0f} µs" for hook, value in medians.items()))


if __name__ == "__main__":
    main()
