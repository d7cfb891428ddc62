"""Every error answer and every flow comment the proxy makes itself, built one way.

Each answer is OpenAI-style JSON (`{"error": {"message", "type", "code"}}`) that clients
already parse, says in its message that the proxy answered and not Cerebras, and carries
`X-Cooldown-Refused: <code>` so that scripts and mitmweb users can tell it from upstream's;
its reason phrase ends in `[Cooldown: <code>]`, which is what mitmdump's flow line prints
(for HTTP/1; HTTP/2 has no reason phrase on the wire, mitmdump prints the standard one).

Comments are whole sentences that begin with `Cooldown: ` and carry a text marker in
capitals (HELD, REFUSED): mitmweb turns any `marked` value into an emoji that renders as an
empty box without an emoji font, so flows are not marked.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

from mitmproxy import http

from .estimate import Estimate, TooLarge
from .periods import describe
from .runtime import CacheGuess
from .tickets import PRIORITIES, Outcome, Ticket, base_priority

log = logging.getLogger(__name__)

PROXY_NAME = "Cooldown proxy"


@dataclass(frozen=True)
class ProxyError:
    status: int
    type: str
    code: str
    message: str

    def response(
        self, retry_after: float = 0.0, detail: str = "", upstream: str = "Cerebras"
    ) -> http.Response:
        message = f"{self.message}{detail} (answered by the {PROXY_NAME}, not by {upstream})"
        body = {"error": {"message": message, "type": self.type, "code": self.code}}
        headers = {"Content-Type": "application/json", "X-Cooldown-Refused": self.code}
        if retry_after > 0:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        response = http.Response.make(self.status, json.dumps(body).encode(), headers)
        response.reason = f"{response.reason} [Cooldown: {self.code}]"
        return response


REFUSALS = {
    Outcome.QUEUE_FULL: ProxyError(
        429,
        "cooldown_queue_full",
        "queue_full",
        "The Cooldown proxy is already holding its maximum number of requests "
        "(max_queue_depth); retry later.",
    ),
    Outcome.CLIENT_QUEUE_FULL: ProxyError(
        429,
        "cooldown_client_queue_full",
        "client_queue_full",
        "This client (API key, else address) already has its whole share of the Cooldown "
        "proxy's queue waiting (max_queue_share_per_client); retry later.",
    ),
    Outcome.TIMEOUT: ProxyError(
        429,
        "cooldown_queue_timeout",
        "queue_timeout",
        "The request waited in the Cooldown proxy's queue longer than request_timeout "
        "without fitting the rate limits; retry later.",
    ),
    Outcome.BREAKER_OPEN: ProxyError(
        503,
        "cooldown_circuit_open",
        "circuit_open",
        "Cerebras answered 429 repeatedly, so the Cooldown proxy is pausing requests "
        "(circuit breaker open); retry after the indicated time.",
    ),
    Outcome.LIMITS_UNAVAILABLE: ProxyError(
        503,
        "cooldown_limits_unavailable",
        "shared_limits_unavailable",
        "The Cooldown proxy cannot reach the limits it shares with other proxies (Redis) and "
        "is set to refuse rather than guess (shared_limits.on_error: reject); retry after the "
        "indicated time.",
    ),
    Outcome.SHUTDOWN: ProxyError(
        503,
        "cooldown_shutdown",
        "proxy_shutting_down",
        "The Cooldown proxy is shutting down; retry shortly.",
    ),
}

PACED_TOO_LONG = ProxyError(
    429,
    "cooldown_pacing_timeout",
    "pacing_timeout",
    "Requests to this host are paced by the Cooldown proxy (rate_limits), and this one's "
    "turn is further away than request_timeout; retry later.",
)

# A request that can never fit. Not a 429: clients and SDKs retry a 429 (the openai SDK does,
# with back-off), and no retry can ever succeed. Longer than the context is what upstream (and
# OpenAI) answer themselves, 400 `context_length_exceeded`, which agents handle by trimming
# the conversation; larger than a token limit is 413 Content Too Large, which SDKs do not
# retry either.
CONTEXT_EXCEEDED = ProxyError(
    400,
    "invalid_request_error",
    "context_length_exceeded",
    "This request can never be admitted: ",
)
TOO_LARGE = ProxyError(
    413,
    "cooldown_request_too_large",
    "request_too_large",
    "This request can never be admitted: ",
)

RETRY_FAILED = ProxyError(
    502, "cooldown_retry_failed", "retry_failed", "Retry after upstream 429 failed"
)


def refusal(outcome: Outcome, retry_after: float) -> http.Response:
    """The answer to a request the proxy will not forward."""
    return REFUSALS[outcome].response(retry_after)


def too_large(verdict: TooLarge, key: str) -> http.Response:
    """The answer to a request no limit of `key` could ever hold, with the numbers."""
    if verdict.limit == "context_length":
        output = verdict.needed - verdict.input_tokens
        return CONTEXT_EXCEEDED.response(
            detail=f"it asks for {verdict.needed:,} tokens ({verdict.input_tokens:,} of input, "
            f"{output:,} of output), more than the context length of {key} "
            f"({verdict.allowed:,}, context_length in the config); lower "
            "max_completion_tokens or shorten the input"
        )
    return TOO_LARGE.response(
        detail=f"it needs at least {verdict.needed:,} tokens (input and the output it asks "
        f"for), more than the whole {describe(verdict.limit)} limit of {key} "
        f"({verdict.limit}_limit: {verdict.allowed:,}); lower max_completion_tokens or "
        "shorten the input"
    )


def retry_failed(reason: str) -> http.Response:
    """The answer to a request whose retry after an upstream 429 got no answer."""
    return RETRY_FAILED.response(detail=f": {reason}")


def refuse_paced(f: http.HTTPFlow, reason: str, retry_after: float) -> None:
    """Answer a paced request (another host) that gets no turn: queue full, or too far off."""
    error = REFUSALS[Outcome.QUEUE_FULL] if reason == "queue_full" else PACED_TOO_LONG
    f.metadata["cooldown_refused"] = error.code
    f.comment = f"Cooldown: paced, refused ({error.code})"
    f.marked = ":no_entry:"
    f.response = error.response(retry_after, upstream=f.request.pretty_host)


def label(f: http.HTTPFlow) -> str:
    """How Cooldown's comment on a flow begins; a retry's copy names the flow it retries."""
    retry_of = f.metadata.get("cooldown_retry_of")
    if retry_of is None:
        return "Cooldown: "
    return f"Cooldown: retry of flow {retry_of} (attempt {f.metadata.get('cooldown_attempt')}), "


def refuse(
    f: http.HTTPFlow,
    outcome: Outcome,
    retry_after: float,
    verdict: TooLarge | None = None,
    key: str = "this model",
) -> None:
    """Answer `f` with the proxy's refusal, said so in its comment; `verdict` for one that
    can never fit (`Outcome.TOO_LARGE`) puts the limit of `key` and the numbers in it."""
    f.metadata["cooldown_refused"] = outcome.value
    f.comment = f"{label(f)}REFUSED ({outcome.value}) by the proxy, not sent to Cerebras"
    if verdict is not None:
        f.comment += f": needs {verdict.needed} tokens, {verdict.limit} is {verdict.allowed}"
        f.response = too_large(verdict, key)
    else:
        f.response = refusal(outcome, retry_after)


def held_comment(
    f: http.HTTPFlow, ticket: Ticket, estimate: Estimate, depth: int, guess: CacheGuess | None
) -> str:
    """What mitmweb shows on a held flow: what it waits for and why it is where it is."""
    reason = describe(ticket.wait_reason) if ticket.wait_reason else "its turn"
    return (
        f"{label(f)}HELD for {ticket.key} (#{depth} in queue), waiting for {reason}; "
        f"estimate {estimate.total} tokens "
        f"({estimate.input_tokens} in + {estimate.output_tokens} out){cached_note(guess)}, "
        f"priority {base_priority(estimate.total):g}{_class_of(ticket)}"
    )


_CLASS_NAMES = {value: name for name, value in PRIORITIES.items()}


def _class_of(ticket: Ticket) -> str:
    """The priority class, when it is not the default (X-Cooldown-Priority, clients:)."""
    priority = ticket.policy.priority
    return "" if priority == 0 else f", class {_CLASS_NAMES.get(priority, priority)}"


def resumed_comment(held: str) -> str:
    """A held flow's comment after someone resumed it by hand (mitmweb's Resume): it stays
    paused, and says so rather than leaving the user to wonder."""
    note = "; resumed by hand, still HELD: the rate limits decide when it goes"
    return held if held.endswith(note) else f"{held}{note}"


def released_comment(f: http.HTTPFlow, ticket: Ticket, guess: CacheGuess | None = None) -> str:
    """A forwarded flow's comment, whether it waited or not, with the prompt cache model's
    prediction (the answer's usage is added by `with_actual`)."""
    how = f"waited {ticket.waited:.3f}s" if ticket.queued else "forwarded at once"
    return f"{label(f)}{how}, estimate {ticket.tokens} tokens{cached_note(guess)}"


def with_actual(comment: str, total: int) -> str:
    """The comment once upstream has said what the request used."""
    return f"{comment}, actual {total} tokens"


def cached_note(guess: CacheGuess | None) -> str:
    """The prompt cache model's prediction, for a comment ("" when cache-blind)."""
    return "" if guess is None else f", {guess.prediction.cached} cached (predicted)"


class QueueFullLog:
    """Says that the queue (or a client's share of it) is full at most once per interval: a
    flood of refusals must not flood the log too."""

    INTERVAL = 10.0

    def __init__(self) -> None:
        self._logged_at = -math.inf

    def refused(self, outcome: Outcome, depth: int) -> None:
        if outcome is not Outcome.QUEUE_FULL and outcome is not Outcome.CLIENT_QUEUE_FULL:
            return
        now = time.monotonic()
        if now - self._logged_at < self.INTERVAL:
            return
        self._logged_at = now
        whose = "queue" if outcome is Outcome.QUEUE_FULL else "a client's share of the queue"
        log.info("%s full (%d held): refusing new requests with 429", whose, depth)
