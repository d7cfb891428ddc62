"""Benchmark 2: estimation cost per 1K tokens, and event-loop stalls while a huge body is estimated.

Per-token cost: `cooldown.estimate.parse_request` on a chat body (JSON parsing, walking the
messages, tokenizing) against bare `tiktoken.encode_ordinary` on the same text, best of several
alternating samples.

Stalls: a ticker coroutine sleeps 1 ms at a time and records how late each wake-up is. While it
runs, a 100K-token body goes through the addon's own path (`cooldown.flows.prepare`, which sends
bodies over 32 KiB to a worker thread), and, in the same run, through `prepare_request` called
inline on the loop (what the addon would do without the offload). The idle ticker (nothing else
running) is the noise floor.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import statistics
import time
from collections.abc import Callable

import tiktoken
from mitmproxy import http
from mitmproxy.test import tflow

from cooldown.estimate import ENCODING_NAME, parse_request
from cooldown.flows import OFFLOAD_BODY_BYTES, prepare, prepare_request

from .common import BenchResult, Figure
from .context import Context

PATH = "/v1/chat/completions"
SIZES = [100, 10_000, 100_000]
TARGET_OVERHEAD = 1.5
TARGET_STALL_MS = 10.0
TICK = 0.001
_VOCABULARY = """
the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if so no what
rate limit token bucket proxy request response model latency throughput queue priority
def return import class self async await None True False print len range dict list str int
{ } ( ) [ ] : ; , . == != <= >= + - * / % 0 1 2 3 42 100 2048 3.14 http://example.com/a?b=c
Ünïcödé naïve café 東京 日本語 emoji 🙂 résumé
"""
WORDS = tuple(_VOCABULARY.split())


def make_text(tokens: int, seed: int = 0) -> str:
    """Prose-and-code-like text of exactly `tokens` cl100k tokens (re-encoding may merge a few)."""
    enc = tiktoken.get_encoding(ENCODING_NAME)
    rng = random.Random(seed)
    pieces: list[str] = []
    have = 0
    while have < tokens * 1.1 + 10:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        pieces.append(line + ("\n" if rng.random() < 0.3 else ". "))
        have += len(line) // 3
    ids = enc.encode_ordinary("".join(pieces))
    while len(ids) < tokens:
        ids = ids + ids
    return enc.decode(ids[:tokens])


def chat_body(text: str, stream: bool = False) -> bytes:
    body = {
        "model": "llama3.1-8b",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
        "max_completion_tokens": 1000,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, ensure_ascii=False).encode()


def _best(fn: Callable[[], object], loops: int, samples: int) -> float:
    best = float("inf")
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def _encode_each(enc: tiktoken.Encoding, texts: list[str]) -> list[list[int]]:
    return [enc.encode_ordinary(x) for x in texts]


def per_token_costs(quick: bool) -> list[dict[str, float]]:
    enc = tiktoken.get_encoding(ENCODING_NAME)
    rows = []
    for tokens in SIZES:
        text = make_text(tokens, seed=tokens)
        body = chat_body(text)
        texts = ["system", "You are a helpful assistant.", "user", text]
        loops = max(1, int((2_000 if not quick else 500) * 100 / tokens))
        rounds = 5 if quick else 9
        parse_best = bare_best = float("inf")
        for _ in range(rounds):  # alternate, so both see the same noise
            parse_best = min(
                parse_best, _best(functools.partial(parse_request, PATH, body), loops, 1)
            )
            bare_best = min(bare_best, _best(functools.partial(_encode_each, enc, texts), loops, 1))
        counted = parse_request(PATH, body).input_tokens
        rows.append(
            {
                "tokens": tokens,
                "counted_input_tokens": counted,
                "body_bytes": len(body),
                "parse_us_per_1k": parse_best * 1e6 / (tokens / 1000),
                "bare_us_per_1k": bare_best * 1e6 / (tokens / 1000),
                "parse_us": parse_best * 1e6,
                "bare_us": bare_best * 1e6,
                "ratio": parse_best / bare_best,
            }
        )
    return rows


async def _ticker(stop: asyncio.Event, lateness: list[float]) -> None:
    loop = asyncio.get_running_loop()
    last = loop.time()
    while not stop.is_set():
        await asyncio.sleep(TICK)
        now = loop.time()
        lateness.append(now - last - TICK)
        last = now


async def _stall(work: Callable[[], object] | None, settle: float = 0.03) -> tuple[float, float]:
    """(longest ticker lateness in ms, seconds the work took) while `work` runs on the loop."""
    stop = asyncio.Event()
    lateness: list[float] = []
    ticker = asyncio.create_task(_ticker(stop, lateness))
    await asyncio.sleep(settle)
    lateness.clear()
    start = time.perf_counter()
    if work is not None:
        outcome = work()
        if asyncio.iscoroutine(outcome):
            await outcome
    else:
        await asyncio.sleep(0.05)
    took = time.perf_counter() - start
    await asyncio.sleep(settle)
    stop.set()
    await ticker
    return max(lateness, default=0.0) * 1000, took


def stalls(quick: bool) -> dict[str, list[tuple[float, float]]]:
    text = make_text(100_000, seed=7)
    bodies = {"plain": chat_body(text), "stream": chat_body(text, stream=True)}
    assert all(len(b) > OFFLOAD_BODY_BYTES for b in bodies.values())
    rounds = 5 if quick else 12
    out: dict[str, list[tuple[float, float]]] = {}

    def flow_with(body: bytes) -> http.HTTPFlow:
        f = tflow.tflow()
        f.request.method = "POST"
        f.request.host = "api.cerebras.ai"
        f.request.path = PATH
        f.request.content = body
        return f

    async def main() -> None:
        for _ in range(rounds):  # interleaved: idle, offloaded, inline
            for kind, body in bodies.items():
                out.setdefault("idle", []).append(await _stall(None))
                f = flow_with(body)
                out.setdefault(f"offloaded-{kind}", []).append(
                    await _stall(functools.partial(prepare, f))
                )
                out.setdefault(f"inline-{kind}", []).append(
                    await _stall(functools.partial(prepare_request, PATH, body))
                )

    asyncio.run(main())
    return out


def run(ctx: Context) -> BenchResult:
    result = BenchResult("estimate", "Estimation: cost per 1K tokens and event-loop stalls")
    rows = per_token_costs(ctx.quick)
    for row in rows:
        big = row["tokens"] >= 10_000
        result.add(
            Figure(
                f"parse_request, {row['tokens']:,}-token chat body",
                row["parse_us_per_1k"],
                "us/1K tok",
                row["bare_us_per_1k"],
                "bare encode_ordinary",
                row["ratio"],
                f"<= {TARGET_OVERHEAD}x" if big else "(fixed cost dominates)",
                row["ratio"] <= TARGET_OVERHEAD if big else None,
                note=f"{row['parse_us']:.0f} us vs {row['bare_us']:.0f} us per body"
                if not big
                else "",
            )
        )
    result.details["per_token"] = rows
    measured = stalls(ctx.quick)
    summary = {}
    for kind, samples in measured.items():
        stalls_ms = [s for s, _ in samples]
        summary[kind] = {
            "max_stall_ms": max(stalls_ms),
            "median_stall_ms": statistics.median(stalls_ms),
            "median_work_ms": statistics.median(t for _, t in samples) * 1000,
            "samples": len(samples),
        }
    result.details["stalls"] = summary
    idle = summary["idle"]["max_stall_ms"]
    for kind in ("plain", "stream"):
        off, inline = summary[f"offloaded-{kind}"], summary[f"inline-{kind}"]
        result.add(
            Figure(
                f"longest loop stall, 100K-token {kind} body via flows.prepare",
                off["max_stall_ms"],
                "ms",
                inline["max_stall_ms"],
                "inline prepare_request",
                off["max_stall_ms"] / inline["max_stall_ms"],
                f"<= {TARGET_STALL_MS:g} ms",
                off["max_stall_ms"] <= TARGET_STALL_MS,
                note=(
                    f"median {off['median_stall_ms']:.2f} ms (inline median "
                    f"{inline['median_stall_ms']:.1f} ms); estimating took "
                    f"{off['median_work_ms']:.1f} ms in the thread; idle ticker worst "
                    f"{idle:.2f} ms (noise floor)"
                ),
            )
        )
    result.add(Figure("idle ticker: longest lateness (noise floor)", idle, "ms"))
    return result
