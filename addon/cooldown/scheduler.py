"""Which held request goes next, and when.

Pure decision logic with no clock and no asyncio: every call takes `now`, and `pump(now)` says
when it next needs to be called. `gate.py` turns that into futures and timers.

Ordering. While usage of every limit is at or below `priority_threshold`, held requests leave
in arrival order (FIFO): capacity is not tight, so reordering would only add unfairness. Above
it, the original Cooldown Proxy's size rule applies: under 1,000 estimated tokens priority
2.0, over 5,000 priority 0.5, else 1.0; equal priority is FIFO. Waiting adds
`1 / priority_aging` priority per second, so a large request overtakes fresh small ones after
a bounded wait instead of starving.
Because every held request ages at the same rate, the order between two requests never
changes while they wait: the heap key `enqueued_at / aging - base` is fixed at submission and
both orders are kept as heaps (O(log n) per decision, stale entries skipped lazily).

Head-of-line per limiter key, with bounded backfill: if the first in order does not fit,
nothing behind it overtakes it, except small requests while capacity is tight and the head is
not small itself, and only up to `BACKFILL_SHARE` of the head's own size in all (so they delay
it by at most that share of the time its own tokens take to refill). Unbounded overtaking
would keep a large request waiting forever under a steady trickle of small ones; aging would
then not help. Strict head-of-line, on the other hand, makes every small request wait behind
an aged large one for as long as the large one's tokens take to come back.

Probe first. A fresh bucket says "full", but upstream's may not be: someone else in the
organization may have used it, or the proxy restarted mid-minute. When nothing is known of
upstream's state for a key (never heard from, or quiet for longer than its shortest period, in
which a bucket refills completely), one request goes alone and the rest wait for its response
headers, which re-sync the limiter, for at most `probe_timeout`. The cost is one round trip
for the first wave; `probe_first: false` turns it off.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from .accounts import Accounts
from .breaker import BreakerState, CircuitBreaker
from .config import CerebrasLimits
from .estimate import Need, TooLarge, too_large
from .limiter import UPSTREAM_429 as UPSTREAM_429  # re-exported: what held requests wait for
from .limiter import Decision, LimiterBackend, Rate, Reservation
from .probe import ProbeFirst
from .queues import KeyQueue
from .tickets import NORMAL, SMALL_REQUEST_TOKENS, Policy
from .tickets import Outcome as Outcome  # re-exported: callers name outcomes here
from .tickets import Ticket as Ticket
from .tickets import base_priority as base_priority

log = logging.getLogger(__name__)

BACKFILL_SHARE = 0.5
# What held requests wait for besides a limit (see Scheduler.waiting).
PROBE = "probe"  # the first answer from upstream (probe first)
BREAKER_PROBE = "breaker_probe"  # the half-open breaker's one probe


def is_tight(
    limiter: LimiterBackend, key: str, rates: Sequence[Rate], threshold: float, now: float
) -> bool:
    """Capacity is tight when any limit is used beyond `threshold` (priority order applies)."""
    return any(
        limiter.used(key, rate, now) > threshold * limiter.limit(key, rate) for rate in rates
    )


def too_large_for(
    limiter: LimiterBackend, key: str, rates: Sequence[Rate], need: Need
) -> TooLarge | None:
    """`need` against the context and every token limit of `key`, each as the limiter applies
    it (the lower of the configured limit and upstream's)."""
    return too_large(need, ((r.name, limiter.limit(key, r)) for r in rates if r.unit == "tokens"))


class ClientShares:
    """Held tickets per client: no client may hold more than its share of the queue."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()

    def full(self, client: str, limits: CerebrasLimits) -> bool:
        share = math.ceil(limits.max_queue_share_per_client * limits.max_queue_depth)
        return self._held[client] >= share

    def add(self, client: str | None) -> None:
        if client is not None:
            self._held[client] += 1

    def remove(self, client: str | None) -> None:
        if client is not None:
            self._held[client] -= 1
            if self._held[client] <= 0:
                del self._held[client]

    def held(self) -> dict[str, int]:
        """Held requests per client (at most `max_queue_depth` entries)."""
        return dict(self._held)


class Deadlines:
    """Held tickets by deadline, the earliest first (tickets resolved meanwhile are skipped)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Ticket]] = []

    def add(self, ticket: Ticket) -> None:
        heapq.heappush(self._heap, (ticket.deadline, ticket.id, ticket))

    def earliest(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def expired(self, now: float) -> Iterator[Ticket]:
        """The held tickets whose deadline has come, taken off."""
        heap = self._heap
        while heap and (heap[0][0] <= now or not heap[0][2].held):
            ticket = heapq.heappop(heap)[2]
            if ticket.held:
                yield ticket


class Pauses:
    """Keys that release nothing until a moment (a cooldown after an upstream 429)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def pause(self, key: str, until: float) -> None:
        self._until[key] = max(until, self._until.get(key, until))

    def until(self, key: str, now: float) -> float | None:
        """When `key`'s pause ends, or None if it is not paused."""
        until = self._until.get(key)
        if until is not None and until <= now:
            del self._until[key]
            return None
        return until


class Scheduler:
    def __init__(
        self,
        limiter: LimiterBackend,
        limits: CerebrasLimits,
        breaker: CircuitBreaker,
        rates_for: Callable[[str], Sequence[Rate]],
        on_resolved: Callable[[Ticket], None] = lambda ticket: None,
    ) -> None:
        self.limiter = limiter
        self.limits = limits
        self.breaker = breaker
        self.rates_for = rates_for
        self.on_resolved = on_resolved
        self._queues: dict[str, KeyQueue] = {}
        self._deadlines = Deadlines()
        self._ids = itertools.count(1)
        self._depth = 0
        self.shares = ClientShares()
        self._last_wait: dict[str, float] = {}
        # Per key with requests held, as of the last pump: what its head waits for (a rate's
        # name, UPSTREAM_429, PROBE, BREAKER_PROBE) and when it may go (None: unknown).
        self.waiting: dict[str, tuple[str | None, float | None]] = {}
        self.pauses = Pauses()
        self.probes = ProbeFirst()
        self.accounts = Accounts(limiter, breaker, self.probes, self.invalidate)
        # After release a ticket's account is the accounts' business (accounts.py).
        self.confirm, self.finish = self.accounts.confirm, self.accounts.finish
        self.abort = self.accounts.abort
        # Bumped whenever capacity may have come back or limits changed (see KeyQueue.refused);
        # only through invalidate(), so no change can forget it.
        self._generation = 0

    def invalidate(self) -> None:
        """Forget every cached refusal: capacity may have come back, a limit or an estimate
        changed. Whoever changes what a refusal was computed from calls this."""
        self._generation += 1

    # -- queries -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests currently held."""
        return self._depth

    def held_tickets(self) -> Iterator[Ticket]:
        return itertools.chain.from_iterable(q.tickets() for q in self._queues.values())

    # -- transitions ---------------------------------------------------------------------------

    def _resolve(
        self, ticket: Ticket, outcome: Outcome, now: float, retry_after: float = 0.0
    ) -> None:
        """Take a held ticket out of the queue with its outcome."""
        if ticket.outcome is not None:
            return
        self._queues[ticket.key].left(ticket, outcome is Outcome.RELEASED)
        self._depth -= 1
        self.shares.remove(ticket.client)
        self._finalize(ticket, outcome, now, retry_after)

    def _finalize(self, ticket: Ticket, outcome: Outcome, now: float, retry_after: float) -> None:
        ticket.outcome = outcome
        ticket.resolved_at = now
        ticket.retry_after = retry_after
        self.on_resolved(ticket)

    def submit(
        self,
        key: str,
        tokens: int,
        now: float,
        requeue: bool = False,
        client: str | None = None,
        policy: Policy = NORMAL,
        need: Need | None = None,
        total: int | None = None,
        waited: float = 0.0,
    ) -> Ticket:
        """Queue a request, or refuse it at once (too large, queue or client's share full,
        breaker open). `requeue`: a retry, never refused for room, waiting at most what its
        earlier attempts (`waited`) left of request_timeout. `need`, `total`: see Gate.submit."""
        deadline = now + self.limits.request_timeout - waited
        ticket = Ticket(next(self._ids), key, max(int(tokens), 1), now, deadline, client=client)
        ticket.total, ticket.policy = None if total is None else max(int(total), 1), policy
        if need is not None:  # first: waiting, retrying or a closed breaker change nothing
            ticket.too_large = too_large_for(self.limiter, key, self.rates_for(key), need)
            if ticket.too_large is not None:
                self._finalize(ticket, Outcome.TOO_LARGE, now, 0.0)
                return ticket
        if self.breaker.state(now) is BreakerState.OPEN:
            self._finalize(ticket, Outcome.BREAKER_OPEN, now, self.breaker.retry_after(now))
            return ticket
        if self._depth >= self.limits.max_queue_depth and not requeue:
            self._finalize(ticket, Outcome.QUEUE_FULL, now, self.retry_hint(key))
            log.debug("queue full (%d held): refusing ticket %d", self._depth, ticket.id)
            return ticket
        if client is not None and not requeue and self.shares.full(client, self.limits):
            self._finalize(ticket, Outcome.CLIENT_QUEUE_FULL, now, self.retry_hint(key))
            return ticket
        queue = self._queues.get(key)
        if (queue is None or queue.live == 0) and self._release_at_once(key, ticket, now):
            return ticket
        queue = self._queues[key] = queue or KeyQueue()
        queue.push(ticket, self.limits.priority_aging, self.rates_for(key))
        ticket.queued = True
        self._deadlines.add(ticket)
        self._depth += 1
        self.shares.add(client)
        return ticket

    def _release_at_once(self, key: str, ticket: Ticket, now: float) -> bool:
        """Nothing of `key` waits: release `ticket` now if everything allows it.

        The same decision a pump would make for a lone head (no pause, no probe out, breaker
        closed, the limiter grants), without the queue, deadline and timer work: the path of
        most requests when capacity is not tight.
        """
        if self.pauses.until(key, now) is not None or self.probes.wait(key, now) is not None:
            return False
        if self.breaker.state(now) is not BreakerState.CLOSED:
            return False
        rates = self.rates_for(key)
        decision = self._acquire(key, rates, ticket, now)
        if decision.unavailable:
            self._finalize(ticket, Outcome.LIMITS_UNAVAILABLE, now, decision.wait)
            return True
        if not decision.granted:
            return False
        ticket.reservation = decision.reservation
        if self.limits.probe_first:
            self.probes.maybe_start(key, rates, ticket, now, self.limits.probe_timeout)
        self._finalize(ticket, Outcome.RELEASED, now, 0.0)
        return True

    def cancel(self, ticket: Ticket, now: float) -> bool:
        """The client left or the flow was killed while held: leave the queue, take nothing."""
        if not ticket.held:
            return False
        self._resolve(ticket, Outcome.CANCELLED, now)
        return True

    def pump(self, now: float) -> float | None:
        """Release every held request that may go now; return when to pump next (or None)."""
        self._expire(now)
        if self.breaker.state(now) is BreakerState.OPEN:
            for ticket in list(self.held_tickets()):
                self._resolve(ticket, Outcome.BREAKER_OPEN, now, self.breaker.retry_after(now))
            return None
        next_at = self._deadlines.earliest()
        for key, queue in list(self._queues.items()):
            wake, reason = self._release_from(key, queue, now)
            if wake is not None:
                next_at = wake if next_at is None else min(next_at, wake)
            self.waiting[key] = (reason, wake)
            if queue.live == 0:
                del self._queues[key], self.waiting[key]
                self.limiter.withdraw(key, now)
        return next_at

    def _release_from(
        self, key: str, queue: KeyQueue, now: float
    ) -> tuple[float | None, str | None]:
        """Release what may go of `key`; then what its head waits for, and until when."""
        paused = self.pauses.until(key, now)
        if paused is not None:
            return paused, UPSTREAM_429
        rates = self.rates_for(key)
        # Once tight, tight for this pump (releasing only adds); one waiting: order is moot.
        tight = False
        while True:
            if not tight and queue.live > 1:
                tight = is_tight(self.limiter, key, rates, self.limits.priority_threshold, now)
            ticket = queue.head(tight)
            if ticket is None:
                self._last_wait.pop(key, None)
                return None, None
            probe_until = self.probes.wait(key, now)
            if probe_until is not None:
                return probe_until, PROBE
            half_open = self.breaker.state(now) is BreakerState.HALF_OPEN
            if half_open and self.breaker.probe_in_flight():
                return None, BREAKER_PROBE  # its answer's finish() pumps again
            refused = queue.refused
            if (
                refused is not None
                and refused[0] == ticket.id
                and refused[1] == self._generation
                and now < refused[2]
            ):
                head_until = refused[2]
            else:
                decision = self._acquire(key, rates, ticket, now)
                if decision.granted:
                    self._release(ticket, decision.reservation, key, rates, half_open, now)
                    continue
                if decision.unavailable:
                    self._resolve(ticket, Outcome.LIMITS_UNAVAILABLE, now, decision.wait)
                    continue
                ticket.wait_reason = decision.binding
                self._last_wait[key] = decision.wait
                head_until = now + decision.wait
                queue.refused = (ticket.id, self._generation, head_until)
            if tight and not half_open and self._backfill(key, queue, ticket, rates, now):
                continue
            return head_until, ticket.wait_reason

    def _backfill(
        self, key: str, queue: KeyQueue, head: Ticket, rates: Sequence[Rate], now: float
    ) -> bool:
        """Let the oldest small request past a waiting head that is not small, within budget."""
        if head.tokens < SMALL_REQUEST_TOKENS:
            return False
        small = queue.backfill_candidate(head)
        if small is None or head.backfilled + small.tokens > BACKFILL_SHARE * head.tokens:
            return False
        decision = self._acquire(key, rates, small, now)
        if not decision.granted:
            return False
        head.backfilled += small.tokens
        self._release(small, decision.reservation, key, rates, False, now)
        return True

    def _acquire(self, key: str, rates: Sequence[Rate], ticket: Ticket, now: float) -> Decision:
        waited, ticket_class = now - ticket.enqueued_at, ticket.policy.priority  # its place
        return self.limiter.try_acquire(
            key, rates, ticket.tokens, now, ticket.total, waited, ticket_class
        )

    def _release(
        self,
        ticket: Ticket,
        reservation: Reservation | None,
        key: str,
        rates: Sequence[Rate],
        half_open: bool,
        now: float,
    ) -> None:
        if half_open:
            self.breaker.try_start_probe(now)
            ticket.probe = True
        ticket.reservation = reservation
        ticket.wait_reason = None
        if self.limits.probe_first:
            self.probes.maybe_start(key, rates, ticket, now, self.limits.probe_timeout)
        self._resolve(ticket, Outcome.RELEASED, now)

    def _expire(self, now: float) -> None:
        for ticket in self._deadlines.expired(now):
            self._resolve(ticket, Outcome.TIMEOUT, now, self.retry_hint(ticket.key))

    def shutdown(self, now: float) -> list[Ticket]:
        """Resolve every held request (the proxy is stopping)."""
        tickets = list(self.held_tickets())
        for ticket in tickets:
            self._resolve(ticket, Outcome.SHUTDOWN, now, 5.0)
        return tickets

    def retry_hint(self, key: str) -> float:
        return max(1.0, math.ceil(self._last_wait.get(key, 1.0)))
