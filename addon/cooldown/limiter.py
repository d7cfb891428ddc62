"""Request and token limits as sliding-window logs: reserve, then settle or release.

Why a sliding-window log and not a token bucket like upstream's? A bucket of capacity C that
refills at C per minute lets up to 2C through in one minute (a full bucket plus a minute of
refill). A log admits an amount only if everything admitted in the last `period` seconds plus
that amount stays within the limit, so *no* window of that length ever holds more than the
limit. That schedule is always acceptable to upstream's bucket of the same capacity and rate:
over any interval of length L it admits at most ceil(L / period) * C <= C + C * L / period,
which is exactly what the bucket allows. The price is only the bucket's initial burst; the
steady state is the full limit. Expiry is exact (no fixed buckets), so capacity comes back
continuously as old reservations age out, the way upstream's bucket refills.

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
    """At most `limit` units of `unit` in any `period` seconds."""

    name: str
    unit: Unit
    limit: int
    period: float = 60.0


@dataclass(eq=False)
class _Entry:
    at: float
    amount: int


class SlidingWindow:
    """A log of admitted amounts; the sum over the last `period` seconds stays <= limit."""

    __slots__ = ("_entries", "_used", "period")

    def __init__(self, period: float) -> None:
        self.period = period
        self._entries: deque[_Entry] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries and entries[0].at + self.period <= now:
            self._used -= entries.popleft().amount

    def used(self, now: float) -> int:
        self._expire(now)
        return self._used

    def wait_time(self, amount: int, limit: int, now: float) -> float:
        """Seconds until `amount` more fits under `limit` (0 if it fits now).

        `amount` must be <= `limit`, or it never fits; callers clamp.
        """
        self._expire(now)
        excess = self._used + amount - limit
        if excess <= 0:
            return 0.0
        freed = 0
        for entry in self._entries:
            freed += entry.amount
            if freed >= excess:
                return entry.at + self.period - now
        return self.period  # only reachable if amount > limit

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


@dataclass(eq=False)
class Reservation:
    """What one released request holds against the limits until it is settled or released."""

    key: str
    tokens: int  # the amount charged against token limits right now
    _token_entries: list[tuple[SlidingWindow, _Entry]] = field(default_factory=list, repr=False)
    _request_entries: list[tuple[SlidingWindow, _Entry]] = field(default_factory=list, repr=False)
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

    def settle(self, reservation: Reservation, actual_tokens: int, now: float) -> None: ...

    def release(self, reservation: Reservation, now: float) -> None: ...

    def used(self, key: str, rate: Rate, now: float) -> int: ...

    def open_reservations(self) -> int: ...


class MemoryLimiter:
    """The in-process backend: one sliding window per (key, unit, period)."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, Unit, float], SlidingWindow] = {}
        self._open = 0

    def _window(self, key: str, rate: Rate) -> SlidingWindow:
        slot = (key, rate.unit, rate.period)
        window = self._windows.get(slot)
        if window is None:
            window = self._windows[slot] = SlidingWindow(rate.period)
        return window

    @staticmethod
    def _amount(rate: Rate, tokens: int) -> int:
        # A request larger than a token limit could never fit; charging it the whole limit
        # lets it through once the window is empty instead of holding it forever.
        return 1 if rate.unit == "requests" else min(tokens, rate.limit)

    def try_acquire(self, key: str, rates: Sequence[Rate], tokens: int, now: float) -> Decision:
        worst_wait, binding = 0.0, None
        for rate in rates:
            wait = self._window(key, rate).wait_time(self._amount(rate, tokens), rate.limit, now)
            if wait > worst_wait:
                worst_wait, binding = wait, rate.name
        if binding is not None:
            return Decision(False, wait=worst_wait, binding=binding)
        reservation = Reservation(key, tokens)
        for rate in rates:
            window = self._window(key, rate)
            entry = window.add(self._amount(rate, tokens), now)
            entries = (
                reservation._request_entries
                if rate.unit == "requests"
                else reservation._token_entries
            )
            entries.append((window, entry))
        self._open += 1
        return Decision(True, reservation=reservation)

    def settle(self, reservation: Reservation, actual_tokens: int, now: float) -> None:
        if not reservation.open:
            return
        actual = max(int(actual_tokens), 0)
        for window, entry in reservation._token_entries:
            window.adjust(entry, actual, now)
        reservation.tokens = actual
        self._close(reservation)

    def release(self, reservation: Reservation, now: float) -> None:
        if not reservation.open:
            return
        for window, entry in reservation._token_entries + reservation._request_entries:
            window.adjust(entry, 0, now)
        reservation.tokens = 0
        self._close(reservation)

    def _close(self, reservation: Reservation) -> None:
        reservation.open = False
        self._open -= 1

    def used(self, key: str, rate: Rate, now: float) -> int:
        return self._window(key, rate).used(now)

    def open_reservations(self) -> int:
        return self._open
