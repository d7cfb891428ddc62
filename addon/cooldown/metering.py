"""The metering addon: Cerebras requests held until the gate releases them, then settled.

It decides which flows are metered, estimates them (off the event loop when the body is
large), holds each one paused in an `async def request` hook until the gate releases it, and
settles the reservation when the response (or an error) comes back. mitmproxy never
interrupts a waiting hook, so the addon listens for the events that mean a held flow is gone
(client disconnect, kill from the UI) and cancels its ticket itself. Each hook is a lookup in
the flow table and one step of that flow's life (flows.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import connection, ctx, hooks, http
from mitmproxy.utils import asyncio_utils

from . import answers
from .flows import (
    FlowTable,
    MeteredFlow,
    Phase,
    prepare,
    snapshot_request,
    take_priority,
)
from .retry import Retries
from .routing import client_of, is_cerebras, is_metered_path, key_for, route
from .runtime import Runtime
from .settle import OURS, account, answer_began, cool_down, re_estimate_held, settle_error
from .streams import find_stream, stream_reset
from .tickets import Outcome, Ticket, policy_of
from .upstream import SSEUsageTap, classify_429, read_answer_head

log = logging.getLogger(__name__)


OUTCOME_LABELS = {
    Outcome.RELEASED: "forwarded",
    Outcome.QUEUE_FULL: "refused_queue_full",
    Outcome.CLIENT_QUEUE_FULL: "refused_client_queue_full",
    Outcome.TIMEOUT: "refused_timeout",
    Outcome.BREAKER_OPEN: "refused_breaker_open",
    Outcome.SHUTDOWN: "refused_shutdown",
    Outcome.CANCELLED: "cancelled",
    Outcome.TOO_LARGE: "refused_too_large",
    Outcome.LIMITS_UNAVAILABLE: "refused_limits_unavailable",
}


class Metering:
    # An addon is named after its class; give it a name no built-in addon uses.
    name = "cooldown"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.table = FlowTable()
        self.retries = Retries(runtime, self.table)
        runtime.metrics.tracked_flows = self.table.__len__
        self._full_log = answers.QueueFullLog()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def running(self) -> None:
        self._tasks = [
            asyncio_utils.create_task(coro, name=name, keep_ref=True)
            for coro, name in ((self._answer_held_on_exit(), "cooldown shutdown watcher"),)
        ]

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.retries.stop_all("shutdown")
        self.runtime.gate.shutdown()

    async def _answer_held_on_exit(self) -> None:
        # Without this, held flows would wait for their timeout while the loop is torn down.
        await ctx.master.should_exit.wait()
        self.runtime.stopping = True  # from now on new requests are answered at once
        held = self.runtime.gate.shutdown()
        if held:
            log.info("shutting down: answered %d held request(s) with 503", held)

    # -- admission -------------------------------------------------------------------------------

    async def request(self, f: http.HTTPFlow) -> None:
        if f.response or f.error or not f.live:
            return
        metered = self.table.get(f.id)  # a retry's copy is entered when it is started
        if metered is None:
            config = self.runtime.config
            if not is_cerebras(config, f):
                return
            sent = take_priority(f.request)
            if not is_metered_path(f.request):
                route(config, f)
                return
            shape = await prepare(f, config.output_cap, sent.encoded)
            key = key_for(config, self.runtime.gate.keys, shape.model)
            if shape.clamped is not None:
                self.runtime.metrics.clamped(key)
            metered = MeteredFlow(f, key, shape, config.cerebras_limits.max_retries)
            metered.client = client_of(f, sent.authorization)
            metered.policy = policy_of(config, metered.client, sent.priority)
            self.table.add(metered)
        await self._admit(metered)

    async def _admit(self, metered: MeteredFlow) -> None:
        """Hold the flow until the gate releases it, then send it on; or answer it."""
        f, gate, is_copy = metered.flow, self.runtime.gate, metered.parent is not None
        if metered.stopped:
            self._end(metered)
            f.kill()  # the flow it retries needs no answer
            return
        if self.runtime.stopping:
            self._end(metered)
            self._refuse(f, Outcome.SHUTDOWN, 5.0)
            return
        estimate = metered.estimate = self.runtime.estimate(metered.key, metered.shape)
        guess = metered.cache = self.runtime.predict(metered.key, metered.shape, estimate)
        uncached, total = self.runtime.admission(estimate, guess)
        # A retry was admitted once already: a queue that filled up meanwhile does not refuse it.
        ticket = metered.ticket = gate.submit(
            uncached,
            key=metered.key,
            requeue=is_copy,
            client=metered.client,
            policy=metered.policy,
            need=estimate.need,
            total=total,
            waited=metered.waited_before,
        )
        f.metadata["cooldown_estimate"] = estimate.total
        if guess is not None:
            f.metadata["cooldown_cached_predicted"] = guess.prediction.cached
        outcome = await self._hold(metered) if ticket.held else ticket.outcome
        f.metadata["cooldown_waited"] = round(ticket.waited, 3)
        if outcome is Outcome.RELEASED and (
            not f.live or f.error or metered.stopped or stream_reset(metered.stream)
        ):
            # Released in the moment its client left (reset the stream, closed, killed it):
            # nothing goes upstream, and it counts as cancelled, not as forwarded.
            gate.abort(ticket, reached_upstream=False)
            outcome = Outcome.CANCELLED
        # A retry that goes out is counted by cooldown_retries_total, not as a new request.
        if outcome is not None and (not is_copy or outcome is not Outcome.RELEASED):
            waited = ticket.waited if ticket.queued else None
            self.runtime.metrics.request_outcome(metered.key, OUTCOME_LABELS[outcome], waited)
        if outcome is Outcome.RELEASED:
            metered.phase = Phase.IN_FLIGHT
            if not ticket.queued:
                f.comment = answers.released_comment(f, ticket, metered.cache)
            if metered.retries_left > 0:
                metered.request = snapshot_request(f.request)  # before routing and later addons
            route(self.runtime.config, f)
            if self.runtime.debug:
                log.debug(
                    "flow %s (%s) released after %.3fs, estimate %d tokens",
                    f.id,
                    metered.key,
                    ticket.waited,
                    ticket.tokens,
                )
            return
        self._end(metered)
        if outcome is Outcome.CANCELLED or outcome is None:
            if self.runtime.debug:
                log.debug("flow %s left the queue (client gone or killed)", f.id)
            if is_copy and f.killable:
                f.kill()  # a copy has no client to leave
            return
        self._refuse(f, outcome, ticket.retry_after, ticket)

    async def _hold(self, metered: MeteredFlow) -> Outcome | None:
        f, ticket, estimate = metered.flow, metered.ticket, metered.estimate
        assert ticket is not None and estimate is not None
        metered.phase = Phase.HELD
        self.table.held += 1  # while a flow is held, the departures addon watches updates
        f.intercept()
        f.comment = answers.held_comment(
            f, ticket, estimate, self.runtime.gate.depth, metered.cache
        )
        self._trigger_update(f)
        metered.stream = find_stream(f)  # to notice a reset stream (check_resets)
        try:
            if f.client_conn.state is connection.ConnectionState.CLOSED or stream_reset(
                metered.stream
            ):
                self.runtime.gate.cancel(ticket)  # the client left while we were estimating
            return await self.runtime.gate.wait(ticket)
        finally:
            metered.phase = Phase.ADMITTING
            self.table.held -= 1
            if ticket.tokens != max(estimate.total, 1):
                metered.estimate = self.runtime.estimate(
                    metered.key, metered.shape
                )  # calibration learnt while it waited
            if f.intercepted:
                f.resume()
            if ticket.outcome is Outcome.RELEASED:
                if metered.cache is not None:  # others' prompts may have been answered since
                    metered.cache = self.runtime.repredict(
                        metered.key, metered.cache.keys, metered.estimate or estimate
                    )
                f.comment = answers.released_comment(f, ticket, metered.cache)
            self._trigger_update(f)

    def _refuse(
        self, f: http.HTTPFlow, outcome: Outcome, retry_after: float, ticket: Ticket | None = None
    ) -> None:
        if ticket is not None and ticket.too_large is not None:
            answers.refuse(f, outcome, retry_after, ticket.too_large, ticket.key)
        else:
            answers.refuse(f, outcome, retry_after)
        if self.runtime.debug:
            log.debug("flow %s refused: %s", f.id, outcome.value)
        self._full_log.refused(outcome, self.runtime.gate.depth)

    def _end(self, metered: MeteredFlow) -> None:
        """`metered` will not go upstream again. A copy's entry stays until its replay is over
        (retry.py removes it): the flow it retries learns of its end through it."""
        if metered.parent is None:
            self.table.remove(metered)
        else:
            metered.phase = Phase.ENDED

    @staticmethod
    def _trigger_update(f: http.HTTPFlow) -> None:
        # Tells mitmweb/mitmproxy to redraw the flow (paused or resumed).
        ctx.master.addons.trigger(hooks.UpdateHook([f]))

    # -- the answer ------------------------------------------------------------------------------

    def responseheaders(self, f: http.HTTPFlow) -> None:
        metered = self.table.get(f.id)
        if metered is None or metered.phase is not Phase.IN_FLIGHT or f.response is None:
            return
        head = metered.head = read_answer_head(f.response.headers.fields, OURS)
        if not head.stream:
            # A whole answer: its body follows at once, and the client gets its headers only
            # with it, after the response hook. It is confirmed there, just before its settle.
            return
        answer_began(self.runtime, metered, f.response, head)
        if metered.parent is not None:
            # A retry's copy: buffered whole, to be handed to the flow it retries (whose
            # client then gets the stream at once); usage is read from the whole body.
            return
        # Pass the stream through unbuffered, reading usage from it on the way.
        metered.tap = SSEUsageTap()
        f.response.stream = metered.tap

    async def response(self, f: http.HTTPFlow) -> None:
        metered = self.table.get(f.id)
        if metered is None:
            return
        try:
            if metered.phase is not Phase.IN_FLIGHT or f.response is None:
                return
            head = metered.head
            if head is None:  # answered without upstream (a later addon set the response)
                head = read_answer_head(f.response.headers.fields)
            elif not metered.answered:
                answer_began(self.runtime, metered, f.response, head)
            if f.response.status_code == 429:
                verdict = classify_429(f.response.get_content(strict=False))
                self.runtime.metrics.upstream_429(metered.key, verdict.kind)
                cooldown = cool_down(self.runtime, metered, f.response, verdict)
                if self.retries.may_retry(metered):
                    await self.retries.run(metered, cooldown)
                    return
            if account(self.runtime, metered, f.response, head):
                re_estimate_held(self.runtime, self.table, metered.key)
        finally:
            self._end(metered)
            if metered.parent is not None:
                self.retries.copy_ended(metered)

    def error(self, f: http.HTTPFlow) -> None:
        metered = self.table.get(f.id)
        if metered is None:
            return
        try:
            if metered.phase is Phase.HELD and metered.ticket is not None:
                self.runtime.gate.cancel(metered.ticket)  # its request hook then ends it
            elif metered.phase is Phase.IN_FLIGHT:
                if metered.head is not None and not metered.answered and f.response is not None:
                    # A whole answer whose body broke off: upstream had begun answering.
                    answer_began(self.runtime, metered, f.response, metered.head)
                settle_error(self.runtime, metered)
                self._end(metered)
        finally:
            if metered.parent is not None:
                self.retries.copy_ended(metered)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        counts = self.table.counts()
        return {
            "held_flows": counts[Phase.HELD.value],
            "in_flight_flows": counts[Phase.IN_FLIGHT.value],
            "retrying_flows": self.table.copies(),  # retries' copies not yet over
            "tracked_flows": len(self.table),
            **self.runtime.gate.status(),
        }
