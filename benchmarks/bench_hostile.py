"""Benchmark 7: hostile clients (issue 15), the issue's "Done when" figures.

Each part runs a real mitmdump + Cooldown in front of the mock (tools/mock_cerebras.py, as its
own process, without limits: its request count is the ground truth of what went upstream),
clients talking HTTPS to api.cerebras.ai through the proxy with mitmproxy's CA, all on
127.0.0.1.

* **names**: 70 requests whose `model` is a distinct 256 KiB name (safe characters, refused
  as a key for its length), then 200 invented short names (20 with unsafe characters), all
  forwarded. Then one scraper reads /metrics and /metrics.json back to back through the proxy
  while another client keeps sending normal requests, one at a time: each page's size
  (target <= 2 MB), that client's worst round trip during the scrapes (target <= 0.5 s; its
  worst round trip over as long a time without scrapes, in the same run, is the baseline),
  and mitmdump's RSS growth from before the names to the end (peak, VmHWM; target
  <= 200 MiB). Also: the 1 KB runs of the long name in mitmdump's log (should be 0).
* **resets**: one HTTP/2 connection (tools/h2client.py) holds 100 streams (a tpm that lets
  nothing more through), then resets them all (RST_STREAM CANCEL) and keeps the connection:
  seconds until the queue depth is 0 (target <= 5 s; worst of the rounds), `forwarded` beyond
  what reached the mock (target 0), open reservations afterwards (target 0).
* **flood**: key A sends 2 x max_queue_depth requests at once, then key B sends what is left
  of the queue beyond A's share (max_queue_depth - ceil(0.9 x max_queue_depth)): how many of
  B's found room (target: all), and how fast A's excess was refused.

Quick runs: one reset round, a 20-deep queue for the flood, 5 s of scrapes; full runs: three
rounds, a 100-deep queue, 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tools.h2client import H2Client
from tools.launch import Mitmdump, Process, rss_kib

from .common import (
    REPO,
    START_TIMEOUT,
    STOP_TIMEOUT,
    BenchResult,
    Figure,
    RawConnection,
    build_request,
    percentile,
    start_mitmdump,
)
from .context import Context

CHAT_URL = "https://api.cerebras.ai/v1/chat/completions"
CHAT_PATH = "/v1/chat/completions"
MODEL = "llama3.1-8b"
ROOMY_MODEL = "roomy-model"  # configured with room: a stream after the resets is answered
OTHER_MODELS = "(other models)"
TINY_TPM = 50  # the warm-up request fits, then nothing more for a minute (sliding window)
TIMEOUT = httpx.Timeout(120.0, connect=30.0, pool=120.0)

LONG_NAMES = 70
LONG_NAME_CHARS = 256 * 1024
INVENTED_NAMES = 200
PATTERN = "hostile.model-"
SEND_CONCURRENCY = 10
RESET_STREAMS = 100  # mitmproxy's (h2's) MAX_CONCURRENT_STREAMS per client connection
KEY_A = "bench-key-A-0123456789"
KEY_B = "bench-key-B-9876543210"

TARGET_PAGE_BYTES = 2_000_000
TARGET_ROUND_TRIP_S = 0.5
TARGET_RSS_MIB = 200
TARGET_RESET_S = 5.0


# ---------------------------------------------------------------------------------------------
# Processes and small clients


def start_mock(workdir: Path, name: str) -> tuple[Process, str]:
    """The mock as its own process (no limits): (process, base URL)."""
    proc = Process.spawn(
        [sys.executable, "-m", "tools.mock_cerebras", "--port", "0", "--rpm", "0", "--tpm", "0"],
        workdir / f"mock-{name}.log",
        name="mock-cerebras",
        cwd=REPO,
        stop_timeout=STOP_TIMEOUT,
    )
    url = proc.wait_for_log(r"listening on (http://\S+)", START_TIMEOUT).group(1)
    return proc, url


def mock_requests(url: str) -> int:
    """Completion requests the mock has received (its own count)."""
    response = httpx.get(f"{url}/_mock/stats", timeout=10.0, trust_env=False)
    response.raise_for_status()
    return int(response.json()["requests"])


def cooldown_config(upstream: str, **limits: Any) -> dict[str, Any]:
    return {
        "cerebras_limits": {"algorithm": "sliding_window", "request_timeout": "10m", **limits},
        "cerebras_upstream": upstream,
        "models": {ROOMY_MODEL: {"tpm_limit": 10**6}},
    }


def rewrite_config(proxy: Mitmdump, config: dict[str, Any]) -> None:
    """Replace the proxy's config file in one step (the addon reads it within a second)."""
    assert proxy.config_path is not None
    partial = proxy.config_path.with_suffix(".tmp")
    partial.write_text(yaml.safe_dump(config), encoding="utf-8")
    os.replace(partial, proxy.config_path)


def chat(model: str = MODEL) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the rate limiter."}],
        "max_completion_tokens": 20,
    }


@contextlib.asynccontextmanager
async def https_client(proxy: Mitmdump, connections: int = 20) -> AsyncIterator[httpx.AsyncClient]:
    """httpx over HTTPS through the proxy, trusting mitmproxy's CA."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        proxy=proxy.url,
        verify=ssl.create_default_context(cafile=str(proxy.ca_file)),
        timeout=TIMEOUT,
        limits=limits,
        trust_env=False,
    ) as client:
        yield client


class Status:
    """cooldown.local's pages through the proxy, over one keep-alive plain connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: RawConnection | None = None

    async def get(self, path: str) -> bytes:
        if self.conn is None:
            self.conn = await RawConnection.open(self.port)
        request = build_request("GET", f"http://cooldown.local{path}", "cooldown.local")
        status, _, body = await asyncio.wait_for(self.conn.request(request), 60)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}")
        return body

    async def metrics(self) -> dict[str, Any]:
        return json.loads(await self.get("/metrics.json"))

    async def wait(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float, interval: float = 0.05
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            snapshot = await self.metrics()
            if condition(snapshot):
                return snapshot
            if time.monotonic() >= deadline:
                raise RuntimeError(f"metrics condition not met in {timeout:g}s: {snapshot}")
            await asyncio.sleep(interval)

    async def settled(self, timeout: float = 30.0) -> dict[str, Any]:
        return await self.wait(
            lambda m: (
                m["cerebras_queue_depth"] == 0
                and m["open_reservations"] == 0
                and m["tracked_flows"] == 0
            ),
            timeout,
        )

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def median_ms(values: list[float]) -> float:
    middle = percentile(values, 50)
    return math.nan if middle is None else middle * 1e3


def forwarded(snapshot: dict[str, Any]) -> int:
    return sum(outcomes.get("forwarded", 0) for outcomes in snapshot["requests"].values())


# ---------------------------------------------------------------------------------------------
# names: long and invented model names, then scrapes under load


def long_name(index: int) -> str:
    prefix = f"{index:03d}-"
    return prefix + (PATTERN * (LONG_NAME_CHARS // len(PATTERN) + 1))[: LONG_NAME_CHARS - 4]


def invented_name(index: int) -> str:
    return f"odd name <{index}> ü" if index % 10 == 0 else f"invented-{index:03d}"


async def round_trips(client: httpx.AsyncClient, stop: asyncio.Event) -> tuple[list[float], int]:
    """Normal requests one at a time until `stop`: (round trips in s, non-200 answers)."""
    times, bad = [], 0
    while not stop.is_set():
        started = time.monotonic()
        response = await client.post(CHAT_URL, json=chat())
        times.append(time.monotonic() - started)
        bad += response.status_code != 200
    return times, bad


async def for_seconds(seconds: float, work: Callable[[asyncio.Event], Any]) -> Any:
    stop = asyncio.Event()
    task = asyncio.ensure_future(work(stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await task


def names_part(ctx: Context) -> dict[str, Any]:
    scrape_seconds = ctx.pick(5.0, 15.0)
    out: dict[str, Any] = {"scrape_seconds": scrape_seconds}
    with contextlib.ExitStack() as stack:
        mock, mock_url = start_mock(ctx.workdir, "names")
        stack.enter_context(mock)
        config = cooldown_config(
            mock_url, rpm_limit=100_000, tpm_limit=10**9, max_queue_depth=1_000
        )
        proxy = stack.enter_context(
            start_mitmdump(ctx.workdir, "hostile-names", addon_config=config)
        )
        pid = proxy.pid

        async def main() -> None:
            status = Status(proxy.port)
            slots = asyncio.Semaphore(SEND_CONCURRENCY)
            async with https_client(proxy) as client, https_client(proxy, 1) as other:

                async def send(model: str) -> int:
                    async with slots:
                        return (await client.post(CHAT_URL, json=chat(model))).status_code

                for _ in range(20):  # warm-up: connections, calibration, the probe
                    await send(MODEL)
                await other.post(CHAT_URL, json=chat())
                await status.settled()
                out["rss_before_kib"] = rss_kib(pid)

                started = time.monotonic()
                longs = await asyncio.gather(*(send(long_name(i)) for i in range(LONG_NAMES)))
                out["long_names_seconds"] = time.monotonic() - started
                started = time.monotonic()
                invented = await asyncio.gather(
                    *(send(invented_name(i)) for i in range(INVENTED_NAMES))
                )
                out["invented_names_seconds"] = time.monotonic() - started
                out["statuses"] = dict(Counter([*longs, *invented]))
                snapshot = await status.settled()
                out["rss_after_names_kib"] = rss_kib(pid)
                out["keys"] = len(snapshot["usage"])
                out["longest_key"] = max(len(key) for key in snapshot["usage"])
                out["other_models_key"] = OTHER_MODELS in snapshot["usage"]

                # Baseline: the other client alone, as long as the scrapes will take.
                quiet, quiet_bad = await for_seconds(
                    scrape_seconds, lambda stop: round_trips(other, stop)
                )

                sizes: dict[str, list[int]] = {"/metrics": [], "/metrics.json": []}
                scrape_times: dict[str, list[float]] = {"/metrics": [], "/metrics.json": []}

                async def scrape(stop: asyncio.Event) -> None:
                    while not stop.is_set():
                        for path in sizes:
                            begun = time.monotonic()
                            page = await status.get(path)
                            scrape_times[path].append(time.monotonic() - begun)
                            sizes[path].append(len(page))

                scraper = asyncio.ensure_future(for_seconds(scrape_seconds, scrape))
                busy, busy_bad = await for_seconds(
                    scrape_seconds, lambda stop: round_trips(other, stop)
                )
                await scraper
                out["quiet_round_trips"] = quiet
                out["busy_round_trips"] = busy
                out["bad_answers"] = quiet_bad + busy_bad
                out["page_bytes"] = {path: max(values) for path, values in sizes.items()}
                out["scrapes"] = {path: len(values) for path, values in sizes.items()}
                out["scrape_seconds_max"] = {p: max(v) for p, v in scrape_times.items()}
                out["scrape_seconds_p50"] = {p: percentile(v, 50) for p, v in scrape_times.items()}
                out["upstream_requests"] = mock_requests(mock_url)
                out["forwarded"] = forwarded(await status.settled())
            await status.close()
            out["rss_end_kib"] = rss_kib(pid)
            out["rss_peak_kib"] = rss_kib(pid, "VmHWM")

        asyncio.run(main())
        log = proxy.log_text()
        runs = {(PATTERN * (1024 // len(PATTERN) + 2))[i : i + 1024] for i in range(len(PATTERN))}
        out["log_runs_of_long_name"] = sum(log.count(run) for run in runs)
        out["log_bytes"] = len(log)
    return out


# ---------------------------------------------------------------------------------------------
# resets: 100 held HTTP/2 streams reset by their client


def resets_part(ctx: Context) -> dict[str, Any]:
    rounds = int(ctx.pick(1, 3))
    out: dict[str, Any] = {"rounds": rounds, "streams": RESET_STREAMS, "seconds_to_empty": []}
    with contextlib.ExitStack() as stack:
        mock, mock_url = start_mock(ctx.workdir, "resets")
        stack.enter_context(mock)
        config = cooldown_config(
            mock_url,
            tpm_limit=TINY_TPM,
            max_queue_depth=RESET_STREAMS + 20,
            max_queue_share_per_client=1,
        )
        proxy = stack.enter_context(
            start_mitmdump(ctx.workdir, "hostile-resets", addon_config=config)
        )

        async def main() -> None:
            status = Status(proxy.port)
            h2 = await H2Client.open(proxy.port, proxy.ca_file)
            try:
                body = json.dumps(chat()).encode()
                warm = await h2.response(h2.post(CHAT_PATH, body), timeout=60.0)
                if warm.status != 200:
                    raise RuntimeError(f"warm-up answered {warm.status}")
                for _ in range(rounds):
                    streams = [h2.post(CHAT_PATH, body) for _ in range(RESET_STREAMS)]
                    await status.wait(
                        lambda m: m["cerebras_queue_depth"] == RESET_STREAMS, timeout=60.0
                    )
                    reset_at = time.monotonic()
                    for stream_id in streams:
                        h2.reset(stream_id)

                    def empty(m: dict[str, Any]) -> bool:
                        h2.ping()
                        return m["cerebras_queue_depth"] == 0

                    await status.wait(empty, timeout=60.0, interval=0.02)
                    out["seconds_to_empty"].append(time.monotonic() - reset_at)
                snapshot = await status.settled()
                out["upstream_requests"] = mock_requests(mock_url)
                out["requests"] = snapshot["requests"]
                out["forwarded"] = forwarded(snapshot)
                out["open_reservations"] = snapshot["open_reservations"]
                out["tracked_flows"] = snapshot["tracked_flows"]
                out["connection_open"] = not h2.closed.is_set()
                after = await h2.response(
                    h2.post(CHAT_PATH, json.dumps(chat(ROOMY_MODEL)).encode()), timeout=60.0
                )
                out["new_stream_status"] = after.status
            finally:
                await h2.close()
                await status.close()

        asyncio.run(main())
    return out


# ---------------------------------------------------------------------------------------------
# flood: one key sends twice the queue, another key comes after


def flood_part(ctx: Context) -> dict[str, Any]:
    depth = int(ctx.pick(20, 100))
    share = math.ceil(0.9 * depth)  # the default max_queue_share_per_client
    flood, others = 2 * depth, depth - share
    out: dict[str, Any] = {"depth": depth, "share": share, "a_sent": flood, "b_sent": others}
    with contextlib.ExitStack() as stack:
        mock, mock_url = start_mock(ctx.workdir, "flood")
        stack.enter_context(mock)
        config = cooldown_config(mock_url, tpm_limit=TINY_TPM, max_queue_depth=depth)
        proxy = stack.enter_context(
            start_mitmdump(ctx.workdir, "hostile-flood", addon_config=config)
        )

        async def main() -> None:
            status = Status(proxy.port)
            async with https_client(proxy, flood + others + 2) as client:

                async def ask(key: str | None) -> tuple[int, str, float, float]:
                    """(status, refusal code, seconds from the request's headers going out
                    (after connect, CONNECT and TLS), seconds in all)."""
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    sent: list[float] = []

                    async def trace(event: str, _info: dict[str, Any]) -> None:
                        if event == "http11.send_request_headers.started":
                            sent.append(time.monotonic())

                    begun = time.monotonic()
                    response = await client.post(
                        CHAT_URL, json=chat(), headers=headers, extensions={"trace": trace}
                    )
                    ended = time.monotonic()
                    refused = response.headers.get("x-cooldown-refused", "")
                    since = ended - (sent[-1] if sent else begun)
                    return response.status_code, refused, since, ended - begun

                first = await ask(None)  # by address: the one request the tpm lets through
                if first[0] != 200:
                    raise RuntimeError(f"warm-up answered {first[0]}")
                a_tasks = [asyncio.create_task(ask(KEY_A)) for _ in range(flood)]
                deadline = time.monotonic() + 120
                while sum(t.done() for t in a_tasks) < flood - share:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.02)
                held_a = await status.wait(
                    lambda m: m["cerebras_queue_depth"] >= share, timeout=30.0
                )
                out["a_held"] = held_a["cerebras_queue_depth"]
                refused = [t.result() for t in a_tasks if t.done()]
                out["a_refused"] = dict(Counter(f"{s} {code}" for s, code, *_ in refused))
                since_sent = [since for _, _, since, _ in refused]
                overall = [total for *_, total in refused]
                out["a_refusal_seconds_p50"] = percentile(since_sent, 50)
                out["a_refusal_seconds_max"] = max(since_sent, default=None)
                out["a_refusal_overall_seconds_p50"] = percentile(overall, 50)
                out["a_refusal_overall_seconds_max"] = max(overall, default=None)

                b_tasks = [asyncio.create_task(ask(KEY_B)) for _ in range(others)]
                try:
                    both = await status.wait(
                        lambda m: (
                            m["cerebras_queue_depth"] == share + others
                            or all(t.done() for t in b_tasks)
                        ),
                        timeout=30.0,
                    )
                except RuntimeError:
                    both = await status.metrics()
                b_refused = [t.result() for t in b_tasks if t.done()]
                out["b_refused"] = dict(Counter(f"{s} {code}" for s, code, *_ in b_refused))
                out["b_found_room"] = others - len(b_refused)
                out["queue_by_client"] = both["queue_by_client"]
                page = json.dumps(both) + (await status.get("/metrics")).decode()
                out["keys_shown"] = sum(key in page for key in (KEY_A, KEY_B))

                # Room for everyone: the held requests are released and answered.
                rewrite_config(proxy, cooldown_config(mock_url, max_queue_depth=depth))
                done, pending = await asyncio.wait([*a_tasks, *b_tasks], timeout=120.0)
                out["unanswered"] = len(pending)
                out["final_statuses"] = dict(Counter(t.result()[0] for t in done))
                snapshot = await status.settled()
                out["settled"] = {
                    key: snapshot[key]
                    for key in ("cerebras_queue_depth", "open_reservations", "tracked_flows")
                }
                out["requests"] = snapshot["requests"]
                out["upstream_requests"] = mock_requests(mock_url)
            await status.close()

        asyncio.run(main())
    return out


# ---------------------------------------------------------------------------------------------


def run(ctx: Context) -> BenchResult:
    result = BenchResult("hostile", "Hostile clients: huge names, reset streams, one key's flood")
    names = names_part(ctx)
    resets = resets_part(ctx)
    flood = flood_part(ctx)
    result.details = {"names": names, "resets": resets, "flood": flood}

    for path, size in names["page_bytes"].items():
        result.add(
            Figure(
                f"{path} size after {LONG_NAMES} 256 KiB names + {INVENTED_NAMES} invented",
                size / 1e6,
                "MB",
                target="<= 2 MB",
                met=size <= TARGET_PAGE_BYTES,
                note=f"{names['keys']} model keys, longest {names['longest_key']} chars; "
                f"scrape p50 {names['scrape_seconds_p50'][path] * 1e3:.1f} ms, "
                f"max {names['scrape_seconds_max'][path] * 1e3:.1f} ms "
                f"over {names['scrapes'][path]} scrapes",
            )
        )
    busy, quiet = names["busy_round_trips"], names["quiet_round_trips"]
    worst, worst_quiet = max(busy), max(quiet)
    result.add(
        Figure(
            "another client's worst round trip during back-to-back scrapes",
            worst,
            "s",
            worst_quiet,
            "worst without scrapes",
            worst / worst_quiet if worst_quiet else None,
            "<= 0.5 s",
            worst <= TARGET_ROUND_TRIP_S,
            note=f"{len(busy)} requests during {names['scrape_seconds']:g} s of scrapes, "
            f"p50 {median_ms(busy):.1f} ms (without: {len(quiet)}, "
            f"p50 {median_ms(quiet):.1f} ms); {names['bad_answers']} answers not 200",
        )
    )
    growth = (max(names["rss_peak_kib"], names["rss_end_kib"]) - names["rss_before_kib"]) / 1024
    result.add(
        Figure(
            "mitmdump RSS growth (peak) over the names and the scrapes",
            growth,
            "MiB",
            names["rss_before_kib"] / 1024,
            "RSS before",
            target="<= 200 MiB",
            met=growth <= TARGET_RSS_MIB,
            note=f"RSS after the names {names['rss_after_names_kib'] / 1024:.0f} MiB, "
            f"at the end {names['rss_end_kib'] / 1024:.0f} MiB; 70 long names sent in "
            f"{names['long_names_seconds']:.1f} s, 200 invented in "
            f"{names['invented_names_seconds']:.1f} s; answers {names['statuses']}",
        )
    )
    result.add(
        Figure(
            "1 KB runs of a long model name in mitmdump's log",
            names["log_runs_of_long_name"],
            "",
            target="0",
            met=names["log_runs_of_long_name"] == 0,
            note=f"log {names['log_bytes']:,} bytes (info verbosity); forwarded "
            f"{names['forwarded']}, upstream saw {names['upstream_requests']}",
        )
    )

    seconds = resets["seconds_to_empty"]
    result.add(
        Figure(
            f"{RESET_STREAMS} held HTTP/2 streams reset: seconds until queue depth 0 (worst)",
            max(seconds),
            "s",
            target="<= 5 s",
            met=max(seconds) <= TARGET_RESET_S,
            note="rounds: " + ", ".join(f"{s:.2f} s" for s in seconds) + "; one 1 s poll "
            f"(departures.py); requests {resets['requests']}; connection kept: "
            f"{resets['connection_open']}, a new stream answered {resets['new_stream_status']}",
        )
    )
    extra = resets["forwarded"] - resets["upstream_requests"]
    result.add(
        Figure(
            "reset streams counted forwarded beyond what reached upstream",
            extra,
            "",
            target="0",
            met=extra == 0,
            note=f"forwarded {resets['forwarded']}, the mock saw {resets['upstream_requests']} "
            f"(the warm-up) before the new stream",
        )
    )
    result.add(
        Figure(
            "open reservations after the resets",
            resets["open_reservations"],
            "",
            target="0",
            met=resets["open_reservations"] == 0,
            note=f"tracked flows {resets['tracked_flows']}",
        )
    )

    result.add(
        Figure(
            f"key B's requests that found room while key A flooded 2 x {flood['depth']}",
            flood["b_found_room"],
            "",
            flood["b_sent"],
            "sent",
            flood["b_found_room"] / flood["b_sent"],
            "all",
            flood["b_found_room"] == flood["b_sent"],
            note=f"A held {flood['a_held']} (share {flood['share']}), refused "
            f"{flood['a_refused']}; queue_by_client {flood['queue_by_client']}; keys shown "
            f"in the pages: {flood['keys_shown']}",
        )
    )
    result.add(
        Figure(
            "key A's excess refused at once: p50 from its request going out to the 429",
            flood["a_refusal_seconds_p50"],
            "s",
            note=f"max {flood['a_refusal_seconds_max']:.3f} s; counting connect, CONNECT and "
            f"TLS too ({flood['a_sent']} connections opened at once): p50 "
            f"{flood['a_refusal_overall_seconds_p50']:.3f} s, max "
            f"{flood['a_refusal_overall_seconds_max']:.3f} s; after a config edit raised the tpm: "
            f"{flood['final_statuses']}, {flood['unanswered']} unanswered, "
            f"settled {flood['settled']}",
        )
    )
    return result
