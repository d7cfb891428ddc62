"""Cerebras's two token buckets: uncached tokens (`tpm_limit`) and total tokens (`total_tpm_limit`).

The property at the end drives the scheduler against a model of upstream that keeps both
buckets, charges each request at a random moment between release and its response headers and
refunds at its end, by either admission rule: neither bucket may ever go below zero, and no
reservation may be left open.
"""

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cooldown.breaker import CircuitBreaker
from cooldown.config import BreakerConfig, CerebrasLimits, ConfigError, parse_config
from cooldown.gate import Gate
from cooldown.limiter import MemoryLimiter, Rate, Settled
from cooldown.scheduler import Outcome, Scheduler
from tests.helpers import FakeClock

UNCACHED = 5_000
TOTAL = 15_000  # 3 x, as Cerebras by default: either bucket may bind
RATES = (
    Rate("rpm", "requests", 50),
    Rate("tpm", "tokens", UNCACHED),
    Rate("total_tpm", "total_tokens", TOTAL),
)


def config(text: str):
    return parse_config(yaml.safe_load(text))


# -- config ------------------------------------------------------------------------------------


def test_total_limit_defaults_to_three_times_the_uncached_one_per_model():
    cfg = config(
        "cerebras_limits: {tpm_limit: 1000}\n"
        "models:\n  a: {tpm_limit: 2000}\n  b: {total_tpm_limit: 2500}\n  c: {total_tpm_limit: 0}\n"
    )
    assert cfg.total_tpm_limit("other") == 3000
    assert cfg.total_tpm_limit("a") == 6000
    assert cfg.total_tpm_limit("b") == 2500
    assert cfg.total_tpm_limit("c") == 0  # off


def test_a_cache_blind_proxy_keeps_no_total_bucket():
    cfg = config("prompt_cache: {enabled: false}\n")
    assert cfg.total_tpm_limit("m") == 0
    gate = Gate(cfg, clock=FakeClock())
    assert [rate.name for rate in gate.rates_for("m")] == ["rpm", "tpm"]


def test_prompt_cache_settings_are_parsed_and_checked():
    cfg = config(
        "prompt_cache: {admission: predicted, block_tokens: 64, ttl: 1h, max_blocks: 500}\n"
    )
    assert cfg.prompt_cache.enabled is True
    assert cfg.prompt_cache.admission == "predicted"
    assert (cfg.prompt_cache.block_tokens, cfg.prompt_cache.ttl) == (64, 3600.0)
    assert cfg.prompt_cache.max_blocks == 500
    with pytest.raises(ConfigError, match=r"prompt_cache\.admission: got 'guess'; expected full"):
        config("prompt_cache: {admission: guess}\n")
    with pytest.raises(ConfigError, match=r"prompt_cache\.max_block: unknown key"):
        config("prompt_cache: {max_block: 5}\n")
    with pytest.raises(ConfigError, match="total_tpm_limit: got -1"):
        config("cerebras_limits: {total_tpm_limit: -1}\n")


# -- the limiter ---------------------------------------------------------------------------------


def test_each_bucket_is_charged_its_own_amount_and_settled_to_its_own_usage():
    limiter = MemoryLimiter(view_margin=0)
    decision = limiter.try_acquire("m", RATES, 1_000, now=0.0, total=3_000)
    assert decision.granted and decision.reservation is not None
    assert limiter.used("m", RATES[1], 0.0) == 1_000
    assert limiter.used("m", RATES[2], 0.0) == 3_000
    limiter.settle(decision.reservation, 700, now=0.0, total=Settled(2_500))
    assert limiter.used("m", RATES[1], 0.0) == 700
    assert limiter.used("m", RATES[2], 0.0) == 2_500
    assert limiter.open_reservations() == 0


def test_the_total_bucket_binds_on_its_own():
    limiter = MemoryLimiter(view_margin=0)
    assert limiter.try_acquire("m", RATES, 100, now=0.0, total=TOTAL).granted
    refused = limiter.try_acquire("m", RATES, 100, now=0.0, total=1_000)
    assert not refused.granted and refused.binding == "total_tpm"
    assert refused.wait == pytest.approx(1_000 / TOTAL * 60)


def test_a_release_gives_both_buckets_back():
    limiter = MemoryLimiter(view_margin=0)
    decision = limiter.try_acquire("m", RATES, 1_000, now=0.0, total=3_000)
    assert decision.reservation is not None
    limiter.release(decision.reservation, now=1.0)
    assert limiter.used("m", RATES[1], 1.0) == limiter.used("m", RATES[2], 1.0) == 0


def test_a_429_naming_the_total_bucket_empties_that_one_only():
    clock = FakeClock(0.0)
    gate = Gate(config("cerebras_limits: {tpm_limit: 1000, rpm_limit: 100}\n"), clock=clock)
    gate.exhaust("m", "total_tokens")
    usage = gate.status()
    assert usage["total_usage"]["m"] == pytest.approx(1.0)
    assert usage["usage"]["m"]["tpm"] == 0
    assert gate.submit(100, key="m", total=600).held  # 600 of 3000: 12 s of refill
    clock.advance(12.0)
    gate.pump()
    assert gate.depth == 0


# -- property: neither of upstream's buckets goes below zero, nothing leaks -------------------

requests = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(min_value=0, max_value=10)),  # gap before it (bursts)
        st.integers(min_value=1, max_value=2_000),  # input tokens
        st.floats(min_value=0, max_value=1),  # cached share of the input
        st.integers(min_value=0, max_value=1_500),  # output reservation
        st.floats(min_value=0, max_value=1),  # completion / reservation
        st.floats(min_value=0.1, max_value=20),  # release to the end of the answer
        st.one_of(st.just(1.0), st.floats(min_value=0, max_value=1)),  # headers, part of that
        st.floats(min_value=0, max_value=1),  # upstream counts it, as a part of that
        st.floats(min_value=0, max_value=1),  # predicted / actual cached (never more)
        st.sampled_from(["ok", "ok", "ok", "abort"]),
    ),
    min_size=1,
    max_size=50,
)


def drive(events, admission):
    """Run `events` through a scheduler; return upstream's charges and refunds per bucket."""
    limits = CerebrasLimits(
        rpm_limit=50, tpm_limit=UNCACHED, max_queue_depth=100, request_timeout=1e6
    )
    limiter = MemoryLimiter(view_margin=0)
    scheduler = Scheduler(limiter, limits, CircuitBreaker(BreakerConfig()), lambda key: RATES)
    now = 0.0
    pending = []  # (time, order, kind, ticket, event)
    tickets = []
    order = 0

    def plan():
        nonlocal order
        for ticket, event in tickets:
            if ticket.outcome is Outcome.RELEASED and not getattr(ticket, "planned", False):
                ticket.planned = True
                latency, headers = event[5], event[6]
                pending.append((ticket.resolved_at + headers * latency, order, "confirm", ticket))
                pending.append((ticket.resolved_at + latency, order + 1, "finish", ticket))
                order += 2

    def advance(target):
        nonlocal now
        while True:
            wake = scheduler.pump(now)
            plan()
            due = [p[0] for p in pending if p[0] <= target]
            moments = [t for t in [wake, *due] if t is not None and t <= target]
            if not moments:
                break
            now = max(now, min(moments))
            for step in sorted(p for p in pending if p[0] <= now):
                pending.remove(step)
                _, _, kind, ticket = step
                event = ticket.event
                _, inp, share, out, frac, *_, fate = event
                cached = int(inp * share)
                completion = int(out * frac)
                if kind == "confirm" and fate != "abort":
                    scheduler.confirm(ticket, now)
                elif kind == "finish" and fate == "abort":
                    scheduler.abort(ticket, reached_upstream=False, now=now)
                elif kind == "finish":
                    uncached = inp - cached + completion
                    scheduler.accounts.finish(
                        ticket, 200, uncached, now, None, Settled(inp + completion)
                    )
        now = target
        scheduler.pump(now)
        plan()

    for event in events:
        gap, inp, share, out, *_, guess, _fate = event
        advance(now + gap)
        predicted = int(int(inp * share) * guess)
        uncached = inp + out - (predicted if admission == "predicted" else 0)
        ticket = scheduler.submit("k", uncached, now, total=inp + out)
        ticket.event = event
        tickets.append((ticket, event))
        scheduler.pump(now)
        plan()
    advance(now + 10_000)
    assert scheduler.depth == 0
    assert limiter.open_reservations() == 0, "a reservation leaked"

    moves = []  # (time, order, bucket, amount): negative = charge
    for ticket, event in tickets:
        _, inp, share, out, frac, latency, headers, charge, _, fate = event
        if ticket.outcome is not Outcome.RELEASED or fate == "abort":
            continue
        cached, completion = int(inp * share), int(out * frac)
        at = ticket.resolved_at + charge * headers * latency
        ended = ticket.resolved_at + latency
        uncached_cost = inp + out - (cached if admission == "predicted" else 0)
        # At one instant, refunds of requests that ended come before charges (order 0, 1);
        # a request counted at its very end is counted before its own refund (order -1).
        order = -1 if at >= ended else 1
        moves.append((at, order, "uncached", -uncached_cost))
        moves.append((at, order, "total", -(inp + out)))
        moves.append((ended, 0, "uncached", uncached_cost - (inp - cached + completion)))
        moves.append((ended, 0, "total", out - completion))
    return sorted(moves)


def overdrafts(moves):
    """Replay upstream's two buckets (full at start, refilled continuously)."""
    capacity = {"uncached": float(UNCACHED), "total": float(TOTAL)}
    level = dict(capacity)
    last = 0.0
    refused = []
    for at, _, bucket, amount in moves:
        for name in level:
            level[name] = min(capacity[name], level[name] + capacity[name] / 60 * (at - last))
        last = at
        if amount < 0 and level[bucket] < -amount - 1e-6:
            refused.append((at, bucket))
        level[bucket] += amount
    return refused


# Found by CI: a request counted at the very end of its answer, beside its own refund.
_COUNTED_AT_ITS_END = [
    (0.0, 1, 0.0, 0, 0.0, 3.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 1, 0.0, 0, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 1, 0.0, 640, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 311, 0.0, 1500, 0.0, 1.0, 1.0, 1.0, 0.0, "ok"),
    (0.0, 1047, 0.0, 1500, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 1, 0.0, 642, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
]

# Found by hypothesis: cached input counted by us, never by upstream, was given back at the
# settle although the bucket had refilled to full since; the next burst then overdrew
# upstream's uncached bucket by a token.
_GIVEN_BACK_AFTER_FULL = [
    (0.0, 1, 0.0, 0, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 1, 0.0, 0, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 1, 0.0, 1494, 1.0, 2.0, 1.0, 1.0, 0.0, "ok"),
    (0.0, 9, 1.0, 0, 0.0, 2.0, 0.0, 0.0, 0.0, "ok"),
    (0.0, 895, 1.0, 8, 0.0, 2.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 1103, 0.0, 1500, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
    (0.0, 1, 0.0, 910, 0.0, 1.0, 1.0, 0.0, 0.0, "ok"),
]


@settings(max_examples=120, deadline=None)
@given(requests, st.sampled_from(["full", "predicted"]))
@example(_COUNTED_AT_ITS_END, "full")
@example(_GIVEN_BACK_AFTER_FULL, "predicted")
def test_neither_bucket_is_ever_overdrawn_and_nothing_leaks(events, admission):
    """Wherever upstream counts each request between release and its headers, with `full`
    admission, or `predicted` with a prediction that never exceeds what upstream finds
    cached, both of upstream's buckets always have room."""
    assert overdrafts(drive(events, admission)) == []


@pytest.mark.parametrize("admission", ["full", "predicted"])
def test_a_mostly_cached_stream_is_held_back_by_the_total_bucket(admission):
    """Agents' traffic: nearly all input cached, so the total bucket is the one that binds
    (random draws rarely sustain it long enough)."""
    burst = [(0.0, 2_000, 0.95, 100, 1.0, 0.5, 1.0, 1.0, 1.0, "ok")] * 60
    moves = drive(burst, admission)
    assert overdrafts(moves) == []
    last_charge = max(at for at, _, _, amount in moves if amount < 0)
    # 60 x 2,100 total tokens, 15,000 at once and 250 a second after that: ~444 s.
    assert last_charge == pytest.approx((60 * 2_100 - TOTAL) / (TOTAL / 60), rel=0.05)
