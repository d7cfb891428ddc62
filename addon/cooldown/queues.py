"""The held requests of one limiter key, and the order they leave in.

Three levels, each with one rule:

1. **Priority class** (`X-Cooldown-Priority`, or the client's default from `clients:`): a
   class's head goes before another class's head when its key is lower, the key being the
   size rule's `enqueued_at / priority_aging - base_priority` (without `base_priority` while
   capacity is not tight) minus `CLASS_STEP` per class above normal. `CLASS_STEP` is larger
   than the size rule's whole spread (2.0 - 0.5), so any high request goes before any normal
   one of the same age, whatever their sizes; and since a waiting request's key never grows
   while fresh ones arrive with later `enqueued_at`, a low request goes ahead of every high
   request submitted more than `2 * CLASS_STEP * priority_aging` (+ the size spread) after
   it: aging still prevents starvation.
2. **Client, within a class**: start-time fair queuing (Goyal, Vin and Cheng, 1996). A client
   that starts waiting gets the start tag `S = max(V, F)`, where `V` is the start tag of the
   last request released from the class and `F` the client's own finish tag; releasing one
   of its requests sets `F = S + cost / weight` and, if it has more waiting, its next tag to
   `max(V, F)`. The client with the lowest tag goes next. `cost` is the request's share of
   the tightest per-minute limit (`max(1 / rpm, tokens / tpm)`), so shares are fair in
   whatever binds. See docs ("Fair share") for the bound this gives.
3. **Within one client**: the existing rule (scheduler.py): arrival order while capacity is
   not tight, the size rule with aging when it is. Backfill (a small request past a large
   head that does not fit, within a budget) still takes the oldest small one of any client.

Every step is a heap operation or a dict lookup: O(log n) per decision, with at most three
classes to compare. With one class and one client (the common case) the client heap holds one
entry and each release is a single `heapreplace`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator, Sequence

from .limiter import Rate
from .tickets import SMALL_REQUEST_TOKENS, Ticket, base_priority

CLASS_STEP = 4.0  # priority units between classes (the size rule spans 1.5)


def cost_of(tokens: int, rates: Sequence[Rate]) -> float:
    """A request's share of the tightest per-minute limit: its weight in the fair share."""
    shares = [
        (1.0 if rate.unit == "requests" else tokens) / rate.limit
        for rate in rates
        if rate.period <= 60.0 and rate.limit > 0
    ]
    return max(shares, default=1.0)


class _ClientQueue:
    """One client's held tickets in one class, in both FIFO and priority order."""

    def __init__(self) -> None:
        self.fifo: deque[Ticket] = deque()
        self.by_priority: list[tuple[float, int, Ticket]] = []
        self.live = 0

    def push(self, ticket: Ticket, aging: float) -> None:
        self.fifo.append(ticket)
        key = ticket.enqueued_at / aging - base_priority(ticket.tokens)
        heapq.heappush(self.by_priority, (key, ticket.id, ticket))
        self.live += 1

    def head(self, tight: bool) -> Ticket | None:
        if tight:
            while self.by_priority and not self.by_priority[0][2].held:
                heapq.heappop(self.by_priority)
            return self.by_priority[0][2] if self.by_priority else None
        while self.fifo and not self.fifo[0].held:
            self.fifo.popleft()
        return self.fifo[0] if self.fifo else None

    def compact(self) -> None:
        """Drop resolved tickets once they outnumber live ones, so memory tracks the queue."""
        if len(self.fifo) > 2 * self.live + 64:
            self.fifo = deque(t for t in self.fifo if t.held)
            self.by_priority = [e for e in self.by_priority if e[2].held]
            heapq.heapify(self.by_priority)


class _ClassQueue:
    """One priority class: its clients, served by start-time fair queuing."""

    def __init__(self) -> None:
        self.clients: dict[str | None, _ClientQueue] = {}
        # (start tag, entry id, client) of every client with held tickets; an entry is
        # current only while `self.entry[client]` is its id (older ones are skipped lazily).
        self.order: list[tuple[float, int, str | None]] = []
        self.entry: dict[str | None, int] = {}
        self.tag: dict[str | None, float] = {}
        self.finish: dict[str | None, float] = {}
        self.virtual = 0.0
        self.live = 0
        self._ids = itertools.count()

    def push(self, ticket: Ticket, aging: float) -> None:
        client = ticket.client
        queue = self.clients.get(client)
        if queue is None:
            queue = self.clients[client] = _ClientQueue()
        if client not in self.entry:  # it starts waiting: its place among the clients
            self._enter(client, max(self.virtual, self.finish.get(client, 0.0)))
        queue.push(ticket, aging)
        self.live += 1

    def _enter(self, client: str | None, tag: float) -> None:
        entry = next(self._ids)
        self.entry[client] = entry
        self.tag[client] = tag
        if self.order and self.entry.get(self.order[0][2]) != self.order[0][1]:
            heapq.heapreplace(self.order, (tag, entry, client))  # reuse a stale top
        else:
            heapq.heappush(self.order, (tag, entry, client))

    def head(self, tight: bool) -> Ticket | None:
        order = self.order
        while order:
            _, entry, client = order[0]
            if self.entry.get(client) == entry:
                ticket = self.clients[client].head(tight)
                if ticket is not None:
                    return ticket
            heapq.heappop(order)
        return None

    def left(self, ticket: Ticket, released: bool) -> None:
        """`ticket` left the queue; a release moves its client's tags on."""
        client = ticket.client
        queue = self.clients[client]
        queue.live -= 1
        self.live -= 1
        if released and client in self.tag:
            start = self.tag[client]
            self.virtual = max(self.virtual, start)
            self.finish[client] = start + ticket.cost / ticket.policy.weight
        if queue.live == 0:
            del self.clients[client]
            self.entry.pop(client, None)
            self.tag.pop(client, None)
        else:
            queue.compact()
            if released:
                tag = max(self.virtual, self.finish[client])
                self.entry.pop(client, None)  # its current entry is stale from now on
                self._enter(client, tag)

    def tickets(self) -> Iterator[Ticket]:
        for queue in self.clients.values():
            yield from (t for t in queue.fifo if t.held)


class KeyQueue:
    """The held tickets of one limiter key, by priority class."""

    def __init__(self) -> None:
        self.aging = 1.0  # priority_aging, set by every push
        self.classes: dict[int, _ClassQueue] = {}
        # Small ones in arrival order, whatever their class and client, for backfill: a small
        # request that fits may pass a waiting large head within the scheduler's budget.
        self.smalls: deque[Ticket] = deque()
        self.live = 0
        # The last refusal of the head: (ticket id, limiter generation, until when). While the
        # same head waits, nothing freed capacity and that moment has not come, asking the
        # limiter again can only say no again.
        self.refused: tuple[int, int, float] | None = None

    def push(self, ticket: Ticket, aging: float, rates: Sequence[Rate]) -> None:
        self.aging = aging
        ticket.cost = cost_of(ticket.tokens, rates)
        queue = self.classes.get(ticket.policy.priority)
        if queue is None:
            queue = self.classes[ticket.policy.priority] = _ClassQueue()
        queue.push(ticket, aging)
        if ticket.tokens < SMALL_REQUEST_TOKENS:
            self.smalls.append(ticket)
        self.live += 1

    def head(self, tight: bool) -> Ticket | None:
        if len(self.classes) == 1:
            (queue,) = self.classes.values()
            return queue.head(tight)
        best: Ticket | None = None
        best_key = 0.0
        for queue in self.classes.values():
            ticket = queue.head(tight)
            if ticket is None:
                continue
            key = ticket.enqueued_at / self.aging - CLASS_STEP * ticket.policy.priority
            if tight:
                key -= base_priority(ticket.tokens)
            if best is None or (key, ticket.id) < (best_key, best.id):
                best, best_key = ticket, key
        return best

    def backfill_candidate(self, head: Ticket) -> Ticket | None:
        """The oldest small request held behind `head`."""
        while self.smalls and not self.smalls[0].held:
            self.smalls.popleft()
        for ticket in itertools.islice(self.smalls, 2):
            if ticket is not head and ticket.held:
                return ticket
        return None

    def left(self, ticket: Ticket, released: bool) -> None:
        queue = self.classes[ticket.policy.priority]
        queue.left(ticket, released)
        self.live -= 1
        if queue.live == 0:
            del self.classes[ticket.policy.priority]
        if len(self.smalls) > 2 * self.live + 64:
            self.smalls = deque(t for t in self.smalls if t.held)

    def tickets(self) -> Iterator[Ticket]:
        for queue in self.classes.values():
            yield from queue.tickets()
