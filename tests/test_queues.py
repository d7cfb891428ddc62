"""Priority classes and the fair share between clients (queues.py), with a fake clock."""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cooldown.breaker import CircuitBreaker
from cooldown.config import BreakerConfig, CerebrasLimits, ClientConfig, Config
from cooldown.limiter import MemoryLimiter, Rate
from cooldown.queues import CLASS_STEP
from cooldown.scheduler import Scheduler
from cooldown.tickets import NORMAL, Policy, Ticket, policy_of

HIGH, LOW = Policy(priority=1), Policy(priority=-1)
LIMITS = CerebrasLimits(
    rpm_limit=1,  # one request a minute: every release is a decision between the held ones
    tpm_limit=10**9,
    max_queue_depth=1000,
    request_timeout=10**6,
    priority_aging=30,
    probe_first=False,
    max_queue_share_per_client=1.0,
)


def make(limits: CerebrasLimits = LIMITS):
    rates = (Rate("rpm", "requests", limits.rpm_limit), Rate("tpm", "tokens", limits.tpm_limit))
    resolved: list[Ticket] = []
    scheduler = Scheduler(
        MemoryLimiter(),
        limits,
        CircuitBreaker(BreakerConfig()),
        lambda key: rates,
        on_resolved=resolved.append,
    )
    return scheduler, resolved


def settle(scheduler, ticket, now):
    """Upstream answered at once: the reservation is charged as estimated."""
    scheduler.confirm(ticket, now)
    scheduler.finish(ticket, 200, ticket.tokens, now)


def drain(scheduler, resolved, now: float, on_release=None, until: float = 1e6):
    """Pump at every moment the scheduler asks for, settling what it releases at once, until
    nothing is held (or `until`); `on_release(ticket, now)` sees each release."""
    done = len(resolved)
    while scheduler.depth and now < until:
        wake = scheduler.pump(now)
        for ticket in resolved[done:]:
            settle(scheduler, ticket, now)
            if on_release is not None:
                on_release(ticket, now)
        done = len(resolved)
        if wake is None:
            break
        now = max(wake, now)
    return now


def tracking(limits: CerebrasLimits = LIMITS):
    scheduler, resolved = make(limits)
    blocker = scheduler.submit("k", 1, now=0.0)  # takes the one request of the first minute
    assert not blocker.held
    settle(scheduler, blocker, 0.0)
    return scheduler, resolved


def test_a_high_request_goes_before_normal_ones_of_any_size():
    scheduler, resolved = tracking()
    normal_small = scheduler.submit("k", 100, now=1.0)
    high_large = scheduler.submit("k", 9_000, now=2.0, policy=HIGH)
    low_small = scheduler.submit("k", 100, now=0.5, policy=LOW)
    drain(scheduler, resolved, 2.0)
    assert resolved[1:] == [high_large, normal_small, low_small]


def test_aging_lets_a_low_request_overtake_fresh_high_ones():
    scheduler, resolved = tracking()
    low = scheduler.submit("k", 100, now=1.0, policy=LOW)
    # Fresh high requests keep arriving; the low one goes once it has waited 2 steps (+1).
    starve_for = (2 * CLASS_STEP + 1) * LIMITS.priority_aging
    highs = []
    now = 1.0
    while low.held and now < 10 * starve_for:
        highs.append(scheduler.submit("k", 100, now=now, policy=HIGH))
        now = drain(scheduler, resolved, now, until=now + 60.0)
    assert not low.held
    assert low.resolved_at <= 1.0 + starve_for + 60.0  # plus the interval between releases
    assert any(h.held for h in highs)  # it did overtake fresh high ones


def test_a_sequential_client_is_not_stuck_behind_a_backlogged_one():
    """The issue's figure: 30 outstanding vs 6 sequential, same priority."""
    scheduler, resolved = tracking()
    batch = [scheduler.submit("k", 500, now=0.1, client="sha256:aaaaaaaaaaaa") for _ in range(30)]
    agent = [scheduler.submit("k", 500, now=0.2, client="sha256:bbbbbbbbbbbb")]

    def next_turn(ticket, now):
        if ticket.client == "sha256:bbbbbbbbbbbb" and len(agent) < 6:
            agent.append(scheduler.submit("k", 500, now=now + 1.0, client=ticket.client))

    drain(scheduler, resolved, 0.2, next_turn)
    assert all(not t.held for t in agent + batch) and len(agent) == 6
    agent_p50 = statistics.median(t.waited for t in agent)
    batch_p50 = statistics.median(t.waited for t in batch)
    assert agent_p50 <= 0.35 * batch_p50, (agent_p50, batch_p50)


def test_without_fair_share_the_same_workload_would_fail_that_figure():
    """The check above can fail: one client, arrival order, gives the agent the batch's wait."""
    scheduler, resolved = tracking()
    for _ in range(30):
        scheduler.submit("k", 500, now=0.1, client="sha256:aaaaaaaaaaaa")
    late = scheduler.submit("k", 500, now=0.2, client="sha256:aaaaaaaaaaaa")
    drain(scheduler, resolved, 0.2)
    assert late.waited >= 30 * 60 - 1


def test_weights_share_the_releases():
    scheduler, resolved = tracking()
    heavy = Policy(weight=2.0)
    for _ in range(30):
        scheduler.submit("k", 500, now=0.1, client="sha256:aaaaaaaaaaaa", policy=heavy)
        scheduler.submit("k", 500, now=0.1, client="sha256:bbbbbbbbbbbb")
    drain(scheduler, resolved, 0.1, until=30 * 60.0)
    first = resolved[1:31]
    assert (
        19 <= sum(t.client == "sha256:aaaaaaaaaaaa" for t in first) <= 21
    )  # 2 of 3, give or take a tie


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=4),
    sizes=st.lists(st.integers(1, 900), min_size=4, max_size=4),
)
def test_backlogged_clients_get_service_in_proportion_to_weight(weights, sizes):
    """Start-time fair queuing's bound: over any time both clients i and j wait, the service
    each got (in shares of the binding limit) divided by its weight differs by at most
    `cost_i / w_i + cost_j / w_j`. Each client sends one size, so its cost is fixed."""
    limits = replace(LIMITS, rpm_limit=10**6, tpm_limit=1000)  # tokens bind: costs differ
    scheduler, resolved = tracking(limits)
    clients = [f"sha256:{i:012x}" for i in range(len(weights))]
    weight = dict(zip(clients, weights, strict=False))
    cost = {client: size / 1000 for client, size in zip(clients, sizes, strict=False)}
    for _ in range(6):
        for client in clients:
            scheduler.submit(
                "k",
                cost[client] * 1000,
                now=0.1,
                client=client,
                policy=Policy(weight=weight[client]),
            )
    for ticket in resolved:
        if not ticket.finished:
            settle(scheduler, ticket, 0.1)  # went at once, before anything waited
    served = dict.fromkeys(clients, 0.0)
    now, counted = 0.1, len(resolved)
    while scheduler.depth:
        now = drain(scheduler, resolved, now, until=now + 1e-9)
        waiting = {t.client for t in scheduler.held_tickets()}
        for ticket in resolved[counted:]:
            served[ticket.client] += ticket.cost
        counted = len(resolved)
        for a in waiting:
            for b in waiting:
                gap = served[a] / weight[a] - served[b] / weight[b]
                assert gap <= cost[a] / weight[a] + cost[b] / weight[b] + 1e-9, (a, b, served)


def test_policy_of_header_then_client_default():
    config = Config(clients={"sha256:aaaaaaaaaaaa": ClientConfig(priority="low", weight=3.0)})
    assert policy_of(config, "sha256:aaaaaaaaaaaa", None) == Policy(-1, 3.0)
    assert policy_of(config, "sha256:aaaaaaaaaaaa", " HIGH ") == Policy(1, 3.0)
    assert policy_of(config, "sha256:aaaaaaaaaaaa", "urgent") == Policy(-1, 3.0)
    assert policy_of(config, "address:10.0.0.1", "high") == HIGH
    assert policy_of(config, None, None) is NORMAL


@pytest.mark.parametrize("name", ["sk-abcdefghijklmnop", "sha256:ABC", "bob"])
def test_a_client_name_that_is_not_a_fingerprint_is_refused_without_echoing_it(name):
    from cooldown.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({"clients": {name: {"priority": "high"}}})
    assert name not in str(err.value) and "fingerprint" in str(err.value)


async def test_the_priority_header_is_read_and_never_sent_upstream(tmp_path):
    from cooldown.routing import client_of
    from tests.helpers import running_cooldown
    from tests.test_addon import cerebras_flow

    fingerprint = client_of(cerebras_flow())
    config = (
        "cerebras_limits:\n  rpm_limit: 2\n  probe_first: false\n"
        f"clients:\n  '{fingerprint}':\n    priority: low\n    weight: 2\n"
    )
    with running_cooldown(tmp_path, config) as cooldown:
        asked = cerebras_flow()
        asked.request.headers["X-Cooldown-Priority"] = "high"
        default = cerebras_flow()
        for f in (asked, default):
            await cooldown.metering.request(f)
            assert "x-cooldown-priority" not in f.request.headers
        assert cooldown.metering.table.get(asked.id).ticket.policy == Policy(1, 2.0)
        held = cerebras_flow()  # the third in a minute of 2: held, its class on its comment
        held.request.headers["X-Cooldown-Priority"] = "high"
        task = asyncio.ensure_future(cooldown.metering.request(held))
        for _ in range(50):
            await asyncio.sleep(0)
            if held.intercepted:
                break
        assert "class high" in held.comment
        held.kill()
        cooldown.departures.update([held])
        await task
        assert cooldown.metering.table.get(default.id).ticket.policy == Policy(-1, 2.0)
        models = cerebras_flow(path="/v1/models")
        models.request.method = "GET"
        models.request.headers["X-Cooldown-Priority"] = "low"
        await cooldown.metering.request(models)
        assert "x-cooldown-priority" not in models.request.headers


def test_another_clients_small_request_may_still_pass_a_waiting_large_head():
    limits = replace(LIMITS, rpm_limit=1000, tpm_limit=10_000, priority_threshold=0.5)
    scheduler, _ = make(limits)
    blocker = scheduler.submit("k", 10_000, now=0.0)
    large = scheduler.submit("k", 6_000, now=1.0, client="sha256:aaaaaaaaaaaa")
    small = scheduler.submit("k", 500, now=2.0, client="sha256:bbbbbbbbbbbb")
    scheduler.confirm(blocker, 3.0)
    scheduler.finish(blocker, 200, 6_000, 3.0)  # 4,000 free: tight, and the large one waits
    scheduler.pump(3.0)
    assert large.held and not small.held
