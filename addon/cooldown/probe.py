"""Probe first: after a quiet spell, one request goes ahead and the rest wait for its answer.

When nothing has been heard from upstream for longer than the shortest limit's period (or
ever, or since the limits changed), the proxy's picture of upstream's buckets may be stale:
others may have used the organization's quota meanwhile. Releasing a whole wave on that
picture can draw a burst of 429s; one request's answer re-syncs the picture (its
`x-ratelimit-*` headers) and calibrates the estimates (its usage) before the rest go.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .limiter import Rate
from .tickets import Ticket

log = logging.getLogger(__name__)


class ProbeFirst:
    def __init__(self) -> None:
        self._synced_at: dict[str, float] = {}  # when upstream last answered, per key
        self._probes: dict[str, tuple[Ticket, float]] = {}  # the probe out per key, and until

    def forget(self) -> None:
        """Upstream's state is unknown again (new limits): probe before the next wave."""
        self._synced_at.clear()

    def synced(self, key: str, now: float) -> None:
        """Upstream answered for `key`: its state is known as of `now`."""
        self._synced_at[key] = now

    def wait(self, key: str, now: float) -> float | None:
        """While a probe for `key` is out, until when to wait for it; None to go on.

        The probe is over when its answer is complete (the headers have re-synced the limits,
        and its usage has calibrated the estimates) or at its deadline.
        """
        probe = self._probes.get(key)
        if probe is None:
            return None
        ticket, until = probe
        if not ticket.finished and now < until:
            return until
        del self._probes[key]
        if not ticket.finished and key not in self._synced_at:
            log.debug("probe for %s not answered in time; releasing without it", key)
            self._synced_at[key] = now
        # A probe that failed without an answer leaves the state unknown: the next one probes.
        return None

    def maybe_start(
        self, key: str, rates: Sequence[Rate], ticket: Ticket, now: float, timeout: float
    ) -> None:
        """`ticket` is being released: make it the probe if upstream's state is stale."""
        if not rates:
            return
        synced = self._synced_at.get(key)
        if synced is not None:
            age = now - synced
            for rate in rates:  # (a plain loop: this runs on every release)
                if age > rate.period:
                    break
            else:
                return  # heard from upstream within the shortest period: not stale
        self._synced_at.pop(key, None)
        self._probes[key] = (ticket, now + timeout)
