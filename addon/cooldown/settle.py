"""Settling a metered flow's reservation from upstream's answer, and learning from it.

What upstream charged is its `usage` (from the JSON body, or from the stream as it passed);
what it gives back is the output it reserved and did not use; an upstream 429 pauses the
model. Called by the metering addon; no hooks here.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from . import answers
from .flows import FlowTable, MeteredFlow, Phase
from .gate import Gate
from .periods import RATE_NAMES, TOTAL_TPM
from .runtime import Runtime
from .tickets import Ticket
from .upstream import AnswerHead, SSEUsageTap, Upstream429, parse_retry_after, usage_from_json

log = logging.getLogger(__name__)


def answer_began(
    runtime: Runtime, metered: MeteredFlow, response: http.Response, head: AnswerHead
) -> None:
    """Upstream has begun answering, so it has counted the request by now: its reservation
    ages from here (a 429's comes back) and the answer's report (`head`, read from
    `response`) re-syncs the limits; upstream holds the prompt; the client gets the proxy's
    view in the headers. A stream is here at its headers, since its report is sent at once; a
    whole answer at its end, with its body (a shared limiter then sends the report with the
    settle)."""
    assert metered.ticket is not None
    metered.answered = True
    runtime.gate.confirm(metered.ticket, response.status_code, head.reports(), not head.stream)
    if response.status_code == 200:
        runtime.processed(metered.cache)
    add_proxy_headers(runtime.gate, response, metered, head)


def add_proxy_headers(
    gate: Gate, response: http.Response, metered: MeteredFlow, head: AnswerHead
) -> None:
    """The proxy's own view, beside upstream's x-ratelimit-* (which pass unchanged)."""
    assert metered.ticket is not None and metered.estimate is not None
    added: list[tuple[bytes, bytes]] = []
    for rate, (limit, remaining) in gate.rate_view(metered.key).items():
        limit_name, remaining_name = _RATE_HEADERS[rate]
        added.append((limit_name, b"%d" % limit))
        added.append((remaining_name, b"%d" % remaining))
    added.append((b"X-Cooldown-Wait", b"%.3f" % metered.ticket.waited))
    added.append((b"X-Cooldown-Estimated-Tokens", b"%d" % metered.estimate.total))
    if metered.shape.clamped is not None:  # the client should know why its answer is short
        added.append((b"X-Cooldown-Clamped", metered.shape.clamped.encode()))
    if metered.cache is not None:
        added.append((b"X-Cooldown-Cached-Tokens", b"%d" % metered.cache.prediction.cached))
    fields = response.headers.fields
    if head.has_ours:
        # Upstream's own X-RateLimit-* names differ from ours, so a client-visible clash is
        # rare: only then are the answer's fields filtered.
        fields = tuple(field for field in fields if field[0].lower() not in OURS)
    response.headers.fields = fields + tuple(added)


# Our header names per limit ("tpm" -> X-RateLimit-Limit-TPM, X-RateLimit-Remaining-TPM;
# "total_tpm" -> X-RateLimit-Limit-Total-TPM).
_RATE_HEADERS = {
    name: (
        f"X-RateLimit-Limit-{name.upper()}".encode(),
        f"X-RateLimit-Remaining-{name.upper()}".encode(),
    )
    for name in RATE_NAMES
} | {TOTAL_TPM: (b"X-RateLimit-Limit-Total-TPM", b"X-RateLimit-Remaining-Total-TPM")}
OURS = frozenset(
    [
        b"x-cooldown-wait",
        b"x-cooldown-estimated-tokens",
        b"x-cooldown-clamped",
        b"x-cooldown-cached-tokens",
    ]
    + [header.lower() for pair in _RATE_HEADERS.values() for header in pair]
)


def usage_of(
    metered: MeteredFlow, response: http.Response, head: AnswerHead
) -> dict[str, int] | None:
    """What upstream says the request used (None: it did not say); `head`: the answer's."""
    if metered.tap is not None:
        return metered.tap.usage
    if response.raw_content is None:
        return None
    content = response.get_content(strict=False) if head.encoded else response.raw_content
    if head.stream:
        tap = SSEUsageTap()  # a stream that was buffered (a retry's copy)
        tap(content or b"")
        tap(b"")
        return tap.usage
    return usage_from_json(content)


def refund(metered: MeteredFlow, usage: dict[str, int] | None) -> int | None:
    """What upstream gives back of the reservation after its own report: the output it
    reserved and did not use.

    Our input estimate may differ from upstream's count, and that difference is not
    refunded, so only the output part is (None: unknown, the limiter assumes all unused).
    A whole (not streamed) answer's headers are written when it is complete, so its own
    report may already show the refund: crediting it again would count it twice, and the
    next report shows it anyway.
    """
    if metered.tap is None:
        return 0
    if not usage or "completion_tokens" not in usage or not metered.shape.understood:
        return None
    assert metered.estimate is not None
    return max(metered.estimate.output_tokens - usage["completion_tokens"], 0)


def account(
    runtime: Runtime, metered: MeteredFlow, response: http.Response, head: AnswerHead
) -> bool:
    """Settle the last attempt's reservation, learn from it, and note it on the flow.

    True when the input calibration changed (held requests of the model may be re-sized).
    """
    assert metered.ticket is not None and metered.estimate is not None
    f, key = metered.flow, metered.key
    usage = usage_of(metered, response, head)
    total = usage.get("total_tokens") if usage else None
    charge = runtime.charge(
        key, metered.cache if response.status_code == 200 else None, usage, refund(metered, usage)
    )
    runtime.gate.finish(
        metered.ticket, response.status_code, charge.uncached, charge.refund, charge.total
    )
    learnt = False
    if usage and "prompt_tokens" in usage and metered.shape.understood:
        calibration = runtime.calibration
        before = calibration.factor(key)
        calibration.observe(key, metered.shape.input_tokens, usage["prompt_tokens"])
        learnt = calibration.factor(key) != before
    if total is not None:
        runtime.metrics.estimate_vs_actual(key, metered.estimate.total, total)
        f.metadata["cooldown_actual_tokens"] = total
        f.comment = answers.with_actual(f.comment, total)
        if charge.total is not None and usage is not None:
            runtime.metrics.cached_input(key, usage.get("prompt_tokens", 0), charge.cached)
            f.metadata["cooldown_cached_tokens"] = charge.cached
            f.comment = f"{f.comment} ({charge.cached} cached)"
    if response.status_code == 429:
        log.info("upstream answered 429 for flow %s (%s); no retries left", f.id, key)
    return learnt


def settle_error(runtime: Runtime, metered: MeteredFlow) -> None:
    """A released flow failed (connection error, killed, stream broken)."""
    assert metered.ticket is not None
    gate = runtime.gate
    usage = metered.tap.usage if metered.tap is not None else None
    if usage is not None:
        # The stream broke after upstream reported usage: that is what it charged.
        charge = runtime.charge(metered.key, None, usage, None)
        gate.finish(metered.ticket, 200, charge.uncached, None, charge.total)
        return
    server = metered.flow.server_conn
    reached = server is not None and server.timestamp_tcp_setup is not None
    gate.abort(metered.ticket, reached_upstream=reached)


def cool_down(
    runtime: Runtime, metered: MeteredFlow, response: http.Response, verdict: Upstream429
) -> float:
    """Pause the model after a 429: for `retry-after` if upstream sent a sane one."""
    retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
    # Without retry-after, a short pause; the upstream view, re-synced from the 429's own
    # headers, then holds releases until upstream's bucket has room. A retry-after longer
    # than anyone may wait in the queue is capped there.
    cooldown = retry_after if retry_after is not None else 1.0
    cooldown = min(cooldown, runtime.config.cerebras_limits.request_timeout)
    runtime.gate.pause(metered.key, cooldown)
    if verdict.unit == "total_tokens":
        # Our picture of the total bucket had room where upstream's had none (traffic that
        # bypassed the proxy, an upstream that reports no headers for it): start it empty.
        runtime.gate.exhaust(metered.key, "total_tokens")
    log.info(
        "upstream 429 (%s%s) for %s: cooling down %.1fs",
        verdict.kind,
        f", {verdict.unit}" if verdict.unit else "",
        metered.key,
        cooldown,
    )
    return cooldown


def re_estimate_held(runtime: Runtime, table: FlowTable, key: str) -> None:
    """Apply what calibration just learnt to the requests still waiting for `key`."""
    sizes: list[tuple[Ticket, int, int | None]] = []
    for metered in table:
        if metered.phase is Phase.HELD and metered.key == key and metered.ticket is not None:
            estimate = runtime.estimate(metered.key, metered.shape)
            metered.flow.metadata["cooldown_estimate"] = estimate.total
            sizes.append((metered.ticket, *runtime.admission(estimate, metered.cache)))
    runtime.gate.resize(sizes)
