"""The mitmweb addon: a Comment column in mitmweb's flow list, where Cooldown says why a flow
waits, what it was estimated at and what it used.

Without it that text is only in each flow's Comment tab. mitmweb lists flows with the columns
of its `web_columns` option, which only mitmweb has (mitmdump and the console have no such
option); so the column is added once, at start-up, under mitmweb only, and never when the user
set `web_columns` (on the command line or in mitmproxy's config.yaml): their choice stands.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

log = logging.getLogger(__name__)

OPTION = "web_columns"
COLUMN = "comment"


class WebColumns:
    name = "cooldown-web"

    def __init__(self) -> None:
        self._decided = False

    def configure(self, updated: set[str]) -> None:
        if self._decided or OPTION not in updated or OPTION not in ctx.options:
            return
        self._decided = True  # later changes (in mitmweb's options dialog) are the user's
        if ctx.options.has_changed(OPTION):
            return
        columns = list(getattr(ctx.options, OPTION))
        if COLUMN not in columns:
            ctx.options.update(**{OPTION: [*columns, COLUMN]})
            log.debug("Cooldown added the %s column to mitmweb's flow list", COLUMN)
