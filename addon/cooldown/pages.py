"""The status addon: Cooldown's read-only pages, through the proxy and on a scrape listener.

`http://cooldown.local/metrics` (Prometheus text) and `/metrics.json` are answered by the
proxy itself, like mitmproxy's `mitm.it` onboarding app; `metrics_listen` serves the same
pages on a plain address for scrapers; `cooldown.status` prints the JSON in mitmproxy's
console; while requests are held, an INFO line per model says why (held.py). Nothing here
changes state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from mitmproxy import command, http
from mitmproxy.utils import asyncio_utils

from .config import Config
from .held import HeldLog
from .listener import MetricsListener
from .metrics import PROMETHEUS_CONTENT_TYPE
from .runtime import Runtime

log = logging.getLogger(__name__)

# A made-up host, answered by the addon itself: http://cooldown.local/metrics through the proxy.
STATUS_HOST = "cooldown.local"
# The Prometheus page is served as rendered for this long (seconds); scrapes come every 15 s+.
RENDER_TTL = 1.0
# How often the held-requests line may be logged, and how often that is looked at.
HELD_LOG_SECONDS = 10.0
HELD_CHECK_SECONDS = 1.0
clock = time.monotonic  # (tests replace it)


class StatusPages:
    name = "cooldown-status"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._listener: MetricsListener | None = None
        self._listener_wanted: tuple[str, int] | None = None
        self._rendered: tuple[float, bytes] | None = None
        self._held_log = HeldLog(HELD_LOG_SECONDS)
        self._held_task: asyncio.Task[None] | None = None
        runtime.on_config(self._config_changed)

    # -- pages -----------------------------------------------------------------------------------

    def render(self, path: str) -> tuple[int, str, bytes]:
        """A page by path: (status, content type, body)."""
        route = path.split("?", 1)[0].rstrip("/")
        if route == "/metrics":
            return 200, PROMETHEUS_CONTENT_TYPE, self._prometheus()
        if route in ("/metrics.json", "/status"):
            body = json.dumps(self.runtime.metrics.snapshot(), indent=2, sort_keys=False)
            return 200, "application/json", body.encode() + b"\n"
        return 404, "text/plain", b"Cooldown: /metrics (Prometheus) or /metrics.json\n"

    def _prometheus(self) -> bytes:
        """The Prometheus text, rendered at most once per RENDER_TTL: with 64 models it takes
        tens of ms on the event loop, and a client scraping in a loop must not turn that into
        a stall for every other flow. (The JSON view, a few ms, is always fresh.)"""
        now = clock()
        if self._rendered is None or now - self._rendered[0] >= RENDER_TTL:
            self._rendered = (now, self.runtime.metrics.prometheus())
        return self._rendered[1]

    def request(self, f: http.HTTPFlow) -> None:
        # The destination (absolute-form through the proxy); not the Host header, which
        # costs a parse on every flow and names no real host here.
        if f.response or f.error or f.request.host.lower() != STATUS_HOST:
            return
        if f.request.method not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain", b"read-only: GET only\n"
        else:
            status, ctype, body = self.render(f.request.path)
        f.response = http.Response.make(status, body, {"Content-Type": ctype})
        if status == 405:
            f.response.headers["Allow"] = "GET, HEAD"
        if f.request.method == "HEAD":
            # A HEAD answer carries the GET's length but no content (RFC 9110, 9.3.2).
            f.response.raw_content = b""
            f.response.headers["content-length"] = str(len(body))

    @command.command("cooldown.status")  # type: ignore[untyped-decorator]
    def status_command(self) -> str:
        """Cooldown's limiter state: queue, usage of every limit, breaker, counts (JSON)."""
        return json.dumps(self.runtime.metrics.snapshot(), indent=2)

    # -- the scrape listener ---------------------------------------------------------------------

    @property
    def listener(self) -> MetricsListener | None:
        return self._listener

    def running(self) -> None:
        self._restart_listener()
        self._held_task = asyncio_utils.create_task(
            self._report_held(), name="cooldown held reporter", keep_ref=True
        )

    def done(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._held_task is not None:
            self._held_task.cancel()
            self._held_task = None

    # -- the held-requests line ------------------------------------------------------------------

    def report_held(self) -> list[str]:
        """Log what is held, if anything is and the last line is old enough; the lines."""
        gate = self.runtime.gate
        lines = self._held_log.lines(gate.held(), clock()) if gate.depth else []
        for line in lines:
            log.info("Cooldown: %s", line)
        return lines

    async def _report_held(self) -> None:
        while True:
            await asyncio.sleep(HELD_CHECK_SECONDS)
            self.report_held()

    def _config_changed(self, config: Config) -> None:
        if self.runtime.running:
            self._restart_listener()

    def _restart_listener(self) -> None:
        """(Re)start the scrape listener when `metrics_listen` is set or changed."""
        wanted = self.runtime.config.metrics_listen
        if wanted == self._listener_wanted and (wanted is None or self._listener is not None):
            return
        self._listener_wanted = wanted
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if wanted is not None:
            self._listener = MetricsListener(wanted[0], wanted[1], self.render)
            asyncio_utils.create_task(
                self._start(self._listener), name="cooldown metrics listener", keep_ref=True
            )

    @staticmethod
    async def _start(listener: MetricsListener) -> None:
        try:
            await listener.start()
        except OSError as e:
            log.error("Cooldown metrics listener %s:%d: %s", listener.host, listener.port, e)
