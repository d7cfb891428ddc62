"""The limiter: the sliding window (selectable), the token bucket (default), upstream's view.

Upstream's view keeps a sliver of each limit back by default (`VIEW_MARGIN`); the tests of its
arithmetic turn that off (`view_margin=0`), and one test checks the margin itself.
"""

import pytest

from cooldown.limiter import (
    RESYNC_INTERVAL,
    STALE_RECHECK_SECONDS,
    MemoryLimiter,
    Rate,
    RateReport,
    SlidingWindow,
    TokenBucket,
)

# The window's tests first: every rate here counts in a 60 s sliding window.
RPM = Rate("rpm", "requests", 3, algorithm="sliding_window")
TPM = Rate("tpm", "tokens", 100, algorithm="sliding_window")


def test_window_counts_only_the_last_period():
    window = SlidingWindow(60)
    window.add(40, now=0)
    window.add(30, now=30)
    assert window.used(100, 59.9) == 70
    assert window.used(100, 60) == 30  # the entry at 0 leaves exactly one period later
    assert window.used(100, 90) == 0


def test_wait_time_is_when_enough_ages_out():
    window = SlidingWindow(60)
    window.add(40, now=0)
    window.add(30, now=30)
    assert window.wait_time(30, limit=100, now=31) == 0
    assert window.wait_time(50, limit=100, now=31) == pytest.approx(29)  # needs the 40 at t=0 gone
    assert window.wait_time(90, limit=100, now=31) == pytest.approx(59)  # needs both gone


def test_acquire_takes_one_request_and_the_tokens():
    limiter = MemoryLimiter(view_margin=0)
    decision = limiter.try_acquire("k", (RPM, TPM), 60, now=0)
    assert decision.granted
    assert limiter.used("k", RPM, 0) == 1
    assert limiter.used("k", TPM, 0) == 60
    assert limiter.open_reservations() == 1


def test_refusal_names_the_binding_limit_and_the_wait():
    limiter = MemoryLimiter(view_margin=0)
    limiter.confirm(limiter.try_acquire("k", (RPM, TPM), 60, now=0).reservation, now=0)
    decision = limiter.try_acquire("k", (RPM, TPM), 60, now=10)
    assert not decision.granted
    assert decision.binding == "tpm"
    assert decision.wait == pytest.approx(50)
    assert decision.reservation is None
    for t in (11, 12):
        limiter.confirm(limiter.try_acquire("k", (RPM, TPM), 1, now=t).reservation, now=t)
    decision = limiter.try_acquire("k", (RPM, TPM), 1, now=20)
    assert (decision.granted, decision.binding) == (False, "rpm")
    assert decision.wait == pytest.approx(40)


def test_settle_refunds_unused_tokens_but_not_the_request():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 90, now=0).reservation
    limiter.settle(reservation, 25, now=1)
    assert limiter.used("k", TPM, 1) == 25
    assert limiter.used("k", RPM, 1) == 1
    assert limiter.open_reservations() == 0
    limiter.settle(reservation, 99, now=2)  # settling twice changes nothing
    assert limiter.used("k", TPM, 2) == 25


def test_settle_above_the_estimate_charges_the_excess():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 10, now=0).reservation
    limiter.settle(reservation, 70, now=1)
    assert limiter.used("k", TPM, 1) == 70
    assert not limiter.try_acquire("k", (RPM, TPM), 40, now=2).granted


def test_release_gives_everything_back():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 90, now=0).reservation
    limiter.release(reservation, now=1)
    assert limiter.used("k", TPM, 1) == 0
    assert limiter.used("k", RPM, 1) == 0
    assert limiter.open_reservations() == 0


def test_settle_after_the_entry_aged_out_does_not_go_negative():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 90, now=0).reservation
    limiter.confirm(reservation, now=0)
    limiter.settle(reservation, 10, now=61)
    assert limiter.used("k", TPM, 61) == 0
    assert limiter.open_reservations() == 0


def test_a_request_larger_than_the_limit_is_charged_the_whole_limit_once_empty():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 5000, now=0).reservation
    limiter.confirm(reservation, now=0)
    assert limiter.used("k", TPM, 0) == 100
    decision = limiter.try_acquire("k", (RPM, TPM), 5000, now=1)
    assert not decision.granted
    assert decision.wait == pytest.approx(59)


def test_keys_are_independent():
    limiter = MemoryLimiter(view_margin=0)
    assert limiter.try_acquire("a", (RPM, TPM), 100, now=0).granted
    assert limiter.try_acquire("b", (RPM, TPM), 100, now=0).granted
    assert not limiter.try_acquire("a", (RPM, TPM), 1, now=0).granted


def test_in_flight_counts_until_confirmed_then_ages_from_confirmation():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 80, now=0).reservation
    # Unconfirmed: still counted long after release (upstream may not have counted it yet).
    assert limiter.used("k", TPM, 500) == 80
    decision = limiter.try_acquire("k", (RPM, TPM), 30, now=500)
    assert not decision.granted
    assert decision.wait == 60  # unknown: it frees when the request is answered
    limiter.confirm(reservation, now=510)
    assert limiter.used("k", TPM, 569) == 80
    assert limiter.used("k", TPM, 570) == 0
    assert limiter.open_reservations() == 1  # confirmed is not settled


def test_release_before_confirmation_gives_back_the_in_flight_amount():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 80, now=0).reservation
    limiter.release(reservation, now=1)
    assert limiter.used("k", TPM, 1) == 0
    assert limiter.used("k", RPM, 1) == 0


def test_settle_confirms_at_settle_time():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (RPM, TPM), 80, now=0).reservation
    limiter.settle(reservation, 20, now=5)
    assert limiter.used("k", TPM, 64) == 20
    assert limiter.used("k", TPM, 65) == 0


# -- pacing (burst < 1) ------------------------------------------------------------------------

# 150 at once, then 10 per second
PACED_TPM = Rate("tpm", "tokens", 600, 60.0, burst=0.25, algorithm="sliding_window")


def test_pacing_allows_a_short_burst_then_the_limits_rate():
    limiter = MemoryLimiter(view_margin=0)
    assert limiter.try_acquire("k", (PACED_TPM,), 150, now=0).granted
    decision = limiter.try_acquire("k", (PACED_TPM,), 50, now=0)
    assert not decision.granted
    assert decision.wait == pytest.approx(5)  # 50 tokens at 10 per second
    assert limiter.try_acquire("k", (PACED_TPM,), 50, now=5).granted


def test_pacing_lets_a_request_larger_than_the_burst_go_once_the_bucket_is_full():
    limiter = MemoryLimiter(view_margin=0)
    assert limiter.try_acquire("k", (PACED_TPM,), 400, now=0).granted  # bucket full: may go
    decision = limiter.try_acquire("k", (PACED_TPM,), 10, now=1)
    assert not decision.granted  # the bucket is 250 in debt, refilling at 10/s
    assert decision.wait == pytest.approx(25)


def test_settling_below_the_estimate_refunds_the_pace():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (PACED_TPM,), 150, now=0).reservation
    limiter.settle(reservation, 30, now=0)
    assert limiter.try_acquire("k", (PACED_TPM,), 120, now=0).granted


def test_release_refunds_the_pace():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (PACED_TPM,), 150, now=0).reservation
    limiter.release(reservation, now=0)
    assert limiter.try_acquire("k", (PACED_TPM,), 150, now=0).granted


def test_paced_releases_under_saturation_are_spread_not_one_burst_a_minute():
    """Saturated for 3 minutes: with pacing, releases in minutes 2 and 3 are spread evenly."""
    for burst, expect_spread in ((1.0, False), (0.25, True)):
        rate = Rate("tpm", "tokens", 600, 60.0, burst=burst, algorithm="sliding_window")
        limiter = MemoryLimiter(view_margin=0)
        released = []
        now = 0.0
        while now < 180:
            decision = limiter.try_acquire("k", (rate,), 10, now)
            if decision.granted:
                limiter.settle(decision.reservation, 10, now)
                released.append(now)
            else:
                now += decision.wait
        late = [t for t in released if t >= 60]
        seconds_with_releases = {int(t) for t in late}
        assert len(late) >= 115  # the full limit either way: 600 tokens a minute
        assert (len(seconds_with_releases) > 60) is expect_spread  # vs ~2 bursts


# -- the token bucket (the default) --------------------------------------------------------------

B_RPM = Rate("rpm", "requests", 3)
B_TPM = Rate("tpm", "tokens", 600)  # refills 10 tokens per second


def test_bucket_refills_continuously_up_to_its_capacity():
    bucket = TokenBucket(60, used=0, now=0)
    bucket.hold(500)
    bucket.count(500, 600, now=0)
    assert bucket.used(600, 0) == 500
    assert bucket.used(600, 10) == pytest.approx(400)  # 10 tokens a second came back
    assert bucket.used(600, 1000) == 0  # never more than full


def test_bucket_admits_a_full_limit_then_the_refill():
    """Over T seconds a bucket that starts full admits limit x (1 + T / period)."""
    limiter = MemoryLimiter(view_margin=0)
    released, now = 0, 0.0
    while now <= 60:
        decision = limiter.try_acquire("k", (B_TPM,), 50, now)
        if decision.granted:
            limiter.confirm(decision.reservation, now)
            released += 50
        else:
            now += decision.wait
    assert released == 1_200  # 600 at once, 600 refilled during the minute


def test_bucket_wait_is_the_time_to_refill_the_shortfall():
    limiter = MemoryLimiter(view_margin=0)
    limiter.confirm(limiter.try_acquire("k", (B_TPM,), 600, now=0).reservation, now=0)
    decision = limiter.try_acquire("k", (B_TPM,), 100, now=2)  # 20 back
    assert (decision.granted, decision.binding) == (False, "tpm")
    assert decision.wait == pytest.approx(8)
    assert limiter.try_acquire("k", (B_TPM,), 100, now=10).granted


def test_bucket_in_flight_amounts_earn_no_refill_until_confirmed():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (B_TPM,), 600, now=0).reservation
    # Upstream may count it at any moment until it answers: it must still find 600 then.
    assert not limiter.try_acquire("k", (B_TPM,), 10, now=500).granted
    limiter.confirm(reservation, now=500)
    assert not limiter.try_acquire("k", (B_TPM,), 10, now=500).granted
    assert limiter.try_acquire("k", (B_TPM,), 10, now=501).granted


def test_bucket_settle_refunds_and_overcharges():
    limiter = MemoryLimiter(view_margin=0)
    reservation = limiter.try_acquire("k", (B_RPM, B_TPM), 500, now=0).reservation
    limiter.settle(reservation, 100, now=0)
    assert limiter.used("k", B_TPM, 0) == 100
    assert limiter.used("k", B_RPM, 0) == 1  # the request itself is not refunded
    reservation = limiter.try_acquire("k", (B_TPM,), 100, now=0).reservation
    limiter.settle(reservation, 800, now=0)  # upstream counted more than we estimated
    assert limiter.used("k", B_TPM, 0) == 900  # in debt: 300 below empty
    assert limiter.open_reservations() == 0


def test_bucket_release_gives_back_in_flight_and_confirmed_amounts():
    limiter = MemoryLimiter(view_margin=0)
    flying = limiter.try_acquire("k", (B_RPM, B_TPM), 300, now=0).reservation
    answered = limiter.try_acquire("k", (B_RPM, B_TPM), 300, now=0).reservation
    limiter.confirm(answered, now=0)
    limiter.release(flying, now=1)
    limiter.release(answered, now=1)  # a 429: upstream charged nothing
    assert limiter.used("k", B_TPM, 1) == 0
    assert limiter.used("k", B_RPM, 1) == 0
    assert limiter.open_reservations() == 0


def test_switching_algorithm_keeps_what_is_used_and_in_flight():
    limiter = MemoryLimiter(view_margin=0)
    window_tpm = Rate("tpm", "tokens", 600, algorithm="sliding_window")
    limiter.confirm(limiter.try_acquire("k", (window_tpm,), 400, now=0).reservation, now=0)
    flying = limiter.try_acquire("k", (window_tpm,), 100, now=0).reservation
    assert limiter.used("k", B_TPM, 0) == 500  # now a bucket: 400 used, 100 in flight
    assert not limiter.try_acquire("k", (B_TPM,), 101, now=0).granted
    limiter.release(flying, now=0)
    assert limiter.try_acquire("k", (B_TPM,), 200, now=0).granted


# -- upstream's view ---------------------------------------------------------------------------


def report(remaining, limit=600, reset=0.0):
    return [RateReport("tokens", 60.0, limit, remaining, reset)]


def test_a_report_below_our_picture_holds_releases_back():
    limiter = MemoryLimiter(view_margin=0)
    first = limiter.try_acquire("k", (B_TPM,), 100, now=0).reservation
    limiter.confirm(first, now=0)
    limiter.observe("k", report(remaining=150), now=0)  # others used 350
    assert limiter.used("k", B_TPM, 0) == 450
    decision = limiter.try_acquire("k", (B_TPM,), 200, now=0)
    assert not decision.granted
    assert decision.wait == pytest.approx(5)  # 50 short at 10 per second


def test_requests_in_flight_stay_held_aside_on_top_of_a_report():
    limiter = MemoryLimiter(view_margin=0)
    first = limiter.try_acquire("k", (B_TPM,), 100, now=0).reservation
    later = limiter.try_acquire("k", (B_TPM,), 200, now=0).reservation
    limiter.confirm(first, now=1)
    # The report may or may not count `later` yet: it stays held aside until its own answer.
    limiter.observe("k", report(remaining=500), now=1)
    assert limiter.try_acquire("k", (B_TPM,), 300, now=1).granted
    assert not limiter.try_acquire("k", (B_TPM,), 1, now=1).granted
    limiter.confirm(later, now=1)  # now charged to the view, no longer held aside
    assert limiter.used("k", B_TPM, 1) == 600


def test_a_request_counted_twice_is_counted_once_again_at_the_next_report():
    limiter = MemoryLimiter(view_margin=0, resync_interval=0)  # every report re-syncs
    flying = limiter.try_acquire("k", (B_TPM,), 200, now=0).reservation
    limiter.observe("k", report(remaining=400), now=0)  # upstream had counted it already
    assert limiter.used("k", B_TPM, 0) == 400  # 200 in the report + 200 held aside
    limiter.confirm(flying, now=0)
    limiter.observe("k", report(remaining=400), now=0)
    assert limiter.used("k", B_TPM, 0) == 200


def test_a_report_soon_after_a_resync_changes_the_view_only_with_bad_news():
    """Under load answers come back hundreds of times a second. A report within
    RESYNC_INTERVAL of the view's last re-sync, while a request of ours is in flight (whose
    answer brings the next report), is skipped when upstream has at least what the view
    assumes, our requests in flight counted: the view stays on the safe side until then. It
    is applied at once when upstream has less, or when nothing is in flight."""
    limiter = MemoryLimiter(view_margin=0)
    assert limiter.observe("k", report(remaining=400), now=0)
    flying = limiter.try_acquire("k", (B_TPM,), 100, now=0).reservation
    assert flying is not None
    assert not limiter.observe("k", report(remaining=500), now=0)  # more room: next report
    assert limiter.used("k", B_TPM, 0) == 300  # 200 by the report, 100 held aside
    # Upstream counted our request in flight: what the view already assumed, nothing new.
    assert not limiter.observe("k", report(remaining=300), now=0)
    assert limiter.observe("k", report(remaining=250), now=0)  # less: at once
    after_bad_news = limiter.used("k", B_TPM, 0)
    assert after_bad_news >= 350  # (and others' lump is kept in reserve)
    limiter.confirm(flying, now=0)
    # Nothing in flight: no report may come for a while, so even good news counts at once.
    assert limiter.observe("k", report(remaining=500), now=0)
    assert limiter.used("k", B_TPM, 0) < after_bad_news
    again = limiter.try_acquire("k", (B_TPM,), 10, now=0).reservation
    assert again is not None
    later = 2 * RESYNC_INTERVAL
    assert limiter.observe("k", report(remaining=600), now=later)  # the interval is over


def test_foreign_usage_is_learned_and_charged_between_reports():
    big = Rate("tpm", "tokens", 6_000)  # refills 100 tokens a second
    limiter = MemoryLimiter(view_margin=0)
    now, left = 0.0, 1_000
    # Another client uses 20 tokens a second; we send nothing but read a report every 5 s.
    limiter.observe("k", report(remaining=left, limit=6_000), now=now)
    for _ in range(12):
        now += 5
        left += (100 - 20) * 5
        limiter.observe("k", report(remaining=left, limit=6_000), now=now)
    assert limiter.foreign_rate("k", "tokens", 60.0, now) == pytest.approx(20, rel=0.05)
    # Between reports the view refills at 100 - 20 per second, not 100, and keeps the most the
    # others took between two reports (100 in 5 s) in reserve.
    assert limiter.used("k", big, now + 2) == pytest.approx(6_000 - (left + 160) + 100, abs=2)
    # Once the other client stops, its rate decays away.
    for _ in range(15):
        now += 5
        left = min(6_000, left + 500)
        limiter.observe("k", report(remaining=left, limit=6_000), now=now)
    assert limiter.foreign_rate("k", "tokens", 60.0, now) == 0


def test_refunds_reach_the_view_with_a_report_and_their_share_is_learnt():
    """An upstream may keep an unused reservation, or refund it a moment after the answer:
    the view takes refunds from reports only, and learns how much of them to expect."""
    limiter = MemoryLimiter(view_margin=0, resync_interval=0)  # every report re-syncs
    reservation = limiter.try_acquire("k", (B_TPM,), 500, now=0).reservation
    limiter.confirm(reservation, now=0)
    limiter.observe("k", report(remaining=100), now=0)
    limiter.settle(reservation, 100, now=0)  # 400 unused
    assert limiter.used("k", B_TPM, 0) == 500  # the view: not refunded yet
    limiter.observe("k", report(remaining=500), now=0)  # upstream did refund
    assert limiter.used("k", B_TPM, 0) == 100
    assert limiter._views.drift(("k", "tokens", 60.0)).share == 1.0
    # This upstream then keeps a reservation: the view follows the report, and the share of
    # refunds it is expected to make drops (so that is not taken for others' usage).
    reservation = limiter.try_acquire("k", (B_TPM,), 300, now=0).reservation
    limiter.confirm(reservation, now=0)
    limiter.settle(reservation, 100, now=0)
    limiter.observe("k", report(remaining=200), now=0)
    assert limiter.used("k", B_TPM, 0) == 400
    assert limiter._views.drift(("k", "tokens", 60.0)).share == pytest.approx(400 / 600)


def test_others_usage_is_told_apart_from_refunds():
    """Intervals without settles show others' usage; the rest show upstream's refunds."""
    big = Rate("tpm", "tokens", 60_000)  # refills 1,000 a second
    limiter = MemoryLimiter(view_margin=0)
    now, left = 0.0, 30_000.0
    limiter.observe("k", report(remaining=left, limit=60_000), now=now)
    for i in range(40):
        now += 0.5
        left = min(60_000.0, left + 500 - 50)  # others take 100 a second
        if i % 2:  # every other interval, one of ours completes: 2,000 unused, refunded
            reservation = limiter.try_acquire("k", (big,), 3_000, now).reservation
            limiter.confirm(reservation, now)
            limiter.settle(reservation, 1_000, now)
            left -= 1_000
        limiter.observe("k", report(remaining=round(left), limit=60_000), now=now)
    assert limiter.foreign_rate("k", "tokens", 60.0, now) == pytest.approx(100, rel=0.05)
    assert limiter._views.drift(("k", "tokens", 60.0)).share == pytest.approx(1.0, abs=0.02)


def test_a_refund_is_credited_a_moment_after_the_settle_once_upstream_is_known_to_refund():
    limiter = MemoryLimiter(view_margin=0, resync_interval=0)  # every report re-syncs
    big = Rate("tpm", "tokens", 60_000)  # refills 1,000 a second
    first = limiter.try_acquire("k", (big,), 5_000, now=0).reservation
    limiter.confirm(first, now=0)
    limiter.observe("k", report(remaining=55_000, limit=60_000), now=0)
    limiter.settle(first, 1_000, now=0)
    limiter.observe("k", report(remaining=59_000, limit=60_000), now=0)  # it refunded 4,000
    reservation = limiter.try_acquire("k", (big,), 30_000, now=0).reservation
    limiter.confirm(reservation, now=0)
    limiter.observe("k", report(remaining=29_000, limit=60_000), now=0)
    limiter.settle(reservation, 10_000, now=0)  # 20,000 unused
    # Nothing in flight, so no report will come; the refund is credited 0.25 s later.
    decision = limiter.try_acquire("k", (big,), 40_000, now=0.1)
    assert not decision.granted
    assert decision.wait == pytest.approx(0.15)  # look again when the refund is credited
    assert limiter.used("k", big, 0.2) == pytest.approx(60_000 - 29_200)
    assert limiter.used("k", big, 0.25) == pytest.approx(60_000 - 29_250 - 20_000)


def test_the_view_credits_no_more_than_upstream_refunds():
    """Our input estimate may exceed upstream's count; upstream only gives back the unused
    output reservation, so that is all the view credits."""
    limiter = MemoryLimiter(view_margin=0, resync_interval=0)  # every report re-syncs
    big = Rate("tpm", "tokens", 60_000)
    first = limiter.try_acquire("k", (big,), 5_000, now=0).reservation
    limiter.confirm(first, now=0)
    limiter.observe("k", report(remaining=55_000, limit=60_000), now=0)
    limiter.settle(first, 1_000, now=0)
    limiter.observe("k", report(remaining=59_000, limit=60_000), now=0)  # it refunds: trusted
    second = limiter.try_acquire("k", (big,), 30_000, now=0).reservation
    limiter.confirm(second, now=0)
    limiter.observe("k", report(remaining=29_000, limit=60_000), now=0)
    # 20,000 unused by our count, but upstream reserved 1,500 less input than we estimated.
    limiter.settle(second, 10_000, now=0, refund=18_500)
    assert limiter.used("k", big, 0.25) == pytest.approx(60_000 - 29_250 - 18_500)


def test_the_view_keeps_a_sliver_of_the_limit_in_reserve():
    limiter = MemoryLimiter()  # the default margin: 0.5 % of the limit
    limiter.observe("k", report(remaining=600), now=0)
    assert limiter.used("k", B_TPM, 0) == pytest.approx(3)
    assert not limiter.try_acquire("k", (B_TPM,), 598, now=0).granted
    assert limiter.try_acquire("k", (B_TPM,), 597, now=0).granted


def test_a_view_that_sees_others_take_the_whole_refill_still_asks_upstream_after_a_period():
    """Regression: an upstream that keeps whole reservations while the proxy settles at usage
    looks like others using the limit as fast as it refills. The view then refilled at 0 and
    held requests forever, since nothing in flight brings a new report. A view is trusted for
    one period after its report: then one request goes (its answer re-syncs the view), and
    the others look again every STALE_RECHECK_SECONDS until it has."""
    big = Rate("tpm", "tokens", 60_000)  # refills 1,000 a second
    limiter = MemoryLimiter(view_margin=0)
    now, left = 0.0, 60_000.0
    limiter.observe("k", report(remaining=left, limit=60_000), now=now)
    for _ in range(20):  # each answer: upstream charged 3,000 more than settled
        now += 1.0
        reservation = limiter.try_acquire("k", (big,), 100, now).reservation
        limiter.confirm(reservation, now)
        limiter.settle(reservation, 100, now)
        left = min(60_000.0, left + 1_000) - 3_100
        limiter.observe("k", report(remaining=round(left), limit=60_000), now=now)
    assert limiter.foreign_rate("k", "tokens", 60.0, now) >= 1_000  # all of the refill
    refused = limiter.try_acquire("k", (big,), 30_000, now)
    assert not refused.granted
    assert refused.wait <= 60.0  # not forever: at most until the view is a period old
    stale = now + 60.0
    probe = limiter.try_acquire("k", (big,), 30_000, stale)
    assert probe.granted  # one request asks upstream
    behind = limiter.try_acquire("k", (big,), 100, stale)
    assert not behind.granted and behind.wait == STALE_RECHECK_SECONDS
    limiter.confirm(probe.reservation, stale + 0.5)
    limiter.observe("k", report(remaining=25_000, limit=60_000), now=stale + 0.5)
    assert limiter.try_acquire("k", (big,), 100, stale + 0.5).granted  # re-synced: room again
