"""Benchmark 3: what the addon adds to mitmproxy's own cost, side by side with bare mitmdump.

One fast local upstream (benchmarks/fast_upstream.py, a separate process) answers a fixed chat
completion with `usage` and `x-ratelimit-*` headers. Two mitmdump processes run at once: bare,
and with `-s addon/cerebras.py` configured to meter plain-HTTP requests to 127.0.0.1
(`cerebras_hosts: ["127.0.0.1"]`, no `cerebras_upstream`) with limits far above the load, so
every request is parsed, estimated, reserved, released at once, confirmed at the response
headers and settled from `usage`. Both get the same workload: plain-HTTP absolute-form
`POST http://127.0.0.1:PORT/v1/chat/completions` (a ~100-token chat body) over keep-alive
connections from a cheap pre-built-request client. A third mitmdump runs an empty addon with
the same hooks (benchmarks/noop_addon.py), to split what mitmproxy charges for calling a
script's hooks from what Cooldown's own work costs. Plain HTTP on both sides keeps TLS out of
the comparison (it would cost the same in both and blur the addon's share).

The headline figure loads bare and addon mitmdump at the same time, both pinned to one CPU
(the load generator and the upstream on the other): they compete for that CPU, so the ratio of
their throughputs is the ratio of their CPU cost per request, and whatever else the machine is
doing hits both alike. Then runs alternate A B A B ...: in each round, a closed-loop
throughput phase (C connections for a fixed time; mitmdump's CPU time per request from /proc)
and a light-load latency phase (one connection, sequential requests). Latency straight to the
upstream is measured too, as the floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .common import (
    HOST,
    BenchResult,
    Figure,
    RawConnection,
    build_request,
    cpu_seconds,
    percentile,
    start_fast_upstream,
    start_mitmdump,
)
from .context import Context
from .profiling import render, start_record, summarize

NOOP_ADDON = Path(__file__).resolve().parent / "noop_addon.py"

TARGET_THROUGHPUT_RATIO = 0.87  # issue 12: CPU per request <= 1.15 x bare mitmdump
TARGET_ADDED_P50_MS = 2.0
CONNECTIONS = 8

CHAT = {
    "model": "llama3.1-8b",
    "messages": [
        {"role": "system", "content": "You are a terse assistant."},
        {
            "role": "user",
            "content": "Summarize in one sentence why a proxy should hold requests instead of "
            "letting clients retry after a 429, considering token buckets, per-model limits, "
            "fairness between small and large requests, and what the client sees meanwhile.",
        },
    ],
    "max_completion_tokens": 100,
}


def addon_config() -> dict[str, Any]:
    return {
        "cerebras_hosts": [HOST],
        "cerebras_limits": {
            "rpm_limit": 10**9,
            "tpm_limit": 10**12,
            "max_queue_depth": 100_000,
            "request_timeout": "10m",
        },
    }


def _percentile(values: list[float], q: float) -> float:
    """A percentile of latencies the phase did measure (it always measures some)."""
    value = percentile(values, q)
    if value is None:
        raise RuntimeError("no latency measured")
    return value


async def closed_loop(port: int, request: bytes, connections: int, seconds: float) -> dict:
    """`connections` keep-alive clients, each sending its next request as soon as answered."""
    deadline = time.perf_counter() + seconds
    counts: dict[str, float] = {"ok": 0, "errors": 0}

    async def worker() -> None:
        conn = await RawConnection.open(port)
        try:
            while time.perf_counter() < deadline:
                status, _, _ = await conn.request(request)
                counts["ok" if status == 200 else "errors"] += 1
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    counts["elapsed"] = time.perf_counter() - start
    return counts


async def sequential(port: int, request: bytes, count: int, max_seconds: float) -> list[float]:
    """Latency (s) of `count` back-to-back requests on one connection (bounded in time)."""
    conn = await RawConnection.open(port)
    latencies = []
    deadline = time.perf_counter() + max_seconds
    try:
        for _ in range(count):
            start = time.perf_counter()
            status, _, _ = await conn.request(request)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"status {status} in the latency phase")
            if time.perf_counter() > deadline:
                break
    finally:
        await conn.close()
    return latencies


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process `pid` (not only its main thread) to `cpus`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(task.name), cpus)


def together_on_one_cpu(
    procs: dict[str, Any], request: bytes, seconds: float, elsewhere: tuple[int, ...] = ()
) -> dict[str, dict[str, float]]:
    """Load every proxy in `procs` at once, all pinned to the same CPU (the load generator and
    the upstream elsewhere): they compete for one CPU, so their throughput ratio is the ratio
    of their CPU cost per request, whatever else the machine is doing at that moment."""
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, others = {cpus[-1]}, set(cpus[:-1]) or {cpus[-1]}
    for proc in procs.values():
        pin(proc.pid, proxy_cpu)
    for pid in elsewhere:
        pin(pid, others)
    os.sched_setaffinity(0, others)
    try:
        cpu0 = {name: cpu_seconds(proc.pid) for name, proc in procs.items()}

        async def load() -> list[dict]:
            return await asyncio.gather(
                *(closed_loop(proc.port, request, CONNECTIONS, seconds) for proc in procs.values())
            )

        counts = dict(zip(procs, asyncio.run(load()), strict=True))
        for name, proc in procs.items():
            counts[name]["cpu_seconds"] = cpu_seconds(proc.pid) - cpu0[name]
            counts[name]["rps"] = counts[name]["ok"] / counts[name]["elapsed"]
        return counts
    finally:
        everywhere = set(cpus)
        os.sched_setaffinity(0, everywhere)
        for pid in [*(proc.pid for proc in procs.values()), *elsewhere]:
            pin(pid, everywhere)


def run(ctx: Context) -> BenchResult:
    result = BenchResult("proxy", "Proxy overhead: bare mitmdump vs mitmdump -s addon/cerebras.py")
    rounds = int(ctx.pick(2, 4))
    seconds = ctx.pick(4.0, 8.0)
    latency_count = int(ctx.pick(300, 800))
    with contextlib.ExitStack() as stack:
        upstream, up_port = start_fast_upstream(ctx.workdir)
        stack.enter_context(upstream)
        bare = stack.enter_context(start_mitmdump(ctx.workdir, "proxy-bare", addon_config=None))
        addon = stack.enter_context(
            start_mitmdump(ctx.workdir, "proxy-addon", addon_config=addon_config())
        )
        noop = stack.enter_context(
            start_mitmdump(
                ctx.workdir, "proxy-noop", addon_config=None, extra=["-s", str(NOOP_ADDON)]
            )
        )
        body = json.dumps(CHAT).encode()
        url = f"http://{HOST}:{up_port}/v1/chat/completions"
        via_proxy = build_request(
            "POST", url, f"{HOST}:{up_port}", body, {"Content-Type": "application/json"}
        )
        direct = build_request(
            "POST",
            "/v1/chat/completions",
            f"{HOST}:{up_port}",
            body,
            {"Content-Type": "application/json"},
        )
        targets = {
            "bare": (bare, bare.port),
            "addon": (addon, addon.port),
            "noop": (noop, noop.port),
        }
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        latencies: dict[str, list[float]] = {name: [] for name in [*targets, "direct"]}

        async def warm_up() -> None:
            for _, port in targets.values():
                await closed_loop(port, via_proxy, CONNECTIONS, 1.5)
            await closed_loop(up_port, direct, CONNECTIONS, 0.5)

        asyncio.run(warm_up())
        for round_ in range(rounds):
            order = ["bare", "addon", "noop"]
            order = order if round_ % 2 == 0 else order[::-1]
            for name in order:
                proc, port = targets[name]
                cpu0 = cpu_seconds(proc.pid)
                counts = asyncio.run(closed_loop(port, via_proxy, CONNECTIONS, seconds))
                counts["cpu_seconds"] = cpu_seconds(proc.pid) - cpu0
                counts["rps"] = counts["ok"] / counts["elapsed"]
                runs[name].append(counts)
            for name in [*order, "direct"]:
                port = up_port if name == "direct" else targets[name][1]
                request = direct if name == "direct" else via_proxy
                latencies[name] += asyncio.run(sequential(port, request, latency_count, 30.0))

        # Side by side on one CPU: bare and addon loaded at the same time, several rounds.
        pairs = {"bare": bare, "addon": addon}
        together = [
            together_on_one_cpu(pairs, via_proxy, seconds, (upstream.pid,)) for _ in range(rounds)
        ]
        ratios = [r["addon"]["rps"] / r["bare"]["rps"] for r in together]
        ratio = statistics.median(ratios)
        cpu_together = {
            name: 1000
            * sum(r[name]["cpu_seconds"] for r in together)
            / sum(r[name]["ok"] for r in together)
            for name in pairs
        }
        sequential_ratios = [
            a["rps"] / b["rps"] for a, b in zip(runs["addon"], runs["bare"], strict=True)
        ]
        profile_text = None
        lat = {k: (_percentile(v, 50), _percentile(v, 99)) for k, v in latencies.items()}
        added_p50 = (lat["addon"][0] - lat["bare"][0]) * 1000
        added_p99 = (lat["addon"][1] - lat["bare"][1]) * 1000
        missed = ratio < TARGET_THROUGHPUT_RATIO or added_p50 > TARGET_ADDED_P50_MS
        if ctx.profile or missed:
            out = ctx.workdir / "proxy-addon.pyspy.txt"
            recorder = start_record(addon.pid, seconds, out)
            asyncio.run(closed_loop(addon.port, via_proxy, CONNECTIONS, seconds + 1))
            with contextlib.suppress(Exception):
                recorder.wait(timeout=30)
            if out.exists():
                summary = summarize(out)
                result.details["profile_addon_mitmdump"] = summary
                profile_text = render(summary)

    def total(name: str, key: str) -> float:
        return sum(r[key] for r in runs[name])

    rps = {k: total(k, "ok") / total(k, "elapsed") for k in runs}
    cpu_ms = {k: 1000 * total(k, "cpu_seconds") / total(k, "ok") for k in runs}
    result.add(
        Figure(
            "throughput with addon, both on one CPU at once (median of rounds)",
            statistics.median(r["addon"]["rps"] for r in together),
            "req/s",
            statistics.median(r["bare"]["rps"] for r in together),
            "bare mitmdump",
            ratio,
            f">= {TARGET_THROUGHPUT_RATIO:.0%} of bare",
            ratio >= TARGET_THROUGHPUT_RATIO,
            note="per-round ratios "
            + ", ".join(f"{r:.3f}" for r in ratios)
            + f"; CPU per request {cpu_together['addon']:.2f} ms vs "
            f"{cpu_together['bare']:.2f} ms ({cpu_together['addon'] / cpu_together['bare']:.2f} x)",
        )
    )
    seq_ratio = statistics.median(sequential_ratios)
    result.add(
        Figure(
            "throughput with addon, one proxy at a time (median of rounds)",
            rps["addon"],
            "req/s",
            rps["bare"],
            "bare mitmdump",
            seq_ratio,
            note="per-round ratios " + ", ".join(f"{r:.3f}" for r in sequential_ratios),
        )
    )
    result.add(
        Figure(
            "mitmdump CPU per request with addon",
            cpu_ms["addon"],
            "ms",
            cpu_ms["bare"],
            "bare mitmdump",
            cpu_ms["addon"] / cpu_ms["bare"],
            note=f"addon's own CPU ~{cpu_ms['addon'] - cpu_ms['bare']:.2f} ms/request",
        )
    )
    noop_ratio = statistics.median(
        n["rps"] / b["rps"] for n, b in zip(runs["noop"], runs["bare"], strict=True)
    )
    result.add(
        Figure(
            "throughput with an empty addon (same hooks, no work)",
            rps["noop"],
            "req/s",
            rps["bare"],
            "bare mitmdump",
            noop_ratio,
            note=f"CPU {cpu_ms['noop']:.2f} ms/request: what mitmproxy charges for a script "
            "addon's hooks alone",
        )
    )
    result.add(
        Figure(
            "added latency p50 (addon - bare), light load",
            added_p50,
            "ms",
            lat["bare"][0] * 1000,
            "bare p50",
            lat["addon"][0] / lat["bare"][0],
            f"<= {TARGET_ADDED_P50_MS:g} ms",
            added_p50 <= TARGET_ADDED_P50_MS,
            note=f"direct to upstream p50 {lat['direct'][0] * 1000:.3f} ms",
        )
    )
    result.add(
        Figure(
            "added latency p99 (addon - bare), light load",
            added_p99,
            "ms",
            lat["bare"][1] * 1000,
            "bare p99",
            lat["addon"][1] / lat["bare"][1],
            note=f"direct to upstream p99 {lat['direct'][1] * 1000:.3f} ms",
        )
    )
    result.details.update(
        {
            "rounds": rounds,
            "seconds_per_throughput_phase": seconds,
            "connections": CONNECTIONS,
            "runs": runs,
            "together_on_one_cpu": together,
            "latency_ms": {
                k: {"p50": v[0] * 1000, "p99": v[1] * 1000, "n": len(latencies[k])}
                for k, v in lat.items()
            },
        }
    )
    if profile_text:
        result.details["profile_text"] = profile_text
        print("py-spy profile of mitmdump with the addon under load:\n" + profile_text)
    return result
