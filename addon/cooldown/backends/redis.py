"""The limits kept in Redis, shared by every proxy of one organization: `RedisLimiter`.

Every bucket, pace and upstream view of a model lives in one Redis hash, and every change to
them is one call of one Lua script (`cooldown.lua`), which applies a batch of operations
atomically with Redis's `TIME` as the only clock. The logic is `MemoryLimiter`'s (limiter.py),
written once more in Lua; the contract tests run both.

Round trips. A request costs two: the decision (`try_acquire`, which must know the answer)
and the re-sync from upstream's headers (`observe`, which must be applied while it is news).
Confirming, settling and releasing only tell Redis what happened; they wait in a list and ride
along with this proxy's next call for the same model, at most a `tick` (a second) later. That
is on the safe side: a confirm that waits leaves its amount held aside in flight (counted in
full), a refund that waits gives capacity back later. A failed call keeps them; they are sent
when Redis answers again.

The estimate of others' usage of the organization's limits (`UpstreamDrift`) stays in each
proxy: a re-sync returns the gap it measured against the shared view, the proxy learns from
it, and passes its estimate with its next reports.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

from ..limiter import (
    RESYNC_INTERVAL,
    VIEW_MARGIN,
    Decision,
    Rate,
    RateReport,
    Reservation,
    Settled,
    Slot,
    Unit,
    UpstreamDrift,
)

log = logging.getLogger(__name__)

SCRIPT = resources.files(__package__).joinpath("cooldown.lua").read_text(encoding="utf-8")
# A reservation nobody settles (its proxy died) is dropped this long after its release: in
# flight, its amounts come back; confirmed, its charge stands.
LEASE_SECONDS = 300.0
# A proxy waiting for a model asks again at least this often: its queue's head stays
# published to the others (the script forgets a head not refreshed within two seconds).
MAX_WAIT = 1.0
# `used` answers from the last call for the model when it is at most this old.
USED_FRESH_SECONDS = 0.05
# The binding the script reports when another proxy's earlier request goes first.
SHARED_QUEUE = "shared_queue"
_KEY_SUFFIXES = (":s", ":r", ":x", ":h", ":hi")


class SharedStateError(Exception):
    """Redis could not be reached, or answered with an error."""


def _fmt(x: float) -> str:
    return repr(float(x))


class RedisLimiter:
    """A `LimiterBackend` over Redis. `use_redis_time=False` (tests only) runs the scripts on
    the `now` the caller passes instead of Redis's clock."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        instance: str,
        use_redis_time: bool = True,
        view_margin: float = VIEW_MARGIN,
        resync_interval: float = RESYNC_INTERVAL,
        lease: float = LEASE_SECONDS,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self.instance = instance
        self._redis_time = use_redis_time
        self._view_margin = view_margin
        self._resync_interval = resync_interval
        self._lease = lease
        self._max_wait = max_wait
        # EVALSHA, and the script loaded again after NOSCRIPT (Redis restarted)
        self._script = client.register_script(SCRIPT)
        self._ids = itertools.count(1)
        # Per key: operations for the next call, each with the (local) time it happened.
        self._pending: dict[str, list[tuple[float, list[str]]]] = {}
        self._open: set[str] = set()  # reservations handed out and not settled or released
        # Per key and (unit, period): (used, at) as the last call said; any call forgets them.
        self._used: dict[str, dict[tuple[Unit, float], tuple[float, float]]] = {}
        self._learned: dict[Slot, int] = {}  # upstream's limits as its reports said
        self._drift: dict[Slot, UpstreamDrift] = {}

    # -- calls -----------------------------------------------------------------------------

    def keys_of(self, key: str) -> list[str]:
        """The Redis keys of one model: one hash tag, so one Cluster slot."""
        tag = f"{self._prefix}{{{key}}}"
        return [tag + suffix for suffix in _KEY_SUFFIXES]

    def call(self, key: str, ops: Sequence[str], now: float) -> list[str]:
        """One atomic call for `key`: the operations waiting for it, then `ops`."""
        pending = self._pending.get(key, ())
        args = ["" if self._redis_time else _fmt(now), self.instance, _fmt(self._lease)]
        for at, (code, *op) in pending:
            # applied at the moment it happened: Redis's clock less its age
            args += [code, str(len(op) + 1), _fmt(max(now - at, 0.0)), *op]
        args += ops
        try:
            result = self._script(keys=self.keys_of(key), args=args)
        except redis.RedisError as e:
            raise SharedStateError(f"{type(e).__name__}: {e}") from e
        if pending:
            del self._pending[key]
        self._used.pop(key, None)  # the state changed: what was used is asked again
        return [x.decode() if isinstance(x, bytes) else str(x) for x in result]

    def flush(self, now: float) -> None:
        """Send every waiting operation now (a tick, or before switching away)."""
        for key in list(self._pending):
            self.call(key, (), now)

    def pending(self) -> int:
        """Operations waiting for their next call (confirms, settles, releases)."""
        return sum(len(ops) for ops in self._pending.values())

    def _later(self, key: str, now: float, *op: str) -> None:
        self._pending.setdefault(key, []).append((now, list(op)))

    # -- admission -------------------------------------------------------------------------

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
        rid = f"{self.instance}:{next(self._ids)}"
        args = [rid, str(int(tokens)), "" if total is None else str(int(total))]
        args += [_fmt(max(waited, 0.0)), str(priority), str(len(rates))]
        for rate in rates:
            args += [_slot_name(rate.unit, rate.period), rate.unit, str(rate.limit)]
            args += [_fmt(rate.period), _fmt(rate.burst)]
        out = self.call(key, ["A", str(len(args)), *args], now)
        granted, wait, binding = out[0] == "1", float(out[1]), int(out[2])
        known = self._used.setdefault(key, {})
        for i, rate in enumerate(rates):
            known[(rate.unit, rate.period)] = (float(out[3 + 2 * i]), now)
        if granted:
            self._open.add(rid)
            return Decision(True, reservation=Reservation(rid, key, int(tokens)))
        name = SHARED_QUEUE if binding < 0 else rates[binding - 1].name
        return Decision(False, wait=min(wait, self._max_wait), binding=name)

    # -- a reservation's life --------------------------------------------------------------

    def confirm(self, reservation: Reservation, now: float) -> None:
        if reservation.id in self._open:
            self._later(reservation.key, now, "C", reservation.id)

    def settle(
        self,
        reservation: Reservation,
        actual_tokens: int,
        now: float,
        refund: int | None = None,
        total: Settled | None = None,
    ) -> None:
        if reservation.id not in self._open:
            return
        self._open.discard(reservation.id)
        self._later(
            reservation.key,
            now,
            "S",
            reservation.id,
            str(max(int(actual_tokens), 0)),
            "" if refund is None else str(int(refund)),
            "" if total is None else str(max(int(total.tokens), 0)),
            "" if total is None or total.refund is None else str(int(total.refund)),
        )

    def release(self, reservation: Reservation, now: float) -> None:
        if reservation.id in self._open:
            self._open.discard(reservation.id)
            self._later(reservation.key, now, "R", reservation.id)

    def exhaust(self, key: str, rate: Rate, now: float) -> None:
        slot = _slot_name(rate.unit, rate.period)
        self.call(key, ["X", "3", slot, str(rate.limit), _fmt(rate.period)], now)

    def charge(self, key: str, rate: Rate, amount: float, now: float) -> None:
        """Count `amount` more on one limit (what a proxy admitted alone, reconciled)."""
        slot = _slot_name(rate.unit, rate.period)
        args = [slot, str(rate.limit), _fmt(rate.period), _fmt(amount)]
        self.call(key, ["K", "4", *args], now)

    # -- upstream's reports ----------------------------------------------------------------

    def observe(self, key: str, reports: Sequence[RateReport], now: float) -> bool:
        wanted = {(r.unit, r.period): r for r in reports if r.limit > 0}
        if not wanted:
            return False
        args = [_fmt(self._view_margin), _fmt(self._resync_interval), str(len(wanted))]
        drifts = []
        for report in wanted.values():
            slot: Slot = (key, report.unit, report.period)
            drift = self._drift.get(slot)
            if drift is None:
                drift = self._drift[slot] = UpstreamDrift()
            drifts.append((drift, report))
            args += [_slot_name(report.unit, report.period), str(report.limit)]
            args += [str(report.remaining), _fmt(report.reset), _fmt(report.period)]
            args += [_fmt(drift.rate(now)), _fmt(drift.lump(now)), _fmt(drift.share)]
            self._learned[slot] = report.limit
        out = self.call(key, ["O", str(len(args)), *args], now)
        if out[0] != "1":
            return False
        at = 1
        for drift, report in drifts:
            if out[at] == "1":
                gap, unsure, dt, refunds = (float(x) for x in out[at + 1 : at + 5])
                drift.add(gap, unsure, dt, refunds, report.limit, now)
                at += 5
            else:
                at += 1
        return True

    def learned_limits(self, key: str) -> dict[tuple[Unit, float], int]:
        return {(u, p): limit for (k, u, p), limit in self._learned.items() if k == key}

    def foreign_rate(self, key: str, unit: Unit, period: float, now: float) -> float:
        drift = self._drift.get((key, unit, period))
        return 0.0 if drift is None else drift.rate(now)

    # -- queries ---------------------------------------------------------------------------

    def limit(self, key: str, rate: Rate) -> int:
        learned = self._learned.get((key, rate.unit, rate.period))
        return rate.limit if learned is None else min(rate.limit, learned)

    def used(self, key: str, rate: Rate, now: float) -> float:
        """From this proxy's last call for `key` if recent, else asked again."""
        known = self._used.get(key, {}).get((rate.unit, rate.period))
        if known is None or abs(now - known[1]) > USED_FRESH_SECONDS or key in self._pending:
            self.refresh(key, (rate,), now)
            known = self._used[key][(rate.unit, rate.period)]
        return known[0]

    def last_used(self, key: str, rate: Rate) -> float:
        """What the last call for `key` said is used of `rate` (0: never asked)."""
        known = self._used.get(key, {}).get((rate.unit, rate.period))
        return 0.0 if known is None else known[0]

    def refresh(self, key: str, rates: Sequence[Rate], now: float) -> None:
        """Ask Redis how much of each limit of `key` is used (and send what waits)."""
        args: list[str] = [str(len(rates))]
        for rate in rates:
            args += [_slot_name(rate.unit, rate.period), str(rate.limit), _fmt(rate.period)]
        out = self.call(key, ["Q", str(len(args)), *args], now)
        known = self._used.setdefault(key, {})
        for i, rate in enumerate(rates):
            known[(rate.unit, rate.period)] = (float(out[3 * i]), now)

    def open_reservations(self) -> int:
        return len(self._open)

    def state(self, key: str) -> dict[str, Any]:
        """The raw shared state of `key` (tests and debugging)."""
        try:
            raw = self._client.hgetall(self.keys_of(key)[0])
        except redis.RedisError as e:
            raise SharedStateError(str(e)) from e
        return {k.decode(): float(v) for k, v in raw.items()}  # type: ignore[union-attr]


def _slot_name(unit: Unit, period: float) -> str:
    return f"{unit}:{period:g}"
