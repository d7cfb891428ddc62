"""Benchmark: limits shared by two proxies on one Redis (issue 11).

One mock of Cerebras (tools/mock_cerebras.py, token buckets by Cerebras's rule, rpm 300,
tpm 60,000, as in the fullspeed burst) is the organization. Two mitmdump + Cooldown processes,
each given the organization's *full* limits, forward to it (`cerebras_upstream`) and share
their limits through one redis-server of the benchmark's own (tools/redis_server.py, a free
127.0.0.1 port, nothing on disk). 24 workers (the openai SDK, `max_retries=2`, in a closed
loop, fullspeed's request mix: 70 % small / 30 % large, 30 % streamed) are split 12 and 12
over the two proxies and send for T = 40 s; then a bounded drain.

Runs, one after the other:

* **shared**: the issue's "done when": upstream 429s in total (target <= 1), client errors
  (0), combined utilization (tokens the mock kept for requests admitted during T over
  tpm/60 x T + tpm; target >= 0.9), each proxy's p50 time held (X-Cooldown-Wait) and the
  ratio of the larger to the smaller (target <= 1.5).
* **unshared** (the baseline): the same two proxies without `shared_limits`, each keeping
  "its" full limits, as before issue 11.
* **redis-killed**: as *shared* (`on_error: hold`, `request_timeout: 60s`), with Redis
  SIGKILLed at T/2 - 1.5 s and started again (empty, same port) 3 s later: every request
  answered within request_timeout, both proxies up, open reservations, queue depth and
  tracked flows back to 0 on both. "Answered" is per HTTP attempt (the time to its answer's
  head): the SDK retries a proxy's 503 or 429 out of sight, so one SDK call may take longer.
* **core**: decisions per second and time per request of the limiter alone, in this process:
  `try_acquire` + `confirm` + `settle` (and, a second figure, with `observe(defer=True)`, the
  re-sync from the headers a non-stream answer brings, which rides with its settle: the two
  round trips of a real request), `SharedLimiter` on the same Redis against the in-process
  `MemoryLimiter`, in alternating blocks of one run.

SHARED_RUNS (comma-separated: shared, unshared, killed, core) picks some.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tools import mock_cerebras
from tools.launch import Mitmdump
from tools.redis_server import RedisServer, redis_server_path

from .bench_fullspeed import MAX_PER_WORKER, Outcome, Plans, _one, http_client_class
from .bench_saturation import UNFINISHED
from .common import BenchResult, Figure, beside, percentile, start_mitmdump
from .context import Context

RPM, TPM = 300, 60_000
# The fairness run: small requests only, and a requests-per-minute limit that makes every one
# of them wait (24 workers, 1 request a second), so that each proxy's p50 wait lies where the
# waits are (with the mixed load, a third go at once and the p50 sits on that edge).
FAIR_RPM = 60
FAIR_DURATION = 90.0
# ... and only requests sent after the limit's first burst (60 requests go at once, to whichever
# proxy asks first) count: in steady state every request waits its turn.
FAIR_WARMUP = 20.0
WORKERS = 24  # split over the two proxies: worker w goes through proxy w % 2
PROXIES = 2
DURATION = 40.0
SEED = 20_261_211
STREAM_SHARE = 0.3
LONG_TIMEOUT = 900.0  # the client's timeout: far beyond any wait here
KILL_REQUEST_TIMEOUT = 60.0
# An answer may come after request_timeout by upstream's own time (a request released just
# before its deadline) and a loaded machine's delay: beyond this, the attempt counts as hung.
ANSWER_MARGIN = 5.0
OUTAGE = 3.0
KEY_PREFIX = "cooldown-bench:"
METRICS_JSON = "http://cooldown.local/metrics.json"
SETTLE_TIMEOUT = 20.0

# Targets (issue 11).
MAX_429S = 1
MIN_UTILIZATION = 0.9
MAX_P50_RATIO = 1.5

# The core figure.
CORE_KEY = "llama3.1-8b"
CORE_BLOCKS = 5  # alternating blocks per limiter


@dataclass
class Run:
    name: str
    shared: bool
    kill: bool = False
    on_error: str = "hold"
    request_timeout: float | None = None  # None: start_cooldown's 10 minutes
    rpm: int = RPM
    small_share: float = 0.7  # of the requests (loadgen's small and large sizes)
    duration: float = DURATION
    warmup: float = 0.0  # requests sent before this count apart (`held_p50_steady`)


def runs_wanted() -> set[str]:
    names = {n for n in os.environ.get("SHARED_RUNS", "").split(",") if n}
    return names or {"shared", "unshared", "killed", "fair", "core"}


# ---------------------------------------------------------------------------------------------
# Processes


def proxy_config(upstream: str, redis: RedisServer | None, run: Run) -> dict[str, Any]:
    limits: dict[str, Any] = {"rpm_limit": run.rpm, "tpm_limit": TPM, "max_queue_depth": 5_000}
    limits["request_timeout"] = (
        "10m" if run.request_timeout is None else f"{run.request_timeout:g}s"
    )
    config: dict[str, Any] = {"cerebras_limits": limits, "cerebras_upstream": upstream}
    if redis is not None:
        config["shared_limits"] = {
            "redis_url": redis.url,
            "key_prefix": KEY_PREFIX,
            "on_error": run.on_error,
        }
    return config


def proxy_metrics(proxy: Mitmdump) -> dict[str, Any] | None:
    """The proxy's /metrics.json (through the proxy), or None if it does not answer."""
    try:
        response = httpx.get(METRICS_JSON, proxy=proxy.url, timeout=10.0, trust_env=False)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def settled(snapshot: dict[str, Any] | None) -> bool:
    return snapshot is not None and all(
        snapshot.get(k) == 0 for k in ("cerebras_queue_depth", "open_reservations", "tracked_flows")
    )


def wait_settled(proxy: Mitmdump, timeout: float = SETTLE_TIMEOUT) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while True:
        snapshot = proxy_metrics(proxy)
        if settled(snapshot) or time.monotonic() >= deadline:
            return snapshot
        time.sleep(0.1)


def wait_shared(proxies: list[Mitmdump], timeout: float = 15.0) -> list[Any]:
    """Until every proxy says it shares through Redis with all of them alive (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        states = [(proxy_metrics(p) or {}).get("shared_limits") for p in proxies]
        if all(s and s.get("state") == "shared" and s.get("instances") == PROXIES for s in states):
            return states
        if time.monotonic() >= deadline:
            return states
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Attempt:
    """One HTTP request the SDK sent (it retries a 429 or 503 out of sight, up to twice):
    when it went, and when its answer's head came back (for a stream, its first byte)."""

    proxy: int
    started: float
    finished: float | None = None
    status: int | None = None
    error: str | None = None  # no HTTP answer: the exception (Cancelled: the drain's end)
    refused: str | None = None  # the proxy's own answer: its X-Cooldown-Refused code


def make_client(
    proxy: Mitmdump, index: int, attempts: list[Attempt], clock: Callable[[], float]
) -> Any:
    """The openai SDK through `proxy` (as bench_fullspeed's clients), recording every HTTP
    attempt in `attempts`."""
    import httpx2
    import openai

    class TimedClient(http_client_class()):  # type: ignore[misc]
        async def send(self, request: Any, **kwargs: Any) -> Any:
            attempt = Attempt(index, clock())
            attempts.append(attempt)
            try:
                response = await super().send(request, **kwargs)
            except BaseException as e:
                attempt.finished, attempt.error = clock(), type(e).__name__
                raise
            attempt.finished, attempt.status = clock(), response.status_code
            attempt.refused = response.headers.get("x-cooldown-refused")
            return response

    http_client = TimedClient(
        timeout=httpx2.Timeout(LONG_TIMEOUT, connect=30.0),
        limits=httpx2.Limits(max_connections=200, max_keepalive_connections=100),
        trust_env=False,
        proxy=proxy.url,
        verify=ssl.create_default_context(cafile=str(proxy.ca_file)),
    )
    return openai.AsyncOpenAI(
        api_key="bench",
        base_url="https://api.cerebras.ai/v1",
        timeout=LONG_TIMEOUT,
        http_client=http_client,
    )


async def closed_loop(
    clients: list[Any],
    outcomes: list[list[Outcome]],
    plans: Plans,
    duration: float,
    drain: float,
    clock: Callable[[], float],
) -> None:
    """WORKERS workers, worker w through proxy w % 2, back to back until `duration`; a
    bounded drain; what is still going then is cancelled (UNFINISHED)."""

    async def worker(w: int) -> None:
        index = w % len(clients)
        for k in range(MAX_PER_WORKER):
            if clock() >= duration:
                return
            # Both proxies get the same requests in the same order (worker w and its twin w ^ 1):
            # symmetric load, so their waits compare.
            planned, stream = plans.get(w // PROXIES, k)
            out = Outcome(planned.size_class, planned.estimated_tokens, clock(), stream=stream)
            outcomes[index].append(out)
            await _one(clients[index], planned, stream, out, clock)

    tasks = [asyncio.create_task(worker(w)) for w in range(WORKERS)]
    await asyncio.wait(tasks, timeout=max(0.0, duration + drain - clock()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def outage(redis: RedisServer, at: float, clock: Callable[[], float], log: dict) -> None:
    """Kill Redis at `at` (the run's clock), start it again OUTAGE seconds later."""
    await asyncio.sleep(max(0.0, at - clock()))
    redis.kill()
    log["killed_at"] = clock()
    await asyncio.sleep(OUTAGE)
    await asyncio.to_thread(redis.start)
    log["restarted_at"] = clock()


def run_load(ctx: Context, run: Run, drain: float) -> dict[str, Any]:
    settings = mock_cerebras.MockSettings(rpm=run.rpm, tpm=TPM)
    plans = Plans(STREAM_SHARE, SEED, run.small_share)
    workdir = ctx.workdir / f"shared-{run.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    events: dict[str, float] = {}
    with contextlib.ExitStack() as stack:  # stops the proxies, then Redis and the mock
        mock = stack.enter_context(mock_cerebras.MockCerebras(settings))
        redis = stack.enter_context(RedisServer(workdir / "redis")) if run.shared else None
        proxies = [
            stack.enter_context(
                start_mitmdump(
                    workdir, f"proxy-{i}", addon_config=proxy_config(mock.url, redis, run)
                )
            )
            for i in range(PROXIES)
        ]
        states_before = wait_shared(proxies) if run.shared else None
        attempts: list[Attempt] = []

        async def main() -> tuple[list[list[Outcome]], float]:
            loop = asyncio.get_running_loop()
            start = loop.time()

            def clock() -> float:
                return loop.time() - start

            clients = [make_client(p, i, attempts, clock) for i, p in enumerate(proxies)]
            outcomes: list[list[Outcome]] = [[] for _ in proxies]
            mock.reset()
            start_mono = time.monotonic()

            background = []
            if run.kill and redis is not None:
                at = run.duration / 2 - OUTAGE / 2
                background.append(asyncio.create_task(outage(redis, at, clock, events)))
            try:
                await closed_loop(clients, outcomes, plans, run.duration, drain, clock)
                await asyncio.gather(*background)
            finally:
                for task in background:
                    task.cancel()
                for client in clients:
                    with contextlib.suppress(Exception):
                        await client.close()
            return outcomes, start_mono

        outcomes, start_mono = asyncio.run(main())
        alive = [p.process.poll() is None for p in proxies]
        states_after = wait_shared(proxies) if run.shared else None
        finals = [wait_settled(p) for p in proxies]
        history, stats = mock.history(), mock.stats()
    return figures_of(run, outcomes, history, stats, start_mono, events) | {
        "attempts": attempt_figures(attempts, run.request_timeout),
        "proxies_alive": alive,
        "final_metrics": [_final(s) for s in finals],
        "shared_limits_before": states_before,
        "shared_limits_after": states_after,
        "drain_s": drain,
    }


def attempt_figures(attempts: list[Attempt], request_timeout: float | None) -> dict[str, Any]:
    """Every HTTP attempt: its status, how long until its answer, and those with no answer.

    An attempt the drain's end cancelled had no answer *yet*: it counts as hung only if it had
    been waiting longer than request_timeout plus ANSWER_MARGIN by then."""
    limit = None if request_timeout is None else request_timeout + ANSWER_MARGIN
    statuses: dict[str, int] = {}
    for a in attempts:
        key = str(a.status) if a.status is not None else a.error or "?"
        statuses[key] = statuses.get(key, 0) + 1
    answered = [a.finished - a.started for a in attempts if a.status is not None and a.finished]
    cut = [a for a in attempts if a.status is None and a.error == "CancelledError"]
    failed = [a for a in attempts if a.status is None and a.error != "CancelledError"]
    hung = [a for a in cut if limit is not None and (a.finished or 0) - a.started > limit]
    others = [a for a in attempts if a.status is not None and a.status != 200]
    return {
        "count": len(attempts),
        "statuses": statuses,
        # every attempt not answered 200: (proxy, status, proxy's code or None: upstream's or
        # mitmproxy's own, sent at, seconds to its answer)
        "not_200": [
            (
                a.proxy,
                a.status,
                a.refused,
                round(a.started, 2),
                round((a.finished or 0) - a.started, 2),
            )
            for a in others
        ],
        "slowest": max(
            (
                (round((a.finished or 0) - a.started, 2), a.proxy, a.status, a.refused)
                for a in attempts
                if a.status is not None
            ),
            default=None,
        ),
        "slowest_answer_s": max(answered, default=None),
        "answer_p99_s": percentile(answered, 99),
        "no_answer_transport_errors": len(failed),
        "cut_by_drain_end": len(cut),
        "hung": len(hung),
        "limit_s": limit,
    }


def _histogram(values: list[float], width: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in sorted(values):
        key = f"{width * int(value / width):.1f}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _final(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    keys = ("cerebras_queue_depth", "open_reservations", "tracked_flows", "shared_limits")
    return {k: snapshot.get(k) for k in keys}


def figures_of(
    run: Run,
    outcomes: list[list[Outcome]],
    history: list[dict[str, Any]],
    stats: dict[str, Any],
    start: float,
    events: dict[str, float],
) -> dict[str, Any]:
    every = [o for per_proxy in outcomes for o in per_proxy]
    bucket_max = TPM / 60 * run.duration + TPM
    kept = sum(
        e["kept"] or 0
        for e in history
        if e["status"] == 200 and start <= e["at"] < start + run.duration
    )
    errors: dict[str, int] = {}
    for o in every:
        if not o.ok and o.error != UNFINISHED:
            key = o.error or f"http_{o.status}"
            errors[key] = errors.get(key, 0) + 1
    per_proxy: list[dict[str, Any]] = []
    for index, mine in enumerate(outcomes):
        ok = [o for o in mine if o.ok and o.done is not None]
        held = [o.held for o in ok if o.held is not None]
        steady = [o.held for o in ok if o.held is not None and o.sent >= run.warmup]
        latency = [o.done - o.sent for o in ok if o.done is not None]
        per_proxy.append(
            {
                "proxy": index,
                "sent": len(mine),
                "answered": len(ok),
                "held_p25": percentile(held, 25),
                "held_p50": percentile(held, 50),
                "held_p75": percentile(held, 75),
                "held_p90": percentile(held, 90),
                "held_mean": statistics.fmean(held) if held else None,
                "held_p50_steady": percentile(steady, 50),
                "steady_answers": len(steady),
                # every held time, 0.1 s buckets: shows a step in the waits (retry cadence)
                "held_histogram": _histogram(held, 0.1),
                "latency_p50": percentile(latency, 50),
                "latency_p90": percentile(latency, 90),
            }
        )
    ratio, steady_ratio = _spread(per_proxy, "held_p50"), _spread(per_proxy, "held_p50_steady")
    answer_times = [o.done - o.sent for o in every if o.done is not None and o.error != UNFINISHED]
    return {
        "run": run.name,
        "shared": run.shared,
        "kill": run.kill,
        "on_error": run.on_error if run.shared else None,
        "request_timeout_s": run.request_timeout,
        "upstream_429s": stats["rate_limited"] - stats["forced_429"],
        "mock_stats": stats,
        "sent": len(every),
        "answered": sum(1 for o in every if o.ok),
        "client_errors": sum(errors.values()),
        "errors": errors,
        "unfinished": sum(1 for o in every if o.error == UNFINISHED),
        "timeouts": sum(1 for o in every if o.timeouts),
        "retried_by_sdk": sum(1 for o in every if o.retries),
        "kept_tokens": kept,
        "utilization": kept / bucket_max,
        "per_proxy": per_proxy,
        "held_p50_ratio": ratio,
        "held_p50_steady_ratio": steady_ratio,
        "slowest_answer_s": max(answer_times, default=None),
        "events": events,
    }


def _spread(per_proxy: list[dict[str, Any]], name: str) -> float | None:
    """The larger proxy's figure over the smaller's (1.0 when both are 0: nothing waited)."""
    values = [p[name] for p in per_proxy if p[name] is not None]
    if len(values) != len(per_proxy):
        return None
    low, high = min(values), max(values)
    return 1.0 if high == 0 else (high / low if low > 0 else float("inf"))


# ---------------------------------------------------------------------------------------------
# The limiter alone


def core_figures(ctx: Context) -> dict[str, Any]:
    """SharedLimiter (Redis on loopback) against MemoryLimiter: per request, try_acquire +
    confirm + settle, then the same with observe; alternating blocks, one run."""
    try:
        from cooldown.backends.shared import SharedLimiter
    except ImportError as e:  # the backend not there yet
        return {"skipped": f"cooldown.backends.shared.SharedLimiter not importable: {e}"}
    from cooldown.config import CerebrasLimits, Config, SharedLimitsConfig
    from cooldown.gate import RateBook
    from cooldown.limiter import MemoryLimiter, RateReport

    config = Config(cerebras_limits=CerebrasLimits(rpm_limit=10**9, tpm_limit=10**12))
    rates = RateBook(config, MemoryLimiter()).rates_for(CORE_KEY)
    reports = [
        RateReport("requests", 60.0, 10**9, 10**9 - 1, 0.1),
        RateReport("tokens", 60.0, 10**12, 10**12 - 500, 0.1),
    ]
    per_block = int(ctx.pick(1_000, 3_000))

    def block(limiter: Any, observe: bool) -> tuple[float, list[float]]:
        times: list[float] = []
        started = time.perf_counter()
        for _ in range(per_block):
            t0 = time.perf_counter()
            now = time.monotonic()
            decision = limiter.try_acquire(CORE_KEY, rates, 500, now)
            reservation = decision.reservation
            if reservation is None:
                raise RuntimeError(f"not granted: {decision}")
            limiter.confirm(reservation, now)
            if observe:  # a non-stream answer's report: it rides with the settle
                limiter.observe(CORE_KEY, reports, now, defer=True)
            limiter.settle(reservation, 300, now, refund=200)
            times.append(time.perf_counter() - t0)
        return time.perf_counter() - started, times

    out: dict[str, Any] = {"requests_per_block": per_block, "blocks": CORE_BLOCKS}
    with RedisServer(ctx.workdir / "shared-core-redis") as redis:
        shared = SharedLimiter(SharedLimitsConfig(redis_url=redis.url, key_prefix="bench-core:"))
        if not shared.start(time.monotonic()):
            return {"skipped": "SharedLimiter.start() could not reach the benchmark's Redis"}
        memory = MemoryLimiter()
        try:
            for observe in (False, True):
                label = "with_observe" if observe else "decide_confirm_settle"
                seconds: dict[str, list[float]] = {"memory": [], "redis": []}
                latencies: dict[str, list[float]] = {"memory": [], "redis": []}
                for _ in range(CORE_BLOCKS):
                    for name, limiter in (("memory", memory), ("redis", shared)):
                        elapsed, times = block(limiter, observe)
                        seconds[name].append(elapsed)
                        latencies[name] += times
                    shared.tick(time.monotonic())  # what waits (settles) goes out, as a tick
                out[label] = {
                    name: {
                        "requests_per_s": per_block / statistics.median(seconds[name]),
                        "us_p50": 1e6 * (percentile(latencies[name], 50) or 0.0),
                        "us_p99": 1e6 * (percentile(latencies[name], 99) or 0.0),
                        "us_mean": 1e6 * statistics.fmean(latencies[name]),
                    }
                    for name in seconds
                }
            out["open_reservations_after"] = {
                "memory": memory.open_reservations(),
                "redis": shared.open_reservations(),
            }
            out["waiting_operations_after"] = shared.shared_status().get("waiting_operations")
        finally:
            shared.close()
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def _p(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.2f} {unit}"


def table(data: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| run | upstream 429s | client errors | unfinished | util | held p50 (proxy 0 / 1) "
        "| ratio | slowest HTTP answer | answered | settled after | proxies up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in data.items():
        a, b = d["per_proxy"]
        ratio = d["held_p50_ratio"]
        settled_after = all(settled(f) for f in d["final_metrics"])
        lines.append(
            f"| {name} | {d['upstream_429s']} | {d['client_errors']} | {d['unfinished']} "
            f"| {100 * d['utilization']:.1f} % | {_p(a['held_p50'])} / {_p(b['held_p50'])} "
            f"| {'-' if ratio is None else f'{ratio:.2f}'} "
            f"| {_p(d['attempts']['slowest_answer_s'])} "
            f"| {d['answered']:,} / {d['sent']:,} | {settled_after} "
            f"| {all(d['proxies_alive'])} |"
        )
    return "\n".join(lines)


def add_load_figures(result: BenchResult, data: dict[str, dict[str, Any]]) -> None:
    s = data.get("shared")
    base = data.get("unshared")
    if s is not None:

        def fig(
            label: str,
            key: str,
            target: str = "",
            met: Callable[[float], bool] | None = None,
            unit: str = "",
            scale: float = 1.0,
            note: str = "",
        ) -> None:
            baseline, against = (None, "") if base is None else (base[key], "two proxies unshared")
            result.add(
                beside(
                    f"shared: {label}", s[key], baseline, against, target, met, unit, scale, note
                )
            )

        fig("upstream 429s, both proxies", "upstream_429s", f"<= {MAX_429S}", lambda v: v <= 1)
        fig(
            "client errors",
            "client_errors",
            "0",
            lambda v: v == 0,
            note=f"errors {s['errors']}; unfinished at the end {s['unfinished']}",
        )
        fig(
            "combined utilization (kept / (tpm/60 x T + tpm))",
            "utilization",
            f">= {MIN_UTILIZATION:.0%}",
            lambda v: v >= MIN_UTILIZATION,
            "%",
            100.0,
            note=f"T = {DURATION:g} s, {WORKERS} workers split over {PROXIES} proxies",
        )
        a, b = s["per_proxy"]
        fig(
            "p50 held, larger / smaller proxy",
            "held_p50_ratio",
            f"<= {MAX_P50_RATIO:g}",
            lambda v: v <= MAX_P50_RATIO,
            note=f"held p50 {_p(a['held_p50'])} and {_p(b['held_p50'])}, mean "
            f"{_p(a['held_mean'])} and {_p(b['held_mean'])}; end-to-end p50 "
            f"{_p(a['latency_p50'])} and {_p(b['latency_p50'])} (about 70 answers a proxy, a "
            "third released at once: the p50 sits where the waits rise steeply)",
        )
    fair = data.get("fair")
    if fair is not None:
        a, b = fair["per_proxy"]
        ratio = fair["held_p50_steady_ratio"]
        result.add(
            Figure(
                "fair: p50 held, larger / smaller proxy (symmetric load, every request waits)",
                ratio,
                "",
                target=f"<= {MAX_P50_RATIO:g}",
                met=ratio is not None and ratio <= MAX_P50_RATIO,
                note=f"small requests only, rpm {FAIR_RPM}, {FAIR_DURATION:g} s; sent after "
                f"{FAIR_WARMUP:g} s: held p50 {_p(a['held_p50_steady'])} and "
                f"{_p(b['held_p50_steady'])} ({a['steady_answers']} and {b['steady_answers']} "
                f"answers); over the whole run {_p(a['held_p50'])} and {_p(b['held_p50'])}; "
                f"upstream 429s {fair['upstream_429s']}, client errors {fair['client_errors']}",
            )
        )
    k = data.get("redis-killed")
    if k is not None:
        at = k["attempts"]
        slowest = at["slowest_answer_s"]
        limit = KILL_REQUEST_TIMEOUT + ANSWER_MARGIN
        answered_all = at["no_answer_transport_errors"] == 0 and at["hung"] == 0
        result.add(
            Figure(
                f"Redis killed {OUTAGE:g} s: slowest HTTP answer (each attempt)",
                slowest,
                "s",
                target=f"every attempt answered, <= request_timeout + {ANSWER_MARGIN:g} s",
                met=answered_all and slowest is not None and slowest <= limit,
                note=f"attempts {at['statuses']}; no answer: {at['no_answer_transport_errors']} "
                f"transport errors, {at['hung']} hung, {at['cut_by_drain_end']} cut by the "
                f"drain's end; SDK calls: client errors {k['client_errors']}, unfinished "
                f"{k['unfinished']}, slowest {_p(k['slowest_answer_s'])} with the SDK's "
                f"retries; upstream 429s {k['upstream_429s']}",
            )
        )
        result.add(
            Figure(
                f"Redis killed {OUTAGE:g} s: both proxies up, nothing left held or reserved",
                float(all(k["proxies_alive"]) and all(settled(f) for f in k["final_metrics"])),
                "",
                target="1 (yes)",
                met=all(k["proxies_alive"]) and all(settled(f) for f in k["final_metrics"]),
                note=f"after the drain: {k['final_metrics']}",
            )
        )


def add_core_figures(result: BenchResult, core: dict[str, Any]) -> None:
    if "skipped" in core:
        result.add(Figure("core: Redis vs in-process limiter", None, "", note=core["skipped"]))
        return
    for label, title in (
        ("decide_confirm_settle", "try_acquire + confirm + settle"),
        ("with_observe", "the same + observe (deferred)"),
    ):
        m, r = core[label]["memory"], core[label]["redis"]
        result.add(
            Figure(
                f"core, {title}: requests/s, Redis",
                r["requests_per_s"],
                "/s",
                m["requests_per_s"],
                "in-process",
                r["requests_per_s"] / m["requests_per_s"],
            )
        )
        result.add(
            Figure(
                f"core, {title}: added time per request (p50), Redis",
                r["us_p50"] - m["us_p50"],
                "us",
                m["us_p50"],
                "in-process p50",
                r["us_p50"] / m["us_p50"] if m["us_p50"] else None,
                note=f"p99 {r['us_p99']:.0f} us vs {m['us_p99']:.0f} us",
            )
        )


def run(ctx: Context) -> BenchResult:
    result = BenchResult("shared", "Two proxies, one Redis: shared limits, Redis killed, core")
    if redis_server_path() is None:
        result.error = "redis-server is not on PATH (apt install redis-server / brew install redis)"
        return result
    wanted = runs_wanted()
    drain = ctx.pick(30.0, 60.0)
    runs = [
        ("shared", Run("shared", shared=True), drain),
        ("unshared", Run("unshared", shared=False), drain),
        (
            "killed",
            Run("redis-killed", shared=True, kill=True, request_timeout=KILL_REQUEST_TIMEOUT),
            KILL_REQUEST_TIMEOUT + 15.0,  # everything held is answered by then
        ),
        (
            "fair",
            Run(
                "fair",
                shared=True,
                rpm=FAIR_RPM,
                small_share=1.0,
                duration=FAIR_DURATION,
                warmup=FAIR_WARMUP,
            ),
            drain,
        ),
    ]
    data: dict[str, dict[str, Any]] = {}
    for key, spec, run_drain in runs:
        if key not in wanted:
            continue
        t0 = time.monotonic()
        print(
            f"-- {spec.name}: {PROXIES} proxies, {WORKERS} workers, {spec.duration:g} s "
            f"(+ drain <= {run_drain:g} s)",
            flush=True,
        )
        data[spec.name] = run_load(ctx, spec, run_drain)
        data[spec.name]["seconds"] = time.monotonic() - t0
        print(table({spec.name: data[spec.name]}), flush=True)
    if data:
        text = table(data)
        result.details["markdown"] = text
        result.details["runs"] = data
        add_load_figures(result, data)
    if "core" in wanted:
        print("-- core: SharedLimiter (Redis) vs MemoryLimiter", flush=True)
        core = core_figures(ctx)
        result.details["core"] = core
        add_core_figures(result, core)
    result.details.update(
        {"rpm": RPM, "tpm": TPM, "workers": WORKERS, "duration_s": DURATION, "seed": SEED}
    )
    return result
