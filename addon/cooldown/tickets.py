"""A request's ticket through the scheduler, and what became of it.

Size classes: under SMALL_REQUEST_TOKENS estimated tokens a request is small (priority 2.0,
and may be let past a waiting large one), over LARGE_REQUEST_TOKENS large (priority 0.5).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .config import Config
from .estimate import TooLarge
from .limiter import Reservation

SMALL_REQUEST_TOKENS = 1_000
LARGE_REQUEST_TOKENS = 5_000


class Outcome(enum.Enum):
    RELEASED = "released"  # forwarded upstream; holds a reservation
    QUEUE_FULL = "queue_full"
    CLIENT_QUEUE_FULL = "client_queue_full"  # this client holds its whole share of the queue
    TIMEOUT = "timeout"
    BREAKER_OPEN = "breaker_open"
    CANCELLED = "cancelled"  # the client went away or the flow was killed
    SHUTDOWN = "shutdown"
    TOO_LARGE = "too_large"  # no limit could ever hold it (see estimate.too_large)
    # The shared limits could not be consulted (Redis unreachable, `on_error: reject`).
    LIMITS_UNAVAILABLE = "limits_unavailable"


# Priority classes, by the names X-Cooldown-Priority and `clients:` use.
PRIORITIES = {"high": 1, "normal": 0, "low": -1}


@dataclass(frozen=True)
class Policy:
    """Where a request stands: its priority class, and its client's weight within it."""

    priority: int = 0  # PRIORITIES: X-Cooldown-Priority, else the client's default
    weight: float = 1.0  # the client's weight in the fair share of its class (queues.py)


NORMAL = Policy()


def policy_of(config: Config, client: str | None, asked: str | None) -> Policy:
    """A request's policy: the class it asked for (X-Cooldown-Priority; an unknown value
    counts as not asking), else its client's default; its client's weight."""
    own = config.clients.get(client) if client is not None else None
    priority = PRIORITIES.get(asked.strip().lower()) if asked is not None else None
    if own is None:
        return NORMAL if priority is None else Policy(priority)
    if priority is None:
        priority = PRIORITIES[own.priority]
    return Policy(priority, own.weight)


def base_priority(tokens: int) -> float:
    if tokens < SMALL_REQUEST_TOKENS:
        return 2.0
    if tokens > LARGE_REQUEST_TOKENS:
        return 0.5
    return 1.0


@dataclass(eq=False)
class Ticket:
    """One request from the moment it asks to go upstream until its answer is accounted."""

    id: int
    key: str
    tokens: int
    enqueued_at: float
    deadline: float
    outcome: Outcome | None = None
    resolved_at: float | None = None
    retry_after: float = 0.0  # for refusals: when trying again makes sense
    reservation: Reservation | None = None
    probe: bool = False  # the single request a half-open breaker let through
    finished: bool = False  # settled or released after release
    wait_reason: str | None = field(default=None)  # which limit it is waiting for, if any
    backfilled: int = 0  # tokens of small requests let past it while it waited at the head
    client: str | None = None  # who asked (an API-key fingerprint or an address), for its share
    policy: Policy = NORMAL  # its priority class and its client's weight
    cost: float = 1.0  # its share of the tightest per-minute limit (queues.cost_of)
    too_large: TooLarge | None = None  # for TOO_LARGE: the limit it can never fit
    queued: bool = False  # it waited in a queue (not released or refused at once)
    # Tokens for the `total_tokens` limit when they differ from `tokens` (the uncached ones,
    # with the prompt cache modelled); None: the same.
    total: int | None = None

    @property
    def held(self) -> bool:
        return self.outcome is None

    @property
    def waited(self) -> float:
        return (
            self.resolved_at if self.resolved_at is not None else self.enqueued_at
        ) - self.enqueued_at
