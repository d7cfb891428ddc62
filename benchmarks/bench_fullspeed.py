"""Benchmark 6: "full speed" (issue 9): does the proxy use the limits fully, without 429s?

Each scenario runs several paths side by side, at the same time, with the same requests: every
path has its own mock of Cerebras (tools/mock_cerebras.py: token buckets by Cerebras's rule,
rpm 300, tpm 60,000) and, for the proxied paths, its own mitmdump + Cooldown with the mock's
limits, forwarding to it (`cerebras_upstream`). Paths:

* **bucket**: `cerebras_limits.algorithm: token_bucket`;
* **window**: `algorithm: sliding_window`;
* **fcfs-bucket** (sustained only): token_bucket with `priority_threshold: 1.0`, i.e. plain
  first-come-first-served;
* **direct**: straight to its mock, the openai SDK's own retries (`max_retries=2`) only.

Clients are the openai SDK (`AsyncOpenAI`), 24 workers per path in a closed loop (each sends
its next request when the previous one ended), for T seconds; then a bounded drain. Worker w's
k-th request is the same on every path: 70 % small / 30 % large bodies from tools/loadgen.py's
`plan_request`, 30 % of them (50 % in `tokenizer`) streamed with
`stream_options.include_usage`, read to the end.

Scenarios: `burst` (40 s), `sustained` (150 s, quick 75 s; clients give up after 60 s),
`tokenizer` (the mock counts input x 1.15 and keeps unused reservations; 40 s), `foreign`
(another client of the organization used 30 % of the minute's tokens before the run and goes
on using 10 % of tpm, straight at the mock; 40 s).

Utilization = tokens the mock kept for requests it admitted during the T seconds of load, over
the most its bucket could admit in that time (tpm/60 x T + tpm; in `foreign`, less what the
other client took). Upstream 429s are the mock's own refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tools import loadgen, mock_cerebras
from tools.launch import Mitmdump

from .bench_saturation import UNFINISHED, PathRun, utilization
from .bench_saturation import Outcome as _Outcome
from .common import BenchResult, beside, percentile, start_cooldown_before
from .context import Context

RPM, TPM = 300, 60_000
WORKERS = 24
SEED = 20_261_201
MAX_PER_WORKER = 2_000  # bounds each worker's loop besides the clock
LONG_TIMEOUT = 900.0  # client timeout where the scenario sets none
PROXY_LIMITS: dict[str, dict[str, Any]] = {
    "bucket": {"algorithm": "token_bucket"},
    "window": {"algorithm": "sliding_window"},
    "fcfs-bucket": {"algorithm": "token_bucket", "priority_threshold": 1.0},
}

# Targets (issue 9).
UTIL_FULL = 0.95  # burst, sustained
UTIL_HARD = 0.85  # tokenizer, foreign
SMALL_P90_WAIT = 2.0
SMALL_OVER_LARGE = 0.25

_current: contextvars.ContextVar[Outcome | None] = contextvars.ContextVar(
    "fullspeed_outcome", default=None
)


@dataclass
class Outcome(_Outcome):
    stream: bool = False
    timeouts: int = 0  # attempts that hit the client's timeout (the SDK may retry them)


@dataclass
class Scenario:
    name: str
    paths: list[str]
    duration: float
    drain: float
    stream_share: float = 0.3
    mock: dict[str, Any] = field(default_factory=dict)  # MockSettings overrides
    client_timeout: float | None = None
    foreign_initial: float = 0.0  # share of tpm used by another client before the load
    foreign_rate: float = 0.0  # share of tpm per minute it goes on using during the load


def scenarios(ctx: Context) -> list[Scenario]:
    """All scenarios; FULLSPEED_SCENARIOS / FULLSPEED_PATHS (comma-separated) pick some, for
    investigating one case without the whole run."""
    only = {n for n in os.environ.get("FULLSPEED_SCENARIOS", "").split(",") if n}
    paths = {n for n in os.environ.get("FULLSPEED_PATHS", "").split(",") if n}
    picked = [s for s in _all_scenarios(ctx) if not only or s.name in only]
    for scenario in picked:
        if paths:
            scenario.paths = [p for p in scenario.paths if p in paths]
    return picked


def _all_scenarios(ctx: Context) -> list[Scenario]:
    drain = ctx.pick(30.0, 60.0)
    return [
        Scenario("burst", ["bucket", "window", "direct"], 40.0, drain),
        Scenario(
            "sustained",
            ["bucket", "window", "fcfs-bucket", "direct"],
            ctx.pick(75.0, 150.0),
            65.0,  # > the client timeout: everything left then has timed out at least once
            client_timeout=60.0,
        ),
        Scenario(
            "tokenizer",
            ["bucket", "window", "direct"],
            40.0,
            drain,
            stream_share=0.5,
            mock={"input_token_factor": 1.15, "refund_unused": False},
        ),
        Scenario(
            "foreign",
            ["bucket", "window", "direct"],
            40.0,
            drain,
            foreign_initial=0.3,
            foreign_rate=0.1,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Requests and clients


class Plans:
    """Worker w's k-th request (body, stream or not), the same for every path; built lazily."""

    def __init__(self, stream_share: float, seed: int, small_share: float = 0.7) -> None:
        import random

        self._random = random.Random
        self._settings = loadgen.Settings(small_share=small_share)
        self._stream_share = stream_share
        self._seed = seed
        self._cache: dict[tuple[int, int], tuple[Any, bool]] = {}

    def get(self, worker: int, k: int) -> tuple[Any, bool]:
        key = (worker, k)
        if key not in self._cache:
            rng = self._random(f"{self._seed}-{worker}-{k}")
            planned = loadgen.plan_request(worker * MAX_PER_WORKER + k, self._settings, rng)
            self._cache[key] = (planned, rng.random() < self._stream_share)
        return self._cache[key]


def http_client_class() -> type:
    import httpx2

    class CountingClient(httpx2.AsyncClient):
        """Counts attempts that hit the client timeout (the SDK retries them out of sight)."""

        async def send(self, request: Any, **kwargs: Any) -> Any:
            try:
                return await super().send(request, **kwargs)
            except httpx2.TimeoutException:
                out = _current.get()
                if out is not None:
                    out.timeouts += 1
                raise

    return CountingClient


def make_client(base_url: str, timeout: float, proxy: str | None = None, ca: Any = None) -> Any:
    import httpx2
    import openai

    extra: dict[str, Any] = {}
    if proxy is not None:
        extra = {"proxy": proxy, "verify": ssl.create_default_context(cafile=str(ca))}
    http_client = http_client_class()(
        timeout=httpx2.Timeout(timeout, connect=min(timeout, 30.0)),
        limits=httpx2.Limits(max_connections=200, max_keepalive_connections=100),
        trust_env=False,
        **extra,
    )
    # max_retries: the SDK's default (2), as users run it.
    return openai.AsyncOpenAI(
        api_key="bench", base_url=base_url, timeout=timeout, http_client=http_client
    )


async def _one(client: Any, planned: Any, stream: bool, out: Outcome, clock: Any) -> None:
    import httpx2
    import openai

    body = planned.body
    _current.set(out)
    extra: dict[str, Any] = (
        {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    )
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=body["model"],
            messages=body["messages"],
            max_completion_tokens=body["max_completion_tokens"],
            **extra,
        )
        out.status = raw.http_response.status_code
        out.retries = getattr(raw, "retries_taken", 0)
        wait = raw.headers.get("x-cooldown-wait")
        if wait is not None:
            out.held = float(wait)
        parsed = raw.parse()
        if stream:
            usage = None
            async for chunk in parsed:
                usage = chunk.usage or usage
            if usage is None:
                raise RuntimeError("stream ended without usage")
        out.ok = 200 <= out.status < 300
    except openai.APIStatusError as e:
        out.status, out.error = e.status_code, f"http_{e.status_code}"
    except (openai.APITimeoutError, httpx2.TimeoutException):
        out.error = "timeout"
        out.timeouts = max(out.timeouts, 1)
    except openai.APIConnectionError as e:
        out.error = type(e).__name__
    except asyncio.CancelledError:
        out.error = UNFINISHED  # still going when the drain time ran out
        raise
    except Exception as e:  # a broken stream etc.: a client error, not a crash
        out.error = f"{type(e).__name__}: {e}"[:120]
    finally:
        out.done = clock()


async def closed_loop(
    clients: dict[str, tuple[Any, PathRun[Outcome]]],
    plans: Plans,
    duration: float,
    drain: float,
    clock: Callable[[], float],
) -> None:
    """WORKERS workers per path send back-to-back until `duration`; bounded drain; cancel."""

    async def worker(client: Any, run: PathRun[Outcome], w: int) -> None:
        for k in range(MAX_PER_WORKER):
            if clock() >= duration:
                return
            planned, stream = plans.get(w, k)
            out = Outcome(planned.size_class, planned.estimated_tokens, clock(), stream=stream)
            run.outcomes.append(out)
            await _one(client, planned, stream, out, clock)

    tasks = [
        asyncio.create_task(worker(client, run, w))
        for w in range(WORKERS)
        for client, run in clients.values()
    ]
    await asyncio.wait(tasks, timeout=max(0.0, duration + drain - clock()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def foreign_client(
    mock: Any, scenario: Scenario, clock: Callable[[], float], taken: dict[str, int], path: str
) -> None:
    """Another client of the organization, straight at the mock, once a second during the
    load; adds the tokens it actually got to `taken[path]`."""
    per_second = round(scenario.foreign_rate * TPM / 60)
    tick = 1
    while tick < scenario.duration:
        await asyncio.sleep(max(0.0, tick - clock()))
        tick += 1
        taken[path] += consume(mock, per_second)


def consume(mock: Any, tokens: int) -> int:
    """Take `tokens` from the mock's buckets; what was really taken (a bucket stops at 0)."""
    if tokens <= 0:
        return 0
    before = _tokens_left(mock)
    after = mock.consume(tokens=tokens)["tokens-minute"]
    return tokens if after > 0 else min(tokens, before)


def _tokens_left(mock: Any) -> int:
    for name, value in mock._state.limiter.headers():  # read-only peek at the mock
        if name == "x-ratelimit-remaining-tokens-minute":
            return int(value)
    return 0


# ---------------------------------------------------------------------------------------------
# One scenario


def run_scenario(ctx: Context, scenario: Scenario) -> dict:
    settings = mock_cerebras.MockSettings(rpm=RPM, tpm=TPM, **scenario.mock)
    proxies: dict[str, Mitmdump] = {}
    timeout = scenario.client_timeout or LONG_TIMEOUT
    plans = Plans(scenario.stream_share, SEED)
    foreign: dict[str, int] = {}
    with contextlib.ExitStack() as stack:  # stops the proxies, then the mocks
        mocks = {
            p: stack.enter_context(mock_cerebras.MockCerebras(settings)) for p in scenario.paths
        }
        for path in scenario.paths:
            if path in PROXY_LIMITS:
                proxies[path] = stack.enter_context(
                    start_cooldown_before(
                        ctx.workdir,
                        f"fullspeed-{scenario.name}-{path}",
                        mocks[path].url,
                        RPM,
                        TPM,
                        PROXY_LIMITS[path],
                    )
                )

        def client_for(path: str) -> Any:
            if path not in proxies:
                return make_client(f"{mocks[path].url}/v1", timeout)
            return make_client(
                "https://api.cerebras.ai/v1",
                timeout,
                proxy=proxies[path].url,
                ca=proxies[path].ca_file,
            )

        async def main() -> tuple[dict[str, PathRun[Outcome]], float]:
            clients = {p: (client_for(p), PathRun[Outcome](p)) for p in scenario.paths}
            loop = asyncio.get_running_loop()
            for mock in mocks.values():
                mock.reset()
            start_mono = time.monotonic()
            start = loop.time()

            def clock() -> float:
                return loop.time() - start

            for path, mock in mocks.items():
                foreign[path] = consume(mock, round(scenario.foreign_initial * TPM))
            background = [
                asyncio.create_task(foreign_client(m, scenario, clock, foreign, p))
                for p, m in mocks.items()
                if scenario.foreign_rate > 0
            ]
            try:
                await closed_loop(clients, plans, scenario.duration, scenario.drain, clock)
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                for client, _ in clients.values():
                    with contextlib.suppress(Exception):
                        await client.close()
            return {p: c[1] for p, c in clients.items()}, start_mono

        runs, start_mono = asyncio.run(main())

    return {
        path: path_figures(
            scenario,
            mocks[path].stats(),
            utilization(mocks[path].history(), start_mono, scenario.duration),
            runs[path].outcomes,
            foreign.get(path, 0),
        )
        for path in scenario.paths
    }


def path_figures(
    scenario: Scenario,
    stats: dict[str, Any],
    util: dict[str, float],
    outcomes: list[Outcome],
    foreign_tokens: int,
) -> dict[str, Any]:
    T = scenario.duration
    bucket_max = TPM / 60 * T + TPM
    ok = [o for o in outcomes if o.ok and o.done is not None]

    def latencies(cls: str) -> list[float]:
        return [o.done - o.sent for o in ok if o.size_class == cls and o.done is not None]

    def held(cls: str) -> list[float]:
        return [o.held for o in ok if o.size_class == cls and o.held is not None]

    small, large = latencies("small"), latencies("large")
    small_p50, large_p50 = percentile(small, 50), percentile(large, 50)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok and o.error != UNFINISHED:
            key = o.error or f"http_{o.status}"
            errors[key] = errors.get(key, 0) + 1
    return {
        "upstream_429s": stats["rate_limited"] - stats["forced_429"],
        "mock_stats": stats,
        "sent": len(outcomes),
        "streamed": sum(1 for o in outcomes if o.stream),
        "answered": len(ok),
        "client_errors": sum(errors.values()),
        "errors": errors,
        "unfinished": sum(1 for o in outcomes if o.error == UNFINISHED),
        "retried": sum(1 for o in outcomes if o.retries),
        "timeouts": sum(1 for o in outcomes if o.timeouts),
        "kept_tokens": util["kept_tokens"],
        "admitted_in_T": util["admitted_requests"],
        "busiest_60s_tokens": util["busiest_60s_window_tokens"],
        "utilization": util["kept_tokens"] / bucket_max,
        "foreign_tokens": foreign_tokens,
        "utilization_of_left": util["kept_tokens"] / max(1.0, bucket_max - foreign_tokens),
        "small_p50": small_p50,
        "small_p90": percentile(small, 90),
        "small_held_p90": percentile(held("small"), 90),
        "large_p50": large_p50,
        "large_max": max(large) if large else None,
        "small_over_large_p50": small_p50 / large_p50
        if small_p50 is not None and large_p50
        else None,
    }


# ---------------------------------------------------------------------------------------------
# Tables and figures


def _cell(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "%":
        return f"{100 * value:.1f} %"
    if kind == "s":
        return f"{value:.2f} s"
    if kind == "r":
        return f"{value:.3f}"
    return f"{value:,}" if isinstance(value, int) else f"{value:.3g}"


COLUMNS: dict[str, list[tuple[str, str, str]]] = {  # header, key, kind
    "burst": [
        ("util", "utilization", "%"),
        ("upstream 429s", "upstream_429s", ""),
        ("client errors", "client_errors", ""),
        ("answered", "answered", ""),
        ("unfinished", "unfinished", ""),
        ("sent", "sent", ""),
    ],
    "sustained": [
        ("util", "utilization", "%"),
        ("upstream 429s", "upstream_429s", ""),
        ("small p90 e2e", "small_p90", "s"),
        ("small p90 held", "small_held_p90", "s"),
        ("timed out", "timeouts", ""),
        ("small/large p50", "small_over_large_p50", "r"),
        ("max large", "large_max", "s"),
        ("errors", "client_errors", ""),
        ("answered", "answered", ""),
    ],
    "tokenizer": [
        ("util", "utilization", "%"),
        ("upstream 429s", "upstream_429s", ""),
        ("client errors", "client_errors", ""),
        ("answered", "answered", ""),
        ("unfinished", "unfinished", ""),
        ("streamed", "streamed", ""),
    ],
    "foreign": [
        ("util of left", "utilization_of_left", "%"),
        ("upstream 429s", "upstream_429s", ""),
        ("client errors", "client_errors", ""),
        ("answered", "answered", ""),
        ("unfinished", "unfinished", ""),
        ("foreign tokens", "foreign_tokens", ""),
    ],
}


def table(name: str, data: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, one row per path."""
    columns = COLUMNS[name]
    lines = [
        "| path | " + " | ".join(h for h, _, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for path, figures in data.items():
        cells = [_cell(figures[key], kind) for _, key, kind in columns]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_figures(result: BenchResult, name: str, data: dict[str, dict[str, Any]], T: float) -> None:
    """Target-bearing figures of the `bucket` path (the default), each beside a baseline."""
    if not {"bucket", "window", "direct"} <= data.keys():
        return  # a partial run (FULLSPEED_PATHS): the tables say it all
    b, w, d = data["bucket"], data["window"], data["direct"]

    def fig(
        label: str,
        key: str,
        base: str,
        target: str = "",
        met: Callable[[float], bool] | None = None,
        unit: str = "",
        scale: float = 1.0,
        note: str = "",
    ) -> None:
        label = f"{name}: {label}, bucket"
        result.add(beside(label, b[key], data[base][key], base, target, met, unit, scale, note))

    if name == "foreign":
        fig(
            "utilization of what is left",
            "utilization_of_left",
            "window",
            f">= {UTIL_HARD:.0%}",
            lambda v: v >= UTIL_HARD,
            "%",
            100.0,
            note=f"T = {T:g} s; the other client took {b['foreign_tokens']:,} tokens; "
            f"direct {100 * d['utilization_of_left']:.1f} %",
        )
    else:
        least = UTIL_HARD if name == "tokenizer" else UTIL_FULL
        fig(
            "utilization (kept / (tpm/60 x T + tpm))",
            "utilization",
            "window",
            f">= {least:.0%}",
            lambda v: v >= least,
            "%",
            100.0,
            note=f"T = {T:g} s; direct {100 * d['utilization']:.1f} %",
        )
    allowed = 0 if name in ("burst", "sustained") else 1
    fig("upstream 429s", "upstream_429s", "direct", f"<= {allowed}", lambda v: v <= allowed)
    if name != "sustained":
        fig(
            "client errors",
            "client_errors",
            "direct",
            "0",
            lambda v: v == 0,
            note=f"errors {b['errors']}; unfinished at the end: bucket {b['unfinished']}, "
            f"window {w['unfinished']}, direct {d['unfinished']}",
        )
        return
    if "fcfs-bucket" not in data:
        return
    f = data["fcfs-bucket"]
    fig(
        "small p90 held (X-Cooldown-Wait)",
        "small_held_p90",
        "window",
        f"<= {SMALL_P90_WAIT:g} s",
        lambda v: v <= SMALL_P90_WAIT,
        "s",
        note=f"end-to-end p90: bucket {_cell(b['small_p90'], 's')}, "
        f"direct {_cell(d['small_p90'], 's')}",
    )
    fig(
        "requests that hit the 60 s client timeout",
        "timeouts",
        "fcfs-bucket",
        "< fcfs-bucket",
        lambda v: v < f["timeouts"],
    )
    fig(
        "small p50 / large p50 latency",
        "small_over_large_p50",
        "fcfs-bucket",
        f"<= {SMALL_OVER_LARGE:.0%}",
        lambda v: v <= SMALL_OVER_LARGE,
    )
    fig("largest large-request latency", "large_max", "fcfs-bucket", unit="s")


def run(ctx: Context) -> BenchResult:
    result = BenchResult("fullspeed", "Full speed: bucket vs window vs direct, side by side")
    tables: list[str] = []
    for scenario in scenarios(ctx):
        t0 = time.monotonic()
        print(
            f"-- {scenario.name}: {len(scenario.paths)} paths x {WORKERS} workers, "
            f"{scenario.duration:g} s (+ drain <= {scenario.drain:g} s)",
            flush=True,
        )
        data = run_scenario(ctx, scenario)
        text = table(scenario.name, data)
        print(text, flush=True)
        print(f"   ({time.monotonic() - t0:.0f} s)", flush=True)
        tables += [f"**{scenario.name}** (T = {scenario.duration:g} s)", "", text, ""]
        result.details[scenario.name] = {
            "duration_s": scenario.duration,
            "drain_s": scenario.drain,
            "seconds": time.monotonic() - t0,
            "scenario": {k: v for k, v in vars(scenario).items() if k != "paths"},
            "paths": data,
        }
        add_figures(result, scenario.name, data, scenario.duration)
    result.details["markdown"] = "\n".join(tables)
    result.details.update({"rpm": RPM, "tpm": TPM, "workers": WORKERS, "seed": SEED})
    return result
