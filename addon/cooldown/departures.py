"""The departures addon: held flows whose client is gone, or that someone else resolved.

A held flow waits inside the metering addon's `request` hook, which mitmproxy never
interrupts; so the signs that its client no longer wants it come from elsewhere and end its
wait here: the client disconnected, the flow was killed, its HTTP/2 stream was reset (no event
for that: checked every second, see streams.py), or it was resumed by hand (then it is paused
again and its comment says so: the limiter decides). A flow waiting for its retry after a 429
has the retry stopped instead.

mitmweb's Resume and Kill buttons change the flow and refresh mitmweb's own view, but trigger no
`update` hook (tools/web/app.py: `ResumeFlow`, `KillFlow`); the console's commands do. So a
resume is also awaited on the flow itself (`wait_for_resume`, one task per held flow), and a
kill is looked for every second with the resets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mitmproxy import connection, ctx, flow, hooks
from mitmproxy.utils import asyncio_utils

from . import answers
from .flows import FlowTable, MeteredFlow, Phase
from .retry import Retries
from .runtime import Runtime
from .streams import stream_reset

log = logging.getLogger(__name__)

# How often held flows are checked for a client that reset its stream (or a kill in mitmweb).
RESET_CHECK_SECONDS = 1.0


class Departures:
    name = "cooldown-departures"

    def __init__(self, runtime: Runtime, table: FlowTable, retries: Retries) -> None:
        self.runtime = runtime
        self.table = table
        self.retries = retries
        self._task: asyncio.Task[None] | None = None
        self._resume_watches: dict[str, asyncio.Task[None]] = {}  # by flow id, while held

    @property
    def watching(self) -> int:
        """Held flows whose resume by hand is awaited (0 once nothing is held)."""
        return len(self._resume_watches)

    def running(self) -> None:
        self._task = asyncio_utils.create_task(
            self._watch_resets(), name="cooldown reset watcher", keep_ref=True
        )

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for watch in self._resume_watches.values():
            watch.cancel()
        self._resume_watches.clear()

    def client_disconnected(self, client: connection.Client) -> None:
        for metered in self.table.of_client(client.id):
            if metered.phase is Phase.HELD and metered.ticket is not None:
                self.runtime.gate.cancel(metered.ticket)
            elif metered.phase is Phase.RETRYING:
                self.retries.stop(metered, "client_gone")

    @property
    def update(self) -> Callable[[list[flow.Flow]], None] | None:
        """The `update` hook while a flow is held or waits for its retry; None otherwise.

        mitmproxy looks a hook up on the addon for every event (`getattr`, skipped when
        falsy) and triggers `update` after every hook of every flow: four times per request.
        Only held flows and flows waiting for a retry's copy (the table has copies) have
        anything to check, so most flows cost no call at all.
        """
        if self.table.held or self.table.copies():
            return self._update
        return None

    def _update(self, flows: list[flow.Flow]) -> None:
        for f in flows:
            metered = self.table.get(f.id)
            if metered is None:
                continue
            killed = _killed(f)
            if metered.phase is Phase.RETRYING and killed:
                self.retries.stop(metered, "killed")
            elif metered.phase is not Phase.HELD or metered.ticket is None:
                continue
            elif killed:
                self.runtime.gate.cancel(metered.ticket)
            elif not f.intercepted and metered.ticket.held:
                self._pause_again(metered)
            elif f.intercepted and f.id not in self._resume_watches:
                self._resume_watches[f.id] = asyncio_utils.create_task(
                    self._await_resume(metered), name="cooldown resume watch", keep_ref=True
                )

    async def _await_resume(self, metered: MeteredFlow) -> None:
        """Pause a held flow again the moment it is resumed by hand (mitmweb's button)."""
        try:
            await metered.flow.wait_for_resume()
        finally:
            self._resume_watches.pop(metered.id, None)
        f, ticket = metered.flow, metered.ticket
        held = metered.phase is Phase.HELD and ticket is not None and ticket.held
        if held and not f.intercepted and not _killed(f):
            self._pause_again(metered)

    @staticmethod
    def _pause_again(metered: MeteredFlow) -> None:
        """The limiter still decides: shown paused again, with a comment that says so."""
        f = metered.flow
        f.intercept()
        f.comment = answers.resumed_comment(f.comment)
        log.info("flow %s resumed by hand; held until the limiter releases it", f.id)
        ctx.master.addons.trigger(hooks.UpdateHook([f]))  # redraws it, and watches again

    def check_resets(self) -> int:
        """Cancel every held flow whose client reset its stream or left, or that was killed
        (mitmweb's Kill triggers no hook); how many."""
        gone = [
            m.ticket
            for m in self.table
            if m.phase is Phase.HELD
            and m.ticket is not None
            and (stream_reset(m.stream) or _killed(m.flow))
        ]
        for ticket in gone:
            self.runtime.gate.cancel(ticket)
        for flow_id, watch in list(self._resume_watches.items()):
            metered = self.table.get(flow_id)
            if metered is None or metered.phase is not Phase.HELD:
                watch.cancel()  # a killed flow's resume never comes
                del self._resume_watches[flow_id]
        return len(gone)

    async def _watch_resets(self) -> None:
        while True:
            await asyncio.sleep(RESET_CHECK_SECONDS)
            if self.runtime.gate.depth or self._resume_watches:
                self.check_resets()


def _killed(f: flow.Flow) -> bool:
    return f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE
