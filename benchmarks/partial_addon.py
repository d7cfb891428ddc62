"""This checkout's Cooldown with named parts of its work stubbed out: where its cost goes.

A mitmproxy script (`benchmarks.together --stub PARTS` loads it with COOLDOWN_BENCH_STUB set):
the proxy runs Cooldown's six addons as usual, minus the parts named (comma-separated):

- `metering`: the metering addon's request, responseheaders and response hooks do nothing
  (what is left is mitmproxy calling the addons' hooks, and the other addons' own);
- `answered`: nothing happens when upstream's answer begins (no confirm, no x-ratelimit-*
  re-sync, no X-RateLimit-* / X-Cooldown-* headers; the answer's headers are still read);
- `rate_reports`: upstream's x-ratelimit-* headers are not read (no re-sync of its view);
- `proxy_headers`: the proxy adds no X-RateLimit-* / X-Cooldown-* headers;
- `proxy_header_values`: it adds the same nine headers with constant values (what sending
  them costs, without computing them);
- `prompt_cache`: the prompt cache model is off, as with `prompt_cache.enabled: false`;
- `metrics`: no Prometheus counter or histogram is updated per request;
- `snapshot`: the request is not kept for a retry after a 429 (a 429 could not be retried).

A part's cost is the difference between the full addon and the addon without it, measured
side by side in one run. Each stub changes what the proxy does: for measuring only.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addon"))

from cooldown import metering, settle, upstream
from cooldown.addon import Cooldown
from cooldown.config import Config

PARTS = (
    "metering",
    "answered",
    "rate_reports",
    "proxy_headers",
    "proxy_header_values",
    "prompt_cache",
    "metrics",
    "snapshot",
)
# The nine headers the benchmark's answers get (bench_proxy's config), with constant values.
CONSTANT_HEADERS = [
    (name.encode(), value)
    for limit in ("RPM", "TPM", "Total-TPM")
    for name, value in (
        (f"X-RateLimit-Limit-{limit}", b"1000000000000"),
        (f"X-RateLimit-Remaining-{limit}", b"999999999000"),
    )
] + [
    (b"X-Cooldown-Wait", b"0.000"),
    (b"X-Cooldown-Estimated-Tokens", b"200"),
    (b"X-Cooldown-Cached-Tokens", b"0"),
]


def constant_proxy_headers(_gate: Any, response: Any, _metered: Any, head: Any) -> None:
    """settle.add_proxy_headers with constants."""
    fields = response.headers.fields
    if head.has_ours:
        fields = tuple(field for field in fields if field[0].lower() not in settle.OURS)
    response.headers.fields = (*fields, *CONSTANT_HEADERS)


def cooldown_without(parts: set[str]) -> list[Any]:
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    cooldown = Cooldown()
    meter: Any = cooldown.metering

    async def nothing_async(_flow: Any) -> None:
        return None

    def nothing(_flow: Any) -> None:
        return None

    if "metering" in parts:
        meter.request, meter.responseheaders, meter.response = (
            nothing_async,
            nothing,
            nothing_async,
        )
    if "answered" in parts:
        setattr(metering, "answer_began", lambda *_args: None)  # noqa: B010 (a stub)
    if "rate_reports" in parts:
        setattr(upstream.AnswerHead, "reports", lambda _head: [])  # noqa: B010 (a stub)
    if "proxy_headers" in parts:
        setattr(metering, "add_proxy_headers", lambda *_args: None)  # noqa: B010 (a stub)
    if "proxy_header_values" in parts:
        setattr(metering, "add_proxy_headers", constant_proxy_headers)  # noqa: B010 (a stub)
    if "metrics" in parts:
        counters: Any = cooldown.runtime.metrics
        counters.request_outcome = counters.estimate_vs_actual = counters.cached_input = (
            lambda *_args: None
        )
    if "snapshot" in parts:
        setattr(metering, "snapshot_request", lambda _request: None)  # noqa: B010 (a stub)
    if "prompt_cache" in parts:
        runtime: Any = cooldown.runtime
        apply = runtime.apply

        def without_cache(config: Config) -> None:
            cache = dataclasses.replace(config.prompt_cache, enabled=False)
            apply(dataclasses.replace(config, prompt_cache=cache))

        runtime.apply = without_cache
    return cooldown.addons


addons = cooldown_without(set(filter(None, os.environ.get("COOLDOWN_BENCH_STUB", "").split(","))))
