"""Benchmark: the dual bucket and the prompt cache model, on an agent workload (issue 10).

Agent sessions (tools/agents.py: 24 sessions in two teams, each team sharing a ~3,000-token
system prompt with its tool definitions, each session sending tool results of 2,500-4,500
tokens and growing its conversation until 12,000 tokens, then starting over) go through
mitmdump + Cooldown to a mock of Cerebras (tools/mock_cerebras.py) that keeps both buckets
(uncached 300,000 tokens per minute, total 3 x that) and a prompt cache (128-token blocks, 5
minutes). The workload's uncached share of tokens (~40 %) makes the uncached bucket the one
that binds.

* **cache** and **blind** run side by side, at the same time, each against its own mock
  (admission `full`): Cooldown with `prompt_cache.enabled: true`, and with `false` (cache-blind:
  every token counted as uncached, as before issue 10).
* **predicted**: mock admission `predicted` (the uncached bucket charged only the uncached
  input) and Cooldown with `prompt_cache.admission: predicted`, alone.
* **memory**: the cache model itself (in this process) after the prompts of 10,000 sessions.

Figures: upstream 429s and client errors; uncached utilization (tokens the mock kept on its
uncached bucket for requests admitted during the run, over tpm/60 x T + tpm); total tokens
served (usage of ok answers) against the cache-blind proxy's; predicted vs reported cached
tokens (X-Cooldown-Cached-Tokens against usage.prompt_tokens_details.cached_tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import tracemalloc
from dataclasses import replace
from typing import Any

from cooldown.prompt_cache import BYTES_PER_BLOCK, PromptCache
from tools import agents, mock_cerebras
from tools.launch import Mitmdump

from .common import BenchResult, Figure, start_mitmdump
from .context import Context

RPM, TPM = 2_000, 300_000
TOTAL_TPM = 3 * TPM
TARGET_UTILIZATION = 0.9
TARGET_RATIO = 1.7
TARGET_PREDICTION = 0.05
MEMORY_SESSIONS = 10_000


def mock_settings(admission: str) -> mock_cerebras.MockSettings:
    return mock_cerebras.MockSettings(
        rpm=RPM,
        tpm=TPM,
        total_tpm=TOTAL_TPM,
        prompt_cache=True,
        cache_admission=admission,
        completion_tokens=200,
        latency=0.3,
    )


def start_proxy(ctx: Context, name: str, upstream: str, cache: dict[str, Any]) -> Mitmdump:
    return start_mitmdump(
        ctx.workdir,
        f"cache-{name}",
        addon_config={
            "cerebras_limits": {
                "rpm_limit": RPM,
                "tpm_limit": TPM,
                "max_queue_depth": 5_000,
                "request_timeout": "10m",
            },
            "prompt_cache": cache,
            "cerebras_upstream": upstream,
        },
    )


def uncached_utilization(history: list[dict[str, Any]], start: float, duration: float) -> dict:
    admitted = [e for e in history if e["status"] == 200 and start <= e["at"] < start + duration]
    kept = sum(e["kept"] or 0 for e in admitted)
    kept_total = sum(e.get("kept_total") or 0 for e in admitted)
    bucket_max = TPM / 60 * duration + TPM
    return {
        "kept_uncached": kept,
        "kept_total": kept_total,
        "bucket_max": bucket_max,
        "utilization": kept / bucket_max,
        "total_utilization": kept_total / (TOTAL_TPM / 60 * duration + TOTAL_TPM),
        "admitted": len(admitted),
    }


def run_paths(
    ctx: Context, paths: dict[str, tuple[str, dict[str, Any]]], duration: float
) -> dict[str, Any]:
    """Run the agent workload through each path at the same time; each has its own mock."""
    settings = agents.AgentSettings(duration=duration)
    with contextlib.ExitStack() as stack:
        mocks = {
            name: stack.enter_context(mock_cerebras.MockCerebras(mock_settings(admission)))
            for name, (admission, _) in paths.items()
        }
        proxies = {
            name: stack.enter_context(start_proxy(ctx, name, mocks[name].url, cache))
            for name, (_, cache) in paths.items()
        }
        for mock in mocks.values():
            mock.reset()
        start = time.monotonic()

        async def main() -> dict[str, agents.AgentSummary]:
            runs = [
                agents.run_agents(
                    replace(
                        settings,
                        proxy=proxies[name].url,
                        ca=str(proxies[name].ca_file),
                    )
                )
                for name in paths
            ]
            return dict(zip(paths, await asyncio.gather(*runs), strict=True))

        summaries = asyncio.run(main())
        out: dict[str, Any] = {}
        for name, summary in summaries.items():
            stats = mocks[name].stats()
            out[name] = {
                "client": summary.figures(),
                "elapsed": summary.elapsed,
                "mock_429s": stats["rate_limited"] - stats["forced_429"],
                "mock": uncached_utilization(mocks[name].history(), start, duration),
            }
        return out


def cache_memory(sessions: int = MEMORY_SESSIONS) -> dict[str, Any]:
    """The model after `sessions` agent conversations (two shared prefixes of 3,000 tokens,
    8 turns of ~1,000 tokens each), with the default bound and without one."""
    figures: dict[str, Any] = {"sessions": sessions}
    for label, bound in (("bounded", PromptCache().max_blocks), ("unbounded", 10**9)):
        rng = random.Random(1)
        tracemalloc.start()
        cache = PromptCache(max_blocks=bound)
        before = tracemalloc.get_traced_memory()[0]
        for session in range(sessions):
            segments = [(hash(("team", session % 2)), 3_000)]
            for _turn in range(8):
                segments.append((rng.getrandbits(60), rng.randint(500, 1_500)))
                cache.record(cache.keys_for("m", segments), now=float(session))
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        figures[label] = {
            "blocks": len(cache),
            "bytes": used,
            "bytes_per_block": used / max(len(cache), 1),
        }
    return figures


def run(ctx: Context) -> BenchResult:
    result = BenchResult("cache", "Agent workload: the dual bucket and the prompt cache model")
    duration = 40.0
    side_by_side = run_paths(
        ctx,
        {
            "cache": ("full", {"enabled": True, "admission": "full"}),
            "blind": ("full", {"enabled": False}),
        },
        duration,
    )
    predicted = run_paths(
        ctx, {"predicted": ("predicted", {"enabled": True, "admission": "predicted"})}, duration
    )
    memory = cache_memory()
    result.details.update(
        {
            "duration_s": duration,
            "limits": {"rpm": RPM, "tpm_uncached": TPM, "tpm_total": TOTAL_TPM},
            "workload": agents.AgentSettings(duration=duration).__dict__,
            "paths": {**side_by_side, **predicted},
            "memory": memory,
        }
    )
    cache, blind, pred = side_by_side["cache"], side_by_side["blind"], predicted["predicted"]
    for label, path, allowed in (("full", cache, 0), ("predicted", pred, 2)):
        client = path["client"]
        result.add(
            Figure(
                f"upstream 429s, admission {label}",
                path["mock_429s"],
                "",
                target=f"<= {allowed}",
                met=path["mock_429s"] <= allowed,
                note=f"{client['requests']} requests, outcomes {client['outcomes']}",
            )
        )
        result.add(
            Figure(
                f"client errors, admission {label}",
                client["client_errors"],
                "",
                target="0" if label == "full" else "",
                met=client["client_errors"] == 0 if label == "full" else None,
            )
        )
        util = path["mock"]["utilization"]
        result.add(
            Figure(
                f"uncached utilization (kept / (tpm/60 x T + tpm)), admission {label}",
                100 * util,
                "%",
                100 * blind["mock"]["utilization"] if label == "full" else None,
                "cache-blind proxy" if label == "full" else "",
                target=f">= {TARGET_UTILIZATION:.0%}",
                met=util >= TARGET_UTILIZATION,
                note=f"total bucket {100 * path['mock']['total_utilization']:.0f} % used; "
                f"cached share of input {client['cached_share_of_input']:.2f}",
            )
        )
        ratio = client["predicted_over_reported"]
        error = client["abs_error_share"]
        result.add(
            Figure(
                f"predicted / reported cached tokens, admission {label}",
                ratio,
                "",
                target=f"within {TARGET_PREDICTION:.0%}",
                met=None if ratio is None else abs(ratio - 1) <= TARGET_PREDICTION,
                note=f"mean absolute error {error:.3f} of reported (per answer)"
                if error is not None
                else "",
            )
        )
    # Served during the run: the total tokens (prompt + completion) of the requests upstream
    # admitted within T. (The clients' own sums also count requests held at T and answered
    # after it, which favours the path that holds more.)
    served, baseline = cache["mock"]["kept_total"], blind["mock"]["kept_total"]
    result.add(
        Figure(
            "total tokens served in T, cache model on",
            served,
            "",
            baseline,
            "prompt_cache.enabled: false",
            served / baseline if baseline else None,
            target=f">= {TARGET_RATIO}x",
            met=bool(baseline) and served / baseline >= TARGET_RATIO,
            note=f"requests admitted in T: {cache['mock']['admitted']} vs "
            f"{blind['mock']['admitted']}; blind: {blind['mock_429s']} upstream 429s, "
            f"{blind['client']['client_errors']} client errors; all answers, the run's tail "
            f"included: {cache['client']['total_tokens']:,} vs "
            f"{blind['client']['total_tokens']:,}",
        )
    )
    bounded = memory["bounded"]
    result.add(
        Figure(
            f"cache model memory after {MEMORY_SESSIONS:,} sessions (max_blocks default)",
            bounded["bytes"] / 2**20,
            "MiB",
            memory["unbounded"]["bytes"] / 2**20,
            "without the bound",
            note=f"{bounded['blocks']:,} blocks, {bounded['bytes_per_block']:.0f} B per block "
            f"(BYTES_PER_BLOCK says {BYTES_PER_BLOCK}); unbounded: "
            f"{memory['unbounded']['blocks']:,} blocks",
        )
    )
    return result
