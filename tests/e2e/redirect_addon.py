"""A second addon for the e2e tests: moves upstream connections for one address to another.

Loaded beside Cooldown (`-s addon/cerebras.py -s tests/e2e/redirect_addon.py`). It acts in
`server_connect`, when mitmproxy opens an upstream connection: that comes after every
addon's `request` hook (Cooldown has released the flow by then), so the load order does not
matter, and the request itself (its URL, its Host header) is left as the client sent it. A
request re-sent outside mitmproxy would never pass through here.

Options: `--set redirect_from=HOST:PORT --set redirect_to=HOST:PORT`. Each redirect is
logged as `redirect: FROM -> TO`, which the tests count.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx

log = logging.getLogger(__name__)


def _address(value: str) -> tuple[str, int] | None:
    host, _, port = value.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


class Redirect:
    name = "e2e_redirect"  # not a built-in addon's name

    def load(self, loader: Any) -> None:
        loader.add_option("redirect_from", str, "", "HOST:PORT whose connections are moved")
        loader.add_option("redirect_to", str, "", "HOST:PORT they go to instead")

    def server_connect(self, data: Any) -> None:
        source = _address(ctx.options.redirect_from)
        target = _address(ctx.options.redirect_to)
        if source is None or target is None or data.server.address is None:
            return
        if tuple(data.server.address) == source:
            data.server.address = target
            log.info("redirect: %s:%d -> %s:%d", *source, *target)


addons = [Redirect()]
