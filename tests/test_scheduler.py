import heapq
import itertools
import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cooldown.breaker import CircuitBreaker
from cooldown.config import BreakerConfig, CerebrasLimits
from cooldown.limiter import MemoryLimiter, Rate, RateReport, TokenBucket
from cooldown.scheduler import Outcome, Scheduler

LIMITS = CerebrasLimits(
    rpm_limit=10,
    tpm_limit=10_000,
    max_queue_depth=5,
    request_timeout=120,
    priority_threshold=0.5,
    probe_first=False,  # tested on its own below
)


def make(limits=LIMITS, breaker=None):
    rates = (
        Rate("rpm", "requests", limits.rpm_limit, algorithm=limits.algorithm),
        Rate("tpm", "tokens", limits.tpm_limit, algorithm=limits.algorithm),
    )
    resolved = []
    scheduler = Scheduler(
        MemoryLimiter(),
        limits,
        breaker or CircuitBreaker(BreakerConfig(failure_threshold=3, open_duration=30)),
        lambda key: rates,
        on_resolved=resolved.append,
    )
    return scheduler, resolved


def test_fitting_request_is_released_at_once():
    scheduler, resolved = make()
    ticket = scheduler.submit("k", 100, now=0)
    assert ticket.outcome is Outcome.RELEASED  # at submit: nothing of "k" was waiting
    assert scheduler.pump(0) is None  # nothing held: no deadline, no wake-up
    assert ticket.reservation is not None
    assert resolved == [ticket]
    assert scheduler.depth == 0


def test_a_request_behind_a_waiting_one_queues_even_if_it_would_fit():
    """Releasing at submit is only for a key with nothing held: a small request that fits
    must not jump a held one (FIFO while not tight; the size rule decides when tight)."""
    scheduler, _ = make()
    first = scheduler.submit("k", 9_000, now=0)
    big = scheduler.submit("k", 5_000, now=0)
    small = scheduler.submit("k", 50, now=0)
    assert first.outcome is Outcome.RELEASED
    assert big.held and small.held
    assert scheduler.submit("other", 50, now=0).outcome is Outcome.RELEASED  # its own queue


def test_waits_until_the_limit_frees_and_reports_why():
    scheduler, _ = make(replace(LIMITS, algorithm="sliding_window"))
    first = scheduler.submit("k", 9_000, now=0)
    scheduler.pump(0)
    scheduler.confirm(first, now=0)  # upstream answered at once: it ages from t=0
    second = scheduler.submit("k", 2_000, now=1)
    wake = scheduler.pump(1)
    assert second.held
    assert second.wait_reason == "tpm"
    assert wake == pytest.approx(60)  # when the first one's tokens age out
    scheduler.finish(first, 200, actual_tokens=1_000, now=5)  # settling frees capacity early
    scheduler.pump(5)
    assert second.outcome is Outcome.RELEASED
    assert second.waited == 4


def test_bucket_waits_for_the_refill_and_reports_why():
    scheduler, _ = make()  # token bucket: 10,000 tokens, refilling 166.7 a second
    first = scheduler.submit("k", 9_000, now=0)
    scheduler.pump(0)
    scheduler.confirm(first, now=0)
    second = scheduler.submit("k", 2_000, now=1)
    wake = scheduler.pump(1)
    assert second.held
    assert second.wait_reason == "tpm"
    assert wake == pytest.approx(6)  # 1,000 short at t=0, 166.7 back per second
    scheduler.pump(wake)
    assert second.outcome is Outcome.RELEASED


def test_fifo_while_capacity_is_not_tight():
    scheduler, resolved = make(replace(LIMITS, priority_threshold=1.0))
    blocker = scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    tickets = [scheduler.submit("k", size, now=1 + i) for i, size in enumerate([6000, 100, 5000])]
    scheduler.finish(blocker, 200, 0, now=10)
    scheduler.pump(10)
    assert resolved[1:] == tickets[:2]
    assert tickets[2].held


def test_small_requests_first_when_tight_and_fifo_among_equals():
    scheduler, resolved = make()
    blocker = scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    large = scheduler.submit("k", 6_000, now=1)
    medium = scheduler.submit("k", 2_000, now=2)
    small_a = scheduler.submit("k", 500, now=3)
    small_b = scheduler.submit("k", 500, now=4)
    scheduler.pump(4)
    assert scheduler.depth == 4
    # Free 4,000 tokens: usage stays above the threshold, so priority order applies.
    scheduler.finish(blocker, 200, 6_000, now=5)
    scheduler.pump(5)
    released = resolved[1:]
    assert released[:3] == [small_a, small_b, medium]
    assert large.held  # 6,000 more would not fit the remaining budget
    assert large.wait_reason == "tpm"


def test_aging_lets_a_large_request_overtake_fresh_small_ones():
    limits = replace(LIMITS, priority_aging=10, max_queue_depth=50)
    scheduler, resolved = make(limits)
    blocker = scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    large = scheduler.submit("k", 6_000, now=1)
    small = scheduler.submit("k", 500, now=30)  # 29 s later: large has gained 2.9 priority
    scheduler.finish(blocker, 200, 3_000, now=31)
    scheduler.pump(31)
    assert resolved.index(large) < resolved.index(small)


def test_small_requests_pass_a_waiting_large_head_within_a_bounded_budget():
    scheduler, resolved = make(replace(LIMITS, priority_aging=1, max_queue_depth=50))
    blocker = scheduler.submit("k", 9_000, now=0)
    scheduler.pump(0)
    scheduler.confirm(blocker, now=0)
    large = scheduler.submit("k", 6_000, now=1)  # aged past the small ones arriving later
    smalls = [scheduler.submit("k", 500, now=15) for _ in range(7)]
    scheduler.pump(15)
    # Tight; 3,500 came back since t=0, not enough for the large head. Small ones may pass it,
    # up to half its size in all: six of 500, not the seventh, although it would fit.
    assert large.held
    assert [t.outcome for t in smalls] == [Outcome.RELEASED] * 6 + [None]
    assert large.backfilled == 3_000
    assert resolved[1:] == smalls[:6]


def test_strict_head_of_line_a_waiting_head_is_not_overtaken():
    scheduler, _ = make(replace(LIMITS, priority_threshold=1.0))
    scheduler.submit("k", 9_500, now=0)
    scheduler.pump(0)
    big = scheduler.submit("k", 5_000, now=1)
    tiny = scheduler.submit("k", 100, now=2)
    scheduler.pump(2)
    assert big.held and tiny.held  # tiny would fit, but it is behind big


def test_queue_full_is_refused_at_once_with_retry_after():
    scheduler, _resolved = make()
    scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    held = [scheduler.submit("k", 100, now=1) for _ in range(5)]
    scheduler.pump(1)
    refused = scheduler.submit("k", 100, now=1)
    assert refused.outcome is Outcome.QUEUE_FULL
    assert refused.retry_after >= 1
    assert all(t.held for t in held)
    assert scheduler.depth == 5


def test_timeout_answers_and_frees_the_slot():
    scheduler, _ = make(replace(LIMITS, algorithm="sliding_window"))
    blocker = scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    scheduler.confirm(blocker, now=0)
    waiting = scheduler.submit("k", 100, now=1)
    assert scheduler.pump(1) == pytest.approx(60)  # the limit frees before the deadline
    scheduler.pump(121)
    assert waiting.outcome is Outcome.TIMEOUT
    assert scheduler.depth == 0


def test_cancel_leaves_the_queue_and_takes_nothing():
    scheduler, _ = make()
    scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    waiting = scheduler.submit("k", 100, now=1)
    assert scheduler.cancel(waiting, now=2)
    assert waiting.outcome is Outcome.CANCELLED
    assert waiting.reservation is None
    assert scheduler.depth == 0
    assert not scheduler.cancel(waiting, now=3)
    assert scheduler.limiter.open_reservations() == 1


def test_breaker_open_answers_held_and_new_requests_then_probes():
    scheduler, _ = make()
    sent = [scheduler.submit("k", 100, now=0) for _ in range(3)]
    scheduler.pump(0)
    held = scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    assert held.held
    for ticket in sent:
        scheduler.finish(ticket, 429, None, now=1)
    scheduler.pump(1)
    assert held.outcome is Outcome.BREAKER_OPEN
    assert held.retry_after == pytest.approx(30)
    refused = scheduler.submit("k", 100, now=2)
    assert refused.outcome is Outcome.BREAKER_OPEN
    # Half-open: exactly one probe goes; the others wait for its answer.
    probe = scheduler.submit("k", 100, now=31)
    other = scheduler.submit("k", 100, now=31)
    scheduler.pump(31)
    assert probe.outcome is Outcome.RELEASED and probe.probe
    assert other.held
    scheduler.finish(probe, 200, 50, now=32)
    scheduler.pump(32)
    assert other.outcome is Outcome.RELEASED
    assert scheduler.breaker.consecutive_429s == 0


def test_probe_answered_429_reopens_and_answers_the_held():
    scheduler, _ = make()
    for ticket in [scheduler.submit("k", 1, now=0) for _ in range(3)]:
        scheduler.pump(0)
        scheduler.finish(ticket, 429, None, now=0)
    probe = scheduler.submit("k", 1, now=30)
    other = scheduler.submit("k", 1, now=30)
    scheduler.pump(30)
    scheduler.finish(probe, 429, None, now=31)
    scheduler.pump(31)
    assert other.outcome is Outcome.BREAKER_OPEN


def test_abort_before_upstream_releases_after_upstream_keeps_the_estimate():
    scheduler, _ = make()
    a = scheduler.submit("k", 1_000, now=0)
    b = scheduler.submit("k", 2_000, now=0)
    scheduler.pump(0)
    scheduler.abort(a, reached_upstream=False, now=1)
    scheduler.abort(b, reached_upstream=True, now=1)
    tpm = Rate("tpm", "tokens", 10_000)
    assert scheduler.limiter.used("k", tpm, 1) == 2_000
    assert scheduler.limiter.open_reservations() == 0


def test_shutdown_answers_everything_held():
    scheduler, _ = make()
    scheduler.submit("k", 10_000, now=0)
    scheduler.pump(0)
    held = [scheduler.submit("k", 100, now=1) for _ in range(3)]
    assert scheduler.shutdown(now=2) == held
    assert all(t.outcome is Outcome.SHUTDOWN for t in held)
    assert scheduler.depth == 0


# -- property: upstream never over the limit, nothing leaked ------------------------------------

arrivals = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=20),  # gap before this arrival
        st.integers(min_value=1, max_value=3_000),  # estimated tokens
        st.floats(min_value=0, max_value=1),  # actual / estimate
        st.floats(min_value=0.1, max_value=30),  # time from release to the end of the answer
        st.floats(min_value=0, max_value=1),  # when the headers come, as a part of that time
        st.floats(min_value=0, max_value=1),  # when upstream counts it, as a part of that
        st.sampled_from(["ok", "ok", "ok", "cancel", "abort"]),
    ),
    min_size=1,
    max_size=60,
)
PROPERTY_LIMITS = CerebrasLimits(
    rpm_limit=7,
    tpm_limit=5_000,
    max_queue_depth=20,
    request_timeout=90,
    priority_threshold=0.5,
    probe_first=False,
)


def run_against_upstream(events, scheduler):
    """Drive `scheduler` through `events`; return what upstream counted, and when.

    Upstream counts each request (its estimate, capped at the limit) at some moment between
    our release and its response headers, and settles it to the actual usage when the answer
    ends. Returns [(counted at, estimate charged, ended at, actual)] for requests that reached
    upstream.
    """
    now = 0.0
    plans = {}  # ticket id -> (event, ticket)
    steps = []  # [time, kind, ticket] for confirm/finish still to happen
    tickets = []

    def track():
        for ticket, event in tickets:
            if ticket.outcome is Outcome.RELEASED and ticket.id not in plans:
                _, _, _, latency, headers, _, _ = event
                plans[ticket.id] = (event, ticket)
                steps.append([ticket.resolved_at + headers * latency, "confirm", ticket])
                steps.append([ticket.resolved_at + latency, "finish", ticket])

    def advance_to(target):
        nonlocal now
        while True:
            wake = scheduler.pump(now)
            track()
            due = [step[0] for step in steps if step[0] <= target]
            candidates = [t for t in [wake, *due] if t is not None and t <= target]
            if not candidates:
                break
            now = max(now, min(candidates))
            for step in sorted((st_ for st_ in steps if st_[0] <= now), key=lambda x: x[0]):
                steps.remove(step)
                _, kind, ticket = step
                event = plans[ticket.id][0]
                fraction, fate = event[2], event[6]
                if kind == "confirm" and fate != "abort":
                    scheduler.confirm(ticket, now)
                elif kind == "finish":
                    if fate == "abort":
                        scheduler.abort(ticket, reached_upstream=False, now=now)
                    else:
                        scheduler.finish(ticket, 200, int(ticket.tokens * fraction), now)
        now = target
        scheduler.pump(now)
        track()

    for event in events:
        gap, tokens, *_, fate = event
        advance_to(now + gap)
        ticket = scheduler.submit("k", tokens, now)
        tickets.append((ticket, event))
        if fate == "cancel":
            scheduler.cancel(ticket, now)
        scheduler.pump(now)
        track()
    advance_to(now + 1_000)

    assert scheduler.depth == 0
    assert scheduler.limiter.open_reservations() == 0
    assert all(not t.held for t, _ in tickets)
    counted = []
    tpm = scheduler.limits.tpm_limit
    for ticket, event in tickets:
        _, _, fraction, latency, headers, charge, fate = event
        if ticket.outcome is not Outcome.RELEASED:
            continue
        assert ticket.finished
        if fate == "abort":
            continue  # never reached upstream
        at = ticket.resolved_at + charge * headers * latency
        ended = ticket.resolved_at + latency
        counted.append((at, min(ticket.tokens, tpm), ended, int(ticket.tokens * fraction)))
    return sorted(counted)


def upstream_bucket_overdrafts(counted, limits):
    """Replay what upstream counted through Cerebras's own buckets (full at the start,
    refilled continuously; a request needs its estimate available when counted, and the
    unused part comes back when it ends). Returns the moments a request would have been
    refused."""
    events = []
    for at, estimate, ended, actual in counted:
        events.append((at, 1, estimate))  # charge (after refunds at the same moment)
        events.append((ended, 0, estimate - actual))  # settle: refund (or extra charge)
    events.sort()
    level = {"requests": float(limits.rpm_limit), "tokens": float(limits.tpm_limit)}
    capacity = dict(level)
    last = 0.0
    refused = []
    for at, is_charge, amount in events:
        for unit in level:
            level[unit] = min(capacity[unit], level[unit] + capacity[unit] / 60 * (at - last))
        last = at
        if is_charge:
            if level["requests"] < 1 - 1e-6 or level["tokens"] < amount - 1e-6:
                refused.append(at)
            level["requests"] -= 1
            level["tokens"] -= amount
        else:
            level["tokens"] += amount
    return refused


@settings(max_examples=150, deadline=None)
@given(arrivals)
def test_upstream_bucket_never_refuses_and_nothing_leaks(events):
    """Wherever in [release, response headers] upstream counts each request, its token
    bucket always has room: the token-bucket limiter never causes a 429."""
    scheduler, _ = make(PROPERTY_LIMITS)
    counted = run_against_upstream(events, scheduler)
    assert upstream_bucket_overdrafts(counted, PROPERTY_LIMITS) == []


@settings(max_examples=150, deadline=None)
@given(arrivals)
def test_no_window_of_60s_exceeds_the_limits_and_nothing_leaks(events):
    """The sliding window: whatever upstream's counting moments, no 60 s window of them
    exceeds a limit (in actual tokens)."""
    limits = replace(PROPERTY_LIMITS, algorithm="sliding_window")
    scheduler, _ = make(limits)
    counted = run_against_upstream(events, scheduler)
    kept = [(at, min(actual, limits.tpm_limit)) for at, _, _, actual in counted]
    for start, _ in kept:
        window = [tokens for at, tokens in kept if start <= at < start + 60]
        assert len(window) <= limits.rpm_limit
        assert sum(window) <= limits.tpm_limit


class RefillsInFlight(TokenBucket):
    """A broken bucket: charges at release, so in-flight amounts refill before upstream
    counts them. (`try_acquire` has just brought `_used` up to date.)"""

    def hold(self, amount):
        self._used += amount

    def unhold(self, amount):
        self._used -= amount

    def count(self, amount, limit, now):
        return None


def test_the_property_catches_a_bucket_that_lets_in_flight_amounts_refill(monkeypatch):
    """The property above is not vacuous: charging at release (instead of holding in-flight
    amounts aside) lets a second request through that upstream then refuses."""
    monkeypatch.setattr("cooldown.limiter.TokenBucket", RefillsInFlight)
    scheduler, _ = make(PROPERTY_LIMITS)
    # 5,000 tokens released at 0, upstream counts them at 29 s; at 30 s the broken bucket has
    # refilled 2,500 and lets 2,500 more through, which upstream counts at once.
    events = [
        (0.0, 5_000, 1.0, 30.0, 1.0, 29 / 30, "ok"),
        (30.0, 2_500, 1.0, 1.0, 0.0, 0.0, "ok"),
    ]
    counted = run_against_upstream(events, scheduler)
    assert upstream_bucket_overdrafts(counted, PROPERTY_LIMITS) != []
    # The real bucket holds the second one back until upstream has room.
    monkeypatch.undo()
    scheduler, _ = make(PROPERTY_LIMITS)
    counted = run_against_upstream(events, scheduler)
    assert upstream_bucket_overdrafts(counted, PROPERTY_LIMITS) == []


def test_an_upstream_429_gives_the_reservation_back():
    scheduler, _ = make()
    ticket = scheduler.submit("k", 4_000, now=0)
    scheduler.pump(0)
    scheduler.finish(ticket, 429, None, now=1)
    tpm = Rate("tpm", "tokens", 10_000)
    assert scheduler.limiter.used("k", tpm, 1) == 0
    assert scheduler.limiter.open_reservations() == 0
    assert scheduler.breaker.consecutive_429s == 1


# -- probe first ---------------------------------------------------------------------------------

PROBING = replace(LIMITS, probe_first=True, probe_timeout=2.0)


def test_first_request_goes_alone_and_the_rest_wait_for_its_answer():
    scheduler, _ = make(PROBING)
    probe, *rest = [scheduler.submit("k", 100, now=0) for _ in range(3)]
    assert scheduler.pump(0) == pytest.approx(2.0)  # at most probe_timeout
    assert probe.outcome is Outcome.RELEASED
    assert all(t.held for t in rest)
    scheduler.confirm(probe, now=0.3)  # headers: synced, but usage not known yet
    scheduler.pump(0.3)
    assert all(t.held for t in rest)
    scheduler.finish(probe, 200, 80, now=0.5)
    scheduler.pump(0.5)
    assert all(t.outcome is Outcome.RELEASED for t in rest)


def test_an_unanswered_probe_holds_the_rest_only_until_probe_timeout():
    scheduler, _ = make(PROBING)
    probe, other = scheduler.submit("k", 100, now=0), scheduler.submit("k", 100, now=0)
    scheduler.pump(0)
    scheduler.pump(1.9)
    assert other.held
    scheduler.pump(2.0)
    assert other.outcome is Outcome.RELEASED
    assert probe.outcome is Outcome.RELEASED


def test_a_probe_that_fails_without_answer_hands_over_to_the_next_request():
    scheduler, _ = make(PROBING)
    probe, second, third = [scheduler.submit("k", 100, now=0) for _ in range(3)]
    scheduler.pump(0)
    scheduler.abort(probe, reached_upstream=False, now=0.1)
    scheduler.pump(0.1)
    assert second.outcome is Outcome.RELEASED  # the new probe
    assert third.held


def test_probes_again_after_a_quiet_spell_longer_than_the_refill_or_new_limits():
    scheduler, _ = make(PROBING)
    first = scheduler.submit("k", 100, now=0)
    scheduler.pump(0)
    scheduler.finish(first, 200, 100, now=0.1)
    # Within a minute of the last answer: no probe, both go at once.
    pair = [scheduler.submit("k", 100, now=30) for _ in range(2)]
    scheduler.pump(30)
    assert all(t.outcome is Outcome.RELEASED for t in pair)
    for t in pair:
        scheduler.finish(t, 200, 100, now=30)
    # Quiet for more than 60 s: upstream may have been used by others meanwhile.
    late = [scheduler.submit("k", 100, now=91) for _ in range(2)]
    scheduler.pump(91)
    assert [t.held for t in late] == [False, True]
    scheduler.finish(late[0], 200, 100, now=91.2)
    scheduler.pump(91.2)
    assert not late[1].held
    scheduler.finish(late[1], 200, 100, now=91.3)
    scheduler.probes.forget()  # e.g. a config reload
    again = [scheduler.submit("k", 100, now=92) for _ in range(2)]
    scheduler.pump(92)
    assert [t.held for t in again] == [False, True]


# -- property: upstream's own report is followed, whatever order the answers come in -----------

upstream_runs = st.fixed_dictionaries(
    {
        "upstream_tpm": st.integers(min_value=2_000, max_value=5_000),  # below the config's
        "already_used": st.floats(min_value=0, max_value=0.9),  # by others, before we start
        "refunds": st.booleans(),  # does upstream give unused reservations back?
        "requests": st.lists(
            st.tuples(
                st.floats(min_value=0, max_value=3),  # gap before this arrival
                st.integers(min_value=1, max_value=1_500),  # estimated tokens
                st.floats(min_value=0, max_value=1),  # actual / estimate
                st.floats(min_value=0.01, max_value=5),  # release -> headers
                st.floats(min_value=0, max_value=1),  # upstream counts it at this part of that
                st.floats(min_value=0, max_value=5),  # headers -> end of the answer
            ),
            min_size=1,
            max_size=40,
        ),
    }
)


@settings(max_examples=150, deadline=None)
@given(upstream_runs)
def test_upstream_never_refuses_when_its_reports_bind(run):
    """Upstream's limit is lower than the config's and partly used by others at the start.
    Upstream writes each report when it sends the headers (so answers, and reports, arrive in
    any order relative to releases). After the probe, nothing we release is refused."""
    limits = replace(PROPERTY_LIMITS, tpm_limit=10_000, rpm_limit=1_000, probe_first=True)
    scheduler, _ = make(limits)
    cap = run["upstream_tpm"]
    level = cap * (1 - run["already_used"])
    rate = cap / 60.0
    clock = 0.0
    upstream_at = 0.0
    events = []  # heap of (time, order, kind, ticket)
    order = itertools.count()
    plans = {}
    refused = []

    def upstream_until(t):
        nonlocal level, upstream_at
        level = min(cap, level + rate * (t - upstream_at))
        upstream_at = t

    def schedule_released(tickets):
        for ticket, plan in tickets:
            if ticket.outcome is Outcome.RELEASED and ticket.id not in plans:
                _, _, _, to_headers, count_at, to_end = plan
                plans[ticket.id] = plan
                released = ticket.resolved_at
                heapq.heappush(
                    events, (released + count_at * to_headers, next(order), "count", ticket)
                )
                heapq.heappush(events, (released + to_headers, next(order), "headers", ticket))
                heapq.heappush(events, (released + to_headers + to_end, next(order), "end", ticket))

    tickets = []
    arrivals = []
    t = 0.0
    for plan in run["requests"]:
        t += plan[0]
        arrivals.append((t, plan))
    pending_arrivals = list(arrivals)
    wake = None
    for _ in range(10_000):
        candidates = [e[0] for e in events[:1]]
        if pending_arrivals:
            candidates.append(pending_arrivals[0][0])
        if wake is not None:
            candidates.append(wake)
        if not candidates:
            break
        clock = max(clock, min(candidates))
        upstream_until(clock)
        if pending_arrivals and pending_arrivals[0][0] <= clock:
            _, plan = pending_arrivals.pop(0)
            tickets.append((scheduler.submit("k", plan[1], clock), plan))
        elif events and events[0][0] <= clock:
            _, _, kind, ticket = heapq.heappop(events)
            charged = min(ticket.tokens, cap)
            actual = int(ticket.tokens * plans[ticket.id][2])
            if kind == "count":
                if level < charged - 1e-6:  # a 429: refused before any work, nothing charged
                    refused.append((ticket.resolved_at, ticket.id, level, charged))
                    plans[ticket.id] = (*plans[ticket.id], "429")
                else:
                    level -= charged
            elif kind == "headers":
                report = [RateReport("tokens", 60.0, cap, math.floor(level), 0.0)]
                if plans[ticket.id][-1] == "429":
                    scheduler.finish(ticket, 429, None, clock)  # what Gate.confirm does
                else:
                    scheduler.confirm(ticket, clock)
                scheduler.limiter.observe("k", report, clock)
            elif plans[ticket.id][-1] != "429":
                if run["refunds"]:
                    level += charged - actual
                scheduler.finish(ticket, 200, actual, clock)
        wake = scheduler.pump(clock)
        schedule_released(tickets)
    assert scheduler.depth == 0
    assert scheduler.limiter.open_reservations() == 0
    first_answer = min(
        (t.resolved_at + plans[t.id][3] for t, _ in tickets if t.id in plans), default=0.0
    )
    # Only what was released before anything was known (the probe, and what a probe that
    # timed out let go) may be refused.
    assert [r for r in refused if r[0] >= first_answer] == [], refused


# -- requests that can never fit --------------------------------------------------------------


def test_a_request_larger_than_a_token_limit_is_refused_at_once_and_never_held():
    from cooldown.estimate import Need, TooLarge

    scheduler, resolved = make()
    ticket = scheduler.submit("k", 12_000, now=0, need=Need(11_000, 1_000, 1, 131_072))
    assert ticket.outcome is Outcome.TOO_LARGE
    assert ticket.too_large == TooLarge("tpm", 10_000, 12_000, 11_000)
    assert ticket.retry_after == 0  # waiting would change nothing
    assert resolved == [ticket] and scheduler.depth == 0 and not ticket.queued
    assert scheduler.pump(0) is None  # no deadline, no wake-up left behind
    # Exactly the limit fits (once the bucket is full): it is released, not refused.
    exact = scheduler.submit("k", 10_000, now=0, need=Need(9_000, 1_000, 1, 131_072))
    assert exact.outcome is Outcome.RELEASED


def test_only_what_is_certain_is_judged_not_the_estimate():
    """An estimate over the limit whose certain part fits (a default output reservation, the
    calibration's margin) keeps today's way: held until the whole bucket is free."""
    from cooldown.estimate import Need

    scheduler, _ = make()
    ticket = scheduler.submit("k", 50_000, now=0, need=Need(2_000, 0, 1, 131_072))
    assert ticket.outcome is Outcome.RELEASED


def test_more_than_the_context_is_refused_whatever_the_limits():
    from cooldown.estimate import Need, TooLarge

    scheduler, _ = make()
    ticket = scheduler.submit("k", 8_192, now=0, need=Need(100, 9_000, 1, 8_192))
    assert ticket.outcome is Outcome.TOO_LARGE
    assert ticket.too_large == TooLarge("context_length", 8_192, 9_100, 100)


def test_a_lower_limit_reported_by_upstream_is_the_one_judged():
    from cooldown.estimate import Need, TooLarge

    scheduler, _ = make()
    scheduler.limiter.observe("k", [RateReport("tokens", 60.0, 5_000, 5_000, 0.0)], 0)
    ticket = scheduler.submit("k", 6_000, now=0, need=Need(100, 5_900, 1, 131_072))
    assert ticket.too_large == TooLarge("tpm", 5_000, 6_000, 100)


def test_too_large_is_refused_before_a_full_queue_or_an_open_breaker():
    """The most useful answer: the others say retry later, and later would not help."""
    from cooldown.estimate import Need

    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, open_duration=30))
    scheduler, _ = make(breaker=breaker)
    breaker.record_429(0)
    assert scheduler.submit("k", 100, now=0).outcome is Outcome.BREAKER_OPEN
    big = scheduler.submit("k", 20_000, now=0, need=Need(10, 19_990, 1, 131_072))
    assert big.outcome is Outcome.TOO_LARGE
