"""The limiter's contract, on both backends: the in-process `MemoryLimiter` and the Redis one
(`RedisLimiter`, the Lua script on a real redis-server of the tests' own).

Every test here runs twice, once per backend, on the same fake clock: the Redis backend takes
the time from the caller (`use_redis_time=False`) so that both can be stepped alike. Where
the Lua script is knowingly coarser (it credits refunds in batches, 0.25 to 0.5 s after the
settle, where the in-process view credits each exactly 0.25 s after), the test says so and
asserts what both promise.
"""

from __future__ import annotations

import itertools
import math

import pytest
import redis

from cooldown.backends.redis import RedisLimiter
from cooldown.limiter import (
    RESYNC_INTERVAL,
    STALE_RECHECK_SECONDS,
    MemoryLimiter,
    Rate,
    RateReport,
    Settled,
)

RPM = Rate("rpm", "requests", 3)
TPM = Rate("tpm", "tokens", 600)  # refills 10 tokens a second
BIG = Rate("tpm", "tokens", 60_000)  # refills 1,000 a second
PACED = Rate("tpm", "tokens", 600, 60.0, burst=0.25)  # 150 at once, then 10 a second
TOTAL = Rate("total_tpm", "total_tokens", 1_800)

_prefixes = itertools.count(1)


@pytest.fixture(params=["memory", "redis"])
def make(request):
    """A factory of fresh limiters of one backend (each Redis one under its own prefix)."""

    def memory(view_margin=0.0, resync_interval=RESYNC_INTERVAL):
        return MemoryLimiter(view_margin=view_margin, resync_interval=resync_interval)

    if request.param == "memory":
        yield memory
        return
    server = request.getfixturevalue("shared_redis")
    clients = []

    def shared(view_margin=0.0, resync_interval=RESYNC_INTERVAL):
        client = redis.Redis.from_url(server.url)
        clients.append(client)
        return RedisLimiter(
            client,
            f"t{next(_prefixes)}:",
            "p1",
            use_redis_time=False,
            view_margin=view_margin,
            resync_interval=resync_interval,
            lease=math.inf,  # leases are Redis's own (test_shared_limits.py)
            max_wait=math.inf,
            fresh_for=0.0,  # `used` asks Redis every time
        )

    yield shared
    for client in clients:
        client.close()


def report(remaining, limit=600, reset=0.0):
    return [RateReport("tokens", 60.0, limit, remaining, reset)]


def granted(limiter, rates, tokens, now, total=None):
    decision = limiter.try_acquire("k", rates, tokens, now, total)
    assert decision.granted, decision
    return decision.reservation


# -- admission ---------------------------------------------------------------------------------


def test_acquire_takes_one_request_and_the_tokens(make):
    limiter = make()
    reservation = granted(limiter, (RPM, TPM), 60, 0)
    assert (reservation.key, reservation.tokens) == ("k", 60)
    assert limiter.used("k", RPM, 0) == 1
    assert limiter.used("k", TPM, 0) == 60
    assert limiter.open_reservations() == 1


def test_reservation_ids_are_distinct(make):
    limiter = make()
    ids = {granted(limiter, (TPM,), 1, 0).id for _ in range(5)}
    assert len(ids) == 5


def test_refusal_names_the_binding_limit_and_the_wait(make):
    limiter = make()
    limiter.confirm(granted(limiter, (RPM, TPM), 600, 0), now=0)
    decision = limiter.try_acquire("k", (RPM, TPM), 100, now=2)  # 20 back
    assert (decision.granted, decision.binding, decision.reservation) == (False, "tpm", None)
    assert decision.wait == pytest.approx(8)
    for t in (3, 4):
        limiter.confirm(granted(limiter, (RPM, TPM), 1, t), now=t)
    decision = limiter.try_acquire("k", (RPM, TPM), 1, now=5)
    assert (decision.granted, decision.binding) == (False, "rpm")
    # 3 requests less 5 s of refill at 3 a minute, and this one: 0.75 over, 15 s to refill
    assert decision.wait == pytest.approx(15)


def test_a_bucket_admits_the_full_limit_then_the_refill(make):
    """Over T seconds a bucket that starts full admits limit x (1 + T / period)."""
    limiter = make()
    released, now = 0, 0.0
    while now <= 60:
        decision = limiter.try_acquire("k", (TPM,), 50, now)
        if decision.granted:
            limiter.confirm(decision.reservation, now)
            released += 50
        else:
            now += decision.wait
    assert released == 1_200


def test_in_flight_amounts_earn_no_refill_until_confirmed(make):
    limiter = make()
    reservation = granted(limiter, (TPM,), 600, 0)
    assert not limiter.try_acquire("k", (TPM,), 10, now=500).granted
    limiter.confirm(reservation, now=500)
    assert not limiter.try_acquire("k", (TPM,), 10, now=500).granted
    assert limiter.try_acquire("k", (TPM,), 10, now=501).granted
    assert limiter.open_reservations() == 2  # confirmed is not settled


def test_an_estimate_larger_than_the_limit_is_charged_the_whole_limit(make):
    limiter = make()
    limiter.confirm(granted(limiter, (TPM,), 5_000, 0), now=0)
    assert limiter.used("k", TPM, 0) == 600
    decision = limiter.try_acquire("k", (TPM,), 5_000, now=1)
    assert not decision.granted
    assert decision.wait == pytest.approx(59)


def test_keys_are_independent(make):
    limiter = make()
    assert limiter.try_acquire("a", (TPM,), 600, now=0).granted
    assert limiter.try_acquire("b", (TPM,), 600, now=0).granted
    assert not limiter.try_acquire("a", (TPM,), 1, now=0).granted


# -- a reservation's life ----------------------------------------------------------------------


def test_settle_refunds_unused_tokens_but_not_the_request_and_only_once(make):
    limiter = make()
    reservation = granted(limiter, (RPM, TPM), 500, 0)
    limiter.settle(reservation, 100, now=0)
    assert limiter.used("k", TPM, 0) == 100
    assert limiter.used("k", RPM, 0) == 1
    assert limiter.open_reservations() == 0
    limiter.settle(reservation, 500, now=0)  # settling twice changes nothing
    limiter.release(reservation, now=0)
    assert limiter.used("k", TPM, 0) == 100


def test_settle_above_the_estimate_leaves_the_bucket_in_debt(make):
    limiter = make()
    limiter.settle(granted(limiter, (TPM,), 100, 0), 800, now=0)
    assert limiter.used("k", TPM, 0) == 800
    decision = limiter.try_acquire("k", (TPM,), 10, now=0)
    assert not decision.granted
    assert decision.wait == pytest.approx(21)  # 210 over, refilled at 10 a second


def test_settle_confirms_at_settle_time(make):
    limiter = make()
    limiter.settle(granted(limiter, (TPM,), 80, 0), 20, now=5)
    assert limiter.used("k", TPM, 6) == pytest.approx(10)  # 20 at 5, 10 a second back


def test_what_upstream_never_counted_comes_back_only_while_it_is_still_in_the_bucket(make):
    # Upstream counted 0 of a 100-token reservation (cached input, say): its bucket stayed
    # fuller by 100 until it refilled to full. Ours counted the 100 and refilled to full too,
    # so a settle after that has nothing to give back; giving it back anyway let a burst
    # after an idle moment through on room upstream did not have.
    limiter = make()
    early = granted(limiter, (TPM,), 100, 0)
    limiter.confirm(early, now=0)
    burst = granted(limiter, (TPM,), 500, 60)  # the bucket was full again at 10 s
    limiter.confirm(burst, now=60)
    limiter.settle(early, 0, now=60)
    assert limiter.used("k", TPM, 60) == pytest.approx(500)
    assert not limiter.try_acquire("k", (TPM,), 101, now=60).granted
    # Without other counts since, all that is still in the bucket comes back.
    alone = make()
    reservation = granted(alone, (TPM,), 100, 0)
    alone.confirm(reservation, now=0)
    alone.settle(reservation, 0, now=3)  # 70 of its 100 were still in the bucket
    assert alone.used("k", TPM, 3) == pytest.approx(0)


def test_what_upstream_refunds_comes_back_whenever_it_was_counted(make):
    # Upstream gives the unused output back at the end, to its bucket as it is then: so does
    # ours, whatever was counted meanwhile.
    limiter = make()
    early = granted(limiter, (TPM,), 100, 0)
    limiter.confirm(early, now=0)
    burst = granted(limiter, (TPM,), 500, 60)
    limiter.confirm(burst, now=60)
    limiter.settle(early, 20, now=60, refund=80)
    assert limiter.used("k", TPM, 60) == pytest.approx(420)


def test_release_gives_back_in_flight_and_confirmed_amounts(make):
    limiter = make()
    flying = granted(limiter, (RPM, TPM), 300, 0)
    answered = granted(limiter, (RPM, TPM), 300, 0)
    limiter.confirm(answered, now=0)
    limiter.release(flying, now=1)
    limiter.release(answered, now=1)  # a 429: upstream charged nothing
    assert limiter.used("k", TPM, 1) == 0
    assert limiter.used("k", RPM, 1) == 0
    assert limiter.open_reservations() == 0


def test_the_total_tokens_limit_is_charged_its_own_amount_and_settled_apart(make):
    limiter = make()
    reservation = granted(limiter, (TPM, TOTAL), 100, 0, total=300)
    assert limiter.used("k", TOTAL, 0) == 300
    limiter.settle(reservation, 80, now=0, total=Settled(250))
    assert limiter.used("k", TPM, 0) == 80
    assert limiter.used("k", TOTAL, 0) == 250


def test_exhaust_counts_the_limit_as_used_up_from_now(make):
    limiter = make()
    limiter.exhaust("k", TPM, now=0)
    assert limiter.used("k", TPM, 0) == 600
    decision = limiter.try_acquire("k", (TPM,), 100, now=0)
    assert decision.wait == pytest.approx(10)


# -- pacing (burst < 1) ------------------------------------------------------------------------


def test_pacing_allows_a_short_burst_then_the_limits_rate(make):
    limiter = make()
    assert limiter.try_acquire("k", (PACED,), 150, now=0).granted
    decision = limiter.try_acquire("k", (PACED,), 50, now=0)
    assert not decision.granted
    assert decision.wait == pytest.approx(5)
    assert limiter.try_acquire("k", (PACED,), 50, now=5).granted


def test_settling_or_releasing_gives_the_pace_back(make):
    limiter = make()
    limiter.settle(granted(limiter, (PACED,), 150, 0), 30, now=0)
    released = granted(limiter, (PACED,), 120, 0)
    limiter.release(released, now=0)
    assert limiter.try_acquire("k", (PACED,), 120, now=0).granted


# -- upstream's view ---------------------------------------------------------------------------


def test_a_report_below_our_picture_holds_releases_back(make):
    limiter = make()
    limiter.confirm(granted(limiter, (TPM,), 100, 0), now=0)
    assert limiter.observe("k", report(remaining=150), now=0)  # others used 350
    assert limiter.used("k", TPM, 0) == 450
    decision = limiter.try_acquire("k", (TPM,), 200, now=0)
    assert not decision.granted
    assert decision.wait == pytest.approx(5)


def test_requests_in_flight_stay_held_aside_on_top_of_a_report(make):
    limiter = make()
    first = granted(limiter, (TPM,), 100, 0)
    later = granted(limiter, (TPM,), 200, 0)
    limiter.confirm(first, now=1)
    limiter.observe("k", report(remaining=500), now=1)
    assert limiter.try_acquire("k", (TPM,), 300, now=1).granted
    assert not limiter.try_acquire("k", (TPM,), 1, now=1).granted
    limiter.confirm(later, now=1)
    assert limiter.used("k", TPM, 1) == 600


def test_a_request_counted_twice_is_counted_once_again_at_the_next_report(make):
    limiter = make(resync_interval=0)
    flying = granted(limiter, (TPM,), 200, 0)
    limiter.observe("k", report(remaining=400), now=0)  # upstream had counted it already
    assert limiter.used("k", TPM, 0) == 400
    limiter.confirm(flying, now=0)
    limiter.observe("k", report(remaining=400), now=0)
    assert limiter.used("k", TPM, 0) == 200


def test_a_report_soon_after_a_resync_changes_the_view_only_with_bad_news(make):
    limiter = make()
    assert limiter.observe("k", report(remaining=400), now=0)
    flying = granted(limiter, (TPM,), 100, 0)
    assert not limiter.observe("k", report(remaining=500), now=0)
    assert limiter.used("k", TPM, 0) == 300
    assert not limiter.observe("k", report(remaining=300), now=0)
    assert limiter.observe("k", report(remaining=250), now=0)
    limiter.confirm(flying, now=0)
    assert limiter.observe("k", report(remaining=500), now=0)  # nothing in flight: applied
    granted(limiter, (TPM,), 10, 0)
    assert limiter.observe("k", report(remaining=600), now=2 * RESYNC_INTERVAL)


def test_a_lower_limit_reported_by_upstream_applies(make):
    limiter = make()
    limiter.observe("k", report(remaining=100, limit=200), now=0)
    assert limiter.limit("k", TPM) == 200
    assert limiter.learned_limits("k") == {("tokens", 60.0): 200}
    assert not limiter.try_acquire("k", (TPM,), 150, now=0).granted


def test_foreign_usage_is_learned_from_reports(make):
    limiter = make()
    now, left = 0.0, 1_000
    limiter.observe("k", report(remaining=left, limit=6_000), now=now)
    for _ in range(12):  # another client uses 20 tokens a second
        now += 5
        left += (100 - 20) * 5
        limiter.observe("k", report(remaining=left, limit=6_000), now=now)
    assert limiter.foreign_rate("k", "tokens", 60.0, now) == pytest.approx(20, rel=0.05)
    big = Rate("tpm", "tokens", 6_000)
    # The view refills at 100 - 20 a second and keeps a lump of the others' usage back.
    assert limiter.used("k", big, now + 2) == pytest.approx(6_000 - (left + 160) + 100, abs=2)


def test_a_refund_is_credited_a_moment_after_the_settle_once_upstream_refunds(make):
    limiter = make(resync_interval=0)
    first = granted(limiter, (BIG,), 5_000, 0)
    limiter.confirm(first, now=0)
    limiter.observe("k", report(remaining=55_000, limit=60_000), now=0)
    limiter.settle(first, 1_000, now=0)
    limiter.observe("k", report(remaining=59_000, limit=60_000), now=0)  # refunded 4,000
    second = granted(limiter, (BIG,), 30_000, 0)
    limiter.confirm(second, now=0)
    limiter.observe("k", report(remaining=29_000, limit=60_000), now=0)
    limiter.settle(second, 10_000, now=0, refund=18_500)  # upstream gives back 18,500
    decision = limiter.try_acquire("k", (BIG,), 40_000, now=0.1)
    assert not decision.granted
    assert 0 < decision.wait <= 0.4  # looks again when the refund is credited
    # credited within 0.5 s on both backends (exactly 0.25 s after in process)
    assert limiter.used("k", BIG, 0.5) == pytest.approx(60_000 - 29_500 - 18_500)


def test_the_view_keeps_a_sliver_of_the_limit_in_reserve(make):
    limiter = make(view_margin=0.005)
    limiter.observe("k", report(remaining=600), now=0)
    assert limiter.used("k", TPM, 0) == pytest.approx(3)
    assert not limiter.try_acquire("k", (TPM,), 598, now=0).granted
    assert limiter.try_acquire("k", (TPM,), 597, now=0).granted


def test_a_stale_view_lets_one_request_ask_upstream(make):
    limiter = make()
    now, left = 0.0, 60_000.0
    limiter.observe("k", report(remaining=left, limit=60_000), now=now)
    for _ in range(20):  # upstream charges 3,000 more per answer than we settle
        now += 1.0
        limiter.settle(granted(limiter, (BIG,), 100, now), 100, now)
        left = min(60_000.0, left + 1_000) - 3_100
        limiter.observe("k", report(remaining=round(left), limit=60_000), now=now)
    refused = limiter.try_acquire("k", (BIG,), 30_000, now)
    assert not refused.granted and refused.wait <= 60.0
    stale = now + 60.0
    probe = limiter.try_acquire("k", (BIG,), 30_000, stale)
    assert probe.granted
    behind = limiter.try_acquire("k", (BIG,), 100, stale)
    assert not behind.granted and behind.wait == STALE_RECHECK_SECONDS
    limiter.confirm(probe.reservation, stale + 0.5)
    limiter.observe("k", report(remaining=25_000, limit=60_000), now=stale + 0.5)
    assert limiter.try_acquire("k", (BIG,), 100, stale + 0.5).granted


def test_a_deferred_report_applies_as_of_its_arrival_by_the_settle(make):
    """A report whose answer's body follows at once may travel with the settle (Redis: one
    round trip less); it re-syncs the view as of its arrival either way."""
    limiter = make()
    reservation = granted(limiter, (TPM,), 300, 0)
    limiter.confirm(reservation, now=1)
    limiter.observe("k", report(remaining=100), now=1, defer=True)  # others used 200
    limiter.settle(reservation, 300, now=1)
    assert limiter.used("k", TPM, 1) == pytest.approx(500)
    assert limiter.used("k", TPM, 2) == pytest.approx(490)  # refilled since its arrival


def test_only_requests_in_flight_at_a_report_make_the_next_one_unsure(make):
    """Others' usage is learnt from reports that cannot have miscounted ours: one released
    and answered between two reports is in neither's doubt; one in flight at a report is."""
    limiter = make(resync_interval=0)
    now, left = 0.0, 1_000
    limiter.observe("k", report(remaining=left, limit=6_000), now=now)
    for _ in range(12):
        reservation = granted(limiter, (Rate("tpm", "tokens", 6_000),), 100, now + 1)
        limiter.confirm(reservation, now=now + 1)  # after the last report: no doubt
        now += 5
        left += 100 * 5 - 100 - 20 * 5  # refill, ours, and others' 20 a second
        limiter.observe("k", report(remaining=left, limit=6_000), now=now)
        limiter.settle(reservation, 100, now=now)
    assert limiter.foreign_rate("k", "tokens", 60.0, now) == pytest.approx(20, rel=0.05)
    flying = granted(limiter, (Rate("tpm", "tokens", 6_000),), 1_000, now)
    limiter.observe("k", report(remaining=left - 1_000, limit=6_000), now=now + 1)
    limiter.confirm(flying, now=now + 2)  # in flight at that report: it may count it twice
    before = limiter.foreign_rate("k", "tokens", 60.0, now + 2)
    limiter.observe("k", report(remaining=left - 3_000, limit=6_000), now=now + 3)
    assert limiter.foreign_rate("k", "tokens", 60.0, now + 3) == pytest.approx(before)


def test_reports_rounded_down_to_whole_units_are_not_taken_for_others_usage(make):
    """Upstream reports what is left in whole units, rounded down: with nobody else using a
    small limit, the rounding alone must not look like others' usage."""
    limiter = make(resync_interval=0)
    rpm = Rate("rpm", "requests", 30)  # refills half a request a second
    level, now = 30.0, 0.0
    for _ in range(40):
        reservation = granted(limiter, (rpm,), 1, now)
        level -= 1
        limiter.confirm(reservation, now)
        limiter.settle(reservation, 1, now)
        now += 0.7
        level = min(30.0, level + 0.5 * 0.7)
        remaining = math.floor(level)
        limiter.observe("k", [RateReport("requests", 60.0, 30, remaining, 0.0)], now=now)
    assert limiter.foreign_rate("k", "requests", 60.0, now) == 0


# -- reports that may be older than what the view has charged ----------------------------------
# Upstream writes a report after admitting the request it answers and before answering; the
# answers reach the proxy in whatever order they come, so a report may be older than another
# request the view has already charged.

KEEP = 1_511  # upstream keeps the whole reservation: no refund ever comes
USAGE = 131  # what the proxy settles each request at


def answered(limiter, reservation, remaining, at):
    """An answer arrives: confirmed, its report read, settled (whole answers refund nothing
    that the next report would not show)."""
    limiter.confirm(reservation, now=at)
    limiter.observe("k", report(remaining, limit=60_000), now=at, reporter=reservation)
    limiter.settle(reservation, USAGE, now=at, refund=0)


def test_a_report_overtaken_by_a_later_answer_does_not_forget_that_answer(make):
    """Regression (e2e test_upstream_keeping_the_whole_reservation_is_followed, stalled 60 s
    under load): upstream admits `early`, writes its report, then admits `late`, whose answer
    arrives first. Re-based on `early`'s older report, the view forgot `late` (confirmed, so
    no longer held aside) and had room upstream had not; the next report showed `late` as
    others' usage within milliseconds, more than the whole refill, and with nothing in flight
    the view held every request for a whole period."""
    limiter = make()
    limiter.observe("k", report(10_000, limit=60_000), now=0.0)
    early = granted(limiter, (BIG,), KEEP, 0.0)
    late = granted(limiter, (BIG,), KEEP, 0.0)
    answered(limiter, late, 10_000 - 2 * KEEP, at=0.004)
    answered(limiter, early, 10_000 - KEEP, at=0.006)  # written before `late` was admitted
    # Both are counted: what upstream has left (and 6 ms of refill) is all the view offers.
    upstream_left = 10_000 - 2 * KEEP + 6
    assert not limiter.try_acquire("k", (BIG,), upstream_left + 1, 0.006).granted
    third = granted(limiter, (BIG,), KEEP, 0.006)
    answered(limiter, third, upstream_left + 4 - KEEP, at=0.010)
    assert limiter.foreign_rate("k", "tokens", 60.0, 0.010) == 0  # nobody else used it
    decision = limiter.try_acquire("k", (BIG,), upstream_left + 4 - KEEP + 2_000, 0.010)
    assert not decision.granted
    assert decision.wait == pytest.approx(2.0, abs=0.01)  # upstream's refill, not a period


def test_reports_overtaken_twice_are_not_taken_for_others_usage(make):
    """Two old reports in a row: the second one re-bases the view on what it counts (what
    the first held back is taken for a double count), but neither it nor the next report is
    learnt from, so the answer both missed is not taken for others' usage."""
    limiter = make(resync_interval=0)  # every report re-syncs, however soon after the last
    limiter.observe("k", report(10_000, limit=60_000), now=0.0)
    first = granted(limiter, (BIG,), KEEP, 0.0)
    second = granted(limiter, (BIG,), 200, 0.0)
    late = granted(limiter, (BIG,), KEEP, 0.0)
    answered(limiter, late, 10_000 - 2 * KEEP - 200, at=0.004)
    answered(limiter, first, 10_000 - KEEP - 200, at=0.005)  # both written before `late`
    answered(limiter, second, 10_000 - KEEP - 200, at=0.006)
    fresh = granted(limiter, (BIG,), KEEP, 0.006)
    upstream_left = 10_000 - 3 * KEEP - 200 + 10
    answered(limiter, fresh, upstream_left, at=0.010)
    assert limiter.foreign_rate("k", "tokens", 60.0, 0.010) == 0
    decision = limiter.try_acquire("k", (BIG,), upstream_left + 2_000, 0.010)
    assert decision.wait == pytest.approx(2.0, abs=0.01)  # upstream's refill, not a period


def test_a_refund_in_a_report_that_may_be_old_reaches_the_view_one_report_later(make):
    """The price of not trusting an old report: when another request was answered while this
    one was in flight, the refund its report shows may as well be that answer missed, so it
    waits for the next report (the report itself may be read at once, and a request answered
    alone is never in doubt)."""
    limiter = make(resync_interval=0)
    limiter.observe("k", report(50_000, limit=60_000), now=0.0)
    slow = granted(limiter, (BIG,), 5_000, 0.0)
    quick = granted(limiter, (BIG,), 5_000, 0.0)
    limiter.confirm(quick, now=1.0)
    # both admitted, `quick` refunded 4,000 of its 5,000, a second of refill; `slow` in flight
    limiter.observe("k", report(45_000, limit=60_000), now=1.0, reporter=quick)
    limiter.settle(quick, 1_000, now=1.0, refund=0)
    limiter.confirm(slow, now=1.1)
    limiter.observe("k", report(49_100, limit=60_000), now=1.1, reporter=slow)  # refunded too
    limiter.settle(slow, 1_000, now=1.1, refund=0)
    assert limiter.used("k", BIG, 1.1) == pytest.approx(60_000 - 45_100)  # 4,000 held back
    alone = granted(limiter, (BIG,), 5_000, 1.1)
    limiter.confirm(alone, now=1.2)
    limiter.observe("k", report(49_200 - 1_000, limit=60_000), now=1.2, reporter=alone)
    assert limiter.used("k", BIG, 1.2) == pytest.approx(60_000 - 48_200)  # all of it now


def test_a_report_read_after_its_request_was_given_back_may_lower_the_view_not_raise_it(make):
    """A 429's reservation is released before its report is read: nothing tells what that
    report may have missed, so it can bring bad news only."""
    limiter = make(resync_interval=0)
    limiter.observe("k", report(10_000, limit=60_000), now=0.0)
    refused = granted(limiter, (BIG,), KEEP, 0.0)
    late = granted(limiter, (BIG,), KEEP, 0.0)
    answered(limiter, late, 10_000 - KEEP, at=0.004)
    limiter.release(refused, now=0.006)  # upstream said 429, before `late` was admitted
    limiter.observe("k", report(10_000, limit=60_000), now=0.006, reporter=refused)
    assert limiter.used("k", BIG, 0.006) == pytest.approx(60_000 - (10_000 - KEEP + 2))
    limiter.observe("k", report(5_000, limit=60_000), now=0.006, reporter=refused)
    assert limiter.used("k", BIG, 0.006) == pytest.approx(55_000)


def test_an_old_report_is_not_taken_for_a_refund(make):
    """What an old report shows beyond the view's belief may be an answer it missed, not a
    refund: it teaches nothing about the share of refunds upstream makes (taken for a full
    refund, it had the view credit refunds this upstream never makes)."""
    limiter = make()
    limiter.observe("k", report(10_000, limit=60_000), now=0.0)
    early = granted(limiter, (BIG,), KEEP, 0.0)
    late = granted(limiter, (BIG,), KEEP, 0.0)
    limiter.confirm(late, now=0.004)
    # both counted, and 4 ms of refill: nothing new, skipped (`early`'s answer comes next)
    assert not limiter.observe(
        "k", report(10_000 - 2 * KEEP + 4, limit=60_000), now=0.004, reporter=late
    )
    limiter.settle(late, USAGE, now=0.004, refund=KEEP - USAGE)  # a stream: its refund is due
    limiter.confirm(early, now=0.006)
    limiter.observe("k", report(10_000 - KEEP, limit=60_000), now=0.006, reporter=early)
    limiter.settle(early, USAGE, now=0.006, refund=KEEP - USAGE)
    third = granted(limiter, (BIG,), KEEP, 0.006)
    limiter.confirm(third, now=0.010)
    upstream_left = 10_000 - 3 * KEEP + 10
    limiter.observe("k", report(upstream_left, limit=60_000), now=0.010, reporter=third)
    limiter.settle(third, USAGE, now=0.010, refund=KEEP - USAGE)
    # Upstream made no refund: none is credited, however long the view waits.
    assert limiter.used("k", BIG, 1.0) == pytest.approx(60_000 - (upstream_left + 990))
