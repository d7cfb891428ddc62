"""Shared helpers: results, machine description, processes (mitmdump, upstreams), a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools import launch
from tools.launch import Mitmdump, Process

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = launch.HOST
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Figure:
    """One measured figure, the baseline it was compared with in the same run, and a target."""

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None  # None: informational, no target
    note: str = ""

    def row(self) -> list[str]:
        return [
            self.name,
            fmt(self.value, self.unit),
            f"{fmt(self.baseline, self.unit)} ({self.baseline_label})"
            if self.baseline_label
            else "",
            "" if self.ratio is None else f"{self.ratio:.3g}",
            self.target,
            {True: "met", False: "NOT MET", None: ""}[self.met],
        ]


@dataclass
class BenchResult:
    name: str
    title: str
    seconds: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def beside(
    name: str,
    value: float | None,
    baseline: float | None,
    baseline_label: str,
    target: str = "",
    met: Callable[[float], bool] | None = None,
    unit: str = "",
    scale: float = 1.0,
    note: str = "",
) -> Figure:
    """A figure beside its baseline from the same run: both scaled, their ratio, and whether
    the value meets its target (`met`; None: no target)."""
    return Figure(
        name,
        None if value is None else value * scale,
        unit,
        None if baseline is None else baseline * scale,
        baseline_label,
        value / baseline if value is not None and baseline else None,
        target,
        None if value is None or met is None else met(value),
        note,
    )


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def print_table(result: BenchResult) -> None:
    headers = ["figure", "value", "baseline (same run)", "ratio", "target", ""]
    rows = [f.row() for f in result.figures]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    for figure in result.figures:
        if figure.note:
            print(f"  * {figure.name}: {figure.note}")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    data = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(data)))
    return data[min(rank, len(data)) - 1]


# ---------------------------------------------------------------------------------------------
# The machine


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for module in ("mitmproxy", "tiktoken", "httpx", "openai"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[module] = version(module)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
        "versions": versions,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
    }


def raise_nofile(wanted: int = 65_536) -> tuple[int, int]:
    """Raise the soft open-files limit as far as the hard limit allows (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---------------------------------------------------------------------------------------------
# Processes (started and stopped by tools.launch)


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def start_fast_upstream(workdir: Path) -> tuple[Process, int]:
    proc = Process.spawn(
        [sys.executable, str(REPO / "benchmarks" / "fast_upstream.py"), "--port", "0"],
        workdir / "fast-upstream.log",
        name="fast-upstream",
        stop_timeout=STOP_TIMEOUT,
    )
    port = int(proc.wait_for_log(r"listening on (\d+)", START_TIMEOUT).group(1))
    return proc, port


def start_mitmdump(
    workdir: Path,
    name: str,
    *,
    addon_config: dict[str, Any] | None,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Mitmdump:
    """mitmdump on a free 127.0.0.1 port, its CA dir, config and log in `workdir`; with
    `addon_config`, with the Cooldown addon. Use it as a context manager to stop it."""
    config_path = None
    if addon_config is not None:
        config_path = workdir / f"cooldown-{name}.yaml"
        config_path.write_text(yaml.safe_dump(addon_config), encoding="utf-8")
    return launch.start_mitmdump(
        confdir=workdir / f"confdir-{name}",
        log_path=workdir / f"mitmdump-{name}.log",
        config_path=config_path,
        options=["flow_detail=0", "connection_strategy=lazy"],
        args=extra,
        cwd=workdir,
        env=env,
        start_timeout=START_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
    )


def start_cooldown_before(
    workdir: Path, name: str, upstream: str, rpm: int, tpm: int, limits: dict[str, Any]
) -> Mitmdump:
    """mitmdump + Cooldown forwarding to `upstream` (a mock) with the mock's rpm and tpm, a
    queue that does not fill and a request timeout no run reaches; `limits` adds to them."""
    return start_mitmdump(
        workdir,
        name,
        addon_config={
            "cerebras_limits": {
                "rpm_limit": rpm,
                "tpm_limit": tpm,
                "max_queue_depth": 5_000,
                "request_timeout": "10m",
                **limits,
            },
            "cerebras_upstream": upstream,
        },
    )


# ---------------------------------------------------------------------------------------------
# A cheap HTTP/1.1 client: pre-built requests over keep-alive connections, so the client costs
# far less CPU than the proxy it measures (httpx would cost about as much as mitmproxy).


def build_request(
    method: str,
    url_or_path: str,
    host: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {url_or_path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = HOST) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, request: bytes) -> None:
        self.writer.write(request)
        await self.writer.drain()

    async def receive(self) -> tuple[int, bytes, bytes]:
        """(status, raw header block, body) of one Content-Length or chunked response."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        lower = head.lower()
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
        if match:
            body = await self.reader.readexactly(int(match.group(1)))
        elif b"transfer-encoding: chunked" in lower:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        else:
            body = b""
        return status, head, body

    async def request(self, request: bytes) -> tuple[int, bytes, bytes]:
        await self.send(request)
        return await self.receive()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def header_value(head: bytes, name: str) -> str | None:
    match = re.search(rb"\r\n" + name.lower().encode() + rb":\s*([^\r\n]*)", head.lower())
    return match.group(1).decode() if match else None
