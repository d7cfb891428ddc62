"""Request and token limits: reserve, confirm, then settle or release.

**Why a token bucket by default.** Cerebras replenishes capacity continuously ("available quota =
min(limit, limit + replenished tokens by time - current usage)"): a bucket of capacity C that
refills at C per period. A limiter that mirrors it admits exactly what upstream admits: over T
seconds, a bucket that starts full admits C x (1 + T / period), while a sliding window of the
same limit admits at most C x ceil(T / period) and gives away the refill of the first period of
every burst (0.59 of what upstream would admit on a 40 s burst). The window stays selectable
(`algorithm: sliding_window`) for upstreams that do count in windows.

**When does upstream count a request?** Somewhere between our release and the first byte of its
answer, and that delay varies (connection set-up, upstream queueing). So a reservation is *in
flight* from release until upstream is known to have admitted it (`confirm`, at the response
headers), and in flight it is held aside: it counts fully and earns no refill. At `confirm` it
is charged to the bucket (or logged in the window) at that moment, which is never earlier than
upstream's own.

*Proof sketch (bucket).* A bucket of capacity C and rate r that starts full accepts a sequence
of (time, amount) charges iff every interval [s, t] holds at most C + r (t - s). Take the
requests upstream counts in [s, t] and let j be the last of them we released, at a_j <= t.
Every other one was released at or before a_j; at a_j it was either confirmed already (at a
time >= its counting moment >= s, so charged to our bucket within [s, a_j]) or still in flight
(held aside). We released j only if level(a_j) - in_flight >= amount_j, and our level at a_j is
at most C + r (a_j - s) minus what we charged in [s, a_j]. So all of them together hold at
most C + r (a_j - s) <= C + r (t - s): upstream's bucket never goes below zero. The same
argument with the window's log gives "no window holds more than the limit". The hypothesis
test in tests/test_scheduler.py draws the counting moments at random and checks both; it fails
on a limiter that lets in-flight amounts refill.

**Upstream knows better** about other clients of the same organization, reservations it keeps
after a short completion, and limits that differ from the config. Its `x-ratelimit-*` headers
are kept per (model, unit, period) as an `UpstreamView`: a bucket re-synced at every report,
with our requests in flight held aside on top, charged with what we confirm since, and with
the rate at which *others* use the organization's capacity (`UpstreamDrift`) taken off its
refill. A request must fit both our bucket and the view, under the lower of the two limits:
trusting upstream can only make the proxy wait more, never send more than its own bucket
allows. Answers may reach the proxy in another order than upstream wrote their reports, so a
report may be older than requests the view has already charged: what it shows beyond the
view's belief may be those missed rather than refunds (see `UpstreamViews.resync`).

The limiter's state lives behind `LimiterBackend` so that a shared (e.g. Redis) backend can
replace `MemoryLimiter` without the scheduler noticing. Nothing here reads a clock: every call
takes `now`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from .periods import Unit as Unit  # re-exported: the limiter's callers name it here

Algorithm = Literal["token_bucket", "sliding_window"]
Slot = tuple[str, Unit, float]  # (limiter key, unit, period)
_EPSILON = 1e-6  # units; amounts are whole, refill is float

# Others' usage and upstream's refunds are estimated from the reports of this many seconds...
FOREIGN_WINDOW = 60.0
# ... others' usage from intervals adding up to at least this long (a few ms apart say little)...
FOREIGN_MIN_SECONDS = 1.0
# ... and this many seconds of it (or its largest lump) are kept in reserve ...
FOREIGN_RESERVE_SECONDS = 1.0
# ... learnt from reports unsure about at most this share of the limit (our requests in flight),
# and without refunds due beyond it for the others' part.
CLEAN_SHARE = 0.005
# Upstream reports whole units, rounded down.
REPORT_UNIT = 1.0
# Upstream's view always keeps this share of the limit in reserve.
VIEW_MARGIN = 0.005
# Unused reservations are credited to upstream's view this long after their settle, once
# upstream has been seen to refund at least this share of them.
REFUND_CREDIT_DELAY = 0.25
# A stale view (no report for a period) lets one request through; the others look again
# this often until its answer re-syncs the view.
STALE_RECHECK_SECONDS = 1.0
REFUND_TRUST = 0.9
# A report this soon after the view's last re-sync re-bases it only if it brings bad news (see
# MemoryLimiter.observe): under load, answers come back hundreds of times a second, and
# re-syncing on each of them was the largest single cost of an answer.
RESYNC_INTERVAL = 0.01
# What a request may wait for with shared limits, besides a limit (Decision.binding): another
# proxy's request that came first, or Redis itself (`on_error: hold`).
SHARED_QUEUE = "shared_queue"
SHARED_UNAVAILABLE = "shared_limits_unavailable"
UPSTREAM_429 = "upstream_429"  # the pause after an upstream 429 (any proxy's, when shared)


@dataclass(frozen=True)
class RateReport:
    """One `x-ratelimit-*-{unit}-{period}` triple as upstream reported it."""

    unit: Unit
    period: float
    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again


@dataclass(frozen=True)
class Rate:
    """At most `limit` units of `unit` per `period` seconds, counted by `algorithm`.

    `burst` < 1 also paces releases: at most `burst * limit` at once, then `limit / period`
    per second (see `Pace`).
    """

    name: str
    unit: Unit
    limit: int
    period: float = 60.0
    burst: float = 1.0
    algorithm: Algorithm = "token_bucket"


class _InFlight:
    """What both counters share: amounts released and not yet confirmed, held aside."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight = 0

    def hold(self, amount: int) -> None:
        self.in_flight += amount

    def unhold(self, amount: int) -> None:
        self.in_flight -= amount


class TokenBucket(_InFlight):
    """Capacity `limit`, refilled at `limit / period` per second; in-flight amounts held aside.

    Kept as what is *used* (capacity minus level), so that a new limit (config reload, a lower
    one reported by upstream) keeps what has been counted rather than what is left. `_used` may
    exceed the limit when upstream reports more than we reserved (a settle above the estimate);
    it then has to drain like upstream's own.
    """

    __slots__ = ("_added", "_used", "at", "period")
    kind: Algorithm = "token_bucket"

    def __init__(self, period: float, used: float, now: float) -> None:
        super().__init__()
        self.period = period
        self._used = used
        self.at = now
        self._added = 0.0  # everything ever counted or charged extra: see `correct`

    def _drain(self, limit: int, now: float) -> float:
        if now > self.at:
            self._used = max(0.0, self._used - limit / self.period * (now - self.at))
            self.at = now
        return self._used

    def used(self, limit: int, now: float) -> float:
        return self._drain(limit, now) + self.in_flight

    def wait_time(self, amount: int, limit: int, now: float) -> float:
        """Seconds until `amount` more fits (0 if it fits now).

        When in-flight amounts stand in the way, this is a lower bound: they only start
        refilling once confirmed, and their confirmation pumps the scheduler anyway.
        """
        excess = self._drain(limit, now) + self.in_flight + amount - limit
        # Refill is computed in floats: a wake-up at the computed moment must find room.
        return 0.0 if excess <= _EPSILON else excess * self.period / limit

    def count(self, amount: int, limit: int, now: float) -> tuple[TokenBucket, float]:
        """Upstream has counted `amount` by `now`: charge it, and let it refill from here.
        Returns the handle `correct` needs: this bucket, and what it had counted by then."""
        self.in_flight -= amount
        self._used = self._drain(limit, now) + amount
        self._added += amount
        return self, self._added

    def correct(
        self,
        handle: object,
        old: int,
        new: int,
        limit: int,
        now: float,
        refunded: int | None = None,
    ) -> None:
        """A counted amount turned out to be `new`, not `old`: an extra charge, or less.

        Of less, `refunded` is what upstream gave back at the answer's end (its unused
        output): upstream's bucket takes it back now, up to full, and so does this one. The
        rest (all of it when `refunded` is None) is what upstream never counted: an input
        estimate above its count, cached tokens, a request it refused. Upstream's bucket never
        took it, so what this one counted in its place has been refilled away wherever this
        bucket reached full since: only what is surely still in it comes back, at most how low
        it has been since the count, for which what it holds now less all counted since is a
        lower bound (giving all of it back let a burst after an idle moment through on room
        upstream did not have).
        """
        used = self._drain(limit, now)
        if new >= old:
            self._used = used + new - old
            self._added += new - old
            return
        back = old - new
        given = 0 if refunded is None else min(max(refunded, 0), back)
        still_in = 0.0
        if isinstance(handle, tuple) and handle[0] is self:
            still_in = min(back - given, max(0.0, used - (self._added - handle[1])))
        self._used = max(0.0, used - still_in - given)

    def exhaust(self, limit: int, now: float) -> None:
        used = self._drain(limit, now)
        self._added += max(0.0, limit - used)
        self._used = max(used, float(limit))

    def __repr__(self) -> str:
        return f"<TokenBucket used={self._used:g} at={self.at:g} in_flight={self.in_flight}>"


@dataclass(eq=False, slots=True)
class _Entry:
    at: float
    amount: int


class SlidingWindow(_InFlight):
    """In-flight amounts plus a log of counted ones; their sum stays <= limit in any period."""

    __slots__ = ("_entries", "_used", "period")
    kind: Algorithm = "sliding_window"

    def __init__(self, period: float) -> None:
        super().__init__()
        self.period = period
        self._entries: deque[_Entry] = deque()
        self._used = 0  # counted amounts inside the window

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0].at + self.period <= now:
            self._used -= entries.popleft().amount

    def used(self, limit: int, now: float) -> float:
        self._expire(now)
        return self._used + self.in_flight

    def wait_time(self, amount: int, limit: int, now: float) -> float:
        """Seconds until `amount` more fits under `limit` (0 if it fits now).

        If only in-flight requests could make room, the moment is unknown (it comes when one
        of them is answered, which pumps the scheduler anyway): say one period.
        """
        self._expire(now)
        excess = self._used + self.in_flight + amount - limit
        if excess <= 0:
            return 0.0
        freed = 0
        for entry in self._entries:
            freed += entry.amount
            if freed >= excess:
                return entry.at + self.period - now
        return self.period

    def count(self, amount: int, limit: int, now: float) -> _Entry:
        self.in_flight -= amount
        return self.add(amount, now)

    def add(self, amount: int, now: float) -> _Entry:
        entry = _Entry(now, amount)
        self._entries.append(entry)
        self._used += amount
        return entry

    def exhaust(self, limit: int, now: float) -> None:
        self._expire(now)
        if self._used < limit:
            self.add(limit - self._used, now)

    def correct(
        self,
        handle: object,
        old: int,
        new: int,
        limit: int,
        now: float,
        refunded: int | None = None,
    ) -> None:
        """Change what an earlier admission counts for, if it is still inside the window
        (refunded or never counted by upstream: the same here)."""
        self._expire(now)
        if not isinstance(handle, _Entry) or handle.at + self.period <= now:
            return  # aged out (or counted by another algorithm): nothing left to correct
        self._used += new - handle.amount
        handle.amount = new

    def __repr__(self) -> str:
        return f"<SlidingWindow period={self.period} used={self._used} n={len(self._entries)}>"


Counter = TokenBucket | SlidingWindow


class UpstreamDrift:
    """What upstream does that the proxy cannot see: others' usage, and its refunds.

    Between two reports upstream's remaining capacity moves by what we sent, what refilled,
    what others of the organization used, and the unused reservations it refunded when our
    requests completed (Cerebras documents refunds; an upstream may keep them). Each report
    gives one equation `gap = share x refunds_due - others_rate x dt`, so the two are told
    apart by *when* they show: intervals in which none of our requests settled show others'
    usage alone; the rest then show the share of refunds upstream makes. Both are estimated
    over the last `FOREIGN_WINDOW` seconds, so others' usage decays to zero once they stop.
    A report may or may not count our requests still in flight (and the one before it those
    confirmed since), so only reports with (almost) none of those are learnt from: under
    load they come whenever the queue waits for capacity. Our under-estimates of tokens look
    like others' usage (the safe side).
    """

    __slots__ = (
        "_lumps",
        "_q_dt",
        "_q_gap",
        "_quiet",
        "_s_dt",
        "_s_due",
        "_s_gap",
        "_settled",
        "share",
    )

    def __init__(self) -> None:
        # Every report can add a sample (hundreds a second under load), so the window keeps
        # running sums and a monotonic deque for its largest lump: O(1) per report, amortized.
        self._quiet: deque[tuple[float, float, float]] = deque()  # (at, dt, gap)
        self._settled: deque[tuple[float, float, float, float]] = deque()  # (.., refunds due)
        self._lumps: deque[tuple[float, float]] = deque()  # (at, lump), lumps decreasing
        self._q_dt = self._q_gap = 0.0
        self._s_dt = self._s_gap = self._s_due = 0.0
        self.share = 0.0  # of refunds due that upstream makes: 0 until seen

    def add(
        self, gap: float, unsure: float, dt: float, refunds_due: float, limit: int, now: float
    ) -> None:
        """One report: `gap` is what upstream had left beyond expectation, give or take
        `unsure` (our requests it may or may not have counted)."""
        if unsure > CLEAN_SHARE * limit:
            return
        if refunds_due <= CLEAN_SHARE * limit:
            # More left than expected is no one's usage: a refund that a report shows later
            # than we settled it, or an estimate of ours above what upstream counted. Nor is
            # less than a unit: a report counts whole units, rounded down (else the rounding
            # alone looks like others' usage, a sizeable share of a small requests limit).
            quiet_gap = min(0.0, gap + REPORT_UNIT - refunds_due * self.share)
            self._quiet.append((now, dt, quiet_gap))
            self._q_dt += dt
            self._q_gap += quiet_gap
            lumps = self._lumps
            while lumps and lumps[-1][1] <= -quiet_gap:
                lumps.pop()
            lumps.append((now, -quiet_gap))
        else:
            self._settled.append((now, dt, gap, refunds_due))
            self._s_dt += dt
            self._s_gap += gap
            self._s_due += refunds_due
        self._prune(now)
        if self._s_due > 0:
            made = self._s_gap + self.rate(now) * self._s_dt
            self.share = min(max(made / self._s_due, 0.0), 1.0)

    def _prune(self, now: float) -> None:
        cutoff = now - FOREIGN_WINDOW
        quiet, settled, lumps = self._quiet, self._settled, self._lumps
        while quiet and quiet[0][0] <= cutoff:
            _, dt, gap = quiet.popleft()
            self._q_dt -= dt
            self._q_gap -= gap
        while settled and settled[0][0] <= cutoff:
            _, dt, gap, due = settled.popleft()
            self._s_dt -= dt
            self._s_gap -= gap
            self._s_due -= due
        while lumps and lumps[0][0] <= cutoff:
            lumps.popleft()
        if not quiet:
            self._q_dt = self._q_gap = 0.0  # no rounding residue once empty
        if not settled:
            self._s_dt = self._s_gap = self._s_due = 0.0

    def rate(self, now: float) -> float:
        """Units per second used by others (>= 0)."""
        self._prune(now)
        if not self._quiet:
            return 0.0
        return max(0.0, -self._q_gap / max(self._q_dt, FOREIGN_MIN_SECONDS))

    def lump(self, now: float) -> float:
        """The most others took between two reports lately: what to keep in reserve."""
        self._prune(now)
        return self._lumps[0][1] if self._lumps else 0.0


class UpstreamView:
    """Upstream's bucket for one (model, unit, period) as its headers last reported it, aged since.

    `level` is what upstream had left at the report, minus what we charged since; it refills at
    upstream's rate less the `foreign` rate. Our requests that the report could not have
    counted yet are `in_flight`, held aside until confirmed, as in `TokenBucket`. Unused
    reservations of requests settled since the report are credited at the `share` upstream
    has been seen to refund, and only `REFUND_CREDIT_DELAY` after the settle (an upstream may
    refund a moment after the answer ends); without that, nothing would credit them while the
    queue waits with nothing in flight, which brings no report.
    """

    __slots__ = (
        "_matured",
        "_refunds",
        "at",
        "counted_twice",
        "epoch",
        "foreign",
        "in_flight",
        "level",
        "limit",
        "pending_refunds",
        "period",
        "possibly_missed",
        "refill",
        "reserve",
        "share",
        "synced_at",
    )

    def __init__(
        self,
        limit: int,
        level: float,
        refill: float,
        foreign: float,
        in_flight: int,
        now: float,
        epoch: int,
        share: float = 0.0,
        reserve: float = 0.0,
        period: float = 60.0,
    ) -> None:
        self.limit = limit
        self.period = period  # of the limit: how long the view's estimate is trusted
        self.reserve = reserve  # kept back for others' next lump
        self.level = level
        self.refill = refill  # upstream's rate less the foreign rate
        self.foreign = foreign
        self.in_flight = in_flight
        self.at = self.synced_at = now
        self.epoch = epoch
        self.pending_refunds = 0.0  # unused reservations settled since the report
        self.share = share
        self._refunds: deque[tuple[float, int]] = deque()  # (settled at, unused), not matured
        self._matured = 0
        # Counted by the view on top of the report, which may have counted them too: confirmed
        # since the report though in flight at it, or held back from it (UpstreamViews.resync).
        self.counted_twice = 0.0
        # What the report may have missed of what the view had charged, and the view does not
        # hold back either: the next report may show that much less, through nobody's usage.
        self.possibly_missed = 0.0

    def _level(self, now: float) -> float:
        if now > self.at:
            self.level = min(float(self.limit), self.level + self.refill * (now - self.at))
            self.at = now
        return self.level

    def refund(self, unused: int, now: float) -> None:
        self.pending_refunds += unused
        self._refunds.append((now, unused))

    def _credit(self, now: float) -> float:
        refunds = self._refunds
        while refunds and refunds[0][0] + REFUND_CREDIT_DELAY <= now:
            self._matured += refunds.popleft()[1]
        # An upstream refunds or it does not; a share learnt from noisy reports in between is
        # not worth crediting (a few tokens at the edge of the bucket are a 429).
        return self.share * self._matured if self.share >= REFUND_TRUST else 0.0

    def believed_left(self, now: float) -> float:
        """What the view takes upstream to have left now, refunds credited, our requests in
        flight aside."""
        return min(float(self.limit), self._level(now) + self._credit(now))

    def room(self, now: float) -> float:
        return self.believed_left(now) - self.in_flight - self.reserve

    def wait_time(self, amount: int, now: float) -> float:
        excess = amount - self.room(now)
        if excess <= _EPSILON:
            return 0.0
        wait = excess / self.refill if self.refill > 0 else float("inf")
        if self._refunds and self.share > 0:  # look again when the next refund is credited
            wait = min(wait, max(self._refunds[0][0] + REFUND_CREDIT_DELAY - now, 0.0))
        # The view is an estimate (others' rate, refunds), only as good as its last report:
        # it holds nothing longer than one period past that report (by then upstream's bucket
        # has refilled, whatever it held). Then it lets one request through at a time, whose
        # answer re-syncs it. Without this, an estimate of others' usage as high as the refill
        # rate would hold requests forever: nothing in flight means no new report.
        stale_in = self.synced_at + self.period - now
        if stale_in > 0:
            return min(wait, stale_in)
        return 0.0 if self.in_flight <= 0 else min(wait, STALE_RECHECK_SECONDS)

    def charge(self, amount: float, now: float) -> None:
        self.level = self._level(now) - amount

    def left(self, now: float) -> float:
        """What the view assumes upstream has left now, our requests in flight aside."""
        return self._level(now)

    def expected_left(self, now: float) -> float:
        """What upstream should have left now if nobody else used it since the report."""
        return min(float(self.limit), self._level(now) + self.foreign * (now - self.synced_at))


@dataclass(eq=False, slots=True)
class _Part:
    """A reservation's share of one (unit, period): in flight until counted at `confirm`."""

    slot: Slot
    amount: int
    limit: int
    pace: tuple[Pace, float, float] | None = None  # (bucket, capacity, refill rate)
    handle: object = None  # the window's log entry, once counted
    view_epoch: int | None = None  # the view it is held aside in, if any
    in_flight_at_report: bool = False  # ... since that view's report (which may count it)
    # What of ours upstream had counted on the slot when this one was released
    # (UpstreamViews.charged): what it counted after, this one's report may not count.
    confirmed_before: float = 0.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """What the backend hands out for one released request: an opaque `id` (the backend keeps
    what it holds under it), the limiter key, and the amount charged against the token
    limits. Plain values only, so that a backend whose state lives elsewhere (Redis) hands
    out the same thing as the in-process one."""

    id: str
    key: str
    tokens: int


@dataclass(eq=False, slots=True)
class _Held:
    """The in-process backend's record of one reservation: a part per limit."""

    key: str
    parts: list[_Part] = field(default_factory=list)
    confirmed: bool = False


# The reporter of a report whose reservation the limiter no longer holds: its mark is gone.
_NO_LONGER_HELD = _Held("")


@dataclass(frozen=True)
class Settled:
    """What upstream counted on the `total_tokens` limit, and gives back of its reservation
    (None: unknown, the view assumes everything unused)."""

    tokens: int
    refund: int | None = None


@dataclass(frozen=True)
class Decision:
    """The verdict of one admission attempt; `wait` says how long until it could succeed."""

    granted: bool
    reservation: Reservation | None = None
    wait: float = 0.0
    binding: str | None = None  # the name of the rate that said no
    # The limits could not be consulted (shared state unreachable, `on_error: reject`): refuse
    # the request now rather than hold it.
    unavailable: bool = False


class Pace:
    """A small token bucket that spreads releases over the period (`burst` < 1).

    A full bucket (or an empty window) admits a whole period's limit at once; `burst * limit`
    refilled at `limit / period` hands capacity out as it comes back instead. A request larger
    than the pace may go once it is full (the level goes negative and must refill), so nothing
    is too big to pass. Only pacing: the bucket or window still provides the guarantee.
    """

    __slots__ = ("at", "level")

    def __init__(self, capacity: float, now: float) -> None:
        self.level = capacity
        self.at = now

    def _refill(self, capacity: float, rate: float, now: float) -> None:
        if now > self.at:
            self.level = min(capacity, self.level + rate * (now - self.at))
            self.at = now

    def wait_time(self, amount: int, capacity: float, rate: float, now: float) -> float:
        self._refill(capacity, rate, now)
        need = min(amount, capacity)
        return 0.0 if self.level >= need else (need - self.level) / rate

    def take(self, amount: float, capacity: float, rate: float, now: float) -> None:
        self._refill(capacity, rate, now)
        self.level = min(capacity, self.level - amount)


class LimiterBackend(Protocol):
    """Where limit state lives: `MemoryLimiter` (one process), `backends.shared.SharedLimiter`
    (Redis, several proxies). Every call takes primitives (a key, rates, amounts, `now`) and
    a reservation is a plain value (`Reservation`): the state stays the backend's own.

    `waited` and `priority` place a request among those every instance holds (the oldest, and
    the highest class, first); a backend with one instance's queue ignores them.
    """

    def try_acquire(
        self,
        key: str,
        rates: Sequence[Rate],
        tokens: int,
        now: float,
        total: int | None = None,
        waited: float = 0.0,
        priority: int = 0,
    ) -> Decision: ...

    def confirm(self, reservation: Reservation, now: float) -> None: ...

    def settle(
        self,
        reservation: Reservation,
        actual_tokens: int,
        now: float,
        refund: int | None = None,
        total: Settled | None = None,
    ) -> None: ...

    def exhaust(self, key: str, rate: Rate, now: float) -> None: ...

    def release(self, reservation: Reservation, now: float) -> None: ...

    def observe(
        self,
        key: str,
        reports: Sequence[RateReport],
        now: float,
        defer: bool = False,
        reporter: Reservation | None = None,
    ) -> bool:
        """Re-sync from one answer's reports; `defer`: the rest of the answer follows at once,
        and a backend may apply them (as of `now`) with its settle. `reporter`: the
        reservation whose answer carried them (its report may miss what was counted after it
        was released); None: reports written just now."""
        ...

    def withdraw(self, key: str, now: float) -> None:
        """Nothing of `key` is held here any more (shared queues: make no room for it)."""
        ...

    def pause(self, key: str, seconds: float, now: float) -> None:
        """Upstream said 429: release nothing of `key` for `seconds`. The scheduler pauses its
        own queue; a shared backend pauses every proxy's."""
        ...

    def used(self, key: str, rate: Rate, now: float) -> float: ...

    def limit(self, key: str, rate: Rate) -> int: ...

    def learned_limits(self, key: str) -> dict[tuple[Unit, float], int]: ...

    def foreign_rate(self, key: str, unit: Unit, period: float, now: float) -> float: ...

    def open_reservations(self) -> int: ...

    def tick(self, now: float) -> bool:
        """Called about once a second: housekeeping that no decision waits for. True when
        what the limiter knew of upstream may be lost (shared limits back after an outage:
        Redis may have restarted empty), so that the next wave probes first."""
        ...

    def shared_status(self) -> dict[str, object] | None:
        """How the limits shared with other proxies stand (None: not shared)."""
        ...


class UpstreamViews:
    """Upstream's view of every limit (one `UpstreamView` per slot, re-built per report) and
    what the reports teach about others' usage of the organization's limits."""

    def __init__(self, view_margin: float, resync_interval: float) -> None:
        self._view_margin = view_margin  # share of a limit the view keeps back (0: exact tests)
        self._resync_interval = resync_interval  # 0: every report re-syncs (exact tests)
        self._views: dict[Slot, UpstreamView] = {}
        self._drift: dict[Slot, UpstreamDrift] = {}
        self._epochs = itertools.count(1)
        # Per slot, every amount of ours upstream has counted so far (confirmed, or charged
        # beyond the estimate at a settle): what a report may have missed is told from it.
        self._charged: dict[Slot, float] = {}

    def get(self, slot: Slot) -> UpstreamView | None:
        return self._views.get(slot)

    def charged(self, slot: Slot) -> float:
        """Every amount of ours counted on `slot` so far (a reservation's mark at release)."""
        return self._charged.get(slot, 0.0)

    def count(self, slot: Slot, amount: float) -> None:
        """Upstream has counted `amount` more of ours on `slot`."""
        self._charged[slot] = self._charged.get(slot, 0.0) + amount

    def unseen(self, slot: Slot, reporter: _Held | None) -> float:
        """What of ours a report on `slot` carried by `reporter`'s answer may not count.

        Upstream wrote it after admitting `reporter` and before answering, so it counts
        everything counted before `reporter` was released, and perhaps nothing since (an
        answer written later may have arrived first). Nothing for a report with no reporter
        (written just now); everything for a reporter without a mark on `slot`, or no longer
        held (a 429's, released before its report is read).
        """
        if reporter is None:
            return 0.0
        for part in reporter.parts:
            if part.slot == slot:
                own = part.amount if reporter.confirmed else 0
                return max(self.charged(slot) - part.confirmed_before - own, 0.0)
        return float("inf")

    def drift(self, slot: Slot) -> UpstreamDrift | None:
        return self._drift.get(slot)

    def resync(self, slot: Slot, report: RateReport, flying: int, unseen: float, now: float) -> int:
        """A new view of `slot` from upstream's report, with `flying` held aside; its epoch.

        `unseen`: what the view has charged that the report may not count (see `unseen`).
        Answers may arrive in another order than upstream wrote their reports, and re-basing
        on an older report forgot a request answered meanwhile: the view had room upstream had
        not, and the next report showed that request as others' usage, often more than the
        whole refill, so that the view held every request for a period. A report that says
        upstream has more than the view believes may show refunds, or have missed up to
        `unseen`, and nothing tells the two apart:

        - what it shows beyond what the view may have counted twice (its `counted_twice`) is
          held back, up to `unseen`, until the next report (kept charged, and counted twice in
          turn, so that it is not held back again). One overtaken report is then harmless,
          and a refund reaches the view one report later;
        - all it may have missed is `possibly_missed`: neither this report nor the next one
          teaches anything about others' usage or refunds.
        """
        limit = report.limit
        reported_left = float(min(max(report.remaining, 0), limit))
        drift = self._drift.get(slot)
        if drift is None:
            drift = self._drift[slot] = UpstreamDrift()
        old = self._views.get(slot)
        kept = missed = 0.0
        if old is not None and old.limit == limit:
            surplus = reported_left - old.believed_left(now)
            missed = min(unseen, max(surplus, 0.0))
            kept = min(unseen, max(surplus - old.counted_twice, 0.0))
            # What upstream would have left had nobody else used the limit and had it made
            # no refunds since the last report.
            gap = reported_left - old.expected_left(now)
            unsure = old.counted_twice + old.possibly_missed + flying + missed
            drift.add(gap, unsure, now - old.synced_at, old.pending_refunds, limit, now)
        refill = limit / report.period
        used = limit - reported_left
        if used > 0 and 0 < report.reset < report.period:
            refill = min(refill, used / report.reset)  # upstream says when it is full again
        others = min(drift.rate(now), refill)
        view = UpstreamView(
            limit,
            reported_left - kept,
            refill - others,
            others,
            flying,
            now,
            next(self._epochs),
            drift.share,
            # Others use the limit in lumps, not evenly: keep their largest recent lump (or a
            # second of their usage) in reserve, and a sliver of the limit for what is not
            # learnt yet (a first lump, an estimate a little short of upstream's count).
            min(
                max(drift.lump(now), others * FOREIGN_RESERVE_SECONDS, limit * self._view_margin),
                limit / 2,
            ),
            report.period,
        )
        view.counted_twice = kept
        view.possibly_missed = missed - kept
        self._views[slot] = view
        return view.epoch

    def observe(
        self,
        key: str,
        reports: Sequence[RateReport],
        in_flight: Iterable[_Held],
        now: float,
        reporter: _Held | None = None,
    ) -> bool:
        """Re-sync the views of `key` from one response's `x-ratelimit-*` reports, with our
        reservations `in_flight` (released, not confirmed) held aside; False when the reports
        changed nothing (see `_is_news`). `reporter`: the reservation whose answer carried
        them (see `unseen`).

        Upstream writes a report when it sends the answer, and any of our requests still in
        flight may or may not be in it: one released earlier can reach upstream later (another
        connection, another thread). So every request in flight is held aside, on top of what
        the report says; one that was in the report is counted twice only until the next
        report after its own answer.
        """
        wanted = {(key, r.unit, r.period): r for r in reports if r.limit > 0}
        for slot, report in wanted.items():
            if self._is_news(slot, report, now):
                break
        else:
            return False
        flying = dict.fromkeys(wanted, 0)
        parts: list[_Part] = []
        for held in in_flight:
            for part in held.parts:
                if part.slot in wanted:
                    parts.append(part)
                    flying[part.slot] += part.amount
        epochs = {
            slot: self.resync(slot, report, flying[slot], self.unseen(slot, reporter), now)
            for slot, report in wanted.items()
        }
        for part in parts:
            part.view_epoch = epochs[part.slot]
            part.in_flight_at_report = True
        return True

    def _is_news(self, slot: Slot, report: RateReport, now: float) -> bool:
        """Whether `report` must re-base the view of `slot` now.

        Always, unless the view was re-synced less than `RESYNC_INTERVAL` ago, a request of
        ours is still in flight (its answer brings the next report), and the report says
        upstream has at least as much left as the view already assumes with every request of
        ours in flight counted: then re-basing could only give room back, and skipping it keeps
        the view on the safe side until that next report. A report that says less is always
        applied, so others' usage is never learnt later; so is one with nothing in flight after
        it, which may be the last for a while (a queue waiting on a view that never re-syncs
        would wait for the refill instead of the room upstream has).
        """
        view = self._views.get(slot)
        if (
            view is None
            or view.limit != report.limit
            or view.in_flight <= 0
            or now - view.synced_at >= self._resync_interval
        ):
            return True
        reported_left = min(max(report.remaining, 0), report.limit)
        return reported_left < view.left(now) - view.in_flight

    def learned_limits(self, key: str) -> dict[tuple[Unit, float], int]:
        return {
            (unit, period): view.limit
            for (view_key, unit, period), view in self._views.items()
            if view_key == key
        }

    def foreign_rate(self, key: str, unit: Unit, period: float, now: float) -> float:
        """Units per second others of the organization use of this limit (estimated)."""
        drift = self._drift.get((key, unit, period))
        return 0.0 if drift is None else drift.rate(now)


class _Alone:
    """The calls that only matter when limits are shared, as one process answers them."""

    def tick(self, now: float) -> bool:
        """Nothing to do now and then: everything here happens when it is called."""
        return False

    def withdraw(self, key: str, now: float) -> None:
        """One process, one queue: nobody else to make room for."""

    def pause(self, key: str, seconds: float, now: float) -> None:
        """One process: the scheduler's own pause is the whole of it."""

    def shared_status(self) -> dict[str, object] | None:
        """None: the limits live in this process alone."""
        return None


class MemoryLimiter(_Alone):
    """The in-process backend: one counter per (key, unit, period), plus upstream's view."""

    def __init__(
        self,
        view_margin: float = VIEW_MARGIN,
        resync_interval: float = RESYNC_INTERVAL,
        id_prefix: str = "m",
    ) -> None:
        self._id_prefix = id_prefix  # reservations of two limiters never share an id
        self._counters: dict[Slot, Counter] = {}
        self._views = UpstreamViews(view_margin, resync_interval)
        self._paces: dict[Slot, Pace] = {}
        # Released and not yet confirmed: a report re-bases the view on top of them.
        self._in_flight: dict[str, dict[_Held, None]] = {}
        self._held: dict[str, _Held] = {}  # every open reservation, by id
        self._ids = itertools.count(1)

    # -- state lookup ------------------------------------------------------------------------

    def _counter(self, slot: Slot, rate: Rate, limit: int, now: float) -> Counter:
        counter = self._counters.get(slot)
        if counter is not None and counter.kind == rate.algorithm:
            return counter
        # New, or the algorithm changed (config reload): carry what is used and in flight over,
        # so that a switch never forgets what upstream has already counted.
        used = 0.0 if counter is None else counter.used(limit, now) - counter.in_flight
        in_flight = 0 if counter is None else counter.in_flight
        fresh: Counter
        if rate.algorithm == "token_bucket":
            fresh = TokenBucket(rate.period, used, now)
        else:
            fresh = SlidingWindow(rate.period)
            if used > 0:
                fresh.add(round(used), now)
        fresh.in_flight = in_flight
        self._counters[slot] = fresh
        return fresh

    def limit(self, key: str, rate: Rate) -> int:
        """The configured limit, or upstream's if it reported a lower one."""
        view = self._views.get((key, rate.unit, rate.period))
        return rate.limit if view is None else min(rate.limit, view.limit)

    def _pace(self, slot: Slot, rate: Rate, limit: int, now: float) -> tuple[Pace, float, float]:
        capacity = max(rate.burst * limit, 1.0)
        pace = self._paces.get(slot)
        if pace is None:
            pace = self._paces[slot] = Pace(capacity, now)
        return pace, capacity, limit / rate.period

    # -- admission -----------------------------------------------------------------------------

    def try_acquire(
        self,
        key: str,
        rates: Sequence[Rate],
        tokens: int,
        now: float,
        total: int | None = None,
        waited: float = 0.0,
        priority: int = 0,
    ) -> Decision:
        """Reserve one request and `tokens` under every limit, or say how long until it fits.

        `tokens` is what the `tokens` limits (the uncached ones, when the prompt cache is
        modelled) are charged, `total` what the `total_tokens` limit is (None: `tokens`)."""
        # Look every structure up once per rate: this runs for every release decision.
        plan = []
        worst_wait, binding = 0.0, None
        for rate in rates:
            slot = (key, rate.unit, rate.period)
            view = self._views.get(slot)
            limit = rate.limit if view is None else min(rate.limit, view.limit)
            counter = self._counter(slot, rate, limit, now)
            # An estimate larger than a token limit could never fit. What a request certainly
            # needs was checked at submit (too large: refused), so the excess here is our own
            # margin or default reservation: charging the whole limit lets it through once the
            # bucket is full instead of holding it forever.
            if rate.unit == "requests":
                amount = 1
            elif rate.unit == "tokens" or total is None:
                amount = min(tokens, limit)
            else:
                amount = min(total, limit)
            wait = counter.wait_time(amount, limit, now)
            if view is not None:
                wait = max(wait, view.wait_time(amount, now))
            pace = None
            if rate.burst < 1.0:
                pace = self._pace(slot, rate, limit, now)
                wait = max(wait, pace[0].wait_time(amount, pace[1], pace[2], now))
            if wait > worst_wait:
                worst_wait, binding = wait, rate.name
            plan.append((slot, counter, view, pace, amount, limit))
        if binding is not None:
            return Decision(False, wait=worst_wait, binding=binding)
        held = _Held(key)
        for slot, counter, view, pace, amount, limit in plan:
            counter.hold(amount)
            part = _Part(slot, amount, limit, pace, confirmed_before=self._views.charged(slot))
            if view is not None:
                view.in_flight += amount
                part.view_epoch = view.epoch
            if pace is not None:
                pace[0].take(amount, pace[1], pace[2], now)
            held.parts.append(part)
        self._in_flight.setdefault(key, {})[held] = None
        reservation = Reservation(f"{self._id_prefix}{next(self._ids)}", key, tokens)
        self._held[reservation.id] = held
        return Decision(True, reservation=reservation)

    # -- upstream's reports --------------------------------------------------------------------

    def observe(
        self,
        key: str,
        reports: Sequence[RateReport],
        now: float,
        defer: bool = False,
        reporter: Reservation | None = None,
    ) -> bool:
        """Re-sync upstream's view of `key` from one response's `x-ratelimit-*` reports;
        False when they changed nothing (see `UpstreamViews.observe`). Always at once.
        `reporter`: the reservation whose answer carried them (None: written just now)."""
        held = None
        if reporter is not None:
            held = self._held.get(reporter.id, _NO_LONGER_HELD)
        return self._views.observe(key, reports, self._in_flight.get(key, ()), now, held)

    def learned_limits(self, key: str) -> dict[tuple[Unit, float], int]:
        return self._views.learned_limits(key)

    def foreign_rate(self, key: str, unit: Unit, period: float, now: float) -> float:
        """Units per second others of the organization use of this limit (estimated)."""
        return self._views.foreign_rate(key, unit, period, now)

    # -- a reservation's life ------------------------------------------------------------------

    def confirm(self, reservation: Reservation, now: float) -> None:
        """Upstream has admitted the request by `now`: charge it at this moment."""
        held = self._held.get(reservation.id)
        if held is not None:
            self._confirm(held, now)

    def _confirm(self, held: _Held, now: float) -> None:
        if held.confirmed:
            return
        for part in held.parts:
            self._views.count(part.slot, part.amount)
            counter = self._counters.get(part.slot)
            if counter is not None:
                part.handle = counter.count(part.amount, part.limit, now)
            view = self._views.get(part.slot)
            if view is not None and part.view_epoch == view.epoch:
                view.in_flight -= part.amount
                view.charge(part.amount, now)
                if part.in_flight_at_report:
                    view.counted_twice += part.amount
                part.view_epoch = None
        self._forget_in_flight(held)
        held.confirmed = True

    def settle(
        self,
        reservation: Reservation,
        actual_tokens: int,
        now: float,
        refund: int | None = None,
        total: Settled | None = None,
    ) -> None:
        """Upstream answered: correct the token count to what it reports it used.

        Upstream refunds an unused reservation when the request completes, which is no later
        than this; the view credits it a moment later, as far as upstream has been seen to.
        `refund` is what upstream gives back (the unused *output* reservation; our input
        estimate may differ from upstream's count, which it keeps): the view never credits
        more, whatever our estimate was. `actual_tokens` and `refund` are for the `tokens`
        limits; `total`, for the `total_tokens` limit (None: it keeps what it reserved).
        """
        held = self._held.pop(reservation.id, None)
        if held is None:
            return
        self._confirm(held, now)
        actual = max(int(actual_tokens), 0)
        for part in held.parts:
            unit = part.slot[1]
            if unit == "tokens":
                used, given = actual, refund
            elif unit == "total_tokens" and total is not None:
                used, given = max(int(total.tokens), 0), total.refund
            else:
                continue
            counter = self._counters.get(part.slot)
            if counter is not None:
                counter.correct(part.handle, part.amount, used, part.limit, now, given)
            view = self._views.get(part.slot)
            if view is not None:
                if used > part.amount:
                    view.charge(used - part.amount, now)  # upstream counted more
                    self._views.count(part.slot, used - part.amount)
                else:
                    # Credited later, as far as upstream is known to refund (see UpstreamView).
                    unused = part.amount - used
                    view.refund(unused if given is None else max(min(given, unused), 0), now)
            if part.pace is not None:
                bucket, capacity, rate = part.pace
                bucket.take(used - part.amount, capacity, rate, now)

    def exhaust(self, key: str, rate: Rate, now: float) -> None:
        """Upstream refused a request on this limit (a 429 naming it) while our picture had
        room: count the limit as used up now, so that it refills from here as upstream's does."""
        slot = (key, rate.unit, rate.period)
        limit = self.limit(key, rate)
        self._counter(slot, rate, limit, now).exhaust(limit, now)

    def release(self, reservation: Reservation, now: float) -> None:
        """Upstream charged nothing (never reached it, or refused it): give everything back.

        A request still in flight leaves the view's in-flight amount (no report counts it
        for sure). A refusal after confirmation is a 429 whose own headers re-sync the view,
        so the view is left alone.
        """
        held = self._held.pop(reservation.id, None)
        if held is None:
            return
        for part in held.parts:
            counter = self._counters.get(part.slot)
            view = self._views.get(part.slot)
            if not held.confirmed:
                if counter is not None:
                    counter.unhold(part.amount)
                if view is not None and part.view_epoch == view.epoch:
                    view.in_flight -= part.amount
            elif counter is not None:
                counter.correct(part.handle, part.amount, 0, part.limit, now)
            if part.pace is not None:
                bucket, capacity, rate = part.pace
                bucket.take(-part.amount, capacity, rate, now)
        self._forget_in_flight(held)

    def _forget_in_flight(self, held: _Held) -> None:
        flying = self._in_flight.get(held.key)
        if flying is not None:
            flying.pop(held, None)
            if not flying:
                del self._in_flight[held.key]

    # -- queries -------------------------------------------------------------------------------

    def used(self, key: str, rate: Rate, now: float) -> float:
        """How much of the effective limit is taken: by the local count or upstream's view."""
        slot = (key, rate.unit, rate.period)
        view = self._views.get(slot)
        limit = rate.limit if view is None else min(rate.limit, view.limit)
        local = self._counter(slot, rate, limit, now).used(limit, now)
        return local if view is None else max(local, limit - view.room(now))

    def open_reservations(self) -> int:
        return len(self._held)
