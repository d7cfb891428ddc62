"""What is held, per model, in words and numbers: for the log, the status page and metrics.

A request held for a minute used to say nothing at mitmproxy's default log level; a user could
not tell a proxy that waits for the token bucket from one that hangs. So while anything is
held, one INFO line per model says how many wait, for how long the oldest has, what they wait
for and when the next may go, at most once per `HeldLog.interval`. The same numbers are in
`/metrics.json` and `cooldown.status`. No mitmproxy import: `now` is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .limiter import SHARED_QUEUE, SHARED_UNAVAILABLE
from .periods import RATE_NAMES, describe
from .scheduler import BREAKER_PROBE, PROBE, UPSTREAM_429, Scheduler

# Besides a limit's name, what the head of a queue may wait for (Scheduler.waiting).
_REASONS = {
    UPSTREAM_429: "the pause after an upstream 429",
    PROBE: "upstream's first answer (probe_first)",
    BREAKER_PROBE: "the circuit breaker's probe",
    SHARED_QUEUE: "another proxy's earlier request (shared_limits)",
    SHARED_UNAVAILABLE: "Redis to answer again (shared_limits.on_error: hold)",
}


def describe_wait(reason: str | None) -> str:
    """`tpm` -> "tokens per minute (tpm_limit)"; the other reasons in words."""
    if reason is None:
        return "their turn"
    if reason in RATE_NAMES:
        return f"{describe(reason)} ({reason}_limit)"
    return _REASONS.get(reason, reason)


@dataclass(frozen=True)
class HeldModel:
    """The requests held for one model (limiter key) at one moment."""

    key: str
    count: int
    oldest: float  # seconds the longest-held one has waited
    waiting_for: str | None  # a rate's name or one of the scheduler's reasons
    next_release_in: float | None  # seconds until the head may go (None: unknown)

    def line(self) -> str:
        """The INFO line: what a user watching mitmdump's output needs to know."""
        when = (
            "next release when upstream answers"
            if self.next_release_in is None
            else f"next release in {self.next_release_in:.1f}s"
        )
        return (
            f"{self.count} held for {self.key}, oldest {self.oldest:.1f}s, waiting for "
            f"{describe_wait(self.waiting_for)}, {when}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "held": self.count,
            "oldest_held_seconds": round(self.oldest, 3),
            "waiting_for": self.waiting_for,
            "next_release_in_seconds": _rounded(self.next_release_in),
        }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def held_by_model(scheduler: Scheduler, now: float) -> list[HeldModel]:
    """Every model with requests held, by key. O(held): read at most a few times a second."""
    counts: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for ticket in scheduler.held_tickets():
        counts[ticket.key] = counts.get(ticket.key, 0) + 1
        oldest[ticket.key] = min(oldest.get(ticket.key, math.inf), ticket.enqueued_at)
    summaries = []
    for key in sorted(counts):
        reason, wake = scheduler.waiting.get(key, (None, None))
        summaries.append(
            HeldModel(
                key,
                counts[key],
                max(now - oldest[key], 0.0),
                reason,
                None if wake is None else max(wake - now, 0.0),
            )
        )
    return summaries


def status_fields(held: Sequence[HeldModel]) -> dict[str, Any]:
    """For the status JSON: the oldest held age and the next release over all models, then
    each model's summary."""
    soonest = [h.next_release_in for h in held if h.next_release_in is not None]
    return {
        "oldest_held_seconds": round(max((h.oldest for h in held), default=0.0), 3),
        "next_release_in_seconds": _rounded(min(soonest, default=None)),
        "held": {h.key: h.to_dict() for h in held},
    }


class HeldLog:
    """Lines to log while requests are held, at most once per `interval` seconds: often
    enough that a held minute says why, rarely enough not to flood the log."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._logged_at = -math.inf

    def lines(self, held: Sequence[HeldModel], now: float) -> list[str]:
        if not held or now - self._logged_at < self.interval:
            return []
        self._logged_at = now
        return [h.line() for h in held]
