"""Per-domain pacing of other hosts: `rate_limits` and `default_rate_limit`.

Cerebras hosts have their own limiter (gate.py); every other host a client reaches through
the proxy may be paced to a number of requests per second. A paced request is held until its
turn, never refused unless `max_queue_depth` requests are already held here or its turn is
further away than `request_timeout`.

Each pacing state is a single number, its *theoretical arrival time* (the generic cell rate
algorithm): with an interval `T = 1 / requests_per_second` and a tolerance `(burst - 1) T`,
a request arriving at `now` goes at `max(now, tat - tolerance)` and moves `tat` on to
`max(tat, now) + T`. So `burst` requests go back to back, then one every `T`, in arrival
order, and a request's release time is known the moment it arrives: no queue to scan, no
timer to share, O(1) per request. A request whose client leaves gives its turn back only if
nobody queued behind it; otherwise the gap stays (those behind it keep their turns, and the
host sees a little less than its rate for one interval).

Which entry applies: an exact host name beats a wildcard, and of the wildcards `*.b.c` beats
`*.c` (the longest domain wins); `*.c` matches every subdomain of `c`, not `c` itself. Hosts
no entry names use `default_rate_limit`, each host paced on its own; without one they pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import DomainRateLimit, Pace

DEFAULT_RULE = "(default)"  # the metrics label of hosts paced by default_rate_limit
_KEPT = 1024  # host verdicts and idle states kept (host names come from clients)


@dataclass(frozen=True)
class PaceSlot:
    """One paced request's turn, or why it has none."""

    state: str  # the pacing state it was counted in: a pattern, or a host under the default
    rule: str  # the entry that applied (its pattern, or DEFAULT_RULE): bounded, for metrics
    release_at: float
    wait: float
    refused: str | None = None  # "queue_full" or "timeout": it was not given a turn
    tat: float = 0.0  # the state's arrival time right after this turn was taken
    interval: float = 0.0  # what this turn added to it


class Pacer:
    """Turns for requests to paced hosts. `now` is passed in; nothing here waits.

    >>> pacer = Pacer([DomainRateLimit(requests_per_second=5, domain="*.example.com")])
    >>> [pacer.take("api.example.com", 0.0, 100, 60.0).release_at for _ in range(3)]
    [0.0, 0.2, 0.4]
    """

    def __init__(self, rules: Iterable[DomainRateLimit] = (), default: Pace | None = None) -> None:
        self._tat: dict[str, float] = {}
        self._held = 0
        self.reconfigure(rules, default)

    def reconfigure(self, rules: Iterable[DomainRateLimit], default: Pace | None) -> None:
        """New entries; turns already given stay, a state keeps its place in time."""
        self._exact: dict[str, DomainRateLimit] = {}
        self._wildcards: dict[str, DomainRateLimit] = {}
        for rule in rules:
            if rule.domain.startswith("*."):
                self._wildcards[rule.domain[2:]] = rule
            else:
                self._exact[rule.domain] = rule
        self._default = default
        self._verdicts: dict[str, tuple[str, str, Pace] | None] = {}

    @property
    def held(self) -> int:
        """Requests given a turn in the future and not done yet."""
        return self._held

    def rule_for(self, host: str) -> tuple[str, str, Pace] | None:
        """(state, rule label, pace) for `host`, or None when it is not paced."""
        verdict = self._verdicts.get(host, False)
        if verdict is False:
            verdict = self._match(host.lower().rstrip("."))
            if len(self._verdicts) < _KEPT:
                self._verdicts[host] = verdict
        return verdict  # type: ignore[return-value]

    def _match(self, name: str) -> tuple[str, str, Pace] | None:
        exact = self._exact.get(name)
        if exact is not None:
            return exact.domain, exact.domain, exact
        labels = name.split(".")
        for i in range(1, len(labels)):
            rule = self._wildcards.get(".".join(labels[i:]))
            if rule is not None:
                return rule.domain, rule.domain, rule
        if self._default is None:
            return None
        return f"host:{name}", DEFAULT_RULE, self._default

    def take(self, host: str, now: float, max_held: int, max_wait: float) -> PaceSlot | None:
        """A turn for a request to `host` (None: the host is not paced)."""
        verdict = self.rule_for(host)
        if verdict is None:
            return None
        state, rule, pace = verdict
        interval = 1.0 / pace.requests_per_second
        tat = self._tat.get(state, now)
        release_at = max(now, tat - (pace.burst - 1) * interval)
        wait = release_at - now
        if wait > 0 and self._held >= max_held:
            return PaceSlot(state, rule, release_at, wait, refused="queue_full")
        if wait > max_wait:
            return PaceSlot(state, rule, release_at, wait, refused="timeout")
        if len(self._tat) >= _KEPT:
            self._forget_idle(now)
        self._tat[state] = after = max(tat, now) + interval
        if wait > 0:
            self._held += 1
        return PaceSlot(state, rule, release_at, wait, tat=after, interval=interval)

    def done(self, slot: PaceSlot, now: float, went: bool) -> None:
        """A held turn is over: the request went (`went`), or its client left first."""
        if slot.refused is not None or slot.wait <= 0:
            return
        self._held -= 1
        if not went and self._tat.get(slot.state) == slot.tat and slot.release_at > now:
            # Nobody took a turn after it: the next request may have this one's.
            self._tat[slot.state] = slot.tat - slot.interval

    def _forget_idle(self, now: float) -> None:
        """States whose next turn is free now say nothing a fresh state would not."""
        for state in [s for s, tat in self._tat.items() if tat <= now]:
            del self._tat[state]

    def status(self) -> dict[str, int]:
        return {"held": self._held, "states": len(self._tat)}
