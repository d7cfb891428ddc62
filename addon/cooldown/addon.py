"""Cooldown's addons, assembled over one shared runtime: what `addon/cerebras.py` loads.

mitmproxy is built from small addons with one concern each; Cooldown follows suit:

- `Settings` (settings.py): the `cerebras_config` option, its file, reloads;
- `StatusPages` (pages.py): `http://cooldown.local/metrics`, the scrape listener, the
  `cooldown.status` command;
- `Metering` (metering.py): holds Cerebras requests until the gate releases them, settles
  them from upstream's answer, retries after a 429 (retry.py);
- `Departures` (departures.py): ends the wait of held flows whose client left (disconnect,
  kill, reset HTTP/2 stream), pauses again those resumed by hand;
- `WebColumns` (web.py): under mitmweb, a Comment column in the flow list;
- `Pacing` (paced.py): holds requests to other hosts for their turn (`rate_limits`).

They share one `Runtime` (runtime.py): the config, the gate, the metrics; metering and
departures also share the table of metered flows.
"""

from __future__ import annotations

from typing import Any

from .departures import Departures
from .metering import Metering
from .paced import Pacing
from .pages import StatusPages
from .runtime import Runtime
from .settings import Settings
from .web import WebColumns


class Cooldown:
    """The addons over one runtime; mitmproxy registers `addons` like a script's list."""

    def __init__(self) -> None:
        self.runtime = Runtime()
        self.settings = Settings(self.runtime)
        self.pages = StatusPages(self.runtime)
        self.metering = Metering(self.runtime)
        self.departures = Departures(self.runtime, self.metering.table, self.metering.retries)
        self.pacing = Pacing(self.runtime)
        self.web = WebColumns()

    @property
    def addons(self) -> list[Any]:
        # The status pages answer cooldown.local before metering looks at a flow.
        return [
            self.settings,
            self.pages,
            self.metering,
            self.departures,
            self.web,
            self.pacing,
        ]
