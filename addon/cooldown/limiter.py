"""Request and token limits as sliding-window logs: reserve, confirm, then settle or release.

Why a sliding-window log and not a token bucket like upstream's? A bucket of capacity C that
refills at C per minute lets up to 2C through in one minute (a full bucket plus a minute of
refill). A log admits an amount only if everything counted in the last `period` seconds plus
that amount stays within the limit, so no window of that length ever holds more than the
limit. That schedule is always acceptable to upstream's bucket of the same capacity and rate:
over any interval of length L it admits at most ceil(L / period) * C <= C + C * L / period,
which is exactly what the bucket allows. The price is only the bucket's initial burst; the
steady state is the full limit, and capacity comes back continuously as entries age out.

When does upstream count a request? Somewhere between our release and the first byte of its
answer, and that delay varies (connection set-up, upstream queueing). A window stamped at
release time could let a later, faster request land less than `period` after a slower earlier
one. So a reservation is *in flight* from release until upstream is known to have admitted it
(`confirm`, at the response headers): in flight it counts against every window whatever the
time; once confirmed it is logged at the confirmation time, which is never earlier than
upstream's own. Every request upstream counts in a given `period` is therefore counted here at
one common moment, and the sum counted here never exceeds the limit.

Upstream knows better about some things: other clients of the same organization, reservations
it keeps after a short completion, limits that differ from the config. Its `x-ratelimit-*`
headers are kept per window as an `UpstreamView` (a simulated token bucket, re-synced at every
report) and a request must fit both views, and the lower of the two limits. Whichever view is
more conservative wins, so trusting upstream can only make the proxy wait more, never send
more than its own window allows.

The limiter's state lives behind `LimiterBackend` so that a shared (e.g. Redis) backend can
replace `MemoryLimiter` without the scheduler noticing. Nothing here reads a clock: every call
takes `now`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Unit = Literal["requests", "tokens"]


@dataclass(frozen=True)
class Rate:
    """At most `limit` units of `unit` in any `period` seconds.

    `burst` < 1 also paces releases: at most `burst * limit` at once, then `limit / period`
    per second (see `Pace`).
    """

    name: str
    unit: Unit
    limit: int
    period: float = 60.0
    burst: float = 1.0


@dataclass(eq=False, slots=True)
class _Entry:
    at: float
    amount: int


class SlidingWindow:
    """In-flight amounts plus a log of confirmed ones; their sum stays <= limit."""

    __slots__ = ("_entries", "_used", "in_flight", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._entries: deque[_Entry] = deque()
        self._used = 0  # confirmed amounts inside the window
        self.in_flight = 0  # released, not yet confirmed: counts until confirmed

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0].at + self.period <= now:
            self._used -= entries.popleft().amount

    def used(self, now: float) -> int:
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

    def add(self, amount: int, now: float) -> _Entry:
        entry = _Entry(now, amount)
        self._entries.append(entry)
        self._used += amount
        return entry

    def adjust(self, entry: _Entry, amount: int, now: float) -> None:
        """Change what an earlier admission counts for, if it is still inside the window."""
        self._expire(now)
        if entry.at + self.period <= now:
            return  # already aged out; nothing left to correct
        self._used += amount - entry.amount
        entry.amount = amount

    def __repr__(self) -> str:
        return f"<SlidingWindow period={self.period} used={self._used} n={len(self._entries)}>"


class UpstreamView:
    """Upstream's count for one window as its headers last reported it, aged since.

    Modelled as the deficit of a token bucket (Cerebras replenishes continuously): it shrinks
    at `refill` units per second and grows with every request we release after the report.
    """

    __slots__ = ("at", "deficit", "limit", "refill")

    def __init__(self, limit: int, deficit: float, refill: float, at: float) -> None:
        self.limit = limit
        self.deficit = deficit
        self.refill = refill
        self.at = at

    def used(self, now: float) -> float:
        return max(0.0, self.deficit - self.refill * max(now - self.at, 0.0))

    def add(self, amount: float, now: float) -> None:
        self.deficit = max(0.0, self.used(now) + amount)
        self.at = now

    def wait_time(self, amount: int, limit: int, now: float) -> float:
        excess = self.used(now) + amount - limit
        return 0.0 if excess <= 0 else excess / self.refill


class Pace:
    """A small token bucket that spreads releases over the period.

    The window alone admits a whole period's limit at once; under saturation those entries
    then age out together a period later, and releases come in one burst per period forever
    (small requests wait ~a period for the next burst). A bucket of `burst * limit` refilled
    at `limit / period` breaks that rhythm: after a short burst, capacity is handed out as it
    comes back. A request larger than the bucket may go once the bucket is full (the level goes
    negative and must refill), so nothing is too big to pass. Only pacing: the window still
    provides the guarantee.
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


@dataclass(eq=False)
class _Part:
    """A reservation's share of one window: in flight until `entry` is set by confirm."""

    window: SlidingWindow
    unit: Unit
    amount: int
    view: UpstreamView | None = None
    pace: tuple[Pace, float, float] | None = None  # (bucket, capacity, refill rate)
    entry: _Entry | None = None

    def give_back(self, amount: int, now: float) -> None:
        """Return `amount` to the views that count in real time (upstream's, the pace)."""
        if amount <= 0:
            return
        if self.view is not None:
            self.view.add(-amount, now)
        if self.pace is not None:
            bucket, capacity, rate = self.pace
            bucket.take(-amount, capacity, rate, now)


@dataclass(eq=False)
class Reservation:
    """What one released request holds against the limits until it is settled or released."""

    key: str
    tokens: int  # the amount charged against token limits right now
    _parts: list[_Part] = field(default_factory=list, repr=False)
    confirmed: bool = False
    open: bool = True


@dataclass(frozen=True)
class Decision:
    """The verdict of one admission attempt; `wait` says how long until it could succeed."""

    granted: bool
    reservation: Reservation | None = None
    wait: float = 0.0
    binding: str | None = None  # the name of the rate that said no


class LimiterBackend(Protocol):
    """Where limit state lives. Implementations: `MemoryLimiter` (one process)."""

    def try_acquire(self, key: str, rates: Sequence[Rate], tokens: int, now: float) -> Decision: ...

    def confirm(self, reservation: Reservation, now: float) -> None: ...

    def settle(self, reservation: Reservation, actual_tokens: int, now: float) -> None: ...

    def release(self, reservation: Reservation, now: float) -> None: ...

    def observe(
        self,
        key: str,
        unit: Unit,
        period: float,
        limit: int,
        remaining: int,
        reset: float,
        now: float,
    ) -> None: ...

    def used(self, key: str, rate: Rate, now: float) -> float: ...

    def limit(self, key: str, rate: Rate) -> int: ...

    def learned_limits(self, key: str) -> dict[tuple[Unit, float], int]: ...

    def open_reservations(self) -> int: ...


class MemoryLimiter:
    """The in-process backend: one sliding window per (key, unit, period)."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, Unit, float], SlidingWindow] = {}
        self._views: dict[tuple[str, Unit, float], UpstreamView] = {}
        self._paces: dict[tuple[str, Unit, float], Pace] = {}
        self._open = 0

    def _window(self, key: str, rate: Rate) -> SlidingWindow:
        slot = (key, rate.unit, rate.period)
        window = self._windows.get(slot)
        if window is None:
            window = self._windows[slot] = SlidingWindow(rate.period)
        return window

    def limit(self, key: str, rate: Rate) -> int:
        """The configured limit, or upstream's if it reported a lower one."""
        view = self._views.get((key, rate.unit, rate.period))
        return rate.limit if view is None else min(rate.limit, view.limit)

    def _pace(self, key: str, rate: Rate, limit: int, now: float) -> tuple[Pace, float, float]:
        capacity = max(rate.burst * limit, 1.0)
        slot = (key, rate.unit, rate.period)
        pace = self._paces.get(slot)
        if pace is None:
            pace = self._paces[slot] = Pace(capacity, now)
        return pace, capacity, limit / rate.period

    def try_acquire(self, key: str, rates: Sequence[Rate], tokens: int, now: float) -> Decision:
        # Look every structure up once per rate: this runs for every release decision.
        plan = []
        worst_wait, binding = 0.0, None
        for rate in rates:
            slot = (key, rate.unit, rate.period)
            window = self._windows.get(slot)
            if window is None:
                window = self._windows[slot] = SlidingWindow(rate.period)
            view = self._views.get(slot)
            limit = rate.limit if view is None else min(rate.limit, view.limit)
            # A request larger than a token limit could never fit; charging it the whole
            # limit lets it through once the window is empty instead of holding it forever.
            amount = 1 if rate.unit == "requests" else min(tokens, limit)
            wait = window.wait_time(amount, limit, now)
            if view is not None:
                wait = max(wait, view.wait_time(amount, limit, now))
            pace = None
            if rate.burst < 1.0:
                pace = self._pace(key, rate, limit, now)
                wait = max(wait, pace[0].wait_time(amount, pace[1], pace[2], now))
            if wait > worst_wait:
                worst_wait, binding = wait, rate.name
            plan.append((rate, window, view, pace, amount))
        if binding is not None:
            return Decision(False, wait=worst_wait, binding=binding)
        reservation = Reservation(key, tokens)
        for rate, window, view, pace, amount in plan:
            window.in_flight += amount
            if view is not None:
                view.add(amount, now)
            if pace is not None:
                pace[0].take(amount, pace[1], pace[2], now)
            reservation._parts.append(_Part(window, rate.unit, amount, view, pace))
        self._open += 1
        return Decision(True, reservation=reservation)

    def observe(
        self,
        key: str,
        unit: Unit,
        period: float,
        limit: int,
        remaining: int,
        reset: float,
        now: float,
    ) -> None:
        """Re-sync the upstream view of one window from an `x-ratelimit-*` report."""
        if limit <= 0:
            return
        reported = max(0, limit - max(remaining, 0))
        refill = limit / period
        if reported > 0 and reset > 0:
            refill = min(refill, reported / reset)
        # Requests still in flight may not be in the report yet: count them on top.
        window = self._windows.get((key, unit, period))
        deficit = reported + (window.in_flight if window is not None else 0)
        self._views[(key, unit, period)] = UpstreamView(limit, deficit, refill, now)

    def learned_limits(self, key: str) -> dict[tuple[Unit, float], int]:
        return {
            (unit, period): view.limit
            for (view_key, unit, period), view in self._views.items()
            if view_key == key
        }

    def confirm(self, reservation: Reservation, now: float) -> None:
        """Upstream has admitted the request by `now`: log it at this moment."""
        if not reservation.open or reservation.confirmed:
            return
        for part in reservation._parts:
            part.window.in_flight -= part.amount
            part.entry = part.window.add(part.amount, now)
        reservation.confirmed = True

    def settle(self, reservation: Reservation, actual_tokens: int, now: float) -> None:
        """Upstream answered: correct the token count to what it reports it used."""
        if not reservation.open:
            return
        self.confirm(reservation, now)
        actual = max(int(actual_tokens), 0)
        for part in reservation._parts:
            if part.unit == "tokens" and part.entry is not None:
                part.window.adjust(part.entry, actual, now)
                if part.pace is not None:
                    bucket, capacity, rate = part.pace
                    bucket.take(actual - part.amount, capacity, rate, now)
        reservation.tokens = actual
        self._close(reservation)

    def release(self, reservation: Reservation, now: float) -> None:
        """The request never reached upstream: give everything back."""
        if not reservation.open:
            return
        for part in reservation._parts:
            if part.entry is None:
                part.window.in_flight -= part.amount
            else:
                part.window.adjust(part.entry, 0, now)
            part.give_back(part.amount, now)
        reservation.tokens = 0
        self._close(reservation)

    def _close(self, reservation: Reservation) -> None:
        reservation.open = False
        self._open -= 1

    def used(self, key: str, rate: Rate, now: float) -> float:
        """The larger of the local count and upstream's last report, aged."""
        local = self._window(key, rate).used(now)
        view = self._views.get((key, rate.unit, rate.period))
        return local if view is None else max(local, view.used(now))

    def open_reservations(self) -> int:
        return self._open
