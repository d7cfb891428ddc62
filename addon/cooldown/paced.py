"""The pacing addon: requests to other hosts held for their turn (`rate_limits`).

The turn comes from the pacer (pacing.py) the moment a request arrives, so holding is one
timed wait per flow, shown paused in mitmweb like a held Cerebras request. What can end the
wait early is the same as for those: the client disconnects, or the flow is killed; a flow
resumed by hand is paused again (the pace decides). Cerebras hosts are the metering addon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from mitmproxy import connection, ctx, flow, hooks, http

from . import answers
from .pacing import PaceSlot
from .routing import is_cerebras
from .runtime import Runtime

log = logging.getLogger(__name__)


class Pacing:
    name = "cooldown-pacing"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Held flows by flow id: the flow and what ends its wait early.
        self._held: dict[str, tuple[http.HTTPFlow, asyncio.Event]] = {}
        runtime.metrics.paced_held = lambda: runtime.pacer.held

    @property
    def request(self) -> Callable[[http.HTTPFlow], Coroutine[Any, Any, None] | None] | None:
        """The `request` hook while the config has pacing rules; None (mitmproxy, which looks
        a hook up on every event, then calls nothing) without any."""
        config = self.runtime.config
        if config.default_rate_limit is None and not config.rate_limits:
            return None
        return self._request

    def _request(self, f: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """The flow's pacing, as a coroutine for mitmproxy to await; None (nothing to await)
        for a flow no rule paces. mitmproxy awaits what a hook returns when it is awaitable,
        and most flows (every Cerebras one) are not paced: they skip a coroutine each."""
        if f.response or f.error or not f.live:
            return None
        config = self.runtime.config
        if (config.default_rate_limit is None and not config.rate_limits) or is_cerebras(config, f):
            return None
        return self._pace(f)

    async def _pace(self, f: http.HTTPFlow) -> None:
        runtime = self.runtime
        limits = runtime.config.cerebras_limits
        slot = runtime.pacer.take(
            f.request.pretty_host,
            runtime.gate.clock(),
            limits.max_queue_depth,
            limits.request_timeout,
        )
        if slot is None:
            return
        if slot.refused is not None:
            runtime.metrics.paced(slot.rule, f"refused_{slot.refused}", 0.0)
            answers.refuse_paced(f, slot.refused, slot.wait)
            return
        went = await self._hold(f, slot) if slot.wait > 0 else True
        runtime.metrics.paced(slot.rule, "forwarded" if went else "cancelled", slot.wait)
        f.metadata["cooldown_paced"] = round(slot.wait if went else 0.0, 3)
        if not went and f.killable:
            f.kill()  # its client is gone or it was killed: nothing goes upstream

    async def _hold(self, f: http.HTTPFlow, slot: PaceSlot) -> bool:
        """Wait for the turn; False when the wait ended because the flow is gone."""
        left = asyncio.Event()
        self._held[f.id] = (f, left)
        f.intercept()
        f.comment = f"Cooldown: paced ({slot.rule}), held {slot.wait:.3f}s for its turn"
        self._update(f)
        went = False
        try:
            if f.client_conn.state is not connection.ConnectionState.CLOSED:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(left.wait(), slot.wait)
            went = not left.is_set() and f.live and f.error is None
            return went
        finally:
            del self._held[f.id]
            self.runtime.pacer.done(slot, self.runtime.gate.clock(), went)
            if f.intercepted:
                f.resume()
            if went:
                f.comment = f"Cooldown: paced ({slot.rule}), waited {slot.wait:.3f}s"
            self._update(f)

    def client_disconnected(self, client: connection.Client) -> None:
        for f, left in list(self._held.values()):
            if f.client_conn.id == client.id:
                left.set()

    @property
    def update(self) -> Callable[[list[flow.Flow]], None] | None:
        """The `update` hook while a flow is held for its turn; None (no call per event)
        otherwise, as for the departures addon."""
        return self._update_held if self._held else None

    def _update_held(self, flows: list[flow.Flow]) -> None:
        for f in flows:
            held = self._held.get(f.id)
            if held is None:
                continue
            if f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE:
                held[1].set()
            elif not f.intercepted and not held[1].is_set():
                f.intercept()  # resumed by hand: the pace still decides
                log.info("flow %s resumed by hand; held until its paced turn", f.id)
                self._update(f)

    @staticmethod
    def _update(f: flow.Flow) -> None:
        ctx.master.addons.trigger(hooks.UpdateHook([f]))
