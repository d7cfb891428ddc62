"""A raw HTTP/2 client through the proxy, for tests and benchmarks that need what httpx cannot
do: many streams on one connection, and a stream reset (RST_STREAM) with the connection kept.

`H2Client.open(proxy_port, ca_file)` sends CONNECT api.cerebras.ai:443 to the proxy, then TLS
with mitmproxy's CA and ALPN h2 (mitmproxy offers h2 to a client that asks, even before it
has an upstream connection: the lazy connection strategy). Then:

* `post(path, body, headers)` opens a stream and sends the whole request; its stream id.
* `reset(stream_id)` sends RST_STREAM(CANCEL) for it; the connection stays open.
* `ping()` sends a PING (the connection is in use); `pings_acked` counts the answers.
* `response(stream_id)` waits for the stream's answer: an `H2Response` (status, headers,
  body), or `StreamGone` if the stream was reset (by either side) or the connection ended.

One reader task feeds the h2 state machine; everything runs on the caller's event loop.
Bodies up to the peer's flow-control window (64 KiB by default) are sent in one go, which is
all the callers need. Only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

HOST = "127.0.0.1"


class StreamGone(Exception):
    """The stream ended without a complete answer: reset, or its connection closed."""


@dataclass
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class _Stream:
    done: asyncio.Future[H2Response]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class H2Client:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.authority = authority
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.streams: dict[int, _Stream] = {}
        self.pings_acked = 0
        self.closed = asyncio.Event()
        self._settings_seen = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        proxy_port: int,
        ca_file: Path,
        host: str = "api.cerebras.ai",
        timeout: float = 10.0,
    ) -> H2Client:
        """CONNECT + TLS (ALPN h2) through the proxy on 127.0.0.1:`proxy_port`."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, proxy_port, limit=1 << 20), timeout
        )
        try:
            authority = f"{host}:443"
            writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"CONNECT answered {head[:80]!r}")
            context = ssl.create_default_context(cafile=str(ca_file))
            context.set_alpn_protocols(["h2"])
            await asyncio.wait_for(writer.start_tls(context, server_hostname=host), timeout)
            tls = writer.get_extra_info("ssl_object")
            chosen = tls.selected_alpn_protocol() if tls is not None else None
            if chosen != "h2":
                raise ConnectionError(f"the proxy chose ALPN {chosen!r}, not h2")
        except BaseException:
            writer.close()
            raise
        client = cls(reader, writer, host)
        client.conn.initiate_connection()
        client._flush()
        client._reader_task = asyncio.create_task(client._read(), name="h2client reader")
        # The proxy's SETTINGS (its MAX_CONCURRENT_STREAMS) before the first stream.
        await asyncio.wait_for(client._settings_seen.wait(), timeout)
        return client

    # -- requests ---------------------------------------------------------------------------

    def post(
        self,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> int:
        """Open a stream with a whole POST request; its stream id."""
        if self.closed.is_set():
            raise StreamGone("the connection is closed")
        stream_id = self.conn.get_next_available_stream_id()
        self.streams[stream_id] = _Stream(asyncio.get_running_loop().create_future())
        request_headers = [
            (":method", "POST"),
            (":path", path),
            (":scheme", "https"),
            (":authority", self.authority),
            ("content-type", content_type),
            ("content-length", str(len(body))),
            *headers,
        ]
        self.conn.send_headers(stream_id, request_headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        self._flush()
        return stream_id

    def reset(self, stream_id: int) -> None:
        """RST_STREAM(CANCEL): the client no longer wants the answer; the connection stays."""
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush()
        self._finish(stream_id, StreamGone(f"stream {stream_id} reset by the client"))

    def ping(self) -> None:
        self.conn.ping(b"cooldown")
        self._flush()

    async def response(self, stream_id: int, timeout: float | None = None) -> H2Response:
        return await asyncio.wait_for(asyncio.shield(self.streams[stream_id].done), timeout)

    def answered(self, stream_id: int) -> bool:
        return self.streams[stream_id].done.done()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close_connection()
            self._flush()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task
        self._end_all("the client closed the connection")

    # -- the reader ---------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for event in self.conn.receive_data(data):
                    self._handle(event)
                self._flush()
        except (OSError, h2.exceptions.ProtocolError, ssl.SSLError):
            pass
        finally:
            self._end_all("the connection ended")

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_seen.set()
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings_acked += 1
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                headers = {str(k): str(v) for k, v in event.headers or []}
                stream.status = int(headers.get(":status", "0"))
                stream.headers = headers
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.body += event.data or b""
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.done.done():
                answer = H2Response(stream.status, stream.headers, bytes(stream.body))
                stream.done.set_result(answer)
        elif isinstance(event, h2.events.StreamReset):
            self._finish(event.stream_id, StreamGone(f"stream {event.stream_id} reset by peer"))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._end_all(f"GOAWAY ({event.error_code})")

    def _finish(self, stream_id: int, error: Exception) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.done.done():
            stream.done.set_exception(error)
            stream.done.exception()  # retrieved: no "never retrieved" warning for a reset

    def _end_all(self, why: str) -> None:
        self.closed.set()
        for stream_id in list(self.streams):
            self._finish(stream_id, StreamGone(why))
