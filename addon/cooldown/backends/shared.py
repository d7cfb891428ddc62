"""Limits shared with other proxies through Redis, and what happens while Redis is away.

`SharedLimiter` is the backend the gate uses when the config has a `shared_limits` section.
While Redis answers, every decision is `RedisLimiter`'s. When a call fails, the proxy says so
once and follows `on_error` until Redis answers again:

- `local`: it decides alone, on its share of every limit (1/N, N the proxies seen alive in the
  last heartbeats), in a fresh in-process limiter. When Redis is back, what that limiter
  counted (used and in flight) is charged to the shared buckets once; its reservations are
  settled where they were made, so nothing is counted twice.
- `hold`: requests stay held and the queue looks again every second; each still ends at its
  `request_timeout` at the latest.
- `reject`: requests are answered 503 with a Retry-After.

Settles and releases of reservations made in Redis wait for it (see redis.py); a Redis that
restarted empty has forgotten those reservations, and they are dropped there.

While Redis is away nothing on the event loop waits for it: a thread asks it once a second
(PING, with a short timeout), and the next `tick` reconnects once it answered. Only the call
that finds Redis gone waits, for at most `presence.SOCKET_TIMEOUT`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import redis

from ..config import SharedLimitsConfig, redact_url
from ..limiter import SHARED_UNAVAILABLE as UNAVAILABLE
from ..limiter import Decision, MemoryLimiter, Rate, RateReport, Reservation, Settled, Unit
from .presence import RETRY_SECONDS, Presence, connect, instance_id
from .redis import RedisLimiter, SharedStateError

log = logging.getLogger(__name__)


class SharedLimiter:
    def __init__(
        self,
        config: SharedLimitsConfig,
        client: redis.Redis | None = None,
        instance: str | None = None,
        use_redis_time: bool = True,
    ) -> None:
        self.config = config
        self._client = client or connect(config.redis_url)
        self.instance = instance or instance_id()
        self.shared = RedisLimiter(self._client, config.key_prefix, self.instance, use_redis_time)
        self.presence = Presence(self._client, config.redis_url, config.key_prefix, self.instance)
        self.up = False
        # Reservations made alone, by id, each in the limiter that made it (one per outage).
        self._alone: MemoryLimiter | None = None
        self._outages = 0
        self._owners: dict[str, MemoryLimiter] = {}
        self._counted_alone: dict[tuple[str, Rate], None] = {}  # what to reconcile

    # -- connection ------------------------------------------------------------------------

    def start(self, now: float) -> bool:
        """Connect (at start-up, and when Redis may be back); True when sharing."""
        try:
            self.presence.beat()
            self.shared.flush(now)
            self._reconcile(now)
        except SharedStateError as e:
            self._down(e, now)
            return False
        if not self.up:
            log.info(
                "Cooldown: sharing limits through Redis at %s as %s (%d proxies alive)",
                redact_url(self.config.redis_url),
                self.instance,
                self.presence.instances,
            )
        self.up = True
        return True

    def tick(self, now: float) -> bool:
        """About once a second: say this proxy is alive, send waiting operations; without
        Redis, reconnect once the watcher has seen it answer. True after an outage, or when
        Redis lost its data meanwhile: its buckets are full again and it has no view of
        upstream, so the next wave had better probe first."""
        if not self.up:
            return self.presence.answering.is_set() and self.start(now)
        try:
            lost = self.presence.beat()
            self.shared.flush(now)
            self.shared.renew(now)
        except SharedStateError as e:
            self._down(e, now)
            return False
        if lost:
            log.warning("Cooldown: Redis lost the shared limits (restarted?); probing first")
        return lost

    def close(self) -> None:
        """Leave: send what waits and stop counting among the proxies alive."""
        self.presence.close()
        if self.up:
            try:
                self.shared.flush(0.0)
                self.presence.beat(leaving=True)
            except SharedStateError:
                pass
        self._client.close()

    def _down(self, error: SharedStateError, now: float) -> None:
        self.presence.watch()
        if not self.up and self._outages:
            return  # still down: said once already
        self.up = False
        self._outages += 1
        self._alone = MemoryLimiter(id_prefix=f"alone{self._outages}-")
        what = {
            "local": f"deciding alone on 1/{self.presence.instances} of every limit",
            "hold": "holding requests until it answers (each at most request_timeout)",
            "reject": "answering 503 until it answers",
        }[self.config.on_error]
        log.warning(
            "Cooldown: Redis at %s unavailable (%s): %s (shared_limits.on_error: %s)",
            redact_url(self.config.redis_url),
            error,
            what,
            self.config.on_error,
        )

    def _reconcile(self, now: float) -> None:
        """Charge the shared buckets with what this proxy counted alone, once."""
        alone, charged = self._alone, 0
        if alone is None:
            return
        for key, rate in list(self._counted_alone):
            amount = alone.used(key, self._scaled(rate), now)
            if amount > 0:
                self.shared.charge(key, rate, amount, now)
                charged += 1
            del self._counted_alone[(key, rate)]
        self._alone = None
        what = f"{charged} limits counted alone are charged to it" if charged else "sharing"
        log.info("Cooldown: Redis answers again: %s", what)

    # -- the backend -----------------------------------------------------------------------

    def _scaled(self, rate: Rate) -> Rate:
        return replace(rate, limit=max(rate.limit // self.presence.instances, 1))

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
        if self.up:
            try:
                return self.shared.try_acquire(key, rates, tokens, now, total, waited, priority)
            except SharedStateError as e:
                self._down(e, now)
        if self.config.on_error == "hold":
            return Decision(False, wait=RETRY_SECONDS, binding=UNAVAILABLE)
        if self.config.on_error == "reject":
            return Decision(False, wait=RETRY_SECONDS, binding=UNAVAILABLE, unavailable=True)
        alone = self._alone
        assert alone is not None  # set by _down
        scaled = [self._scaled(rate) for rate in rates]
        decision = alone.try_acquire(key, scaled, tokens, now, total, waited, priority)
        for rate in rates:
            self._counted_alone[(key, rate)] = None
        if decision.reservation is not None:
            self._owners[decision.reservation.id] = alone
        return decision

    def confirm(self, reservation: Reservation, now: float) -> None:
        owner = self._owners.get(reservation.id)
        if owner is not None:
            owner.confirm(reservation, now)
        else:
            self.shared.confirm(reservation, now)

    def settle(
        self,
        reservation: Reservation,
        actual_tokens: int,
        now: float,
        refund: int | None = None,
        total: Settled | None = None,
    ) -> None:
        owner = self._owners.pop(reservation.id, None)
        if owner is not None:
            owner.settle(reservation, actual_tokens, now, refund, total)
            return
        try:
            self.shared.settle(reservation, actual_tokens, now, refund, total, not self.up)
        except SharedStateError as e:
            self._down(e, now)

    def release(self, reservation: Reservation, now: float) -> None:
        owner = self._owners.pop(reservation.id, None)
        if owner is not None:
            owner.release(reservation, now)
            return
        try:
            self.shared.release(reservation, now, not self.up)
        except SharedStateError as e:
            self._down(e, now)

    def exhaust(self, key: str, rate: Rate, now: float) -> None:
        if self.up:
            try:
                self.shared.exhaust(key, rate, now)
                return
            except SharedStateError as e:
                self._down(e, now)
        if self._alone is not None:
            self._alone.exhaust(key, self._scaled(rate), now)

    def observe(
        self,
        key: str,
        reports: Sequence[RateReport],
        now: float,
        defer: bool = False,
        reporter: Reservation | None = None,
    ) -> bool:
        if self.up:
            try:
                return self.shared.observe(key, reports, now, defer, reporter)
            except SharedStateError as e:
                self._down(e, now)
        # Alone, upstream's reports still say what the whole organization left.
        alone = self._alone
        return alone is not None and alone.observe(key, reports, now, reporter=reporter)

    def pause(self, key: str, seconds: float, now: float) -> None:
        if self.up:
            try:
                self.shared.pause(key, seconds, now)
            except SharedStateError as e:
                self._down(e, now)

    def withdraw(self, key: str, now: float) -> None:
        if self.up:
            self.shared.withdraw(key, now)

    def used(self, key: str, rate: Rate, now: float) -> float:
        if self.up:
            try:
                return self.shared.used(key, rate, now)
            except SharedStateError as e:
                self._down(e, now)
        if self._alone is None:
            return self.shared.last_used(key, rate)
        return self._alone.used(key, self._scaled(rate), now) * self.presence.instances

    def limit(self, key: str, rate: Rate) -> int:
        return self.shared.limit(key, rate)

    def learned_limits(self, key: str) -> dict[tuple[Unit, float], int]:
        return self.shared.learned_limits(key)

    def foreign_rate(self, key: str, unit: Unit, period: float, now: float) -> float:
        return self.shared.foreign_rate(key, unit, period, now)

    def open_reservations(self) -> int:
        return self.shared.open_reservations() + len(self._owners)

    def shared_status(self) -> dict[str, object]:
        state = (
            "shared"
            if self.up
            else {"local": "local", "hold": "holding"}.get(self.config.on_error, "rejecting")
        )
        return {
            "state": state,
            "instances": self.presence.instances,
            "instance": self.instance,
            "waiting_operations": self.shared.pending(),
        }
