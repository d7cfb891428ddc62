"""The mitmproxy-facing shell: flows in, gate calls out, flows answered.

This is the only module that knows about mitmproxy. It decides which flows are metered,
estimates them (off the event loop when the body is large), holds each one paused in an
`async def request` hook until the gate releases it, and settles the reservation when the
response (or an error) comes back. mitmproxy never interrupts a waiting hook, so the addon
listens for the events that mean a held flow is gone (client disconnect, kill from the UI)
and cancels its ticket itself.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import connection, ctx, exceptions, flow, hooks, http
from mitmproxy.utils import asyncio_utils

from .config import Config, ConfigError, load_config, resolve_config_path
from .estimate import Estimate, estimate_request
from .gate import DEFAULT_KEY, Gate
from .scheduler import Outcome, Ticket

log = logging.getLogger(__name__)

METERED_PATHS = ("/v1/chat/completions", "/v1/completions")
# Tokenizing is fast but not free (roughly 1 ms per 4K tokens); above this many body bytes,
# estimate in a worker thread so other flows keep moving.
OFFLOAD_BODY_BYTES = 32 * 1024
PROXY_NAME = "Cooldown proxy"


@dataclass(frozen=True)
class _Refusal:
    status: int
    type: str
    code: str
    message: str


_REFUSALS = {
    Outcome.QUEUE_FULL: _Refusal(
        429,
        "cooldown_queue_full",
        "queue_full",
        "The Cooldown proxy is already holding its maximum number of requests "
        "(max_queue_depth); retry later.",
    ),
    Outcome.TIMEOUT: _Refusal(
        429,
        "cooldown_queue_timeout",
        "queue_timeout",
        "The request waited in the Cooldown proxy's queue longer than request_timeout "
        "without fitting the rate limits; retry later.",
    ),
    Outcome.BREAKER_OPEN: _Refusal(
        503,
        "cooldown_circuit_open",
        "circuit_open",
        "Cerebras answered 429 repeatedly, so the Cooldown proxy is pausing requests "
        "(circuit breaker open); retry after the indicated time.",
    ),
    Outcome.SHUTDOWN: _Refusal(
        503,
        "cooldown_shutdown",
        "proxy_shutting_down",
        "The Cooldown proxy is shutting down; retry shortly.",
    ),
}


def proxy_error_response(outcome: Outcome, retry_after: float) -> http.Response:
    """An OpenAI-style error that says plainly it comes from the proxy, not from Cerebras."""
    refusal = _REFUSALS[outcome]
    body = {
        "error": {
            "message": f"{refusal.message} (answered by the {PROXY_NAME}, not by Cerebras)",
            "type": refusal.type,
            "code": refusal.code,
        }
    }
    headers = {
        "Content-Type": "application/json",
        "X-Cooldown-Refused": refusal.code,
    }
    if retry_after > 0:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return http.Response.make(refusal.status, json.dumps(body).encode(), headers)


def usage_total_tokens(response: http.Response) -> int | None:
    """`usage.total_tokens` from a JSON completion response, if present."""
    content = response.get_content(strict=False)
    if not content or "json" not in response.headers.get("content-type", "json"):
        return None
    try:
        usage = json.loads(content).get("usage")
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    return None


class Cooldown:
    """Holds Cerebras requests until the shared limiter and priority queue release them."""

    # An addon is named after its class; give it a name no built-in addon uses.
    name = "cooldown"

    def __init__(self) -> None:
        self.config = Config()
        self.gate = Gate(self.config)
        self._held: dict[str, tuple[http.HTTPFlow, Ticket]] = {}
        self._in_flight: dict[str, Ticket] = {}
        self._running = False
        self._shutdown_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cerebras_config",
            str | None,
            None,
            "Path of Cooldown's YAML config. Without it, ./config.yaml is used if present, "
            "else built-in defaults (see config.yaml.example).",
        )

    def configure(self, updated: set[str]) -> None:
        if "cerebras_config" in updated:
            self._load_config()
        if "connection_strategy" in updated and ctx.options.connection_strategy == "eager":
            # Eager opens the upstream connection at CONNECT time; for a request held for
            # minutes that connection sits idle and upstream closes it. Lazy connects when
            # the request is released, which is what holding needs (docs: Architecture).
            log.info("Cooldown sets connection_strategy=lazy: upstream connections open on release")
            ctx.options.update(connection_strategy="lazy")

    def _load_config(self) -> None:
        path = resolve_config_path(ctx.options.cerebras_config)
        try:
            config = load_config(path)
        except ConfigError as e:
            if self._running:
                # mitmproxy rolls the option back and reports this; the running config stays.
                raise exceptions.OptionsError(
                    f"cerebras_config not applied, keeping the running config: {e}"
                ) from e
            # At start-up an exception here would print a script traceback; one ERROR line is
            # clearer, and mitmdump exits with status 1 on any error logged during start-up.
            log.error("Cooldown cannot start: cerebras_config: %s", e)
            return
        self.config = config
        self.gate.reconfigure(config)
        limits = config.cerebras_limits
        log.info(
            "Cooldown config from %s: rpm_limit=%d tpm_limit=%d max_queue_depth=%d "
            "request_timeout=%gs hosts=%s%s",
            config.source,
            limits.rpm_limit,
            limits.tpm_limit,
            limits.max_queue_depth,
            limits.request_timeout,
            ",".join(config.cerebras_hosts),
            f" upstream={config.cerebras_upstream}" if config.cerebras_upstream else "",
        )

    def running(self) -> None:
        self._running = True
        self._shutdown_task = asyncio_utils.create_task(
            self._answer_held_on_exit(), name="cooldown shutdown watcher", keep_ref=True
        )

    def done(self) -> None:
        if self._shutdown_task is not None:
            self._shutdown_task.cancel()
            self._shutdown_task = None
        self.gate.shutdown()

    async def _answer_held_on_exit(self) -> None:
        # Without this, held flows would wait for their timeout while the loop is torn down.
        await ctx.master.should_exit.wait()
        held = self.gate.shutdown()
        if held:
            log.info("shutting down: answered %d held request(s) with 503", held)

    # -- which flows are ours ----------------------------------------------------------------------

    def _is_cerebras(self, f: http.HTTPFlow) -> bool:
        host = f.request.pretty_host.lower()
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.config.cerebras_hosts)

    @staticmethod
    def _is_metered(f: http.HTTPFlow) -> bool:
        return (
            f.request.method == "POST"
            and f.request.path.split("?", 1)[0].rstrip("/") in METERED_PATHS
        )

    def _route(self, f: http.HTTPFlow) -> None:
        """Point the flow at the configured test upstream, if any."""
        upstream = self.config.cerebras_upstream
        if upstream is None:
            return
        parts = urlsplit(upstream)
        f.request.scheme = parts.scheme
        f.request.host = parts.hostname or f.request.host
        f.request.port = parts.port or (443 if parts.scheme == "https" else 80)

    # -- hooks -----------------------------------------------------------------------------------

    async def request(self, f: http.HTTPFlow) -> None:
        if f.response or f.error or not f.live or not self._is_cerebras(f):
            return
        if not self._is_metered(f):
            self._route(f)
            return
        estimate = await self._estimate(f)
        ticket = self.gate.submit(estimate.total, key=DEFAULT_KEY, meta=f.id)
        f.metadata["cooldown_estimate"] = estimate.total
        if ticket.held:
            outcome = await self._hold(f, ticket, estimate)
        else:
            outcome = ticket.outcome
        f.metadata["cooldown_waited"] = round(ticket.waited, 3)
        if outcome is Outcome.RELEASED:
            if not f.live or f.error:
                self.gate.abort(ticket, reached_upstream=False)
                return
            self._in_flight[f.id] = ticket
            self._route(f)
            log.debug(
                "flow %s released after %.3fs (estimate %d tokens)",
                f.id,
                ticket.waited,
                estimate.total,
            )
            return
        if outcome is Outcome.CANCELLED or outcome is None:
            log.debug("flow %s left the queue (client gone or killed)", f.id)
            return
        f.metadata["cooldown_refused"] = outcome.value
        f.comment = f"Cooldown: refused ({outcome.value})"
        f.response = proxy_error_response(outcome, ticket.retry_after)
        log.debug("flow %s refused: %s", f.id, outcome.value)

    async def _estimate(self, f: http.HTTPFlow) -> Estimate:
        body = f.request.get_content(strict=False) or b""
        path = f.request.path
        context_length = self.config.cerebras_limits.context_length
        if len(body) > OFFLOAD_BODY_BYTES:
            return await asyncio.to_thread(estimate_request, path, body, context_length)
        return estimate_request(path, body, context_length)

    async def _hold(self, f: http.HTTPFlow, ticket: Ticket, estimate: Estimate) -> Outcome:
        self._held[f.id] = (f, ticket)
        f.intercept()
        f.comment = (
            f"Cooldown: held, estimate {estimate.total} tokens "
            f"({estimate.input_tokens} in + {estimate.output_tokens} out)"
        )
        self._trigger_update(f)
        try:
            if f.client_conn.state is connection.ConnectionState.CLOSED:
                self.gate.cancel(ticket)  # the client left while we were estimating
            return await self.gate.wait(ticket)
        finally:
            del self._held[f.id]
            if f.intercepted:
                f.resume()
            if ticket.outcome is Outcome.RELEASED:
                f.comment = (
                    f"Cooldown: waited {ticket.waited:.3f}s, estimate {estimate.total} tokens"
                )
            self._trigger_update(f)

    @staticmethod
    def _trigger_update(f: http.HTTPFlow) -> None:
        # Tells mitmweb/mitmproxy to redraw the flow (paused or resumed).
        ctx.master.addons.trigger(hooks.UpdateHook([f]))

    def client_disconnected(self, client: connection.Client) -> None:
        for f, ticket in list(self._held.values()):
            if f.client_conn.id == client.id:
                self.gate.cancel(ticket)

    def update(self, flows: list[flow.Flow]) -> None:
        for f in flows:
            held = self._held.get(f.id)
            if held is None:
                continue
            _, ticket = held
            if f.error and f.error.msg == flow.Error.KILLED_MESSAGE:
                self.gate.cancel(ticket)
            elif not f.intercepted and ticket.held:
                # Resumed by hand (mitmweb): the limiter still decides, so it stays paused.
                f.intercept()
                log.info(
                    "flow %s resumed by hand; it stays held until the limiter releases it", f.id
                )
                self._trigger_update(f)

    def responseheaders(self, f: http.HTTPFlow) -> None:
        # Upstream counts a request before it answers: from now on its reservation ages.
        ticket = self._in_flight.get(f.id)
        if ticket is not None:
            self.gate.confirm(ticket)

    def response(self, f: http.HTTPFlow) -> None:
        ticket = self._in_flight.pop(f.id, None)
        if ticket is None or f.response is None:
            return
        actual = usage_total_tokens(f.response) if f.response.raw_content is not None else None
        self.gate.finish(ticket, f.response.status_code, actual)
        if actual is not None:
            f.metadata["cooldown_actual_tokens"] = actual
            f.comment = f"{f.comment}, actual {actual} tokens"
        if f.response.status_code == 429:
            log.info("upstream answered 429 for flow %s", f.id)

    def error(self, f: http.HTTPFlow) -> None:
        ticket = self._in_flight.pop(f.id, None)
        if ticket is not None:
            reached = f.server_conn is not None and f.server_conn.timestamp_tcp_setup is not None
            self.gate.abort(ticket, reached_upstream=reached)
            return
        held = self._held.get(f.id)
        if held is not None:
            self.gate.cancel(held[1])

    def status(self) -> dict[str, Any]:
        return {
            "held_flows": len(self._held),
            "in_flight_flows": len(self._in_flight),
            **self.gate.status(),
        }
