"""The departures addon: held flows whose client is gone, or that someone else resolved.

A held flow waits inside the metering addon's `request` hook, which mitmproxy never
interrupts; so the signs that its client no longer wants it come from elsewhere and end its
wait here: the client disconnected, the flow was killed (mitmweb), its HTTP/2 stream was reset
(no event for that: checked every second, see streams.py), or it was resumed by hand (then it
is paused again: the limiter decides). A flow waiting for its retry after a 429 has the retry
stopped instead.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import connection, ctx, flow, hooks
from mitmproxy.utils import asyncio_utils

from .flows import FlowTable, Phase
from .retry import Retries
from .runtime import Runtime
from .streams import stream_reset

log = logging.getLogger(__name__)

# How often held flows are checked for a client that reset its stream.
RESET_CHECK_SECONDS = 1.0


class Departures:
    name = "cooldown-departures"

    def __init__(self, runtime: Runtime, table: FlowTable, retries: Retries) -> None:
        self.runtime = runtime
        self.table = table
        self.retries = retries
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        self._task = asyncio_utils.create_task(
            self._watch_resets(), name="cooldown reset watcher", keep_ref=True
        )

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def client_disconnected(self, client: connection.Client) -> None:
        for metered in self.table.of_client(client.id):
            if metered.phase is Phase.HELD and metered.ticket is not None:
                self.runtime.gate.cancel(metered.ticket)
            elif metered.phase is Phase.RETRYING:
                self.retries.stop(metered, "client_gone")

    def update(self, flows: list[flow.Flow]) -> None:
        for f in flows:
            metered = self.table.get(f.id)
            if metered is None:
                continue
            killed = f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE
            if metered.phase is Phase.RETRYING and killed:
                self.retries.stop(metered, "killed")
            elif metered.phase is not Phase.HELD or metered.ticket is None:
                continue
            elif killed:
                self.runtime.gate.cancel(metered.ticket)
            elif not f.intercepted and metered.ticket.held:
                # Resumed by hand (mitmweb): the limiter still decides, so it stays paused.
                f.intercept()
                log.info("flow %s resumed by hand; held until the limiter releases it", f.id)
                ctx.master.addons.trigger(hooks.UpdateHook([f]))

    def check_resets(self) -> int:
        """Cancel every held flow whose client reset its stream or left; how many."""
        gone = [
            m.ticket
            for m in self.table
            if m.phase is Phase.HELD and m.ticket is not None and stream_reset(m.stream)
        ]
        for ticket in gone:
            self.runtime.gate.cancel(ticket)
        return len(gone)

    async def _watch_resets(self) -> None:
        while True:
            await asyncio.sleep(RESET_CHECK_SECONDS)
            if self.runtime.gate.depth:
                self.check_resets()
