import asyncio
from dataclasses import replace

import pytest

from cooldown.config import CerebrasLimits, Config
from cooldown.gate import Gate
from cooldown.scheduler import Outcome
from cooldown.upstream import RateReport, parse_rate_headers

from .helpers import FakeClock

CONFIG = Config(
    cerebras_limits=CerebrasLimits(
        rpm_limit=2, tpm_limit=1_000, max_queue_depth=3, probe_first=False
    )
)


def make():
    clock = FakeClock()
    return Gate(CONFIG, clock=clock), clock


async def test_released_at_once_when_it_fits():
    gate, _ = make()
    ticket = gate.submit(100)
    assert await gate.wait(ticket) is Outcome.RELEASED
    assert gate.status()["open_reservations"] == 1
    gate.finish(ticket, 200, 40)
    assert gate.status()["open_reservations"] == 0


async def test_held_waiter_wakes_when_capacity_frees():
    gate, clock = make()
    first = gate.submit(900)
    waiter = asyncio.ensure_future(gate.wait(gate.submit(500)))
    await asyncio.sleep(0)
    assert not waiter.done()
    assert gate.status()["queue_depth"] == 1
    clock.advance(1)
    gate.finish(first, 200, 100)  # settling frees tokens: the held request goes
    assert await waiter is Outcome.RELEASED


async def test_timer_is_armed_for_the_next_release():
    gate, clock = make()
    gate.confirm(gate.submit(1_000))
    held = gate.submit(10)
    assert gate.alarm.at is not None
    assert gate.alarm.at == pytest.approx(clock.now + 0.6)  # 10 tokens refilled at 1000/min
    clock.advance(0.6)
    gate.alarm.fire()  # what the loop would run at that moment
    assert held.outcome is Outcome.RELEASED


async def test_cancelling_the_waiting_task_cancels_the_ticket():
    gate, _ = make()
    gate.submit(1_000)
    ticket = gate.submit(500)
    task = asyncio.ensure_future(gate.wait(ticket))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert ticket.outcome is Outcome.CANCELLED
    assert gate.status()["queue_depth"] == 0
    assert gate.status()["open_reservations"] == 1  # only the first, which was released


async def test_waiter_cancelled_in_the_same_instant_as_release_gives_the_reservation_back():
    gate, _ = make()
    first = gate.submit(1_000)
    ticket = gate.submit(500)
    task = asyncio.ensure_future(gate.wait(ticket))
    await asyncio.sleep(0)
    gate.finish(first, 200, 0)  # releases `ticket` and resolves its future...
    task.cancel()  # ...but its waiter dies before it runs
    await asyncio.gather(task, return_exceptions=True)
    assert ticket.outcome is Outcome.RELEASED
    assert ticket.finished
    assert gate.status()["open_reservations"] == 0


async def test_shutdown_answers_held_waiters():
    gate, _ = make()
    gate.submit(1_000)
    waiters = [asyncio.ensure_future(gate.wait(gate.submit(10))) for _ in range(2)]
    await asyncio.sleep(0)
    assert gate.shutdown() == 2
    assert await asyncio.gather(*waiters) == [Outcome.SHUTDOWN, Outcome.SHUTDOWN]


async def test_reconfigure_applies_new_limits_to_held_requests():
    gate, _ = make()
    gate.submit(1_000)
    held = gate.submit(500)
    assert held.held
    bigger = replace(CONFIG, cerebras_limits=replace(CONFIG.cerebras_limits, tpm_limit=2_000))
    gate.reconfigure(bigger)
    assert held.outcome is Outcome.RELEASED


async def test_stats_count_forwarded_refused_and_upstream_429s():
    gate, _ = make()
    a = gate.submit(1_000)
    for _ in range(3):
        gate.submit(10)
    refused = gate.submit(10)
    assert refused.outcome is Outcome.QUEUE_FULL
    gate.finish(a, 429, None)  # refused upstream: its request and tokens come back
    status = gate.status()
    assert status["forwarded"] == 3  # a, then two of the held (rpm_limit 2)
    assert status["refused"] == {"queue_full": 1}
    assert status["upstream_429s"] == 1


# -- per model, hour/day, upstream reports, cooldowns -------------------------------------------


def per_model_gate(text: str):
    import yaml

    from cooldown.config import parse_config
    from cooldown.limiter import MemoryLimiter

    clock = FakeClock()
    # Exact arithmetic: without the sliver of each limit the upstream view keeps back.
    limiter = MemoryLimiter(view_margin=0)
    return Gate(parse_config(yaml.safe_load(text)), clock=clock, limiter=limiter), clock


async def test_each_model_has_its_own_limits_and_windows():
    gate, _ = per_model_gate(
        "cerebras_limits: {rpm_limit: 100, tpm_limit: 1000}\n"
        "models:\n  big: {tpm_limit: 5000, tpd_limit: 20000}\n"
    )
    assert [(r.name, r.limit) for r in gate.rates_for("big")] == [
        ("rpm", 100),
        ("tpm", 5000),
        ("tpd", 20000),
        ("total_tpm", 15000),  # 3 x its own tpm_limit (the prompt cache is modelled by default)
    ]
    assert [(r.name, r.limit) for r in gate.rates_for("other")] == [
        ("rpm", 100),
        ("tpm", 1000),
        ("total_tpm", 3000),
    ]
    assert gate.submit(1000, key="other").outcome is Outcome.RELEASED
    assert gate.submit(4000, key="big").outcome is Outcome.RELEASED  # other's use is not big's
    assert gate.submit(10, key="other").held


async def test_fits_the_minute_but_not_the_day_waits_and_the_wait_is_reported():
    gate, clock = per_model_gate(
        "cerebras_limits: {algorithm: sliding_window, probe_first: false}\n"
        "models:\n  m: {tpm_limit: 1000, tpd_limit: 1500}\n"
    )
    first = gate.submit(900, key="m")
    gate.finish(first, 200, 900)
    clock.advance(61)  # the minute window is empty again, the day window is not
    second = gate.submit(900, key="m")
    assert second.held
    assert second.wait_reason == "tpd"
    # Reported as the wait (and as Retry-After if it is refused): until the first request's
    # tokens leave the day window, a day after it was answered.
    assert gate.scheduler.retry_hint("m") == 86400 - 61
    assert gate.status()["usage"]["m"]["tpd"] == pytest.approx(0.6)


async def test_fits_the_minute_but_not_the_day_bucket():
    gate, clock = per_model_gate(
        "cerebras_limits: {probe_first: false}\nmodels:\n  m: {tpm_limit: 1000, tpd_limit: 1500}\n"
    )
    first = gate.submit(900, key="m")
    gate.finish(first, 200, 900)
    clock.advance(61)  # the minute bucket is full again; the day bucket got 1500/86400 a second
    second = gate.submit(900, key="m")
    assert second.held
    assert second.wait_reason == "tpd"
    refilled = 1500 / 86400 * 61
    assert gate.scheduler.retry_hint("m") == pytest.approx((300 - refilled) * 86400 / 1500, abs=1)


async def test_hour_limits_replenish_continuously():
    gate, clock = per_model_gate(
        "cerebras_limits: {request_timeout: 2h, algorithm: sliding_window, probe_first: false}\n"
        "models:\n  m: {rph_limit: 2}\n"
    )
    a = gate.submit(1, key="m")
    gate.finish(a, 200, 1)
    clock.advance(1800)
    b = gate.submit(1, key="m")
    gate.finish(b, 200, 1)
    c = gate.submit(1, key="m")
    assert c.held and c.wait_reason == "rph"
    clock.advance(1800)  # a's slot ages out an hour after a was answered, not on the hour
    gate.pump()
    assert c.outcome is Outcome.RELEASED


async def test_upstream_report_of_other_clients_usage_makes_the_proxy_wait():
    gate, clock = per_model_gate("models:\n  m: {tpm_limit: 1000}\n")
    # Upstream says 900 of 1000 are used (another client), full again in 54 s.
    gate.observe("m", [RateReport("tokens", 60.0, 1000, 100, 54.0)])
    held = gate.submit(500, key="m")
    assert held.held and held.wait_reason == "tpm"
    clock.advance(24)  # the bucket refills 900 / 54 s: 400 used by now, 500 more fit
    gate.pump()
    assert held.outcome is Outcome.RELEASED


async def test_a_lower_limit_reported_by_upstream_wins_and_a_missing_one_is_added():
    gate, _ = per_model_gate("models:\n  m: {tpm_limit: 100000}\n")
    gate.observe(
        "m",
        [
            RateReport("tokens", 60.0, 1000, 1000, 0.0),
            RateReport("requests", 86400.0, 2, 2, 0.0),
        ],
    )
    rates = {r.name: r for r in gate.rates_for("m")}
    assert gate.limiter.limit("m", rates["tpm"]) == 1000
    assert rates["rpd"].limit == 2
    assert gate.submit(1000, key="m").outcome is Outcome.RELEASED
    assert gate.submit(1, key="m").held


async def test_pause_holds_a_model_until_the_cooldown_passes():
    gate, clock = per_model_gate("{}")
    gate.pause("m", 2.0)
    held = gate.submit(1, key="m")
    other = gate.submit(1, key="n")
    assert held.held and other.outcome is Outcome.RELEASED
    assert gate.alarm.at == pytest.approx(clock.now + 2.0)
    clock.advance(2.0)
    gate.pump()
    assert held.outcome is Outcome.RELEASED


async def test_requeue_is_not_refused_by_a_full_queue():
    gate, _ = make()
    gate.submit(1_000)
    for _ in range(3):
        gate.submit(10)
    assert gate.submit(10).outcome is Outcome.QUEUE_FULL
    assert gate.submit(10, requeue=True).held


async def test_a_retry_waits_only_what_its_earlier_attempts_left_of_request_timeout():
    gate, clock = per_model_gate("cerebras_limits: {request_timeout: 60s, tpm_limit: 1000}\n")
    gate.confirm(gate.submit(1_000, key="m"))  # the minute's tokens are gone
    retry = gate.submit(500, key="m", requeue=True, waited=50.0)  # fits in 30 s
    fresh = gate.submit(500, key="m")
    clock.advance(10.5)
    gate.pump()
    assert retry.outcome is Outcome.TIMEOUT  # 50 s before, 10 s now: its 60 s are over
    assert fresh.held


async def test_burst_setting_paces_only_per_minute_limits():
    gate, _ = per_model_gate("cerebras_limits: {burst: 0.25, tpd_limit: 100000}\n")
    bursts = {rate.name: rate.burst for rate in gate.rates_for("m")}
    assert bursts == {"rpm": 0.25, "tpm": 0.25, "tpd": 1.0, "total_tpm": 0.25}


# Upstream's report after others used 900 of its 1000 tokens per minute.
HEADERS_900_OF_1000_USED = {
    "x-ratelimit-limit-tokens-minute": "1000",
    "x-ratelimit-remaining-tokens-minute": "100",
    "x-ratelimit-reset-tokens-minute": "54",
}


async def test_a_429_is_settled_and_its_report_read_before_anything_else_is_released():
    """The 429's own report re-syncs the limiter before the queue moves: releasing on the
    picture the 429 just proved wrong would draw another."""
    gate, _ = per_model_gate(
        "cerebras_limits: {probe_first: false}\nmodels:\n  m: {tpm_limit: 1000}\n"
    )
    first = gate.submit(600, key="m")
    held = gate.submit(500, key="m")
    assert first.outcome is Outcome.RELEASED and held.held
    # Upstream refused `first` (others had used 900 of 1000): giving `first` back alone would
    # let `held` go; with the report read first it keeps waiting.
    gate.confirm(first, 429, parse_rate_headers(HEADERS_900_OF_1000_USED))
    assert first.finished
    assert held.held and held.wait_reason == "tpm"
    assert gate.status()["upstream_429s"] == 1
    assert gate.status()["open_reservations"] == 0
