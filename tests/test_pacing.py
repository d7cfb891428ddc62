"""Per-domain pacing: the pacer with a fake clock, and the addon that holds paced flows."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from cooldown.config import DomainRateLimit, Pace
from cooldown.pacing import DEFAULT_RULE, Pacer
from tests.helpers import running_cooldown

RULES = [
    DomainRateLimit(requests_per_second=5, domain="*.example.com"),
    DomainRateLimit(requests_per_second=1, domain="*.api.example.com"),
    DomainRateLimit(requests_per_second=2, burst=3, domain="api.example.com"),
]


def take(pacer: Pacer, host: str, now: float, max_held: int = 100, max_wait: float = 600.0):
    return pacer.take(host, now, max_held, max_wait)


@pytest.mark.parametrize(
    ("host", "rule"),
    [
        ("api.example.com", "api.example.com"),  # exact beats every wildcard
        ("v1.api.example.com", "*.api.example.com"),  # the longest domain wins
        ("www.example.com", "*.example.com"),
        ("a.b.example.com", "*.example.com"),  # any depth
        ("WWW.Example.COM", "*.example.com"),
        ("example.com", DEFAULT_RULE),  # *.example.com is for subdomains only
        ("other.org", DEFAULT_RULE),
    ],
)
def test_the_most_specific_entry_applies(host, rule):
    pacer = Pacer(RULES, Pace(requests_per_second=10))
    assert take(pacer, host, 0.0).rule == rule


def test_without_a_default_unnamed_hosts_pass():
    pacer = Pacer(RULES)
    assert take(pacer, "other.org", 0.0) is None
    assert take(pacer, "www.example.com", 0.0) is not None


def test_twenty_requests_at_five_per_second_take_three_point_eight_seconds():
    pacer = Pacer(RULES)
    turns = [take(pacer, "www.example.com", 0.0).release_at for _ in range(20)]
    assert turns == pytest.approx([i * 0.2 for i in range(20)])
    assert pacer.held == 19


def test_burst_goes_back_to_back_then_one_per_interval():
    pacer = Pacer(RULES)
    turns = [take(pacer, "api.example.com", 10.0).release_at for _ in range(5)]
    assert turns == pytest.approx([10.0, 10.0, 10.0, 10.5, 11.0])
    # An idle spell refills the burst, no more.
    later = [take(pacer, "api.example.com", 100.0).release_at for _ in range(4)]
    assert later == pytest.approx([100.0, 100.0, 100.0, 100.5])


def test_each_host_under_the_default_is_paced_on_its_own_and_patterns_are_shared():
    pacer = Pacer(RULES, Pace(requests_per_second=1))
    assert take(pacer, "a.org", 0.0).wait == 0.0
    assert take(pacer, "b.org", 0.0).wait == 0.0
    assert take(pacer, "a.org", 0.0).wait == pytest.approx(1.0)
    assert take(pacer, "x.example.com", 0.0).wait == 0.0
    assert take(pacer, "y.example.com", 0.0).wait == pytest.approx(0.2)


def test_queue_depth_and_timeout_refuse_without_taking_a_turn():
    pacer = Pacer(RULES)
    for _ in range(3):
        take(pacer, "v1.api.example.com", 0.0, max_held=2, max_wait=10.0)
    full = take(pacer, "v1.api.example.com", 0.0, max_held=2, max_wait=10.0)
    assert full.refused == "queue_full" and full.wait == pytest.approx(3.0)
    far = take(pacer, "v1.api.example.com", 0.0, max_held=100, max_wait=2.5)
    assert far.refused == "timeout"
    # Neither moved the schedule on.
    assert take(pacer, "v1.api.example.com", 0.0).release_at == pytest.approx(3.0)


def test_a_cancelled_last_turn_is_given_back_a_middle_one_is_not():
    pacer = Pacer(RULES)
    first = take(pacer, "v1.api.example.com", 0.0)
    second = take(pacer, "v1.api.example.com", 0.0)
    third = take(pacer, "v1.api.example.com", 0.0)
    assert (first.wait, second.wait, third.wait) == (0.0, 1.0, 2.0)
    pacer.done(third, 0.5, went=False)
    assert pacer.held == 1
    assert take(pacer, "v1.api.example.com", 0.5).release_at == pytest.approx(2.0)
    pacer.done(second, 0.5, went=False)  # someone is behind it: the gap stays
    assert take(pacer, "v1.api.example.com", 0.5).release_at == pytest.approx(3.0)


def test_reconfigure_keeps_turns_given():
    pacer = Pacer(RULES)
    take(pacer, "www.example.com", 0.0)
    pacer.reconfigure([DomainRateLimit(requests_per_second=1, domain="*.example.com")], None)
    assert take(pacer, "www.example.com", 0.0).release_at == pytest.approx(0.2)
    assert take(pacer, "www.example.com", 0.0).release_at == pytest.approx(1.2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rps=st.floats(0.1, 50),
    burst=st.integers(1, 5),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_no_window_ever_sees_more_than_its_share(rps, burst, gaps):
    """Whatever the arrivals, turns keep the pace: any `k` consecutive turns span at least
    `(k - burst) / rps` seconds, each turn comes at or after its request, in arrival order."""
    pacer = Pacer([DomainRateLimit(requests_per_second=rps, burst=burst, domain="h")])
    now, turns = 0.0, []
    for gap in gaps:
        now += gap
        slot = take(pacer, "h", now, max_wait=float("inf"))
        assert slot.release_at >= now
        turns.append(slot.release_at)
    assert turns == sorted(turns)
    for i in range(len(turns)):
        for j in range(i + burst, len(turns)):
            assert turns[j] - turns[i] >= (j - i - burst + 1) / rps - 1e-6


# -- the addon -------------------------------------------------------------------------------


def other_flow(host: str):
    f = tflow.tflow()
    f.request.host = host
    return f


@pytest.fixture
def paced(tmp_path):
    with running_cooldown(
        tmp_path,
        "cerebras_limits:\n  max_queue_depth: 3\n  request_timeout: 5s\n"
        "rate_limits:\n  - domain: '*.example.com'\n    requests_per_second: 2\n",
    ) as cooldown:
        yield cooldown


async def test_a_paced_flow_is_held_paused_then_goes(paced):
    addon, metrics = paced.pacing, paced.runtime.metrics
    first, second = other_flow("a.example.com"), other_flow("b.example.com")
    await addon.request(first)
    assert first.response is None and not first.intercepted
    task = asyncio.ensure_future(addon.request(second))
    for _ in range(50):
        await asyncio.sleep(0)
        if second.intercepted:
            break
    assert second.intercepted and "paced (*.example.com)" in second.comment
    assert metrics.snapshot()["paced_held"] == 1
    await task  # its turn comes 0.5 s later (a real timer: the hold is a timed wait)
    assert not second.intercepted and second.response is None
    assert metrics.snapshot()["paced_requests"] == {"*.example.com": {"forwarded": 2}}
    assert second.metadata["cooldown_paced"] == pytest.approx(0.5, abs=0.05)


async def test_cerebras_and_unnamed_hosts_are_not_paced(paced):
    for host in ("api.cerebras.ai", "example.org", "example.com"):
        f = other_flow(host)
        f.request.path = "/v1/models"
        pending = paced.pacing.request(f)
        if pending is not None:
            await pending
        assert "cooldown_paced" not in f.metadata
    # A Cerebras flow is the metering addon's: not even a coroutine to await here.
    assert paced.pacing.request(other_flow("api.cerebras.ai")) is None


async def test_a_client_that_leaves_while_paced_sends_nothing(paced):
    addon = paced.pacing
    await addon.request(other_flow("a.example.com"))
    waiting = other_flow("a.example.com")
    task = asyncio.ensure_future(addon.request(waiting))
    for _ in range(50):
        await asyncio.sleep(0)
        if waiting.intercepted:
            break
    addon.client_disconnected(waiting.client_conn)
    await task
    assert waiting.error is not None  # killed: nothing goes upstream
    assert paced.runtime.pacer.held == 0
    assert paced.runtime.metrics.snapshot()["paced_requests"]["*.example.com"]["cancelled"] == 1


async def test_beyond_the_queue_a_paced_flow_is_refused_with_the_proxys_429(paced):
    addon = paced.pacing
    await addon.request(other_flow("a.example.com"))
    tasks = []
    for _ in range(3):
        f = other_flow("a.example.com")
        tasks.append((f, asyncio.ensure_future(addon.request(f))))
    await asyncio.sleep(0)
    refused = other_flow("a.example.com")
    await addon.request(refused)
    assert refused.response.status_code == 429
    assert b"not by a.example.com" in refused.response.content
    assert refused.response.headers["X-Cooldown-Refused"] == "queue_full"
    for f, task in tasks:
        f.kill()
        addon.update([f])
        await task
    assert paced.runtime.pacer.held == 0
