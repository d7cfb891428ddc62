"""Retries after an upstream 429, re-sent through mitmproxy itself.

A copy of the 429'd request (as the metering addon released it) is replayed with mitmproxy's
client-replay handler, so the proxy mode, other addons and TLS options apply to it as to the
original. The copy is metered like any request (held again while the model cools down); the
original waits and then answers its client with the copy's answer. A copy whose original no
longer needs an answer (client gone, flow killed, shutdown) is stopped and frees what it holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, ctx, http
from mitmproxy.addons.clientplayback import MockServer, ReplayHandler
from mitmproxy.proxy import layers
from mitmproxy.proxy.layers.http import HTTPMode

from . import answers
from .flows import FlowTable, MeteredFlow, Phase, Retry
from .runtime import Runtime
from .tickets import Outcome

log = logging.getLogger(__name__)


class RetryReplay(ReplayHandler):
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


def copy_for_retry(f: http.HTTPFlow, request: http.Request, attempt: int) -> http.HTTPFlow:
    """A new flow that re-sends `request` (the original's, as released) as attempt `attempt`."""
    retry_copy: http.HTTPFlow = f.copy()
    retry_copy.request = request
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
    retry_copy.metadata = {
        "cooldown_retry_of": f.id,
        "cooldown_attempt": attempt,
        "cooldown_attempts": attempt,
    }
    retry_copy.comment = f"{answers.label(retry_copy)}after upstream 429"
    return retry_copy


class Retries:
    """Starts, stops and finishes the copies of 429'd flows; their entries live in `table`."""

    def __init__(self, runtime: Runtime, table: FlowTable) -> None:
        self.runtime = runtime
        self.table = table
        # (flow, options) -> a handler with `replay()` and `stop()`; tests swap it.
        self.replay_handler: Callable[[http.HTTPFlow, Any], Any] = RetryReplay

    @staticmethod
    def may_retry(metered: MeteredFlow) -> bool:
        # Nobody waits for a stopped copy's answer, so it is not retried in turn.
        return metered.retries_left > 0 and metered.request is not None and not metered.stopped

    async def run(self, metered: MeteredFlow, cooldown: float) -> None:
        """Re-send a copy of `metered` and answer its flow with the copy's end."""
        f, gate = metered.flow, self.runtime.gate
        assert metered.ticket is not None
        gate.finish(metered.ticket, 429, None)  # settled at its headers already, normally
        self.runtime.metrics.retry(metered.key)
        if f.client_conn.state is connection.ConnectionState.CLOSED:
            f.metadata["cooldown_refused"] = "client_gone"
            return
        retry = self._start(metered)
        log.info("retrying flow %s after %.1fs as flow %s", f.id, cooldown, retry.copy.id)
        try:
            await retry.done
        except asyncio.CancelledError:
            self.stop(metered, "shutdown")  # the hook itself is being cancelled
            raise
        if retry.stopped == "shutdown":
            answers.refuse(f, Outcome.SHUTDOWN, 5.0)
        elif retry.stopped is not None:
            if retry.stopped == "client_gone":
                log.debug("client of flow %s left during a retry; retry stopped", f.id)
            else:
                log.debug("flow %s %s during a retry; retry stopped", f.id, retry.stopped)
            f.metadata["cooldown_refused"] = retry.stopped
        else:
            self._take_over(f, retry.copy)

    def _start(self, metered: MeteredFlow) -> Retry:
        """Replay a copy of `metered`'s request, as the addon released it, through mitmproxy."""
        assert metered.request is not None and metered.ticket is not None
        request, metered.request = metered.request, None
        retry_copy = copy_for_retry(metered.flow, request, metered.attempt + 1)
        retry = Retry(copy=retry_copy, done=asyncio.get_running_loop().create_future())
        copy_entry = MeteredFlow(
            retry_copy,
            metered.key,
            metered.shape,
            retries_left=metered.retries_left - 1,
            attempt=metered.attempt + 1,
            parent=metered,
            waited_before=metered.waited_before + metered.ticket.waited,
            client=metered.client,
            policy=metered.policy,
        )
        self.table.add(copy_entry)
        metered.retry = retry
        metered.phase = Phase.RETRYING
        try:
            retry.handler = self.replay_handler(retry_copy, ctx.options)
            retry.task = asyncio.ensure_future(retry.handler.replay())
        except Exception:
            log.exception("could not start the retry of flow %s", metered.id)
            self._replay_finished(copy_entry, None)
        else:
            retry.task.add_done_callback(lambda task: self._replay_finished(copy_entry, task))
        return retry

    @staticmethod
    def _take_over(f: http.HTTPFlow, retry_copy: http.HTTPFlow) -> None:
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
        f.response = answers.retry_failed(reason)

    def copy_ended(self, copy_entry: MeteredFlow) -> None:
        """A copy's response or error hook ran: the flow it retries may go on."""
        parent = copy_entry.parent
        if parent is not None and parent.retry is not None and not parent.retry.done.done():
            parent.retry.done.set_result(None)

    def stop(self, metered: MeteredFlow, reason: str) -> None:
        """`metered` waits for a retry and needs no answer any more: stop the copy, free what
        it holds. Held, its ticket is cancelled (and the copy killed); in flight, it is killed
        and its upstream connection closed, so its error hook settles its reservation."""
        retry = metered.retry
        if retry is None or retry.stopped is not None:
            return
        retry.stopped = reason
        copy_entry = self.table.get(retry.copy.id)
        if copy_entry is not None:
            copy_entry.stopped = reason
            if copy_entry.phase is Phase.HELD and copy_entry.ticket is not None:
                self.runtime.gate.cancel(copy_entry.ticket)
            elif copy_entry.phase is Phase.IN_FLIGHT:
                if retry.copy.killable:
                    retry.copy.kill()
                if retry.handler is not None:
                    retry.handler.stop()
            elif copy_entry.phase is Phase.RETRYING:
                self.stop(copy_entry, reason)  # the copy waits for a retry of its own
        if not retry.done.done():
            retry.done.set_result(None)

    def stop_all(self, reason: str) -> None:
        """Nothing waits on a retry past shutdown."""
        for metered in self.table:
            if metered.phase is Phase.RETRYING and metered.retry is not None:
                self.stop(metered, reason)
                if metered.retry.task is not None:
                    metered.retry.task.cancel()

    def _replay_finished(self, copy_entry: MeteredFlow, task: asyncio.Task[None] | None) -> None:
        """The copy's replay is over: the last safety net for its reservation."""
        parent = copy_entry.parent
        if task is not None and not task.cancelled() and (e := task.exception()) is not None:
            log.warning("retry of flow %s crashed: %r", parent.id if parent else "?", e)
        gate, ticket = self.runtime.gate, copy_entry.ticket
        if ticket is not None:
            if copy_entry.phase is Phase.IN_FLIGHT:  # ended without its response or error hook
                gate.abort(ticket, reached_upstream=True)
            elif copy_entry.phase is Phase.HELD:
                gate.cancel(ticket)
        self.table.remove(copy_entry)
        self.copy_ended(copy_entry)
