"""The async face of the scheduler: held requests await a future; one timer wakes the queue.

No polling: after every state change (submit, cancel, settle, timer) the scheduler is pumped
once and says when it next needs a pump — when the head of a queue will fit, or the earliest
deadline. One `loop.call_later` handle covers that. Still no mitmproxy import: the addon
translates flows into these calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .breaker import CircuitBreaker
from .config import Config
from .estimate import Need
from .held import HeldModel, held_by_model, status_fields
from .limiter import LimiterBackend, MemoryLimiter, Rate, Reservation, Settled, Unit
from .periods import RATE_NAMES, TOTAL_TPM
from .scheduler import Scheduler
from .tickets import NORMAL, Outcome, Policy, Ticket
from .upstream import RateReport

Reports = Sequence[RateReport]  # one answer's `x-ratelimit-*` reports

log = logging.getLogger(__name__)

DEFAULT_KEY = "default"  # requests that name no model
QUEUE_BY_CLIENT_SHOWN = 10
_MIN_TIMER_DELAY = 0.001


@dataclass
class GateStats:
    """Counters since start; read by tests and, later, by metrics."""

    submitted: int = 0
    forwarded: int = 0
    upstream_429s: int = 0

    def __post_init__(self) -> None:
        self.refused: Counter[str] = Counter()


def top_clients(held: Mapping[str, int]) -> dict[str, int]:
    """The clients holding the most of the queue (fingerprints or addresses, never keys)."""
    ranked = sorted(held.items(), key=lambda kv: (-kv[1], kv[0]))
    return dict(ranked[:QUEUE_BY_CLIENT_SHOWN])


class RateBook:
    """The limits of each model: configured ones, plus any upstream reported on its own.

    Built once per model and kept until the config changes or upstream reports a new limit.
    """

    def __init__(self, config: Config, limiter: LimiterBackend) -> None:
        self._config = config
        self._limiter = limiter
        self._rates: dict[str, tuple[Rate, ...]] = {}
        # The last limit upstream reported per (key, unit, period): a change rebuilds the rates.
        self._reported: dict[tuple[str, Unit, float], int] = {}

    def reconfigure(self, config: Config) -> None:
        self._config = config
        self._rates.clear()

    def reported(self, key: str, reports: Sequence[RateReport]) -> None:
        for r in reports:
            if r.limit > 0 and self._reported.get((key, r.unit, r.period)) != r.limit:
                self._reported[(key, r.unit, r.period)] = r.limit
                self._rates.pop(key, None)  # a limit appeared or changed: rebuild the rates

    def rates_for(self, key: str) -> tuple[Rate, ...]:
        rates = self._rates.get(key)
        if rates is None:
            rates = self._rates[key] = self._build(key)
        return rates

    def _build(self, key: str) -> tuple[Rate, ...]:
        config = self._config
        limits = config.model_limits(key)
        configured: dict[tuple[Unit, float], int | None] = {
            (unit, period): getattr(limits, f"{name}_limit")
            for name, (unit, period) in RATE_NAMES.items()
        }
        for slot, learned in self._limiter.learned_limits(key).items():
            if configured.get(slot) is None:
                configured[slot] = learned  # enforced by the upstream view's lower limit
        # Pacing only within a minute: spreading a day's quota over the day would throttle
        # a user who wants to spend it now.
        burst = config.cerebras_limits.burst
        algorithm = limits.algorithm or config.cerebras_limits.algorithm
        rates = tuple(
            Rate(name, unit, limit, period, burst if period <= 60.0 else 1.0, algorithm)
            for name, (unit, period) in RATE_NAMES.items()
            if (limit := configured.get((unit, period))) is not None
        )
        total = config.total_tpm_limit(key)
        if total:
            rates += (Rate(TOTAL_TPM, "total_tokens", total, 60.0, burst, algorithm),)
        return rates


class Alarm:
    """One asyncio timer that calls `ring` at a moment of `clock`; setting the same moment
    again keeps it, None cancels it. Without a running loop (sync unit tests) it stays unset
    and the caller rings by hand."""

    def __init__(self, clock: Callable[[], float], ring: Callable[[], None]) -> None:
        self._clock = clock
        self._ring = ring
        self._handle: asyncio.TimerHandle | None = None
        self.at: float | None = None

    def set(self, at: float | None) -> None:
        if at is None:
            self.cancel()
            return
        if self._handle is not None and self.at == at:
            return
        self.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._handle = loop.call_later(max(at - self._clock(), _MIN_TIMER_DELAY), self.fire)
        self.at = at

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self.at = None

    def fire(self) -> None:
        """What the loop runs at the moment (tests call it)."""
        self.cancel()
        try:
            self._ring()
        except Exception:
            # A failing pump must not leave held requests without a wake-up; log loudly and
            # retry soon rather than hang every held request until its timeout.
            log.exception("scheduler pump failed; retrying in 1s")
            asyncio.get_running_loop().call_later(1.0, self.fire)


class Gate:
    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        limiter: LimiterBackend | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.breaker = CircuitBreaker(config.circuit_breaker)
        self._install(limiter or MemoryLimiter())
        self.stats = GateStats()
        self._waiters: dict[int, asyncio.Future[Outcome]] = {}
        self.alarm = Alarm(clock, self.pump)  # when the scheduler next needs a pump
        self.keys: set[str] = set()  # every model seen, for status and metrics

    def rates_for(self, key: str) -> Sequence[Rate]:
        """The limits of one model (see RateBook)."""
        self.keys.add(key)
        return self.rates.rates_for(key)

    def reconfigure(self, config: Config) -> None:
        """Apply new limits without dropping anything held or in flight."""
        self.config = config
        self.scheduler.limits = config.cerebras_limits
        self.scheduler.probes.forget()  # upstream's state is unknown again: probe first
        self.scheduler.invalidate()
        self.breaker.config = config.circuit_breaker
        self.rates.reconfigure(config)
        self.pump()

    def observe(
        self, key: str, reports: Reports, defer: bool = False, reporter: Reservation | None = None
    ) -> bool:
        """Correct the local picture with upstream's `x-ratelimit-*` report for `key`, carried
        by `reporter`'s answer (`defer`: see `confirm`); False when it changed nothing."""
        self.keys.add(key)
        if not reports or not self.limiter.observe(key, reports, self.clock(), defer, reporter):
            return False
        self.scheduler.invalidate()
        self.rates.reported(key, reports)
        self.pump()
        return True

    def use_limiter(self, limiter: LimiterBackend) -> bool:
        """Keep limits in `limiter` from now on (shared_limits at start-up); False, and
        nothing changes, while anything is held or holds a reservation."""
        if self.scheduler.depth or self.limiter.open_reservations():
            return False
        self._install(limiter)
        return True

    def _install(self, limiter: LimiterBackend) -> None:
        self.limiter = limiter
        self.rates = RateBook(self.config, limiter)
        self.scheduler = Scheduler(
            limiter,
            self.config.cerebras_limits,
            self.breaker,
            self.rates_for,
            on_resolved=self._on_resolved,
        )

    def tick(self) -> None:
        """About once a second: the limiter's housekeeping (shared limits: heartbeat, sending
        what waits, reconnecting), then a pump, since capacity may have changed elsewhere.
        After a reconnect upstream's state is unknown again: the next wave probes first."""
        if self.limiter.tick(self.clock()):
            self.scheduler.probes.forget()
        self.scheduler.invalidate()
        self.pump()

    def pause(self, key: str, seconds: float) -> None:
        """Release nothing more for `key` for `seconds` (upstream said 429)."""
        now = self.clock()
        self.scheduler.pauses.pause(key, now + seconds)
        self.limiter.pause(key, seconds, now)
        self.pump()

    def exhaust(self, key: str, unit: Unit) -> None:
        """Upstream said 429 naming this limit: count `key`'s limits of `unit` as used up."""
        now = self.clock()
        for rate in self.rates_for(key):
            if rate.unit == unit:
                self.limiter.exhaust(key, rate, now)
        self.scheduler.invalidate()
        self.pump()

    # -- the request's life ----------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests held now."""
        return self.scheduler.depth

    def submit(
        self,
        tokens: int,
        key: str = DEFAULT_KEY,
        requeue: bool = False,
        client: str | None = None,
        policy: Policy = NORMAL,
        need: Need | None = None,
        total: int | None = None,
        waited: float = 0.0,
    ) -> Ticket:
        """Queue a request; `requeue` is for one already admitted once (a retry after a 429),
        which must not be turned away because the queue filled up meanwhile, and which may
        wait only what its earlier attempts (`waited`) left of request_timeout; `need` (what it
        certainly needs) refuses it at once when no limit could ever hold it. `tokens` are
        charged to the (uncached) token limits, `total` to the total-tokens limit (None: the
        same)."""
        self.stats.submitted += 1
        ticket = self.scheduler.submit(
            key,
            tokens,
            self.clock(),
            requeue=requeue,
            client=client,
            policy=policy,
            need=need,
            total=total,
            waited=waited,
        )
        if ticket.held:
            self.pump()
        return ticket

    async def wait(self, ticket: Ticket) -> Outcome:
        """Wait until the ticket is released or refused. Cancelling the wait cancels the ticket."""
        if ticket.outcome is not None:
            return ticket.outcome
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[ticket.id] = future
        try:
            return await future
        except asyncio.CancelledError:
            # Released in the same instant the waiter died: nothing will forward it, so give
            # the reservation back rather than leak it.
            if not self.cancel(ticket) and ticket.outcome is Outcome.RELEASED:
                self.abort(ticket, reached_upstream=False)
            raise
        finally:
            self._waiters.pop(ticket.id, None)

    def cancel(self, ticket: Ticket) -> bool:
        cancelled = self.scheduler.cancel(ticket, self.clock())
        if cancelled:
            self.pump()
        return cancelled

    def resize(self, sizes: Iterable[tuple[Ticket, int] | tuple[Ticket, int, int | None]]) -> None:
        """New estimates for held tickets (calibration learnt); a smaller one may fit now.

        Each is (ticket, tokens) or (ticket, tokens, total) as in `submit`."""
        for ticket, tokens, *total in sizes:
            if ticket.held:
                ticket.tokens = max(int(tokens), 1)
                if total and total[0] is not None:
                    ticket.total = max(int(total[0]), 1)
        self.scheduler.invalidate()
        self.pump()

    def confirm(
        self,
        ticket: Ticket,
        status: int = 200,
        reports: Reports = (),
        body_follows: bool = False,
    ) -> None:
        """Upstream's answer to `ticket` has begun: its status, and the `x-ratelimit-*`
        `reports` it carries (upstream.parse_rate_headers), applied in the same step.
        `body_follows`: the rest of the answer comes at once (not a stream), so a shared
        limiter may send the report with the settle, one round trip instead of two.

        A 429 is settled before its report is read: upstream refused the request before any
        work, so the report does not count it and neither may the limiter.
        """
        if status == 429:
            # Not finish(): its pump would release more on the picture the 429 just proved wrong.
            self._finish(ticket, 429, None)
        else:
            self.scheduler.confirm(ticket, self.clock())
        defer = body_follows and status != 429
        if not self.observe(ticket.key, reports, defer, ticket.reservation) and status == 429:
            self.pump()  # (observe re-syncs and pumps when the reports change anything)
        # Otherwise nothing can go that could not before: a confirmed amount is charged, not
        # freed, and a probe is over only when its answer ends (finish pumps).

    def finish(
        self,
        ticket: Ticket,
        status: int,
        actual_tokens: int | None,
        refund: int | None = None,
        total: Settled | None = None,
    ) -> None:
        """Upstream answered: settle at `actual_tokens` (uncached, with the prompt cache
        modelled) and `total` (the total-tokens limit), see Accounts.finish."""
        self._finish(ticket, status, actual_tokens, refund, total)
        self.pump()

    def _finish(
        self,
        ticket: Ticket,
        status: int,
        actual_tokens: int | None,
        refund: int | None = None,
        total: Settled | None = None,
    ) -> None:
        if status == 429 and ticket.outcome is Outcome.RELEASED and not ticket.finished:
            self.stats.upstream_429s += 1
        self.scheduler.accounts.finish(ticket, status, actual_tokens, self.clock(), refund, total)

    def abort(self, ticket: Ticket, reached_upstream: bool) -> None:
        self.scheduler.abort(ticket, reached_upstream, self.clock())
        self.pump()

    def shutdown(self) -> int:
        """Answer everything held (the proxy is stopping); returns how many were held."""
        tickets = self.scheduler.shutdown(self.clock())
        self.alarm.cancel()
        return len(tickets)

    # -- internals -----------------------------------------------------------------------------

    def _on_resolved(self, ticket: Ticket) -> None:
        if ticket.outcome is Outcome.RELEASED:
            self.stats.forwarded += 1
        elif ticket.outcome is not Outcome.CANCELLED and ticket.outcome is not None:
            self.stats.refused[ticket.outcome.value] += 1
        future = self._waiters.get(ticket.id)
        if future is not None and not future.done():
            future.set_result(ticket.outcome)  # type: ignore[arg-type]

    def pump(self) -> None:
        """Release what may go now and arm the timer for the next moment something can."""
        self.alarm.set(self.scheduler.pump(self.clock()))

    def rate_view(self, key: str) -> dict[str, tuple[int, int]]:
        """For each per-minute limit of `key`: (effective limit, remaining now)."""
        return rate_view(self, key)

    def usage(self, key: str, now: float, total: bool = False) -> dict[str, float]:
        """Fraction of each limit in use for `key`, by rate name: the requests and (uncached)
        tokens limits, or with `total` only the total-tokens limit (if it is enforced)."""
        return {
            rate.name: self.limiter.used(key, rate, now) / self.limiter.limit(key, rate)
            for rate in self.rates_for(key)
            if (rate.unit == "total_tokens") is total
        }

    def held(self) -> list[HeldModel]:
        """What is held now, per model (held.py)."""
        return held_by_model(self.scheduler, self.clock())

    def status(self) -> dict[str, Any]:
        """A snapshot of the limiter's state for logs, commands and tests."""
        return gate_status(self)


def rate_view(gate: Gate, key: str) -> dict[str, tuple[int, int]]:
    """For each per-minute limit of `key`: (effective limit, remaining now)."""
    now = gate.clock()
    view = {}
    for rate in gate.rates_for(key):
        if rate.period == 60.0:
            limit = gate.limiter.limit(key, rate)
            used = gate.limiter.used(key, rate, now)
            view[rate.name] = (limit, max(0, math.floor(limit - used)))
    return view


def gate_status(gate: Gate) -> dict[str, Any]:
    """A snapshot of the gate's state for logs, commands, metrics and tests."""
    now = gate.clock()
    keys = sorted(gate.keys)
    return {
        "queue_depth": gate.scheduler.depth,
        **status_fields(held_by_model(gate.scheduler, now)),
        "queue_by_client": top_clients(gate.scheduler.shares.held()),
        "open_reservations": gate.limiter.open_reservations(),
        "breaker": gate.breaker.state(now).value,
        "usage": {key: gate.usage(key, now) for key in keys},
        # The total-tokens limit (cached and uncached), apart: `usage` keeps its shape.
        "total_usage": {
            key: usage[TOTAL_TPM]
            for key in keys
            if TOTAL_TPM in (usage := gate.usage(key, now, total=True))
        },
        "foreign_tokens_per_minute": {
            key: round(gate.limiter.foreign_rate(key, "tokens", 60.0, now) * 60.0, 1)
            for key in keys
        },
        "algorithm": {key: _algorithm(gate, key) for key in keys},
        **_shared(gate.limiter),
        "submitted": gate.stats.submitted,
        "forwarded": gate.stats.forwarded,
        "refused": dict(gate.stats.refused),
        "upstream_429s": gate.stats.upstream_429s,
    }


def _shared(limiter: LimiterBackend) -> dict[str, Any]:
    shared = limiter.shared_status()
    return {} if shared is None else {"shared_limits": shared}


def _algorithm(gate: Gate, key: str) -> str:
    rates = gate.rates_for(key)
    return rates[0].algorithm if rates else gate.config.cerebras_limits.algorithm
