#!/usr/bin/env python3
"""A minimal, fast HTTP/1.1 stand-in for Cerebras on 127.0.0.1, for the proxy benchmarks.

The mock (tools/mock_cerebras.py) tokenizes every body in a thread per connection; measuring
the proxy's own cost needs an upstream much cheaper than the proxy, so this one answers every
request with the same prepared chat completion (with `usage` and an `x-ratelimit-*` family far
above any load, so the addon parses and learns from it as it would from Cerebras). Keep-alive,
Content-Length bodies only (what mitmproxy sends). Run it as a separate process:

    python benchmarks/fast_upstream.py --port 0      # prints "fast-upstream listening on PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

HOST = "127.0.0.1"
BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "llama3.1-8b",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 5, "total_tokens": 125},
    },
    separators=(",", ":"),
).encode()
LIMIT = 10**12
HEADERS = (
    "HTTP/1.1 200 OK\r\n"
    "Content-Type: application/json\r\n"
    f"Content-Length: {len(BODY)}\r\n"
    f"x-ratelimit-limit-requests-day: {LIMIT}\r\n"
    f"x-ratelimit-limit-tokens-minute: {LIMIT}\r\n"
    f"x-ratelimit-remaining-requests-day: {LIMIT}\r\n"
    f"x-ratelimit-remaining-tokens-minute: {LIMIT}\r\n"
    "x-ratelimit-reset-requests-day: 0.000\r\n"
    "x-ratelimit-reset-tokens-minute: 0.000\r\n"
    "\r\n"
).encode()
RESPONSE = HEADERS + BODY
MAX_HEADER_BYTES = 64 * 1024


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEADER_BYTES and self.transport is not None:
                    self.transport.close()
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            start = head.find(b"\r\ncontent-length:")
            if start >= 0:
                stop = head.find(b"\r\n", start + 2)
                length = int(head[start + 17 : stop if stop >= 0 else None].strip() or 0)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            assert self.transport is not None
            self.transport.write(RESPONSE)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, HOST, port, backlog=1024)
    print(f"fast-upstream listening on {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
