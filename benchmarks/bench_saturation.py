"""Benchmark 5: under saturation, the proxy against what users have today.

Three mocks of Cerebras (tools/mock_cerebras.py, token buckets by Cerebras's rule) with the
same limits (rpm 600, tpm 60,000) get the same offered load at the same time: about twice the
tokens-per-minute limit in admission cost (input + max_completion_tokens), with the seed's mix
(70 % small requests of 100-1,000 tokens, 30 % large of 2,000-8,000; bodies built by
tools/loadgen.py's `plan_request`), Poisson arrivals with one fixed seed, so all paths see the
identical schedule and bodies. All use the openai SDK (`AsyncOpenAI`, its default
`max_retries=2` with backoff and retry-after):

* **proxy**: HTTPS to api.cerebras.ai through mitmdump + Cooldown (limits = the mock's), which
  forwards to mock A (`cerebras_upstream`);
* **proxy-paced**: the same with `cerebras_limits.burst: 0.25` (pacing within the minute);
* **baseline**: straight to mock C, as a client without Cooldown does today.

Figures, from the mocks' own records: utilization of the binding limit (tokens the mock kept
while the load was offered, over the most its bucket could accept in that time,
tpm/60 x duration + tpm), the busiest 60 s of kept tokens against tpm, upstream 429s, and per
size class the end-to-end latency (for the proxy, also the time held, from X-Cooldown-Wait)
and how many requests failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from tools import loadgen, mock_cerebras
from tools.launch import Mitmdump

from .common import BenchResult, Figure, percentile, start_cooldown_before
from .context import Context

RPM, TPM = 600, 60_000
OFFERED_FACTOR = 2.0
SEED = 20_251_129
TARGET_UTILIZATION = 0.95
TARGET_SMALL_OVER_LARGE = 0.25
UNFINISHED = "unfinished"
# Every path gets the same schedule at the same time, each against its own mock.
PROXIED = {"proxy": {}, "proxy-paced": {"burst": 0.25}}  # extra cerebras_limits keys
PATHS = [*PROXIED, "direct"]


@dataclass
class Outcome:
    size_class: str
    estimate: int
    sent: float
    done: float | None = None
    ok: bool = False
    status: int | None = None
    error: str | None = None
    held: float | None = None  # X-Cooldown-Wait (proxy path)
    retries: int = 0


@dataclass
class PathRun[O: Outcome]:
    """One path's requests; `O` is the Outcome (sub)class the benchmark records."""

    name: str
    outcomes: list[O] = field(default_factory=list)


def _mean_size(settings: loadgen.Settings) -> float:
    small = (settings.small.low + settings.small.high) / 2
    large = (settings.large.low + settings.large.high) / 2
    return settings.small_share * small + (1 - settings.small_share) * large


async def _one(client: Any, planned: Any, out: Outcome, clock: Any) -> None:
    import openai

    body = planned.body
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=body["model"],
            messages=body["messages"],
            max_completion_tokens=body["max_completion_tokens"],
        )
        out.status = raw.http_response.status_code
        out.ok = 200 <= out.status < 300
        out.retries = getattr(raw, "retries_taken", 0)
        wait = raw.headers.get("x-cooldown-wait")
        if wait is not None:
            out.held = float(wait)
        raw.parse()
    except openai.APIStatusError as e:
        out.status, out.error = e.status_code, f"http_{e.status_code}"
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        out.error = type(e).__name__
    except asyncio.CancelledError:
        out.error = UNFINISHED  # still waiting when the drain time ran out
        raise
    finally:
        out.done = clock()


async def drive(
    runs: dict[str, tuple[Any, PathRun[Outcome]]],
    planned: list[tuple[float, Any]],
    drain: float,
    clock: Any,
) -> None:
    """Send the schedule to every path at once; wait (bounded) for answers; cancel the rest."""
    tasks: list[asyncio.Task[None]] = []
    for at, request in planned:
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        for client, run in runs.values():
            out = Outcome(request.size_class, request.estimated_tokens, clock())
            run.outcomes.append(out)
            tasks.append(asyncio.create_task(_one(client, request, out, clock)))
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=drain)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def utilization(history: list[dict], start: float, duration: float) -> dict[str, float]:
    """Tokens the mock kept for requests it admitted in [start, start + duration)."""
    kept = [
        (e["at"] - start, e["kept"] or 0)
        for e in history
        if e["status"] == 200 and start <= e["at"] < start + duration
    ]
    total = sum(k for _, k in kept)
    bucket_max = TPM / 60 * duration + TPM
    # Busiest 60-s window of kept tokens (a sliding-window limiter keeps this <= tpm).
    times = sorted(kept)
    best, j, acc = 0, 0, 0
    for i in range(len(times)):
        acc += times[i][1]
        while times[i][0] - times[j][0] >= 60.0:
            acc -= times[j][1]
            j += 1
        best = max(best, acc)
    return {
        "kept_tokens": total,
        "bucket_max_tokens": bucket_max,
        "utilization": total / bucket_max,
        "busiest_60s_window_tokens": best,
        "admitted_requests": len(kept),
    }


def class_stats(outcomes: list[Outcome]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for size_class in ("small", "large"):
        mine = [o for o in outcomes if o.size_class == size_class]
        ok = [o for o in mine if o.ok and o.done is not None]
        latency = [o.done - o.sent for o in ok]  # type: ignore[operator]
        held = [o.held for o in ok if o.held is not None]
        stats[size_class] = {
            "sent": len(mine),
            "ok": len(ok),
            "failed": sum(1 for o in mine if not o.ok and o.error != UNFINISHED),
            "unfinished": sum(1 for o in mine if o.error == UNFINISHED),
            "retried": sum(1 for o in mine if o.retries),
            "latency_p50": percentile(latency, 50),
            "latency_p95": percentile(latency, 95),
            "held_p50": percentile(held, 50),
            "held_p95": percentile(held, 95),
            "errors": sorted({o.error for o in mine if o.error and o.error != UNFINISHED}),
        }
    return stats


def run(ctx: Context) -> BenchResult:
    import httpx2
    import openai

    result = BenchResult("saturation", "Under saturation: proxy vs openai SDK retries, direct")
    duration = ctx.pick(75.0, 240.0)
    drain = ctx.pick(25.0, 120.0)
    settings = loadgen.Settings(small_share=0.7)
    mean = _mean_size(settings)
    rate = OFFERED_FACTOR * TPM / 60 / mean  # requests per second
    rng = random.Random(SEED)
    schedule: list[tuple[float, Any]] = []
    at = 0.0
    while at < duration and len(schedule) < 5_000:
        schedule.append((at, loadgen.plan_request(len(schedule), settings, rng)))
        at += rng.expovariate(rate)
    offered = sum(p.estimated_tokens for _, p in schedule)

    mock_settings = mock_cerebras.MockSettings(rpm=RPM, tpm=TPM)
    proxies: dict[str, Mitmdump] = {}
    with contextlib.ExitStack() as stack:  # stops the proxies, then the mocks
        mocks = {
            name: stack.enter_context(mock_cerebras.MockCerebras(mock_settings)) for name in PATHS
        }
        for name, extra_limits in PROXIED.items():
            proxies[name] = stack.enter_context(
                start_cooldown_before(
                    ctx.workdir, f"saturation-{name}", mocks[name].url, RPM, TPM, extra_limits
                )
            )
        limits = httpx2.Limits(max_connections=5_000, max_keepalive_connections=100)
        timeout = httpx2.Timeout(900.0, connect=30.0)

        def client_for(name: str) -> Any:
            if name not in proxies:  # the baseline: straight to its mock
                return openai.AsyncOpenAI(
                    api_key="bench",
                    base_url=f"{mocks[name].url}/v1",
                    http_client=httpx2.AsyncClient(timeout=timeout, limits=limits, trust_env=False),
                )
            return openai.AsyncOpenAI(
                api_key="bench",
                base_url="https://api.cerebras.ai/v1",
                http_client=httpx2.AsyncClient(
                    proxy=proxies[name].url,
                    verify=ssl.create_default_context(cafile=str(proxies[name].ca_file)),
                    timeout=timeout,
                    limits=limits,
                    trust_env=False,
                ),
            )

        async def main() -> tuple[dict[str, PathRun[Outcome]], float]:
            runs = {name: (client_for(name), PathRun[Outcome](name)) for name in PATHS}
            loop = asyncio.get_running_loop()
            start = loop.time()
            for mock in mocks.values():
                mock.reset()
            start_mono = time.monotonic()
            try:
                await drive(runs, schedule, drain, lambda: loop.time() - start)
            finally:
                for client, _ in runs.values():
                    with contextlib.suppress(Exception):
                        await client.close()
            return {k: v[1] for k, v in runs.items()}, start_mono

        runs, start_mono = asyncio.run(main())

    data: dict[str, Any] = {}
    for name, mock in mocks.items():
        stats = mock.stats()
        history = mock.history()
        data[name] = {
            "mock_stats": stats,
            "upstream_429s": stats["rate_limited"] - stats["forced_429"],
            "utilization": utilization(history, start_mono, duration),
            "classes": class_stats(runs[name].outcomes),
        }
    result.details.update(
        {
            "duration_s": duration,
            "drain_s": drain,
            "requests_offered": len(schedule),
            "offered_tokens": offered,
            "offered_tokens_per_minute": offered / duration * 60,
            "rate_rps": rate,
            "seed": SEED,
            "paths": data,
        }
    )
    p, d = data["proxy"], data["direct"]
    # Most a 60-s sliding window can pass in T seconds (C per started minute), over the bucket's.
    log_ceiling = min(1.0, math.ceil(duration / 60) * TPM / (TPM / 60 * duration + TPM))
    result.details["sliding_window_ceiling"] = log_ceiling
    pu, du = p["utilization"], d["utilization"]
    result.add(
        Figure(
            "utilization of tpm (kept / (tpm/60 x T + tpm)), proxy",
            100 * pu["utilization"],
            "%",
            100 * du["utilization"],
            "direct + SDK retries",
            pu["utilization"] / du["utilization"],
            f">= {TARGET_UTILIZATION:.0%}",
            pu["utilization"] >= TARGET_UTILIZATION,
            note=f"T = {duration:g}s of offered load at {offered / duration * 60:,.0f} tokens/min "
            f"(admission cost), {len(schedule)} requests per path; a limiter that keeps every "
            f"60-s window <= tpm can reach at most {100 * log_ceiling:.0f} % by this measure",
        )
    )
    result.add(
        Figure(
            "busiest 60 s of kept tokens / tpm, proxy",
            100 * pu["busiest_60s_window_tokens"] / TPM,
            "%",
            100 * du["busiest_60s_window_tokens"] / TPM,
            "direct + SDK retries",
            pu["busiest_60s_window_tokens"] / max(du["busiest_60s_window_tokens"], 1),
            note="a 60-s sliding-window limiter keeps this <= 100 %; a token bucket allows "
            "up to 200 % (a full bucket plus a minute of refill)",
        )
    )
    result.add(
        Figure(
            "upstream 429s, proxy",
            p["upstream_429s"],
            "",
            d["upstream_429s"],
            "direct + SDK retries",
            target="0",
            met=p["upstream_429s"] == 0,
        )
    )
    for name, label in (("proxy", "proxy"), ("direct", "direct")):
        c = data[name]["classes"]
        result.add(
            Figure(
                f"requests failed (client saw an error), {label}",
                c["small"]["failed"] + c["large"]["failed"],
                "",
                note=f"small {c['small']['failed']}/{c['small']['sent']}, large "
                f"{c['large']['failed']}/{c['large']['sent']}; unfinished at the end: "
                f"small {c['small']['unfinished']}, large {c['large']['unfinished']}; "
                f"errors {sorted(set(c['small']['errors']) | set(c['large']['errors']))}",
            )
        )
    pc, dc = p["classes"], d["classes"]
    for cls in ("small", "large"):
        result.add(
            Figure(
                f"{cls}: latency p50 / p95, proxy (s)",
                pc[cls]["latency_p50"],
                "s",
                dc[cls]["latency_p50"],
                "direct p50 (ok only)",
                note=f"proxy p95 {pc[cls]['latency_p95']}, held p50 {pc[cls]['held_p50']} "
                f"p95 {pc[cls]['held_p95']}; direct p95 {dc[cls]['latency_p95']}",
            )
        )
    q = data["proxy-paced"]
    qc = q["classes"]
    result.add(
        Figure(
            "utilization of tpm, proxy with pacing (burst 0.25)",
            100 * q["utilization"]["utilization"],
            "%",
            100 * pu["utilization"],
            "proxy, default burst 1.0",
            q["utilization"]["utilization"] / pu["utilization"],
            note=f"upstream 429s {q['upstream_429s']}; small p50 {qc['small']['latency_p50']} "
            f"p95 {qc['small']['latency_p95']}; large p50 {qc['large']['latency_p50']} "
            f"p95 {qc['large']['latency_p95']}; failed "
            f"{qc['small']['failed'] + qc['large']['failed']}, unfinished "
            f"{qc['small']['unfinished'] + qc['large']['unfinished']}",
        )
    )
    small, large = pc["small"]["latency_p50"], pc["large"]["latency_p50"]
    ratio = small / large if small is not None and large else None
    result.add(
        Figure(
            "small p50 wait / large p50 wait, proxy",
            ratio,
            "",
            (dc["small"]["latency_p50"] or 0) / (dc["large"]["latency_p50"] or 1),
            "direct",
            target=f"<= {TARGET_SMALL_OVER_LARGE:.0%}",
            met=None if ratio is None else ratio <= TARGET_SMALL_OVER_LARGE,
        )
    )
    return result
