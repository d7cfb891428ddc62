"""The limits kept in Redis, shared by every proxy of one organization: `RedisLimiter`.

Every bucket, pace and upstream view of a model lives in one Redis hash, and every change to
them is one call of one Lua script (`cooldown.lua`), which applies a batch of operations
atomically with Redis's `TIME` as the only clock. The logic is `MemoryLimiter`'s (limiter.py),
written once more in Lua; the contract tests run both.

Round trips. A request costs two: the decision (`try_acquire`) and the settle at the end of
its answer. Confirming it, and re-syncing from the report in its headers, wait for that
settle when the answer is not a stream (its body follows within milliseconds: `observe(...,
defer=True)`); each waiting operation carries its age and applies at the moment it happened.
A stream's report is sent at once: its end may be minutes away. Settles and releases are
never held back: other proxies' views learn from them (upstream's refunds show in its next
report, and a settle that waited would make them look like nobody's). A confirm that waits is
on the safe side: its amount stays held aside in flight, counted in full. What waits when a
call fails is sent when Redis answers again.

The estimate of others' usage of the organization's limits (`UpstreamDrift`) stays in each
proxy: a re-sync returns the gap it measured against the shared view, the proxy learns from
it, and passes its estimate with its next reports.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis

from ..limiter import (
    RESYNC_INTERVAL,
    SHARED_QUEUE,
    UPSTREAM_429,
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
# A reservation nobody settles is dropped this long after its proxy last renewed it (each tick
# renews every one it holds): a proxy that died, or lost Redis, leaks nothing for longer. In
# flight, its amounts come back; confirmed, its charge stands.
LEASE_SECONDS = 60.0
# A proxy waiting for a model asks again at least this often: its queue's head stays
# published to the others (the script forgets a head not refreshed within a second or two).
MAX_WAIT = 0.1
# `used` answers from the last call for the model when it is at most this old (it orders the
# queue and fills the X-RateLimit-* headers; admission never reads it).
USED_FRESH_SECONDS = 0.25
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
        fresh_for: float = USED_FRESH_SECONDS,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self.instance = instance
        self._redis_time = use_redis_time
        self._view_margin = view_margin
        self._resync_interval = resync_interval
        self._lease = lease
        self._max_wait = max_wait
        self._fresh_for = fresh_for
        # EVALSHA, and the script loaded again after NOSCRIPT (Redis restarted)
        self._script = client.register_script(SCRIPT)
        self._ids = itertools.count(1)
        # Per key: operations for the next call, each with the (local) time it happened and
        # what reads its results (a report's re-sync returns what it measured).
        self._pending: dict[str, list[_Waiting]] = {}
        # Reservations handed out and not settled or released, and their keys.
        self._open: dict[str, str] = {}
        # Per key and (unit, period): (used, at) as the last call that asked said.
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
        for waiting in pending:
            code, *op = waiting.op
            # applied at the moment it happened: Redis's clock less its age
            args += [code, str(len(op) + 1), _fmt(max(now - waiting.at, 0.0)), *op]
        args += ops
        try:
            result = self._script(keys=self.keys_of(key), args=args)
        except redis.RedisError as e:
            raise SharedStateError(f"{type(e).__name__}: {e}") from e
        if pending:
            del self._pending[key]
        out = iter([x.decode() if isinstance(x, bytes) else str(x) for x in result])
        for waiting in pending:
            if waiting.read is not None:
                waiting.read(out, now)
        return list(out)

    def flush(self, now: float) -> None:
        """Send every waiting operation now (a tick, or before switching away)."""
        for key in list(self._pending):
            self.call(key, (), now)

    def renew(self, now: float) -> None:
        """Extend the lease of every reservation this proxy still holds (a tick's work): a
        lease runs out only when its proxy stopped renewing it (died, or lost Redis)."""
        by_key: dict[str, list[str]] = {}
        for rid, key in self._open.items():
            by_key.setdefault(key, []).append(rid)
        for key, ids in by_key.items():
            self.call(key, ["L", str(len(ids)), *ids], now)

    def pending(self) -> int:
        """Operations waiting for their next call (confirms, settles, releases)."""
        return sum(len(ops) for ops in self._pending.values())

    def _later(self, key: str, now: float, op: list[str], read: _Reader | None = None) -> None:
        self._pending.setdefault(key, []).append(_Waiting(now, op, read))

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
            self._open[rid] = key
            return Decision(True, reservation=Reservation(rid, key, int(tokens)))
        name = {-1: SHARED_QUEUE, -2: UPSTREAM_429}.get(binding) or rates[binding - 1].name
        return Decision(False, wait=min(wait, self._max_wait), binding=name)

    # -- a reservation's life --------------------------------------------------------------

    def confirm(self, reservation: Reservation, now: float) -> None:
        if reservation.id in self._open:
            self._later(reservation.key, now, ["C", reservation.id])

    def settle(
        self,
        reservation: Reservation,
        actual_tokens: int,
        now: float,
        refund: int | None = None,
        total: Settled | None = None,
        later: bool = False,
    ) -> None:
        """Settle at once (`later`: with the next call, e.g. while Redis is away). A call
        that fails keeps it for the next one, and raises."""
        if reservation.id not in self._open:
            return
        del self._open[reservation.id]
        args = [
            reservation.id,
            str(max(int(actual_tokens), 0)),
            "" if refund is None else str(int(refund)),
            "" if total is None else str(max(int(total.tokens), 0)),
            "" if total is None or total.refund is None else str(int(total.refund)),
        ]
        self._send(reservation.key, ["S", *args], now, later)

    def release(self, reservation: Reservation, now: float, later: bool = False) -> None:
        """As `settle`: at once, or with the next call."""
        if reservation.id in self._open:
            del self._open[reservation.id]
            self._send(reservation.key, ["R", reservation.id], now, later)

    def _send(self, key: str, op: list[str], now: float, later: bool) -> None:
        self._later(key, now, op)
        if not later:
            self.call(key, (), now)  # a failure leaves it waiting with the others

    def pause(self, key: str, seconds: float, now: float) -> None:
        """Every proxy releases nothing of `key` for `seconds` (an upstream 429)."""
        self.call(key, ["P", "1", _fmt(seconds)], now)

    def withdraw(self, key: str, now: float) -> None:
        """Nothing of `key` waits here any more: stop asking the others to make room for this
        proxy's queue (sent with the next call)."""
        self._later(key, now, ["W"])

    def exhaust(self, key: str, rate: Rate, now: float) -> None:
        slot = _slot_name(rate.unit, rate.period)
        self.call(key, ["X", "3", slot, str(rate.limit), _fmt(rate.period)], now)

    def charge(self, key: str, rate: Rate, amount: float, now: float) -> None:
        """Count `amount` more on one limit (what a proxy admitted alone, reconciled)."""
        slot = _slot_name(rate.unit, rate.period)
        args = [slot, str(rate.limit), _fmt(rate.period), _fmt(amount)]
        self.call(key, ["K", "4", *args], now)

    # -- upstream's reports ----------------------------------------------------------------

    def observe(
        self,
        key: str,
        reports: Sequence[RateReport],
        now: float,
        defer: bool = False,
        reporter: Reservation | None = None,
    ) -> bool:
        """Re-sync the shared views from one answer's reports (see LimiterBackend.observe);
        `defer`: with the next call (the settle that follows), applied as of now."""
        wanted = {(r.unit, r.period): r for r in reports if r.limit > 0}
        if not wanted:
            return False
        reporter_id = "" if reporter is None else reporter.id
        args = [_fmt(self._view_margin), _fmt(self._resync_interval), reporter_id, str(len(wanted))]
        drifts = []
        for report in wanted.values():
            slot: Slot = (key, report.unit, report.period)
            drift = self._drift.get(slot) or self._drift.setdefault(slot, UpstreamDrift())
            drifts.append((drift, report))
            args += _report_args(report, drift, now)
            self._learned[slot] = report.limit

        def read(out: Iterator[str], at: float) -> bool:
            if next(out) != "1":
                return False
            for drift, report in drifts:
                if next(out) == "1":
                    gap, unsure, dt, refunds = (float(next(out)) for _ in range(4))
                    drift.add(gap, unsure, dt, refunds, report.limit, at)
            return True

        if defer:
            self._later(key, now, ["O", *args], read)
            return False
        return read(iter(self.call(key, ["O", str(len(args) + 1), "0", *args], now)), now)

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
        if known is None or abs(now - known[1]) >= self._fresh_for:
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


_Reader = Callable[[Iterator[str], float], object]


@dataclass(frozen=True, slots=True)
class _Waiting:
    """An operation waiting for the next call: when it happened, its code and arguments,
    and what reads its results."""

    at: float
    op: list[str]
    read: _Reader | None = None


def _slot_name(unit: Unit, period: float) -> str:
    return f"{unit}:{period:g}"


def _report_args(report: RateReport, drift: UpstreamDrift, now: float) -> list[str]:
    """One report as the script's `O` operation reads it, with this proxy's estimate of
    others' usage of its limit."""
    return [
        _slot_name(report.unit, report.period),
        str(report.limit),
        str(report.remaining),
        _fmt(report.reset),
        _fmt(report.period),
        _fmt(drift.rate(now)),
        _fmt(drift.lump(now)),
        _fmt(drift.share),
    ]
