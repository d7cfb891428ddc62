"""An agent workload for the load generator: sessions that share a long prefix and grow.

Coding agents, tool-using agents and RAG with a fixed system prompt send the same long prefix
on every call and a conversation that grows turn by turn, so most of their input is found in
Cerebras's prompt cache. This workload is that shape, closed-loop: `sessions` sessions in
`teams` teams; each team shares a system prompt of about `prefix_tokens` tokens that carries
its tool definitions (as text, the way several coding agents put them in the system prompt);
each session sends a user turn (a tool result) of `turn_tokens` tokens, waits for the answer,
appends it and the next turn, and starts a new conversation once its context passes
`max_context_tokens`. A refused turn is sent again after a second.

Each answer's `usage` says what upstream found cached (`prompt_tokens_details.cached_tokens`),
and through Cooldown the `X-Cooldown-Cached-Tokens` header what the proxy predicted; the summary
sets them side by side. `python -m tools.loadgen agents --help` runs it from the command line;
benchmarks/bench_cache.py uses `run_agents` directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tools import loadgen

CACHED_HEADER = "x-cooldown-cached-tokens"
RETRY_PAUSE = 1.0  # seconds before a refused or failed turn is sent again


@dataclass(frozen=True)
class AgentSettings:
    sessions: int = 24
    teams: int = 2
    prefix_tokens: int = 3_000
    turn_low: int = 2_500
    turn_high: int = 4_500
    max_completion_tokens: int = 400
    max_context_tokens: int = 12_000
    duration: float = 40.0
    model: str = "llama3.1-8b"
    seed: int = 20_251_201
    target: str = "proxy"  # or "direct" (the mock itself)
    url: str | None = None
    proxy: str = loadgen.DEFAULT_PROXY
    ca: str = loadgen.DEFAULT_CA
    timeout: float = 300.0

    def checked(self) -> AgentSettings:
        if not (1 <= self.sessions <= 10_000 and 1 <= self.teams <= self.sessions):
            raise ValueError("sessions must be 1-10,000 and teams 1-sessions")
        if not (0 < self.turn_low <= self.turn_high and self.prefix_tokens > 0):
            raise ValueError("prefix and turn sizes must be positive, low <= high")
        if not (0 < self.duration <= loadgen.MAX_DURATION):
            raise ValueError(f"duration must be in (0, {loadgen.MAX_DURATION:g}] seconds")
        return self


@dataclass
class Turn:
    """One request of a session; times are seconds since the run started."""

    session: int
    sent: float
    answered: float | None = None
    status: int | None = None
    outcome: str = loadgen.UNFINISHED
    code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # what upstream reported
    predicted_cached: int | None = None  # what the proxy predicted (its header)


@dataclass
class AgentSummary:
    settings: dict[str, Any]
    elapsed: float
    turns: list[Turn] = field(repr=False, default_factory=list)

    def figures(self) -> dict[str, Any]:
        ok = [t for t in self.turns if t.outcome == loadgen.OK and t.prompt_tokens is not None]
        prompt = sum(t.prompt_tokens or 0 for t in ok)
        completion = sum(t.completion_tokens or 0 for t in ok)
        cached = sum(t.cached_tokens or 0 for t in ok)
        both = [t for t in ok if t.predicted_cached is not None and t.cached_tokens is not None]
        reported = sum(t.cached_tokens or 0 for t in both)
        predicted = sum(t.predicted_cached or 0 for t in both)
        error = sum(abs((t.predicted_cached or 0) - (t.cached_tokens or 0)) for t in both)
        outcomes: dict[str, int] = {}
        for turn in self.turns:
            outcomes[turn.outcome] = outcomes.get(turn.outcome, 0) + 1
        return {
            "requests": len(self.turns),
            "outcomes": outcomes,
            "upstream_429s": outcomes.get(loadgen.UPSTREAM_429, 0),
            "client_errors": sum(
                n for kind, n in outcomes.items() if kind not in (loadgen.OK, loadgen.UNFINISHED)
            ),
            "total_tokens": prompt + completion,
            "uncached_tokens": prompt - cached + completion,
            "cached_tokens": cached,
            "cached_share_of_input": cached / prompt if prompt else 0.0,
            "predicted_cached_tokens": predicted if both else None,
            "predicted_over_reported": predicted / reported if reported else None,
            "abs_error_share": error / reported if reported else None,
            "tokens_per_minute": (prompt + completion) / self.elapsed * 60 if self.elapsed else 0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "elapsed": self.elapsed,
            "figures": self.figures(),
            "turns": [asdict(t) for t in self.turns],
        }


def team_prefix(team: int, tokens: int) -> str:
    """A team's system prompt: instructions and tool definitions, about `tokens` tokens."""
    tools = [
        {
            "name": f"tool_{team}_{i}",
            "description": f"Team {team} tool {i}: reads, edits or searches the repository.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        }
        for i in range(8)
    ]
    head = f"You are a coding agent of team {team}. Tools:\n{json.dumps(tools)}\nContext:\n"
    rest = max(1, tokens - loadgen.count_tokens(head))
    return head + loadgen.make_prompt(rest, random.Random(team), f"team {team}")


async def _session(
    index: int,
    settings: AgentSettings,
    prefix: str,
    client: httpx.AsyncClient,
    url: str,
    turns: list[Turn],
    clock: Any,
    end: float,
) -> None:
    rng = random.Random(settings.seed * 1_000 + index)
    system = {"role": "system", "content": prefix}
    messages: list[dict[str, str]] = [system]
    context = loadgen.count_tokens(prefix)
    pending: dict[str, str] | None = None
    while clock() < end:
        if context > settings.max_context_tokens:
            messages, context = [system], loadgen.count_tokens(prefix)
        if pending is None:
            size = rng.randint(settings.turn_low, settings.turn_high)
            pending = {
                "role": "user",
                "content": loadgen.make_prompt(size, rng, f"session {index} tool result"),
            }
        body = {
            "model": settings.model,
            "messages": [*messages, pending],
            "max_completion_tokens": settings.max_completion_tokens,
        }
        turn = Turn(index, clock())
        turns.append(turn)
        try:
            response = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            turn.outcome, turn.code = loadgen.TRANSPORT_ERROR, type(exc).__name__
        else:
            data = loadgen.json_object(response.content)
            turn.status = response.status_code
            turn.outcome, turn.code = loadgen.classify(response.status_code, response.headers, data)
            _read_usage(turn, data, response.headers.get(CACHED_HEADER))
            if turn.outcome == loadgen.OK:
                reply = _reply(data)
                messages += [pending, {"role": "assistant", "content": reply}]
                context += (turn.prompt_tokens or 0) - context + (turn.completion_tokens or 0)
                pending = None
        finally:
            turn.answered = clock()
        if turn.outcome != loadgen.OK:
            await asyncio.sleep(RETRY_PAUSE)


def _read_usage(turn: Turn, data: dict[str, Any], predicted: str | None) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        turn.prompt_tokens = usage.get("prompt_tokens")
        turn.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            turn.cached_tokens = details.get("cached_tokens")
    if predicted is not None and predicted.isdigit():
        turn.predicted_cached = int(predicted)


def _reply(data: dict[str, Any]) -> str:
    try:
        return str(data["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        return ""


def _client(settings: AgentSettings) -> httpx.AsyncClient:
    mix = loadgen.Settings(
        target=settings.target,  # type: ignore[arg-type]
        proxy=settings.proxy,
        ca=settings.ca,
        concurrency=max(settings.sessions, 1),
        timeout=settings.timeout,
    )
    return loadgen.http_client(mix)  # the same pooled client as the mix workload


async def run_agents(settings: AgentSettings) -> AgentSummary:
    """Run the sessions for `duration` seconds; answers still outstanding then are awaited
    (bounded by `timeout`), so every turn ends in a record."""
    settings = settings.checked()
    url = settings.url or (loadgen.PROXY_URL if settings.target == "proxy" else loadgen.DIRECT_URL)
    prefixes = [team_prefix(team, settings.prefix_tokens) for team in range(settings.teams)]
    turns: list[Turn] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    def clock() -> float:
        return loop.time() - start

    async with _client(settings) as client:
        await asyncio.gather(
            *(
                _session(
                    i,
                    settings,
                    prefixes[i % settings.teams],
                    client,
                    url,
                    turns,
                    clock,
                    settings.duration,
                )
                for i in range(settings.sessions)
            )
        )
    return AgentSummary(asdict(settings), clock(), turns)


def build_parser() -> argparse.ArgumentParser:
    defaults = AgentSettings()
    parser = argparse.ArgumentParser(
        prog="python -m tools.loadgen agents",
        description="Agent sessions sharing a long prefix, growing turn by turn.",
    )
    for name, value in asdict(defaults).items():
        kind = type(value) if value is not None else str
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--json", type=Path, default=None, help="write every turn here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    out = args.pop("json")
    started = time.monotonic()
    summary = asyncio.run(run_agents(AgentSettings(**args)))
    print(json.dumps(summary.figures(), indent=2))
    print(f"wall time {time.monotonic() - started:.1f} s", file=sys.stderr)
    if out is not None:
        out.write_text(json.dumps(summary.to_dict(), indent=1), encoding="utf-8")
    return 0
