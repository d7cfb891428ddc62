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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from mitmproxy import command, connection, ctx, exceptions, flow, hooks, http
from mitmproxy.utils import asyncio_utils

from .config import Config, ConfigError, load_config, resolve_config_path
from .estimate import Estimate, InputCalibration, RequestShape, parse_request
from .gate import DEFAULT_KEY, Gate
from .listener import MetricsListener
from .metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from .scheduler import Outcome, Ticket, base_priority
from .upstream import (
    SSEUsageTap,
    Upstream429,
    classify_429,
    parse_rate_headers,
    parse_retry_after,
    usage_from_json,
)

log = logging.getLogger(__name__)
# The retry client's own debug lines would drown mitmproxy's log at termlog_verbosity=debug.
logging.getLogger("httpcore").setLevel(logging.WARNING)
logging.getLogger("httpx").setLevel(logging.WARNING)

METERED_PATHS = ("/v1/chat/completions", "/v1/completions")
# A made-up host, answered by the addon itself: http://cooldown.local/metrics through the proxy.
STATUS_HOST = "cooldown.local"
_QUEUE_FULL_LOG_INTERVAL = 10.0
CONFIG_POLL_SECONDS = 1.0
MAX_MODELS = 64
OTHER_MODELS_KEY = "(other models)"


def _file_stamp(path: Path | None) -> tuple[float, int] | None:
    """What identifies a version of the config file: its mtime and size (None: no file)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime, stat.st_size)


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


_OUTCOME_LABELS = {
    Outcome.RELEASED: "forwarded",
    Outcome.QUEUE_FULL: "refused_queue_full",
    Outcome.TIMEOUT: "refused_timeout",
    Outcome.BREAKER_OPEN: "refused_breaker_open",
    Outcome.SHUTDOWN: "refused_shutdown",
    Outcome.CANCELLED: "cancelled",
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


def prepare_request(path: str, body: bytes) -> tuple[RequestShape, bytes | None]:
    """Tokenize once and, for a stream that does not ask for usage, ask for it.

    Upstream reports `usage` in a stream only with `stream_options.include_usage`; without it
    the reservation could only be settled at its estimate. Returns the new body, or None when
    the body stays as it is. The client then sees `usage` in the stream's last data chunk
    (the one with `finish_reason`), a field OpenAI-compatible clients ignore unless asked.
    """
    shape = parse_request(path, body)
    if not (shape.understood and shape.stream):
        return shape, None
    try:
        document = json.loads(body)
        options = document.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return shape, None
        document["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        return shape, json.dumps(document, ensure_ascii=False).encode()
    except (ValueError, TypeError, RecursionError):
        return shape, None


@dataclass(eq=False)
class _FlowState:
    """A metered flow from its release to its end (answer, error or retries exhausted)."""

    key: str
    shape: RequestShape
    estimate: Estimate
    ticket: Ticket
    retries_left: int
    tap: SSEUsageTap | None = None
    attempts: int = 1


# Headers that belong to one hop, not to the message, when re-sending a request ourselves.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


class Cooldown:
    """Holds Cerebras requests until the shared limiter and priority queue release them."""

    # An addon is named after its class; give it a name no built-in addon uses.
    name = "cooldown"

    def __init__(self) -> None:
        self.config = Config()
        self.gate = Gate(self.config)
        self._held: dict[str, tuple[http.HTTPFlow, Ticket]] = {}
        # Held flows by client connection: a disconnect finds its flows without a scan.
        self._held_by_client: dict[str, set[str]] = {}
        self._held_shapes: dict[str, RequestShape] = {}
        # Re-sends in progress (after an upstream 429), by client connection.
        self._retrying: dict[str, set[asyncio.Future[http.Response]]] = {}
        self._in_flight: dict[str, _FlowState] = {}
        self.calibration = InputCalibration()
        self.metrics = Metrics(self.gate)
        self._listener: MetricsListener | None = None
        self._listener_wanted: tuple[str, int] | None = None
        self._queue_full_logged_at = -math.inf
        self._debug = True  # per-request debug logging; off unless termlog shows debug
        self._stopping = False
        self._running = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._config_stamp: tuple[float, int] | None = None

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
        if "termlog_verbosity" in updated:
            # mitmproxy formats and dispatches every record its root logger sees, shown or
            # not; per-request debug lines are only worth that when someone will read them.
            self._debug = ctx.options.termlog_verbosity == "debug"
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
        self._config_stamp = _file_stamp(path)
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
        self._apply_config(config)

    def _apply_config(self, config: Config) -> None:
        self.config = config
        self.gate.reconfigure(config)
        if self._running:
            self._restart_listener()
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
        self._watch_task = asyncio_utils.create_task(
            self._watch_config_file(), name="cooldown config watcher", keep_ref=True
        )
        self._restart_listener()

    async def _watch_config_file(self) -> None:
        """Reload the config when its file changes, as mitmproxy reloads scripts."""
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Apply the config file if it changed on disk; a bad file keeps the running config."""
        path = resolve_config_path(ctx.options.cerebras_config)
        stamp = _file_stamp(path)
        if stamp == self._config_stamp:
            return False
        self._config_stamp = stamp
        try:
            config = load_config(path)
        except ConfigError as e:
            log.error("config change not applied, keeping the running config: %s", e)
            return False
        log.info("config file changed: reloading")
        self._apply_config(config)
        return True

    def done(self) -> None:
        for task in (self._shutdown_task, self._watch_task):
            if task is not None:
                task.cancel()
        self._shutdown_task = self._watch_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.gate.shutdown()

    def _restart_listener(self) -> None:
        """(Re)start the scrape listener when `metrics_listen` is set or changed."""
        wanted = self.config.metrics_listen
        if wanted == self._listener_wanted and (wanted is None or self._listener is not None):
            return
        self._listener_wanted = wanted
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if wanted is not None:
            self._listener = MetricsListener(wanted[0], wanted[1], self.render_status)
            asyncio_utils.create_task(
                self._start_listener(self._listener),
                name="cooldown metrics listener",
                keep_ref=True,
            )

    @staticmethod
    async def _start_listener(listener: MetricsListener) -> None:
        try:
            await listener.start()
        except OSError as e:
            log.error("Cooldown metrics listener %s:%d: %s", listener.host, listener.port, e)

    async def _answer_held_on_exit(self) -> None:
        # Without this, held flows would wait for their timeout while the loop is torn down.
        await ctx.master.should_exit.wait()
        self._stopping = True  # from now on new requests are answered at once, not held
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
        if f.response or f.error or not f.live:
            return
        if f.request.pretty_host.lower() == STATUS_HOST:
            self._answer_status(f)
            return
        if not self._is_cerebras(f):
            return
        if not self._is_metered(f):
            self._route(f)
            return
        shape = await self._prepare(f)
        if self._stopping:
            self._refuse(f, Outcome.SHUTDOWN, 5.0)
            return
        key = self._key_for(shape.model)
        estimate = self._estimate(key, shape)
        ticket = self.gate.submit(estimate.total, key=key, meta=f.id)
        f.metadata["cooldown_estimate"] = estimate.total
        if ticket.held:
            outcome = await self._hold(f, ticket, estimate, shape)
        else:
            outcome = ticket.outcome
        f.metadata["cooldown_waited"] = round(ticket.waited, 3)
        if outcome is not None:
            self.metrics.request_outcome(key, _OUTCOME_LABELS[outcome], ticket.waited)
        if outcome is Outcome.RELEASED:
            if not f.live or f.error:
                self.gate.abort(ticket, reached_upstream=False)
                return
            retries = self.config.cerebras_limits.max_retries
            self._in_flight[f.id] = _FlowState(key, shape, estimate, ticket, retries)
            self._route(f)
            if self._debug:
                log.debug(
                    "flow %s (%s) released after %.3fs, estimate %d tokens",
                    f.id,
                    key,
                    ticket.waited,
                    estimate.total,
                )
            return
        if outcome is Outcome.CANCELLED or outcome is None:
            if self._debug:
                log.debug("flow %s left the queue (client gone or killed)", f.id)
            return
        self._refuse(f, outcome, ticket.retry_after)

    def _key_for(self, model: str | None) -> str:
        """The limiter key for a model name, which comes from the client.

        Every key has its own windows, queue and metric series; past MAX_MODELS distinct names
        not in the config, further ones share one key, so a client inventing names cannot
        grow the proxy without bound.
        """
        if model is None:
            return DEFAULT_KEY
        if model in self.gate.keys or model in self.config.models:
            return model
        return model if len(self.gate.keys) < MAX_MODELS else OTHER_MODELS_KEY

    def _refuse(self, f: http.HTTPFlow, outcome: Outcome, retry_after: float) -> None:
        f.metadata["cooldown_refused"] = outcome.value
        f.comment = f"Cooldown: refused ({outcome.value})"
        f.marked = ":no_entry:"
        f.response = proxy_error_response(outcome, retry_after)
        if self._debug:
            log.debug("flow %s refused: %s", f.id, outcome.value)
        if outcome is Outcome.QUEUE_FULL:
            now = time.monotonic()
            if now - self._queue_full_logged_at >= _QUEUE_FULL_LOG_INTERVAL:
                self._queue_full_logged_at = now
                log.info(
                    "queue full (%d held): refusing new requests with 429",
                    self.gate.scheduler.depth,
                )

    # -- status and metrics --------------------------------------------------------------------

    def render_status(self, path: str) -> tuple[int, str, bytes]:
        """The read-only status pages, by path: Prometheus text, or JSON."""
        route = path.split("?", 1)[0].rstrip("/")
        if route == "/metrics":
            return 200, PROMETHEUS_CONTENT_TYPE, self.metrics.prometheus()
        if route in ("/metrics.json", "/status"):
            body = json.dumps(self.metrics.snapshot(), indent=2, sort_keys=False).encode()
            return 200, "application/json", body + b"\n"
        return 404, "text/plain", b"Cooldown: /metrics (Prometheus) or /metrics.json\n"

    def _answer_status(self, f: http.HTTPFlow) -> None:
        if f.request.method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"read-only: GET only\n"
        else:
            status, ctype, body = self.render_status(f.request.path)
        f.response = http.Response.make(status, body, {"Content-Type": ctype})
        if status == 405:
            f.response.headers["Allow"] = "GET, HEAD"
        if f.request.method == "HEAD":
            # A HEAD answer carries the GET's length but no content (RFC 9110, 9.3.2).
            f.response.raw_content = b""
            f.response.headers["content-length"] = str(len(body))

    @command.command("cooldown.status")
    def status_command(self) -> str:
        """Cooldown's limiter state: queue, usage of every limit, breaker, counts (JSON)."""
        return json.dumps(self.metrics.snapshot(), indent=2)

    async def _prepare(self, f: http.HTTPFlow) -> RequestShape:
        body = f.request.get_content(strict=False) or b""
        path = f.request.path
        if len(body) > OFFLOAD_BODY_BYTES:
            shape, new_body = await asyncio.to_thread(prepare_request, path, body)
        else:
            shape, new_body = prepare_request(path, body)
        if new_body is not None:
            f.request.content = new_body  # re-encoded as the request's content-encoding says
            f.metadata["cooldown_added_include_usage"] = True
        return shape

    def _estimate(self, key: str, shape: RequestShape) -> Estimate:
        limits = self.config.model_limits(key)
        return shape.estimate(
            limits.context_length or self.config.cerebras_limits.context_length,
            limits.output_reservation,
            self.calibration.factor(key),
        )

    async def _hold(
        self, f: http.HTTPFlow, ticket: Ticket, estimate: Estimate, shape: RequestShape
    ) -> Outcome:
        self._held[f.id] = (f, ticket)
        self._held_shapes[f.id] = shape
        self._held_by_client.setdefault(f.client_conn.id, set()).add(f.id)
        f.intercept()
        waiting_for = {
            None: "its turn",
            "rpm": "requests per minute",
            "rph": "requests per hour",
            "rpd": "requests per day",
            "tpm": "tokens per minute",
            "tph": "tokens per hour",
            "tpd": "tokens per day",
        }.get(ticket.wait_reason, ticket.wait_reason)
        f.comment = (
            f"Cooldown: held for {ticket.key} (#{self.gate.scheduler.depth} in queue), "
            f"waiting for {waiting_for}; estimate {estimate.total} tokens "
            f"({estimate.input_tokens} in + {estimate.output_tokens} out), "
            f"priority {base_priority(estimate.total):g}"
        )
        self._trigger_update(f)
        try:
            if f.client_conn.state is connection.ConnectionState.CLOSED:
                self.gate.cancel(ticket)  # the client left while we were estimating
            return await self.gate.wait(ticket)
        finally:
            del self._held[f.id]
            del self._held_shapes[f.id]
            siblings = self._held_by_client.get(f.client_conn.id)
            if siblings is not None:
                siblings.discard(f.id)
                if not siblings:
                    del self._held_by_client[f.client_conn.id]
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
        for retry in list(self._retrying.get(client.id, ())):
            retry.cancel()
        for flow_id in list(self._held_by_client.get(client.id, ())):
            held = self._held.get(flow_id)
            if held is not None:
                self.gate.cancel(held[1])

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
        state = self._in_flight.get(f.id)
        if state is None or f.response is None:
            return
        # Upstream counts a request before it answers: from now on its reservation ages.
        self.gate.confirm(state.ticket)
        self.gate.observe(state.key, parse_rate_headers(f.response.headers))
        self._add_proxy_headers(f.response, state)
        if f.response.headers.get("content-type", "").startswith("text/event-stream"):
            # Pass the stream through unbuffered, reading usage from it on the way.
            state.tap = SSEUsageTap()
            f.response.stream = state.tap

    def _add_proxy_headers(self, response: http.Response, state: _FlowState) -> None:
        """The proxy's own view, beside upstream's x-ratelimit-* (which pass unchanged)."""
        added: list[tuple[bytes, bytes]] = []
        for name, (limit, remaining) in self.gate.rate_view(state.key).items():
            added.append((f"X-RateLimit-Limit-{name.upper()}".encode(), str(limit).encode()))
            added.append(
                (f"X-RateLimit-Remaining-{name.upper()}".encode(), str(remaining).encode())
            )
        added.append((b"X-Cooldown-Wait", f"{state.ticket.waited:.3f}".encode()))
        added.append((b"X-Cooldown-Estimated-Tokens", str(state.estimate.total).encode()))
        # One rebuild of the header tuple instead of a scan-and-rebuild per header.
        names = {name.lower() for name, _ in added}
        response.headers.fields = (
            *(field for field in response.headers.fields if field[0].lower() not in names),
            *added,
        )

    async def response(self, f: http.HTTPFlow) -> None:
        state = self._in_flight.pop(f.id, None)
        if state is None or f.response is None:
            return
        while f.response.status_code == 429:
            verdict = classify_429(f.response.get_content(strict=False))
            self.metrics.upstream_429(state.key, verdict.kind)
            cooldown = self._cool_down(state, f.response, verdict)
            if state.retries_left <= 0 or not await self._retry_after_429(f, state, cooldown):
                break
        if f.response is not None and "cooldown_refused" not in f.metadata:
            self._account(f, state, f.response)

    def _usage(self, state: _FlowState, response: http.Response) -> dict[str, int] | None:
        if state.tap is not None:
            return state.tap.usage
        if response.raw_content is None:
            return None
        return usage_from_json(response.get_content(strict=False))

    def _re_estimate_held(self, key: str) -> None:
        """Apply what calibration just learnt to the requests still waiting for `key`."""
        for flow_id, (f, ticket) in self._held.items():
            if ticket.key == key and ticket.held:
                estimate = self._estimate(key, self._held_shapes[flow_id])
                ticket.tokens = max(estimate.total, 1)
                f.metadata["cooldown_estimate"] = estimate.total
        self.gate.scheduler.generation += 1  # a smaller estimate may fit now
        self.gate.pump()

    def _account(self, f: http.HTTPFlow, state: _FlowState, response: http.Response) -> None:
        """Settle the last attempt's reservation, learn from it, and note it on the flow."""
        usage = self._usage(state, response)
        total = usage.get("total_tokens") if usage else None
        self.gate.finish(state.ticket, response.status_code, total)
        if usage and "prompt_tokens" in usage and state.shape.understood:
            before = self.calibration.factor(state.key)
            self.calibration.observe(state.key, state.shape.input_tokens, usage["prompt_tokens"])
            if self.calibration.factor(state.key) != before:
                self._re_estimate_held(state.key)
        if total is not None:
            self.metrics.estimate_vs_actual(state.key, state.estimate.total, total)
            f.metadata["cooldown_actual_tokens"] = total
            f.comment = f"{f.comment}, actual {total} tokens"
        if response.status_code == 429:
            log.info("upstream answered 429 for flow %s (%s); no retries left", f.id, state.key)

    def _cool_down(self, state: _FlowState, response: http.Response, verdict: Upstream429) -> float:
        """Pause the model after a 429: for `retry-after` if upstream sent a sane one."""
        retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        # Without retry-after, a short pause; the upstream view, re-synced from the 429's own
        # headers, then holds releases until upstream's bucket has room. A retry-after longer
        # than anyone may wait in the queue is capped there.
        cooldown = retry_after if retry_after is not None else 1.0
        cooldown = min(cooldown, self.config.cerebras_limits.request_timeout)
        self.gate.pause(state.key, cooldown)
        log.info(
            "upstream 429 (%s%s) for %s: cooling down %.1fs",
            verdict.kind,
            f", {verdict.unit}" if verdict.unit else "",
            state.key,
            cooldown,
        )
        return cooldown

    async def _retry_after_429(self, f: http.HTTPFlow, state: _FlowState, cooldown: float) -> bool:
        """Cool the model down, hold the request again and re-send it; False if it ended."""
        response = f.response
        assert response is not None
        self.gate.confirm(state.ticket)
        self.gate.observe(state.key, parse_rate_headers(response.headers))
        self.gate.finish(state.ticket, 429, None)
        self.metrics.retry(state.key)
        log.info("retrying flow %s after %.1fs", f.id, cooldown)
        state.retries_left -= 1
        state.attempts += 1
        state.estimate = self._estimate(state.key, state.shape)
        ticket = self.gate.submit(state.estimate.total, key=state.key, meta=f.id, requeue=True)
        if ticket.held:
            outcome = await self._hold(f, ticket, state.estimate, state.shape)
        else:
            outcome = ticket.outcome
        if outcome is not None and outcome is not Outcome.RELEASED:
            # A retry that goes out is counted by cooldown_retries_total, not as a new request.
            self.metrics.request_outcome(state.key, _OUTCOME_LABELS[outcome], ticket.waited)
        if outcome is not Outcome.RELEASED:
            if outcome not in (Outcome.CANCELLED, None):
                self._refuse(f, outcome, ticket.retry_after)
            return False
        state.ticket = ticket
        state.tap = None
        # The proxy re-sends on its own client, which mitmproxy does not tie to the flow: if
        # the client leaves meanwhile, stop the retry rather than wait for upstream's answer.
        resend = asyncio.ensure_future(self._resend(f, state))
        self._retrying.setdefault(f.client_conn.id, set()).add(resend)
        try:
            f.response = await resend
            self._add_proxy_headers(f.response, state)
        except asyncio.CancelledError:
            self.gate.abort(ticket, reached_upstream=True)  # upstream may have counted it
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the hook itself is being cancelled, not just the retry
            log.debug("client of flow %s left during a retry; retry stopped", f.id)
            f.metadata["cooldown_refused"] = "client_gone"
            return False
        except httpx.HTTPError as e:
            self.gate.abort(ticket, reached_upstream=True)
            log.info("retry of flow %s failed: %s", f.id, type(e).__name__)
            f.metadata["cooldown_refused"] = "retry_failed"
            f.response = http.Response.make(
                502,
                json.dumps(
                    {
                        "error": {
                            "message": f"Retry after upstream 429 failed: {type(e).__name__} "
                            f"(answered by the {PROXY_NAME})",
                            "type": "cooldown_retry_failed",
                            "code": "retry_failed",
                        }
                    }
                ).encode(),
                {"Content-Type": "application/json", "X-Cooldown-Refused": "retry_failed"},
            )
            return False
        finally:
            retries = self._retrying.get(f.client_conn.id)
            if retries is not None:
                retries.discard(resend)
                if not retries:
                    del self._retrying[f.client_conn.id]
        f.metadata["cooldown_attempts"] = state.attempts
        return True

    async def _resend(self, f: http.HTTPFlow, state: _FlowState) -> http.Response:
        """Send the request again ourselves; mitmproxy cannot re-send a flow it has answered."""
        headers = [
            (name, value)
            for name, value in f.request.headers.items(multi=True)
            if name.lower() not in _HOP_BY_HOP
        ]
        # A client per retry: retries are rare, and nothing is left open when the proxy stops.
        verify = not getattr(ctx.options, "ssl_insecure", False)
        timeout = httpx.Timeout(600.0, connect=15.0)
        async with (
            httpx.AsyncClient(timeout=timeout, verify=verify, trust_env=False) as client,
            client.stream(
                f.request.method, f.request.url, headers=headers, content=f.request.raw_content
            ) as upstream,
        ):
            self.gate.confirm(state.ticket)
            self.gate.observe(state.key, parse_rate_headers(upstream.headers))
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                state.tap = SSEUsageTap()
            pieces = []
            async for chunk in upstream.aiter_raw():
                pieces.append(state.tap(chunk) if state.tap is not None else chunk)
            if state.tap is not None:
                state.tap(b"")
            raw = b"".join(pieces)
        response = http.Response.make(
            upstream.status_code,
            b"",
            [
                (k.encode(), v.encode())
                for k, v in upstream.headers.multi_items()
                if k.lower() not in _HOP_BY_HOP
            ],
        )
        response.raw_content = raw
        response.headers["content-length"] = str(len(raw))
        return response

    def error(self, f: http.HTTPFlow) -> None:
        state = self._in_flight.pop(f.id, None)
        if state is not None:
            usage = state.tap.usage if state.tap is not None else None
            if usage is not None:
                # The stream broke after upstream reported usage: that is what it charged.
                self.gate.finish(state.ticket, 200, usage["total_tokens"])
                return
            reached = f.server_conn is not None and f.server_conn.timestamp_tcp_setup is not None
            self.gate.abort(state.ticket, reached_upstream=reached)
            return
        held = self._held.get(f.id)
        if held is not None:
            self.gate.cancel(held[1])

    def status(self) -> dict[str, Any]:
        return {
            "held_flows": len(self._held),
            "held_clients": len(self._held_by_client),
            "in_flight_flows": len(self._in_flight),
            **self.gate.status(),
        }
