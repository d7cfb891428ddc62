"""Benchmark 4: resident memory of mitmdump + Cooldown with 1,000 and 10,000 held requests.

Requests are held because the proxy's `rpm_limit` is 1 and a warm-up request has used it;
`max_queue_depth` and `request_timeout` are far above the test. Each held request is its own
client connection (plain HTTP, absolute-form, ~2 KB chat body, what a client without HTTP/2
does), so the figure includes mitmproxy's per-connection state, not only Cooldown's. RSS is read
from /proc/PID/status (VmRSS) once the proxy's own metrics report the queue depth, against the
idle RSS of the same process after the warm-up. A second, smaller run (full runs only) holds
1,000 requests over HTTPS (CONNECT + TLS through mitmproxy's CA), as real clients send them, to
show what TLS adds per connection. The open-files limit is raised for the runner and inherited
by mitmdump.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from pathlib import Path
from typing import Any

from tools.launch import rss_kib

from .common import (
    HOST,
    BenchResult,
    Figure,
    RawConnection,
    build_request,
    raise_nofile,
    start_fast_upstream,
    start_mitmdump,
)
from .context import Context

TARGETS_MB = {1_000: 100, 10_000: 600}
OPEN_CONCURRENCY = 100
SETTLE_SECONDS = 1.0


def held_config(upstream: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "cerebras_limits": {
            "rpm_limit": 1,
            "tpm_limit": 10**9,
            "max_queue_depth": 50_000,
            "request_timeout": "1h",
        }
    }
    if upstream is None:
        config["cerebras_hosts"] = [HOST]
    else:
        config["cerebras_upstream"] = upstream
    return config


def body_2kb(index: int) -> bytes:
    text = (f"request {index}: " + "please hold this request until it fits the limits. " * 40)[
        :1_900
    ]
    return json.dumps(
        {
            "model": "llama3.1-8b",
            "messages": [{"role": "user", "content": text}],
            "max_completion_tokens": 50,
        }
    ).encode()


async def queue_depth(proxy_port: int) -> int:
    conn = await RawConnection.open(proxy_port)
    try:
        request = build_request("GET", "http://cooldown.local/metrics.json", "cooldown.local")
        status, _, body = await asyncio.wait_for(conn.request(request), 30)
        if status != 200:
            raise RuntimeError(f"metrics.json answered {status}")
        return int(json.loads(body)["cerebras_queue_depth"])
    finally:
        await conn.close()


async def wait_depth(proxy_port: int, wanted: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    depth = -1
    while time.monotonic() < deadline:
        depth = await queue_depth(proxy_port)
        if depth == wanted:
            return depth
        await asyncio.sleep(0.5)
    raise RuntimeError(f"queue depth {depth}, wanted {wanted}, after {timeout:g}s")


class Holder:
    """Opens client connections that each send one request and wait (held by the proxy)."""

    def __init__(self, proxy_port: int, target: str, tls: SSLTarget | None = None) -> None:
        self.proxy_port = proxy_port
        self.target = target  # absolute URL (plain) or path (TLS)
        self.tls = tls
        self.connections: list[RawConnection] = []
        self.failures = 0

    async def _open_one(self, index: int) -> None:
        body = body_2kb(index)
        headers = {"Content-Type": "application/json"}
        try:
            conn = await RawConnection.open(self.proxy_port)
            if self.tls is None:
                host = self.target.split("/")[2]
                await conn.send(build_request("POST", self.target, host, body, headers))
            else:
                authority = f"{self.tls.host}:443"
                await conn.send(
                    f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
                )
                status, _, _ = await conn.receive()
                if status != 200:
                    raise RuntimeError(f"CONNECT answered {status}")
                await conn.writer.start_tls(self.tls.context, server_hostname=self.tls.host)
                await conn.send(build_request("POST", self.target, self.tls.host, body, headers))
            self.connections.append(conn)
        except (OSError, RuntimeError, asyncio.IncompleteReadError, ssl.SSLError):
            self.failures += 1

    async def open(self, count: int) -> None:
        slots = asyncio.Semaphore(OPEN_CONCURRENCY)
        start = len(self.connections)

        async def one(i: int) -> None:
            async with slots:
                await self._open_one(i)

        await asyncio.gather(*(one(start + i) for i in range(count)))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections), return_exceptions=True)
        self.connections.clear()


class SSLTarget:
    def __init__(self, host: str, ca_file: Path) -> None:
        self.host = host
        self.context = ssl.create_default_context(cafile=str(ca_file))


async def _warm_up(proxy_port: int, url: str, host: str, tls: SSLTarget | None) -> None:
    """One request (released: it uses the single rpm) and a metrics read."""
    holder = Holder(proxy_port, url, tls)
    await holder._open_one(0)
    if not holder.connections:
        raise RuntimeError("warm-up request could not be sent")
    status, _, _ = await asyncio.wait_for(holder.connections[0].receive(), 30)
    if status != 200:
        raise RuntimeError(f"warm-up answered {status}")
    await holder.close()
    await queue_depth(proxy_port)


def _settled_rss(pid: int) -> int:
    time.sleep(SETTLE_SECONDS)
    return min(rss_kib(pid) for _ in range(3))


def measure(ctx: Context, name: str, levels: list[int], tls: bool) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        upstream, up_port = start_fast_upstream(ctx.workdir)
        stack.enter_context(upstream)
        up_url = f"http://{HOST}:{up_port}"
        proxy = stack.enter_context(
            start_mitmdump(ctx.workdir, name, addon_config=held_config(up_url if tls else None))
        )
        port = proxy.port
        if tls:
            target = SSLTarget("api.cerebras.ai", proxy.ca_file)
            url = "/v1/chat/completions"
        else:
            target = None
            url = f"{up_url}/v1/chat/completions"
        out: dict[str, Any] = {"levels": {}}

        async def main() -> None:
            await _warm_up(port, url, "api.cerebras.ai", target)
            out["idle_kib"] = _settled_rss(proxy.pid)
            holder = Holder(port, url, target)
            try:
                for level in levels:
                    start = time.monotonic()
                    await holder.open(level - len(holder.connections))
                    await wait_depth(port, level, timeout=120)
                    rss = _settled_rss(proxy.pid)
                    out["levels"][level] = {
                        "rss_kib": rss,
                        "growth_mib": (rss - out["idle_kib"]) / 1024,
                        "per_request_kib": (rss - out["idle_kib"]) / level,
                        "seconds_to_hold": time.monotonic() - start,
                        "client_failures": holder.failures,
                    }
            finally:
                await holder.close()
            with contextlib.suppress(RuntimeError):
                await wait_depth(port, 0, timeout=60)
                out["after_release_kib"] = _settled_rss(proxy.pid)

        asyncio.run(main())
        return out


def run(ctx: Context) -> BenchResult:
    result = BenchResult("memory", "Memory: mitmdump RSS with held requests")
    soft, hard = raise_nofile(30_000)
    result.details["nofile"] = [soft, hard]
    levels = [1_000, 10_000] if soft >= 10_500 else [1_000]
    plain = measure(ctx, "memory-plain", levels, tls=False)
    tls = None if ctx.quick else measure(ctx, "memory-tls", [1_000], tls=True)
    result.details["plain_http"] = plain
    result.details["https_connect_tls"] = tls
    idle_mib = plain["idle_kib"] / 1024
    for level in levels:
        data = plain["levels"][level]
        target = TARGETS_MB[level]
        result.add(
            Figure(
                f"RSS growth, {level:,} held (plain HTTP, 1 connection each)",
                data["growth_mib"],
                "MiB",
                idle_mib,
                "idle RSS",
                data["rss_kib"] / plain["idle_kib"],
                f"<= {target} MB",
                data["growth_mib"] * 1.048576 <= target,
                note=f"{data['per_request_kib']:.1f} KiB per held request; "
                f"{data['client_failures']} client failures; "
                f"held in {data['seconds_to_hold']:.1f}s",
            )
        )
    if 10_000 not in levels:
        result.add(
            Figure(
                "RSS growth, 10,000 held",
                None,
                "MiB",
                target="<= 600 MB",
                note=f"open-files limit {soft} too low for 10,000 connections",
            )
        )
    if tls is not None:  # full runs only
        data = tls["levels"][1_000]
        result.add(
            Figure(
                "RSS growth, 1,000 held over HTTPS (CONNECT + TLS)",
                data["growth_mib"],
                "MiB",
                tls["idle_kib"] / 1024,
                "idle RSS",
                data["rss_kib"] / tls["idle_kib"],
                note=f"{data['per_request_kib']:.1f} KiB per held request",
            )
        )
    if "after_release_kib" in plain:
        result.add(
            Figure(
                "RSS after every held client left (plain run)",
                plain["after_release_kib"] / 1024,
                "MiB",
                idle_mib,
                "idle RSS",
                plain["after_release_kib"] / plain["idle_kib"],
                note="the queue drained to 0; CPython keeps freed arenas, so RSS need not fall",
            )
        )
    return result
