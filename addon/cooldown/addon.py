"""The mitmproxy-facing shell: flows in, gate calls out, flows answered.

This is the only module that knows about mitmproxy. It decides which flows are metered,
estimates them (off the event loop when the body is large), holds each one paused in an
`async def request` hook until the gate releases it, and settles the reservation when the
response (or an error) comes back. mitmproxy never interrupts a waiting hook, so the addon
listens for the events that mean a held flow is gone (client disconnect, kill from the UI)
and cancels its ticket itself.

After an upstream 429 a flow is retried through mitmproxy itself: a copy of its request is
replayed (mitmproxy's client-replay handler), so the proxy mode, other addons and TLS options
apply to it as to the original; the copy is metered like any request, and the original
answers its client with the copy's answer.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import command, connection, ctx, exceptions, flow, hooks, http
from mitmproxy.addons.clientplayback import MockServer, ReplayHandler
from mitmproxy.proxy import layers
from mitmproxy.proxy.layers.http import HTTPMode
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


def _label(f: http.HTTPFlow) -> str:
    """How Cooldown's comment on a flow begins; a retry's copy names the flow it retries."""
    retry_of = f.metadata.get("cooldown_retry_of")
    if retry_of is None:
        return "Cooldown: "
    return f"Cooldown: retry of flow {retry_of} (attempt {f.metadata.get('cooldown_attempt')}), "


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
    attempts: int = 1  # which attempt this flow is (a retry's copy: 2, 3, ...)
    # The request as this addon released it (before routing and later addons): what a retry
    # re-sends. Only kept while retries are left.
    request: http.Request | None = None


def snapshot_request(request: http.Request) -> http.Request:
    """A copy of `request` as it is now that later changes to `request` do not reach.

    Cheap enough for every metered flow (a few microseconds; `Request.copy()` serializes the
    whole message): mitmproxy never changes a header list or a body in place, it replaces
    the (immutable) tuple or bytes, so copying the containers is enough.
    """
    snapshot = copy.copy(request)
    snapshot.data = copy.copy(request.data)
    snapshot.data.headers = copy.copy(request.data.headers)
    if request.data.trailers is not None:
        snapshot.data.trailers = copy.copy(request.data.trailers)
    return snapshot


@dataclass(eq=False)
class _Retry:
    """A copy of a flow, re-sent through mitmproxy after the flow drew an upstream 429."""

    parent: http.HTTPFlow  # the flow that drew the 429 (itself a retry's copy, perhaps)
    copy: http.HTTPFlow
    key: str
    shape: RequestShape
    attempt: int  # the copy is attempt 2, 3, ... of the client's request
    retries_left: int  # for the copy, if it draws a 429 in turn
    done: asyncio.Future[None]  # the copy ended (answered, failed or refused), or was stopped
    handler: Any = None  # its _RetryReplay
    task: asyncio.Task[None] | None = None
    stopped: str | None = None  # why it was stopped: "client_gone", "killed", "shutdown"


class _RetryReplay(ReplayHandler):
    """mitmproxy's client-replay connection handler, with an idle timeout and a stop.

    It sends the copy through every addon and the configured mode (the first `--mode`:
    `upstream:` goes through that proxy), exactly like the `replay.client` command, but
    concurrently (`replay.client` replays one flow at a time, and a retry may be held for
    minutes). A replay has no client connection, so mitmproxy's own idle timeout would never
    fire; this one closes the upstream connection after `tcp_timeout` seconds without any
    event outside of hooks, as mitmproxy does for a client.
    """

    def __init__(self, f: http.HTTPFlow, options: Any) -> None:
        super().__init__(f, options)
        if self.layer.mode is HTTPMode.upstream and not f.request.authority:
            # The original came through a CONNECT tunnel (origin-form): mitmproxy handled it
            # in transparent mode, reaching its destination with a CONNECT through the
            # upstream proxy. Do the same: in upstream mode a plain-HTTP destination would
            # get an origin-form request, which no proxy can route.
            context = self.layer.context
            self.layer = layers.HttpLayer(context, HTTPMode.transparent)
            self.layer.connections[context.client] = MockServer(f, context.fork())

    async def replay(self) -> None:
        watch = asyncio.ensure_future(self.timeout_watchdog.watch())
        try:
            await super().replay()
        finally:
            watch.cancel()

    async def handle_hook(self, hook: Any) -> None:
        with self.timeout_watchdog.disarm():  # time spent held in a hook is not idle
            await super().handle_hook(hook)

    async def on_timeout(self) -> None:
        self.log(f"retry idle for {self.timeout_watchdog.timeout}s: closing it")
        if not self.stop():
            self.done.set()  # nothing to close: end the replay itself

    def stop(self) -> bool:
        """Close the copy's upstream connections (mitmproxy then ends it with an error);
        False if it has none."""
        handlers = [io.handler for io in self.transports.values() if io.handler is not None]
        for handler in handlers:
            handler.cancel("retry stopped")
        return bool(handlers)


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
        # Retries after an upstream 429: by the copy's flow id (until the copy has ended), by
        # the id of the flow they retry, and by client connection (while that flow waits).
        self._retries: dict[str, _Retry] = {}
        self._retry_of: dict[str, _Retry] = {}
        self._retrying: dict[str, set[_Retry]] = {}
        self._replay_handler: Any = _RetryReplay  # (flow, options) -> handler; tests swap it
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
        for retry in list(self._retries.values()):  # nothing waits on a retry past shutdown
            self._stop_retry(retry, "shutdown")
            if retry.task is not None:
                retry.task.cancel()
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
        if self._retries:
            retry = self._retries.get(f.id)
            if retry is not None:  # a copy re-sent after a 429: metered like its original
                await self._admit(f, retry.key, retry.shape, retry)
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
        await self._admit(f, self._key_for(shape.model), shape)

    async def _admit(
        self, f: http.HTTPFlow, key: str, shape: RequestShape, retry: _Retry | None = None
    ) -> None:
        """Hold the flow until the gate releases it, then send it on; or answer it."""
        if retry is not None and retry.stopped:
            f.kill()  # the flow it retries needs no answer any more
            return
        if self._stopping:
            self._refuse(f, Outcome.SHUTDOWN, 5.0)
            return
        estimate = self._estimate(key, shape)
        # A retry was admitted once already: a queue that filled up meanwhile does not refuse it.
        ticket = self.gate.submit(estimate.total, key=key, meta=f.id, requeue=retry is not None)
        f.metadata["cooldown_estimate"] = estimate.total
        if ticket.held:
            outcome = await self._hold(f, ticket, estimate, shape)
            if ticket.tokens != max(estimate.total, 1):
                estimate = self._estimate(key, shape)  # calibration learnt while it waited
        else:
            outcome = ticket.outcome
        f.metadata["cooldown_waited"] = round(ticket.waited, 3)
        # A retry that goes out is counted by cooldown_retries_total, not as a new request.
        if outcome is not None and (retry is None or outcome is not Outcome.RELEASED):
            self.metrics.request_outcome(key, _OUTCOME_LABELS[outcome], ticket.waited)
        if outcome is Outcome.RELEASED:
            if not f.live or f.error or (retry is not None and retry.stopped):
                self.gate.abort(ticket, reached_upstream=False)
                if retry is not None and f.killable:
                    f.kill()
                return
            if retry is None:
                retries, attempt = self.config.cerebras_limits.max_retries, 1
            else:
                retries, attempt = retry.retries_left, retry.attempt
            state = _FlowState(key, shape, estimate, ticket, retries, attempts=attempt)
            if retries > 0:
                state.request = snapshot_request(f.request)  # before routing and later addons
            self._in_flight[f.id] = state
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
            if retry is not None and f.killable:
                f.kill()  # a copy has no client of its own whose leaving would stop it
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
        f.comment = f"{_label(f)}refused ({outcome.value})"
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
            f"{_label(f)}held for {ticket.key} (#{self.gate.scheduler.depth} in queue), "
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
                    f"{_label(f)}waited {ticket.waited:.3f}s, estimate {ticket.tokens} tokens"
                )
            self._trigger_update(f)

    @staticmethod
    def _trigger_update(f: http.HTTPFlow) -> None:
        # Tells mitmweb/mitmproxy to redraw the flow (paused or resumed).
        ctx.master.addons.trigger(hooks.UpdateHook([f]))

    def client_disconnected(self, client: connection.Client) -> None:
        for retry in list(self._retrying.get(client.id, ())):
            self._stop_retry(retry, "client_gone")
        for flow_id in list(self._held_by_client.get(client.id, ())):
            held = self._held.get(flow_id)
            if held is not None:
                self.gate.cancel(held[1])

    def update(self, flows: list[flow.Flow]) -> None:
        for f in flows:
            held = self._held.get(f.id)
            if held is None:
                if self._retry_of and f.error and f.error.msg == flow.Error.KILLED_MESSAGE:
                    retry = self._retry_of.get(f.id)  # killed while waiting for its retry
                    if retry is not None:
                        self._stop_retry(retry, "killed")
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
        # Upstream counts a request before it answers: from now on its reservation ages (a
        # 429 was not counted: its reservation is given back before the report is read).
        self.gate.confirm(
            state.ticket, parse_rate_headers(f.response.headers), f.response.status_code
        )
        self._add_proxy_headers(f.response, state)
        if f.response.headers.get("content-type", "").startswith("text/event-stream"):
            if state.attempts > 1:
                # A retry's copy: buffered whole, to be handed to the flow it retries (whose
                # client then gets the stream at once); usage is read from the whole body.
                return
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
        try:
            if state is None or f.response is None:
                return
            if f.response.status_code == 429:
                verdict = classify_429(f.response.get_content(strict=False))
                self.metrics.upstream_429(state.key, verdict.kind)
                cooldown = self._cool_down(state, f.response, verdict)
                if self._may_retry(f, state):
                    await self._retry_after_429(f, state, cooldown)
                    return
            self._account(f, state, f.response)
        finally:
            if self._retries:
                self._copy_ended(f)

    def _may_retry(self, f: http.HTTPFlow, state: _FlowState) -> bool:
        if state.retries_left <= 0 or state.request is None:
            return False
        retry = self._retries.get(f.id) if self._retries else None
        return retry is None or retry.stopped is None  # nobody waits for a stopped copy

    def _usage(self, state: _FlowState, response: http.Response) -> dict[str, int] | None:
        if state.tap is not None:
            return state.tap.usage
        if response.raw_content is None:
            return None
        content = response.get_content(strict=False)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            tap = SSEUsageTap()  # a stream that was buffered (a retry's copy)
            tap(content or b"")
            tap(b"")
            return tap.usage
        return usage_from_json(content)

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
        self.gate.finish(state.ticket, response.status_code, total, self._refund(state, usage))
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

    @staticmethod
    def _refund(state: _FlowState, usage: dict[str, int] | None) -> int | None:
        """What upstream gives back of the reservation after its own report: the output it
        reserved and did not use.

        Our input estimate may differ from upstream's count, and that difference is not
        refunded, so only the output part is (None: unknown, the limiter assumes all unused).
        A whole (not streamed) answer's headers are written when it is complete, so its own
        report may already show the refund: crediting it again would count it twice, and the
        next report shows it anyway.
        """
        if state.tap is None:
            return 0
        if not usage or "completion_tokens" not in usage or not state.shape.understood:
            return None
        return max(state.estimate.output_tokens - usage["completion_tokens"], 0)

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

    async def _retry_after_429(self, f: http.HTTPFlow, state: _FlowState, cooldown: float) -> None:
        """Settle the 429'd attempt, re-send a copy through mitmproxy, answer with its end.

        The copy is held again by the gate (the model is cooling down), then goes out as the
        original did: same mode, same addons (which may reroute it), same TLS options. It is
        settled by its own hooks, and retried in turn if it draws another 429.
        """
        response = f.response
        assert response is not None
        self.gate.confirm(state.ticket, parse_rate_headers(response.headers))
        self.gate.finish(state.ticket, 429, None)
        self.metrics.retry(state.key)
        if f.client_conn.state is connection.ConnectionState.CLOSED:
            f.metadata["cooldown_refused"] = "client_gone"
            return
        retry = self._start_retry(f, state)
        log.info("retrying flow %s after %.1fs as flow %s", f.id, cooldown, retry.copy.id)
        try:
            await retry.done
        except asyncio.CancelledError:
            self._stop_retry(retry, "shutdown")  # the hook itself is being cancelled
            raise
        finally:
            del self._retry_of[f.id]
            retries = self._retrying.get(f.client_conn.id)
            if retries is not None:
                retries.discard(retry)
                if not retries:
                    del self._retrying[f.client_conn.id]
        if retry.stopped == "shutdown":
            self._refuse(f, Outcome.SHUTDOWN, 5.0)
        elif retry.stopped == "client_gone":
            log.debug("client of flow %s left during a retry; retry stopped", f.id)
            f.metadata["cooldown_refused"] = retry.stopped
        elif retry.stopped is not None:
            log.debug("flow %s %s during a retry; retry stopped", f.id, retry.stopped)
            f.metadata["cooldown_refused"] = retry.stopped
        else:
            self._take_over(f, retry.copy)

    def _start_retry(self, f: http.HTTPFlow, state: _FlowState) -> _Retry:
        """Replay a copy of `f`'s request, as this addon released it, through mitmproxy."""
        assert state.request is not None
        retry_copy = f.copy()
        retry_copy.request, state.request = state.request, None
        retry_copy.response = None
        retry_copy.error = None
        # A fresh server connection: nothing of the 429'd attempt's (mitmproxy opens its own).
        retry_copy.server_conn = connection.Server(
            address=(retry_copy.request.host, retry_copy.request.port)
        )
        # A copied connection is CLOSED until opened; the client waits for this copy.
        retry_copy.client_conn.state = connection.ConnectionState.OPEN
        retry_copy.is_replay = "request"
        retry_copy.marked = ""
        attempt = state.attempts + 1
        retry_copy.metadata = {
            "cooldown_retry_of": f.id,
            "cooldown_attempt": attempt,
            "cooldown_attempts": attempt,
        }
        retry_copy.comment = f"{_label(retry_copy)}after upstream 429"
        retry = _Retry(
            parent=f,
            copy=retry_copy,
            key=state.key,
            shape=state.shape,
            attempt=attempt,
            retries_left=state.retries_left - 1,
            done=asyncio.get_running_loop().create_future(),
        )
        self._retries[retry_copy.id] = retry
        self._retry_of[f.id] = retry
        self._retrying.setdefault(f.client_conn.id, set()).add(retry)
        try:
            retry.handler = self._replay_handler(retry_copy, ctx.options)
            retry.task = asyncio.ensure_future(retry.handler.replay())
        except Exception:
            log.exception("could not start the retry of flow %s", f.id)
            self._replay_finished(retry, None)
        else:
            retry.task.add_done_callback(lambda task: self._replay_finished(retry, task))
        return retry

    def _take_over(self, f: http.HTTPFlow, retry_copy: http.HTTPFlow) -> None:
        """Answer `f` with the answer to its retry (upstream's, or the proxy's refusal)."""
        answer = retry_copy.response
        if retry_copy.error is None and answer is not None and answer.raw_content is not None:
            f.response = answer.copy()  # with the copy's X-Cooldown-* and X-RateLimit-*
            for name in ("cooldown_refused", "cooldown_actual_tokens", "cooldown_attempts"):
                if name in retry_copy.metadata:
                    f.metadata[name] = retry_copy.metadata[name]
            f.comment = f"{f.comment}; upstream 429, answered by its retry {retry_copy.id}"
            return
        reason = retry_copy.error.msg if retry_copy.error is not None else "no complete answer"
        log.info("retry of flow %s failed: %s", f.id, reason)
        f.metadata["cooldown_refused"] = "retry_failed"
        f.comment = f"{f.comment}; upstream 429, its retry {retry_copy.id} failed: {reason}"
        f.response = http.Response.make(
            502,
            json.dumps(
                {
                    "error": {
                        "message": f"Retry after upstream 429 failed: {reason} "
                        f"(answered by the {PROXY_NAME})",
                        "type": "cooldown_retry_failed",
                        "code": "retry_failed",
                    }
                }
            ).encode(),
            {"Content-Type": "application/json", "X-Cooldown-Refused": "retry_failed"},
        )

    def _copy_ended(self, f: http.HTTPFlow) -> None:
        """`f`'s response or error hook ran: if it is a retry's copy, its flow may go on."""
        retry = self._retries.get(f.id)
        if retry is not None and not retry.done.done():
            retry.done.set_result(None)

    def _stop_retry(self, retry: _Retry, reason: str) -> None:
        """The flow a retry is for needs no answer any more: stop the copy, free what it holds.

        Held, its ticket is cancelled (and the copy killed); in flight, it is killed and its
        upstream connection closed, so its error hook settles its reservation.
        """
        if retry.stopped is not None:
            return
        retry.stopped = reason
        copy_id = retry.copy.id
        held = self._held.get(copy_id)
        if held is not None:
            self.gate.cancel(held[1])
        elif copy_id in self._in_flight:
            if retry.copy.killable:
                retry.copy.kill()  # not connected yet: mitmproxy drops it after the hooks
            if retry.handler is not None:
                retry.handler.stop()
        child = self._retry_of.get(copy_id)  # the copy waits for a retry of its own
        if child is not None:
            self._stop_retry(child, reason)
        if not retry.done.done():
            retry.done.set_result(None)

    def _replay_finished(self, retry: _Retry, task: asyncio.Task[None] | None) -> None:
        """The copy's replay is over: the last safety net for its reservation."""
        if task is not None and not task.cancelled() and (e := task.exception()) is not None:
            log.warning("retry of flow %s crashed: %r", retry.parent.id, e)
        copy_id = retry.copy.id
        state = self._in_flight.pop(copy_id, None)
        if state is not None:  # ended without its response or error hook
            self.gate.abort(state.ticket, reached_upstream=True)
        held = self._held.get(copy_id)
        if held is not None:
            self.gate.cancel(held[1])
        self._retries.pop(copy_id, None)
        if not retry.done.done():
            retry.done.set_result(None)

    def error(self, f: http.HTTPFlow) -> None:
        try:
            self._settle_error(f)
        finally:
            if self._retries:
                self._copy_ended(f)

    def _settle_error(self, f: http.HTTPFlow) -> None:
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
            "retrying_flows": len(self._retries),
            **self.gate.status(),
        }
