"""Benchmark: the policies of issue 13 through a real mitmdump, against the issue's figures.

* **pacing**: 20 concurrent requests to another host (the mock, reached as
  http://127.0.0.1:<port>) paced at 5 req/s, burst 1: how long until all are answered, and
  how many got 200; 6 to `localhost` (no entry names it) under `default_rate_limit` 2 req/s.
* **priority**: with Cerebras's limit saturated (rpm 120, `burst: 0.05`: 6 at once, then one
  every 0.5 s), 20 requests with `X-Cooldown-Priority: high` and 20 with `low`, sent together
  (interleaved): p50 time held (X-Cooldown-Wait), high against low.
* **fair share**: the same limits; client A (one API key) keeps 30 requests outstanding, and
  once its backlog has built up client B (another key) sends 6 requests one after another.
  B's p50 held time against A's over B's run. Baseline in the same run: a second proxy where
  B uses A's key (one client, arrival order).
* **output cap**: `max_completion_tokens: 8000` under a cap of 1024: what the mock priced
  (input + output reservation) and the `X-Cooldown-Clamped` header.

The wildcard rule (`*.` for subdomains) is not measured here (no subdomain of a local name
resolves on this machine); tests/test_pacing.py covers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import statistics
import time
from typing import Any

import httpx

from tools import mock_cerebras
from tools.launch import Mitmdump

from .common import BenchResult, Figure, start_mitmdump
from .context import Context

CHAT = "https://api.cerebras.ai/v1/chat/completions"
MODEL = "llama3.1-8b"
LIMITS = {
    "rpm_limit": 120,
    "tpm_limit": 10_000_000,
    "burst": 0.05,
    "max_queue_depth": 500,
    "request_timeout": "10m",
}


def _client(proxy: Mitmdump, key: str = "bench") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        proxy=proxy.url,
        verify=ssl.create_default_context(cafile=str(proxy.ca_file)),
        timeout=httpx.Timeout(300.0, connect=30.0),
        limits=httpx.Limits(max_connections=200),
        headers={"Authorization": f"Bearer {key}"},
        trust_env=False,
    )


def _body(max_completion_tokens: int = 10) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the rate limiter."}],
        "max_completion_tokens": max_completion_tokens,
    }


async def _held(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> float:
    response = await client.post(CHAT, json=_body(), headers=headers)
    response.raise_for_status()
    return float(response.headers["x-cooldown-wait"])


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _pacing(proxy: Mitmdump, upstream_port: int) -> dict[str, Any]:
    async with _client(proxy) as client:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(client.get(f"http://127.0.0.1:{upstream_port}/v1/models") for _ in range(20))
        )
        paced = time.monotonic() - started
        started = time.monotonic()
        default = await asyncio.gather(
            *(client.get(f"http://localhost:{upstream_port}/v1/models") for _ in range(6))
        )
        by_default = time.monotonic() - started
    return {
        "seconds": paced,
        "ok": sum(a.status_code == 200 for a in answers),
        "default_seconds": by_default,
        "default_ok": sum(a.status_code == 200 for a in default),
    }


async def _priority(proxy: Mitmdump) -> dict[str, list[float]]:
    async with _client(proxy) as client:
        classes = ["low", "high"] * 20
        waits = await asyncio.gather(*(_held(client, {"X-Cooldown-Priority": c}) for c in classes))
    held: dict[str, list[float]] = {"high": [], "low": []}
    for name, wait in zip(classes, waits, strict=True):
        held[name].append(wait)
    return held


async def _fair_share(proxy: Mitmdump, agent_key: str, backlog: float) -> dict[str, Any]:
    """A keeps 30 outstanding; after `backlog` seconds B sends 6 one after another."""
    batch_waits: list[tuple[float, float]] = []  # (answered at, held)
    stop = asyncio.Event()
    async with _client(proxy, "batch-key") as batch, _client(proxy, agent_key) as agent:

        async def worker() -> None:
            while not stop.is_set():
                wait = await _held(batch)
                batch_waits.append((time.monotonic(), wait))

        workers = [asyncio.create_task(worker()) for _ in range(30)]
        await asyncio.sleep(backlog)
        began = time.monotonic()
        agent_waits = [await _held(agent) for _ in range(6)]
        ended = time.monotonic()
        stop.set()
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    during = [wait for at, wait in batch_waits if began <= at <= ended]
    return {"agent": agent_waits, "batch": during, "agent_done": len(agent_waits)}


async def _cap(proxy: Mitmdump, mock: Any) -> dict[str, Any]:
    async with _client(proxy) as client:
        mock.reset()
        body = _body(max_completion_tokens=8000)
        response = await client.post(CHAT, json=body)
    (entry,) = mock.history()
    prompt = mock_cerebras.count_chat_tokens(body["messages"])
    return {
        "status": response.status_code,
        "header": response.headers.get("x-cooldown-clamped"),
        "upstream_output": entry["cost"] - prompt,
    }


def run(ctx: Context) -> BenchResult:
    result = BenchResult("policies", "Policies: pacing, priority classes, fair share, output cap")
    unlimited = mock_cerebras.MockSettings(rpm=None, tpm=None)
    with contextlib.ExitStack() as stack:
        mocks = [stack.enter_context(mock_cerebras.MockCerebras(unlimited)) for _ in range(3)]

        def proxy(name: str, mock: Any, **config: Any) -> Mitmdump:
            addon = {"cerebras_limits": LIMITS, "cerebras_upstream": mock.url, **config}
            return stack.enter_context(
                start_mitmdump(ctx.workdir, f"policies-{name}", addon_config=addon)
            )

        paced = proxy(
            "pacing",
            mocks[0],
            rate_limits=[{"domain": "127.0.0.1", "requests_per_second": 5}],
            default_rate_limit={"requests_per_second": 2},
        )
        pacing = asyncio.run(_pacing(paced, mocks[0].port))
        policies = proxy("priority", mocks[1], models={MODEL: {"max_completion_tokens_cap": 1024}})
        held = asyncio.run(_priority(policies))
        asyncio.run(asyncio.sleep(25.0))  # the bucket refills: each part starts alike
        cap = asyncio.run(_cap(policies, mocks[1]))
        one_client = proxy("fair-baseline", mocks[2])

        async def both() -> tuple[dict[str, Any], dict[str, Any]]:
            fair, same = await asyncio.gather(
                _fair_share(policies, "agent-key", 20.0),
                _fair_share(one_client, "batch-key", 20.0),
            )
            return fair, same

        fair, same = asyncio.run(both())

    for label, seconds, ok, count, least in (
        ("20 concurrent requests at 5 req/s, burst 1", "seconds", "ok", 20, 3.8),
        (
            "6 to an unnamed host under default_rate_limit 2 req/s",
            "default_seconds",
            "default_ok",
            6,
            2.5,
        ),
    ):
        result.add(
            Figure(
                f"pacing: {label}",
                pacing[seconds],
                "s",
                target=f">= {least} s, all 200",
                met=pacing[seconds] >= least and pacing[ok] == count,
                note=f"{pacing[ok]}/{count} answered 200",
            )
        )
    high, low = _p50(held["high"]), _p50(held["low"])
    result.add(
        Figure(
            "priority: p50 held, high (20 high + 20 low sent together)",
            high,
            "s",
            low,
            "low p50",
            high / low if low else None,
            "<= 0.5 x low",
            bool(low) and high <= 0.5 * low,
        )
    )
    agent, batch = _p50(fair["agent"]), _p50(fair["batch"])
    baseline = _p50(same["agent"])
    result.add(
        Figure(
            "fair share: p50 held of a 6-sequential client beside one with 30 outstanding",
            agent,
            "s",
            batch,
            "the 30-outstanding client's p50",
            agent / batch if batch else None,
            "<= 0.35 x, all 6 done",
            bool(batch) and agent <= 0.35 * batch and fair["agent_done"] == 6,
            note=f"baseline (same run, B with A's key: one client, arrival order): B's p50 "
            f"{baseline:.2f} s vs A's {_p50(same['batch']):.2f} s; A's requests answered "
            f"during B's run: {len(fair['batch'])}",
        )
    )
    result.add(
        Figure(
            "output cap: max_completion_tokens 8000 under a cap of 1024, as upstream priced it",
            cap["upstream_output"],
            "tokens",
            target="1024, with X-Cooldown-Clamped",
            met=cap["upstream_output"] == 1024 and cap["header"] is not None,
            note=f"status {cap['status']}, X-Cooldown-Clamped: {cap['header']}",
        )
    )
    result.details.update(pacing=pacing, priority=held, fair=fair, one_client=same, cap=cap)
    return result
