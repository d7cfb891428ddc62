"""Circuit breaker fed by upstream 429s.

When upstream keeps answering 429 although the limiter thought there was room, our picture of
the limits is wrong (another client shares the organization, or the limits changed). Sending
more only burns the quota further, so after `failure_threshold` consecutive 429s the breaker
opens: the proxy answers 503 itself for `open_duration`. Then it lets exactly one probe
through (half-open): a non-429 answer closes it, another 429 opens it again.
"""

from __future__ import annotations

import enum
import logging

from .config import BreakerConfig

log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.consecutive_429s = 0
        self._opened_until: float | None = None
        self._probe_in_flight = False

    def state(self, now: float) -> BreakerState:
        if self._opened_until is None:
            return BreakerState.CLOSED
        if now < self._opened_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker lets a probe through (0 unless open)."""
        if self._opened_until is None:
            return 0.0
        return max(self._opened_until - now, 0.0)

    def try_start_probe(self, now: float) -> bool:
        """In half-open state, claim the single probe slot; True if this caller got it."""
        if self.state(now) is not BreakerState.HALF_OPEN or self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def probe_in_flight(self) -> bool:
        return self._probe_in_flight

    def record_429(self, now: float) -> None:
        self.consecutive_429s += 1
        self._probe_in_flight = False
        state = self.state(now)
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.consecutive_429s >= self.config.failure_threshold
        ):
            self._opened_until = now + self.config.open_duration
            log.warning(
                "circuit breaker open for %.0fs after %d consecutive upstream 429s",
                self.config.open_duration,
                self.consecutive_429s,
            )

    def record_success(self, now: float) -> None:
        self.consecutive_429s = 0
        self._probe_in_flight = False
        if self._opened_until is not None and self.state(now) is BreakerState.HALF_OPEN:
            self._opened_until = None
            log.info("circuit breaker closed: upstream answered the probe")

    def probe_aborted(self) -> None:
        """The probe ended without an answer from upstream; let another one try."""
        self._probe_in_flight = False
