"""A released request's account with the limiter and the breaker, until upstream has answered.

The scheduler decides who goes; this settles what going cost: the reservation is confirmed
when upstream starts answering, then settled at upstream's usage (or released, after a 429 or
a failure before upstream), and the breaker hears how it went. Every step may free capacity,
so each tells the scheduler (`changed`) that its cached refusals are stale.
"""

from __future__ import annotations

from collections.abc import Callable

from .breaker import CircuitBreaker
from .limiter import LimiterBackend, Settled
from .probe import ProbeFirst
from .tickets import Outcome, Ticket


class Accounts:
    def __init__(
        self,
        limiter: LimiterBackend,
        breaker: CircuitBreaker,
        probes: ProbeFirst,
        changed: Callable[[], None],
    ) -> None:
        self._limiter = limiter
        self._breaker = breaker
        self._probes = probes
        self._changed = changed

    def confirm(self, ticket: Ticket, now: float) -> None:
        """Upstream has started answering, so it has counted the request by now."""
        if ticket.reservation is not None and not ticket.finished:
            self._limiter.confirm(ticket.reservation, now)
            self._changed()
        if ticket.outcome is Outcome.RELEASED:
            self._probes.synced(ticket.key, now)

    def finish(
        self,
        ticket: Ticket,
        status: int,
        actual_tokens: int | None,
        now: float,
        refund: int | None = None,
        total: Settled | None = None,
    ) -> None:
        """Upstream answered a released request: settle its reservation and feed the breaker.

        `refund`: what upstream gives back of the reservation (its unused output), if known;
        `total`: what it counted on the total-tokens limit (None: the reservation stands)."""
        if ticket.outcome is not Outcome.RELEASED or ticket.finished:
            return
        ticket.finished = True
        self._changed()
        self._probes.synced(ticket.key, now)  # upstream answered: its state is known
        if status == 429:
            self._breaker.record_429(now)
        else:
            self._breaker.record_success(now)
        if ticket.reservation is None:
            return
        if status == 429:
            # Refused before any work: upstream charged nothing. Its picture of the limits is
            # re-synced from the 429's own headers, so holding the estimate would count twice.
            self._limiter.release(ticket.reservation, now)
            return
        # Without a usage figure (errors, odd bodies) keep the estimate: upstream may have
        # charged it, and over-counting only costs a little waiting.
        settled = ticket.reservation.tokens if actual_tokens is None else actual_tokens
        self._limiter.settle(ticket.reservation, settled, now, refund, total)

    def abort(self, ticket: Ticket, reached_upstream: bool, now: float) -> None:
        """A released request failed without an answer from upstream."""
        if ticket.outcome is not Outcome.RELEASED or ticket.finished:
            return
        ticket.finished = True
        self._changed()
        if ticket.probe:
            self._breaker.probe_aborted()
        if ticket.reservation is None:
            return
        if reached_upstream:
            # Upstream may have admitted and charged it: keep the estimate.
            self._limiter.settle(ticket.reservation, ticket.reservation.tokens, now)
        else:
            self._limiter.release(ticket.reservation, now)
