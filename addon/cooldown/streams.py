"""Whether the client still wants a held flow: a reset HTTP/2 stream, or a closed connection.

mitmproxy fires no hook while our `request` hook is pending: the layer of a stream that waits
for a hook queues every event for it (`Layer._paused_event_queue`, proxy/layer.py), and a
client's RST_STREAM (or its connection closing) lands there at once as a
`RequestProtocolError` (layers/http/_http2.py, _http1.py). mitmproxy itself looks in that
queue when the hook returns (`HttpStream.check_killed`); this module looks earlier, so that a
held stream its client reset leaves the queue within a second instead of holding its slot
until its release (and then being counted as forwarded).

This reads mitmproxy internals (12.x: the proxyserver's connection handlers, `HttpLayer.streams`,
`HttpStream.flow`, the paused-event queue); `tests/test_streams.py` checks they are there. Any
surprise answers "not reset", which is the behaviour without this module.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, http
from mitmproxy.proxy.layers.http import HttpLayer, HttpStream
from mitmproxy.proxy.layers.http._events import RequestProtocolError

log = logging.getLogger(__name__)

# The attribute of a paused layer that holds the events it has not handled yet.
PAUSED_EVENTS = "_paused_event_queue"


def find_stream(f: http.HTTPFlow) -> HttpStream | None:
    """The stream layer that carries live flow `f` (None: its connection is gone, it is a
    replayed copy, or mitmproxy's internals differ). Walks one connection's layers, ~20 µs:
    once per held flow."""
    try:
        proxyserver: Any = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(f.client_conn.id) if proxyserver else None
        if handler is None:
            return None
        todo: list[Any] = list(handler.layer.context.layers)
        seen: set[int] = set()
        while todo:
            layer = todo.pop()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, HttpLayer):
                todo.extend(layer.streams.values())
            elif isinstance(layer, HttpStream):
                if getattr(layer, "flow", None) is f:
                    return layer
                todo.extend(layer.context.layers)  # the inner stack of a CONNECT tunnel
    except Exception:  # mitmproxy's internals moved: behave as without this module
        log.debug("could not find the stream of flow %s", f.id, exc_info=True)
    return None


def stream_reset(stream: HttpStream | None) -> bool:
    """The client reset this stream (HTTP/2 RST_STREAM) or closed its connection while the
    stream waits for our hook. About 0.2 µs for a stream with nothing queued."""
    if stream is None:
        return False
    queued = getattr(stream, PAUSED_EVENTS, None)
    if not queued:
        return False
    return any(isinstance(event, RequestProtocolError) for event in queued)
