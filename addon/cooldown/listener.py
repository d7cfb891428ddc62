"""A tiny read-only HTTP listener for scrapers, on the proxy's own event loop.

Prometheus scrapes a plain address; going through the proxy (`http://cooldown.local/metrics`
with `curl -x`) is handy for people but awkward for scrapers. Serving on mitmproxy's loop
(rather than prometheus_client's threaded server) means metrics are read on the same thread
that changes them: no locks, no torn reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Render = Callable[[str], tuple[int, str, bytes]]  # path -> (status, content type, body)
_MAX_REQUEST_HEAD = 16 * 1024
_READ_TIMEOUT = 10.0


class MetricsListener:
    def __init__(self, host: str, port: int, render: Render) -> None:
        self.host = host
        self.port = port
        self.render = render
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        # `limit` bounds what readuntil buffers: a longer head is refused, not accumulated.
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=_MAX_REQUEST_HEAD
        )
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("Cooldown metrics listening at http://%s:%d/metrics", self.host, self.port)

    @property
    def serving(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            except asyncio.LimitOverrunError:
                writer.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
                await writer.drain()
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
            elif parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"read-only: GET only\n"
            else:
                status, ctype, body = self.render(parts[1])
                if parts[0] == "HEAD":
                    body = b""
            allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{allow}"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError):
            pass  # a client that sends no complete request head gets nothing
        except ConnectionError:
            pass  # the scraper went away; nothing to answer
        finally:
            writer.close()
