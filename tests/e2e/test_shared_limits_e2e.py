"""Limits shared on Redis (issue 11), end to end: two real mitmdump + Cooldown processes, each
given the organization's *full* limits, in front of one mock Cerebras, sharing one Redis that
the test starts itself (tools/redis_server.py; skipped when `redis-server` is missing; never
the machine's own Redis).

1. **Shared, and a control without sharing.** Clients are split over both proxies; every
   request costs about 4,000 tokens at admission (`max_completion_tokens`), refunded down to
   what was generated when the mock answers (after 1 s). One proxy's clients alone never
   reach the limit (12 x 4,030 < 60,000), so a proxy on its own forwards them all at once;
   both proxies' clients together ask for about 1.6 x the limit. `probe_first` is off, so
   both proxies release their first wave at once, before any answer (and its
   `x-ratelimit-*` headers) could tell one about the other: with the probe on, whether the
   headers save two unshared proxies is a race (0 to 16 upstream 429s in four runs). With
   the limits shared, the proxies hold the excess between them: at most one upstream 429,
   every client gets a 200, both proxies say `shared` with 2 instances (JSON and the
   `cooldown_shared_limits_up` gauge), and nothing is left held, reserved or tracked on
   either. The control is the same run without `shared_limits`: the mock refuses the first
   wave's excess (7-10 upstream 429s, often enough for a breaker to open); it checks the
   premise that makes the first case mean something.
2. **Redis killed mid-run and restarted** (`on_error: hold`, `local`, `reject`): clients keep
   sending through both proxies while Redis is SIGKILLed for a few seconds and started again,
   empty, on the same port. Every request gets an HTTP answer (a 200, or the proxy's own
   503/429 with an OpenAI-style error) within `request_timeout` (plus upstream's latency and
   a generous margin: a hang shows as the client's own timeout, far above it), no client sees
   a connection error, both proxies stay up and say their state in `/metrics.json`
   (`shared_limits.state`: `holding`, `local` or `rejecting` while Redis is gone, and
   `cooldown_shared_limits_up` 0; `shared` with both instances, and 1, once it is back), and
   afterwards nothing is held, reserved or tracked. Under `reject` some requests get 503.

Every run prints its figures (FIGURES line; appended to $COOLDOWN_E2E_FIGURES when set).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tools.redis_server import RedisServer

from .conftest import CEREBRAS_CHAT, CEREBRAS_MODELS, Proxy, chat_body
from .faults_support import METRICS_TEXT, Launcher, launcher, metrics, record_figures, wait_settled

pytestmark = pytest.mark.e2e

MODEL = "llama3.1-8b"
KEY_PREFIX = "cooldown-e2e:"
SETTLE_TIMEOUT = 15.0
STATE_TIMEOUT = 15.0  # for a proxy to notice Redis gone or back (heartbeat, reconnect)

# 1. Sharing. The tokens-per-minute limit binds through the reservations in flight: each
# request reserves ~4,030 tokens for LATENCY seconds, then keeps ~45.
SHARE_RPM = 1_000
SHARE_TPM = 60_000
SHARE_COMPLETION = 4_000
SHARE_LATENCY = 1.0
SHARE_CLIENTS = 12  # per proxy
SHARE_ROUNDS = 4  # requests per client, one after the other
MAX_UPSTREAM_429S = 1
SHARE_TIMEOUT = httpx.Timeout(120.0, connect=10.0)

# 2. Redis killed. Limits that leave room (the point is what happens without Redis), short
# answers, a request_timeout that an outage of OUTAGE seconds fits in.
OUTAGE_RPM = 3_000
OUTAGE_TPM = 300_000
OUTAGE_COMPLETION = 300
OUTAGE_LATENCY = 0.2
OUTAGE_CLIENTS = 6  # per proxy
REQUEST_TIMEOUT = 8.0
BEFORE_KILL = 2.5
OUTAGE = 3.0
AFTER_RESTART = 3.0
# An answer may come request_timeout after the request was held, plus upstream's latency:
# beyond this margin on top (a loaded 2-core machine), the test calls it a hang.
ANSWER_MARGIN = 10.0
OUTAGE_CLIENT_TIMEOUT = httpx.Timeout(REQUEST_TIMEOUT + 60.0, connect=10.0)
REFUSED_PAUSE = 0.25  # a client's pause after the proxy refused it (shorter than Retry-After)
PROXY_STATUSES = {429, 503}  # the proxy's own answers that a Redis outage may bring


@pytest.fixture
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    """`launch(config)` starts mitmdump + Cooldown; failed tests get the logs attached."""
    yield from launcher(request, tmp_path)


def proxy_config(
    upstream: str,
    limits: dict[str, Any],
    redis: RedisServer | None,
    on_error: str = "hold",
) -> dict[str, Any]:
    config: dict[str, Any] = {"cerebras_limits": limits, "cerebras_upstream": upstream}
    if redis is not None:
        config["shared_limits"] = {
            "redis_url": redis.url,
            "key_prefix": KEY_PREFIX,
            "on_error": on_error,
        }
    return config


@dataclass
class Answer:
    proxy: int
    started: float
    finished: float
    status: int | None = None  # None: no HTTP answer at all
    error: str | None = None  # the transport error, or the proxy's own error code
    refused_by_proxy: bool = False

    @property
    def seconds(self) -> float:
        return self.finished - self.started


async def ask(client: httpx.AsyncClient, proxy: int, body: dict[str, Any]) -> Answer:
    started = time.monotonic()
    try:
        response = await client.post(CEREBRAS_CHAT, json=body)
    except httpx.HTTPError as exc:
        return Answer(proxy, started, time.monotonic(), error=f"{type(exc).__name__}: {exc}")
    answer = Answer(proxy, started, time.monotonic(), status=response.status_code)
    refused = response.headers.get("x-cooldown-refused")
    if refused is not None:
        answer.refused_by_proxy = True
        answer.error = refused
    elif response.status_code != 200:
        answer.error = response.text[:200]
    return answer


def shared_state(proxy: Proxy) -> dict[str, Any] | None:
    return metrics(proxy).get("shared_limits")


def shared_up_gauge(proxy: Proxy) -> float | None:
    """`cooldown_shared_limits_up` from the proxy's Prometheus text (None: not there)."""
    response = httpx.get(METRICS_TEXT, proxy=proxy.url, timeout=10.0, trust_env=False)
    match = re.search(r"^cooldown_shared_limits_up(?:\{[^}]*\})? (\S+)$", response.text, re.M)
    return None if match is None else float(match.group(1))


def wait_for_shared(proxies: list[Proxy], timeout: float = STATE_TIMEOUT) -> list[Any]:
    """Poll every proxy's `shared_limits` until each shares through Redis and sees all the
    proxies alive (or `timeout`); the last states seen."""
    deadline = time.monotonic() + timeout
    while True:
        states = [shared_state(p) for p in proxies]
        if all(
            s is not None and s.get("state") == "shared" and s.get("instances") == len(proxies)
            for s in states
        ):
            return states
        if time.monotonic() >= deadline:
            return states
        time.sleep(0.1)


def assert_settled_and_up(proxies: list[Proxy]) -> list[dict[str, Any]]:
    """Both proxies still run, and nothing is held, reserved or tracked on either."""
    snapshots = []
    for index, proxy in enumerate(proxies):
        assert proxy.process.poll() is None, f"proxy {index} exited:\n{proxy.log_tail()}"
        snapshot = wait_settled(proxy, SETTLE_TIMEOUT)
        leftovers = {
            k: snapshot[k] for k in ("cerebras_queue_depth", "open_reservations", "tracked_flows")
        }
        assert leftovers == dict.fromkeys(leftovers, 0), (index, leftovers)
        snapshots.append(snapshot)
    return snapshots


def start_pair(
    launch: Launcher, upstream: str, limits: dict[str, Any], redis: RedisServer | None, **kw: Any
) -> list[Proxy]:
    # info, not debug: two proxies logging every decision cost CPU the run needs.
    return [launch(proxy_config(upstream, limits, redis, **kw), verbosity="info") for _ in range(2)]


# ---------------------------------------------------------------------------------------------
# 1. Two proxies, one Redis (and the control without it)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "control-unshared"])
async def test_two_proxies_on_one_redis_keep_the_organizations_limits(
    launch: Launcher,
    mock_upstream: Any,
    mock_cerebras_module: Any,
    redis_server: RedisServer,
    shared: bool,
) -> None:
    body = chat_body(max_completion_tokens=SHARE_COMPLETION)
    cost = mock_cerebras_module.parse_completion_request(
        json.dumps(body).encode(), chat=True, context_length=131_072
    ).cost
    # The premise: one proxy's clients fit the limit at once, both proxies' clients do not.
    assert SHARE_CLIENTS * cost < SHARE_TPM < 2 * SHARE_CLIENTS * cost

    mock_upstream.configure(rpm=SHARE_RPM, tpm=SHARE_TPM, latency=SHARE_LATENCY)
    limits = {
        "rpm_limit": SHARE_RPM,
        "tpm_limit": SHARE_TPM,
        "request_timeout": "60s",
        "probe_first": False,
    }
    proxies = start_pair(launch, mock_upstream.url, limits, redis_server if shared else None)
    if shared:
        states = wait_for_shared(proxies)
        assert [s and (s["state"], s["instances"]) for s in states] == [("shared", 2)] * 2, states
        assert len({s["instance"] for s in states}) == 2, states

    answers: list[Answer] = []

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        for _ in range(SHARE_ROUNDS):
            answers.append(await ask(client, index, body))

    clients = [p.async_client(timeout=SHARE_TIMEOUT) for p in proxies]
    try:
        # Every client's connection (CONNECT, TLS) is open before the first wave, so that
        # both proxies' first waves leave together: the control's premise does not depend on
        # how long one proxy took to set up its clients.
        await asyncio.gather(
            *(client.get(CEREBRAS_MODELS) for client in clients for _ in range(SHARE_CLIENTS))
        )
        mock_upstream.reset()
        started = time.monotonic()
        await asyncio.gather(
            *(
                client_loop(clients[index], index)
                for index in range(len(proxies))
                for _ in range(SHARE_CLIENTS)
            )
        )
    finally:
        for client in clients:
            await client.aclose()
    elapsed = time.monotonic() - started
    stats = mock_upstream.stats()
    upstream_429s = stats["rate_limited"] - stats["forced_429"]
    history = mock_upstream.history()
    snapshots = assert_settled_and_up(proxies)
    record_figures(
        {
            "test": f"shared_limits_{'shared' if shared else 'control'}",
            "requests": len(answers),
            "statuses": dict(Counter(str(a.status) for a in answers)),
            "upstream_requests": stats["requests"],
            "upstream_429s": upstream_429s,
            "upstream_429_positions": [i for i, e in enumerate(history) if e["status"] == 429],
            "elapsed_s": round(elapsed, 2),
            "per_proxy_forwarded": [s["requests"].get(MODEL, {}) for s in snapshots],
            "shared_limits": [s.get("shared_limits") for s in snapshots],
        }
    )
    for proxy in proxies:
        proxy.assert_clean_log()

    if not shared:
        # The control: two proxies that do not share send more than the organization's limit.
        assert upstream_429s > MAX_UPSTREAM_429S, stats
        assert all(s.get("shared_limits") is None for s in snapshots)
        return
    assert upstream_429s <= MAX_UPSTREAM_429S, stats
    errors = [a for a in answers if a.status != 200]
    assert not errors, errors
    assert len(answers) == 2 * SHARE_CLIENTS * SHARE_ROUNDS
    for snapshot in snapshots:
        assert snapshot["shared_limits"]["state"] == "shared", snapshot["shared_limits"]
        assert snapshot["shared_limits"]["instances"] == 2, snapshot["shared_limits"]
    assert [shared_up_gauge(p) for p in proxies] == [1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# 2. Redis killed mid-run and restarted

# What `shared_limits.state` says while Redis is gone, per on_error.
OUTAGE_STATE = {"hold": "holding", "local": "local", "reject": "rejecting"}


@pytest.mark.parametrize("on_error", list(OUTAGE_STATE))
async def test_redis_killed_and_restarted_mid_run_answers_every_request(
    launch: Launcher, mock_upstream: Any, redis_server: RedisServer, on_error: str
) -> None:
    mock_upstream.configure(rpm=OUTAGE_RPM, tpm=OUTAGE_TPM, latency=OUTAGE_LATENCY)
    limits = {
        "rpm_limit": OUTAGE_RPM,
        "tpm_limit": OUTAGE_TPM,
        "request_timeout": f"{REQUEST_TIMEOUT:g}s",
    }
    proxies = start_pair(launch, mock_upstream.url, limits, redis_server, on_error=on_error)
    states = wait_for_shared(proxies)
    assert [s and (s["state"], s["instances"]) for s in states] == [("shared", 2)] * 2, states

    body = chat_body(max_completion_tokens=OUTAGE_COMPLETION)
    answers: list[Answer] = []
    stop = asyncio.Event()
    # What each proxy's /metrics.json and /metrics said while Redis was gone.
    seen_during_outage: list[list[Any]] = [[] for _ in proxies]
    gauge_during_outage: list[list[float | None]] = [[] for _ in proxies]
    restarted_at = float("inf")
    run_started = time.monotonic()

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        while not stop.is_set():
            answer = await ask(client, index, body)
            answers.append(answer)
            if answer.refused_by_proxy:
                await asyncio.sleep(REFUSED_PAUSE)  # as a client honouring Retry-After would

    async def outage() -> None:
        nonlocal restarted_at
        await asyncio.sleep(BEFORE_KILL)
        assert redis_server.kill(), "redis-server was not running"
        killed_at = time.monotonic()
        # Each proxy notices (its next call to Redis, or its heartbeat) and says so.
        deadline = killed_at + OUTAGE
        while time.monotonic() < deadline:
            for index, proxy in enumerate(proxies):
                state = await asyncio.to_thread(shared_state, proxy)
                seen_during_outage[index].append(state and state.get("state"))
                gauge = await asyncio.to_thread(shared_up_gauge, proxy)
                gauge_during_outage[index].append(gauge)
            await asyncio.sleep(0.25)
        await asyncio.to_thread(redis_server.start)
        restarted_at = time.monotonic()
        await asyncio.sleep(AFTER_RESTART)
        stop.set()

    clients = [p.async_client(timeout=OUTAGE_CLIENT_TIMEOUT) for p in proxies]
    try:
        await asyncio.gather(
            outage(),
            *(
                client_loop(clients[index], index)
                for index in range(len(proxies))
                for _ in range(OUTAGE_CLIENTS)
            ),
        )
    finally:
        for client in clients:
            await client.aclose()
    elapsed = time.monotonic() - run_started

    states_after = wait_for_shared(proxies)
    assert_settled_and_up(proxies)
    stats = mock_upstream.stats()
    record_figures(
        {
            "test": f"shared_limits_redis_killed_{on_error}",
            "requests": len(answers),
            "statuses": dict(Counter(str(a.status) for a in answers)),
            "proxy_refusals": dict(Counter(a.error for a in answers if a.refused_by_proxy)),
            "transport_errors": sum(1 for a in answers if a.status is None),
            "slowest_answer_s": round(max((a.seconds for a in answers), default=0.0), 2),
            "upstream_requests": stats["requests"],
            "upstream_429s": stats["rate_limited"] - stats["forced_429"],
            "states_during_outage": [dict(Counter(map(str, seen))) for seen in seen_during_outage],
            "up_gauge_during_outage": [dict(Counter(map(str, g))) for g in gauge_during_outage],
            "answered_200_after_restart": sum(
                1 for a in answers if a.status == 200 and a.started > restarted_at
            ),
            "states_after": states_after,
            "elapsed_s": round(elapsed, 2),
        }
    )
    for proxy in proxies:
        proxy.assert_clean_log()

    # Every request got an HTTP answer: a 200, or the proxy's own refusal.
    unanswered = [a for a in answers if a.status is None]
    assert not unanswered, unanswered[:5]
    odd = [a for a in answers if a.status != 200 and not a.refused_by_proxy]
    assert not odd, odd[:5]
    assert {a.status for a in answers if a.refused_by_proxy} <= PROXY_STATUSES
    # ... within request_timeout (plus upstream's latency and the margin): nothing hung.
    slowest = max(answers, key=lambda a: a.seconds)
    assert slowest.seconds <= REQUEST_TIMEOUT + OUTAGE_LATENCY + ANSWER_MARGIN, slowest
    # Requests went through before the outage, and again once Redis was back.
    assert any(a.status == 200 and a.finished < run_started + BEFORE_KILL for a in answers)
    assert any(a.status == 200 and a.started > restarted_at for a in answers)
    # Each proxy said Redis was gone, in the words of its on_error, then came back to shared.
    for index in range(len(proxies)):
        assert OUTAGE_STATE[on_error] in seen_during_outage[index], (index, seen_during_outage)
        assert 0.0 in gauge_during_outage[index], (index, gauge_during_outage)
    assert [s and (s["state"], s["instances"]) for s in states_after] == [("shared", 2)] * 2, (
        states_after
    )
    assert [shared_up_gauge(p) for p in proxies] == [1.0, 1.0]
    if on_error == "reject":
        assert any(a.status == 503 for a in answers), Counter(a.status for a in answers)
