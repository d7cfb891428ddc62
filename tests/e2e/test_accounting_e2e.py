"""Accounting end to end: upstream made harder than the proxy's picture of it.

The mock upstream (tools/mock_cerebras.py) is switched so that the proxy's own accounting
is wrong at first, in the three ways a real organization meets:

1. the model's tokenizer counts more input tokens than tiktoken (``input_token_factor``);
2. upstream keeps the whole reservation after a short completion (``refund_unused=False``);
3. another client of the same organization has already used most of the budget (``consume``).

In each run the proxy and the mock have the same limits, clients send more than fits at once,
and the proxy must correct itself from what upstream reports (``usage`` and the
``x-ratelimit-*`` headers): after at most a handful of upstream 429s, all early, it stops
causing them, and clients see no error at all (the proxy retries the few 429s itself).

The limits are per minute and the proxy's own window frees capacity only 60 s after use, so
each run is sized to finish within seconds: the tight resource is either upstream's
continuously refilling bucket (runs 2 and 3, paced by the header sync) or reservations in
flight that are settled down to a small usage when answered (the input-factor runs, which
turn the proxy's pacing off so that its accounting alone faces the whole limit).

What makes each run fail when the correction is missing (checked by disabling it in a copy of
the addon): without calibration both input-factor runs fail (tiktoken's estimates in the log;
upstream 429s in the wide burst); without the header sync the other two get a stream of
upstream 429s and client errors.

Also here: a stream through the real mitmdump arrives chunk by chunk and its reservation is
settled from the usage in its last chunk; a single upstream 429 with ``retry-after: 1`` is
retried by the proxy and the client gets a 200.

Every harder run prints its figures and, when ``COOLDOWN_E2E_FIGURES`` names a file, appends
them there as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import httpx
import pytest

from cooldown.config import CerebrasLimits
from cooldown.estimate import estimate_request

from .conftest import CEREBRAS_CHAT, chat_body
from .faults_support import record_figures

pytestmark = pytest.mark.e2e

CONTEXT_LENGTH = 131_072  # the addon's default and the mock's default
MAX_UPSTREAM_429S = 3
CLIENT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# The proxy's pacing (`burst`: a share of the limit released at once, the rest at the
# limit's rate) keeps the first seconds of any run far below upstream's budget, so a
# tokenizer that counts 15 % more could not matter there. The input-factor runs turn it off,
# where the option exists, so that the proxy's accounting alone faces the whole limit.
NO_PACING = {"burst": 1.0} if "burst" in CerebrasLimits.__dataclass_fields__ else {}
_RELEASED = re.compile(r"released after [\d.]+s, estimate (\d+) tokens")


def proxy_estimate(body: dict[str, Any]) -> int:
    """What the proxy reserves for this request before it has learnt anything."""
    return estimate_request("/v1/chat/completions", json.dumps(body).encode(), CONTEXT_LENGTH).total


def mock_cost(mock_module: ModuleType, body: dict[str, Any], factor: float = 1.0) -> int:
    """What the mock takes from its buckets at admission (input + reservation)."""
    parsed = mock_module.parse_completion_request(
        json.dumps(body).encode(),
        chat=True,
        context_length=CONTEXT_LENGTH,
        input_token_factor=factor,
    )
    return parsed.cost


def mock_input(mock_module: ModuleType, body: dict[str, Any], factor: float = 1.0) -> int:
    return mock_module.scaled_input_tokens(mock_module.count_chat_tokens(body["messages"]), factor)


def released_estimates(proxy: Any) -> list[int]:
    """The estimate of every request the proxy released, in order (from its debug log)."""
    return [int(tokens) for tokens in _RELEASED.findall(proxy.log_text())]


def prompt_of(mock_module: ModuleType, tokens: int) -> str:
    """Filler text of about `tokens` tiktoken words (about 1.05 tokens each)."""
    return " ".join(mock_module.filler_words(tokens))


@dataclass
class Answer:
    index: int
    status: int
    started: float
    finished: float
    body: dict[str, Any] | None


async def send_all(
    client: httpx.AsyncClient, body: dict[str, Any], count: int, workers: int
) -> tuple[list[Answer], float]:
    """`count` requests from `workers` clients that each send the next as soon as one ends."""
    started = time.monotonic()
    answers: list[Answer] = []
    next_index = iter(range(count))

    async def worker() -> None:
        for index in next_index:
            sent = time.monotonic() - started
            response = await client.post(CEREBRAS_CHAT, json=body)
            try:
                payload = response.json()
            except ValueError:
                payload = None
            answers.append(
                Answer(index, response.status_code, sent, time.monotonic() - started, payload)
            )

    await asyncio.gather(*(worker() for _ in range(workers)))
    return sorted(answers, key=lambda a: a.index), time.monotonic() - started


def run_figures(
    name: str,
    *,
    tpm: int,
    start_level: int,
    answers: Sequence[Answer],
    elapsed: float,
    history: Sequence[dict[str, Any]],
    stats: dict[str, Any],
    start_at: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What the lead's note needs: 429s, client errors, time, and how much of the limit was used.

    `utilization` compares the tokens upstream kept for our requests with what its bucket
    could have admitted over the run (the budget left at `start_at`, default the first
    admission, plus the refill until the last admission); `bucket_peak_use` is how far the
    tokens-per-minute bucket was drained at its lowest (1.0 = empty)."""
    admitted = [e for e in history if e["status"] == 200]
    refused_at = [i for i, e in enumerate(history) if e["status"] == 429]
    lefts = [e["tokens_left"] for e in history if e["tokens_left"] is not None]
    if start_at is None:
        start_at = history[0]["at"] if history else 0.0
    span = history[-1]["at"] - start_at if history else 0.0
    capacity = start_level + tpm / 60.0 * span
    kept = sum(e["kept"] for e in admitted)
    return {
        "test": name,
        "requests": len(answers),
        "upstream_requests": stats["requests"],
        "upstream_429s": stats["rate_limited"] - stats["forced_429"],
        "upstream_429_positions": refused_at,
        "client_errors": sum(1 for a in answers if a.status != 200),
        "elapsed_s": round(elapsed, 2),
        "tpm_limit": tpm,
        "budget_at_start": start_level,
        "tokens_admitted": sum(e["cost"] for e in admitted),
        "tokens_kept": kept,
        "upstream_capacity_over_run": round(capacity),
        "utilization": round(kept / capacity, 3) if capacity else None,
        "bucket_peak_use": round(1 - min(lefts) / tpm, 3) if lefts else None,
        "kept_per_tpm": round(kept / tpm, 3),
        "finish_times_s": [round(a.finished, 2) for a in answers],
        **extra,
    }


def assert_recovered(figures: dict[str, Any], answers: Sequence[Answer]) -> None:
    """Clients saw no error; upstream said 429 at most a handful of times, and only early."""
    assert [a.status for a in answers] == [200] * len(answers), [
        (a.index, a.status, a.body) for a in answers if a.status != 200
    ]
    assert figures["upstream_429s"] <= MAX_UPSTREAM_429S, figures
    half = figures["upstream_requests"] // 2
    assert all(position < half for position in figures["upstream_429_positions"]), figures


# ---------------------------------------------------------------------------------------------
# 1. Upstream counts 15 % more input tokens than tiktoken.

FACTOR = 1.15
FACTOR_TPM = 30_000
FACTOR_PROMPT_TOKENS = 900
FACTOR_MAX_COMPLETION = 4_000  # reserved at admission, refunded down to 20 after 1 s
FACTOR_LATENCY = 1.0
FACTOR_REQUESTS = 16
FACTOR_WORKERS = 8


async def test_tokenizer_counting_more_than_tiktoken_is_learnt(
    proxy: Any, mock_upstream: Any, mock_cerebras_module: ModuleType
) -> None:
    """The first requests go out at tiktoken's count and overshoot upstream's budget; the
    usage of the first answers (calibration) and the headers correct the proxy."""
    body = chat_body(
        prompt_of(mock_cerebras_module, FACTOR_PROMPT_TOKENS),
        max_completion_tokens=FACTOR_MAX_COMPLETION,
    )
    estimate = proxy_estimate(body)
    cost = mock_cost(mock_cerebras_module, body, FACTOR)
    prompt = mock_input(mock_cerebras_module, body, FACTOR)
    first_wave = FACTOR_TPM // estimate
    # The premise: what the proxy releases at first does not fit upstream's count of it.
    assert first_wave * cost > FACTOR_TPM >= first_wave * estimate
    # ... and the run, settled, plus a 429 kept at its estimate and one reservation in flight,
    # fits one minute's budget: nothing has to wait for the window to age out.
    assert FACTOR_REQUESTS * (prompt + 20) + estimate + cost <= FACTOR_TPM

    mock_upstream.configure(
        rpm=600, tpm=FACTOR_TPM, input_token_factor=FACTOR, latency=FACTOR_LATENCY
    )
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": FACTOR_TPM, **NO_PACING})
    async with cooldown.async_client(timeout=CLIENT_TIMEOUT) as client:
        answers, elapsed = await send_all(client, body, FACTOR_REQUESTS, FACTOR_WORKERS)
    estimates = released_estimates(cooldown)

    figures = run_figures(
        "input_token_factor_1.15",
        tpm=FACTOR_TPM,
        start_level=FACTOR_TPM,
        answers=answers,
        elapsed=elapsed,
        history=mock_upstream.history(),
        stats=mock_upstream.stats(),
        proxy_first_estimate=estimate,
        upstream_cost=cost,
        proxy_estimates=estimates,
    )
    record_figures(figures)
    assert_recovered(figures, answers)
    assert all(a.body and a.body["usage"]["prompt_tokens"] == prompt for a in answers)
    # Calibration: tiktoken's count only for what was estimated before the first answers
    # (one request per client, and a retry after a 429), upstream's count after that.
    assert len(estimates) >= len(answers)
    assert estimates.count(estimate) <= FACTOR_WORKERS + figures["upstream_429s"], estimates
    later = estimates[len(estimates) // 2 :]
    assert all(cost <= e <= cost + 1 for e in later), estimates
    assert elapsed < 20.0
    cooldown.assert_clean_log()


WIDE_TPM = 30_000
WIDE_PROMPT_TOKENS = 390
WIDE_MAX_COMPLETION = 300
WIDE_LATENCY = 1.0
WIDE_REQUESTS = 56  # after the first one
WIDE_WORKERS = 42


async def test_learnt_input_factor_keeps_a_wide_burst_within_upstream_count(
    proxy: Any, mock_upstream: Any, mock_cerebras_module: ModuleType
) -> None:
    """After one answer has shown upstream's prompt_tokens, a burst wide enough that 15 % of
    its input is worth several requests is released at upstream's count, not tiktoken's."""
    body = chat_body(
        prompt_of(mock_cerebras_module, WIDE_PROMPT_TOKENS),
        max_completion_tokens=WIDE_MAX_COMPLETION,
    )
    estimate = proxy_estimate(body)
    cost = mock_cost(mock_cerebras_module, body, FACTOR)
    used = mock_input(mock_cerebras_module, body, FACTOR) + 20
    # The premise: after the first answer, tiktoken's count would release at least three
    # more requests than upstream admits; the learnt count releases only what it admits.
    assert (WIDE_TPM - used) // estimate >= WIDE_TPM // cost + 3
    assert (WIDE_TPM - used) // cost <= WIDE_TPM // cost <= WIDE_WORKERS

    mock_upstream.configure(rpm=600, tpm=WIDE_TPM, input_token_factor=FACTOR, latency=WIDE_LATENCY)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": WIDE_TPM, **NO_PACING})
    async with cooldown.async_client(timeout=CLIENT_TIMEOUT) as client:
        first, first_took = await send_all(client, body, 1, 1)
        rest, elapsed = await send_all(client, body, WIDE_REQUESTS, WIDE_WORKERS)
    estimates = released_estimates(cooldown)
    answers = first + [
        Answer(a.index + 1, a.status, a.started + first_took, a.finished + first_took, a.body)
        for a in rest
    ]

    figures = run_figures(
        "input_token_factor_1.15_wide_burst",
        tpm=WIDE_TPM,
        start_level=WIDE_TPM,
        answers=answers,
        elapsed=first_took + elapsed,
        history=mock_upstream.history(),
        stats=mock_upstream.stats(),
        proxy_first_estimate=estimate,
        upstream_cost=cost,
    )
    record_figures(figures)
    assert_recovered(figures, answers)
    # The first request went out at tiktoken's count; every later one at upstream's.
    assert estimates[0] == estimate
    assert len(estimates) == len(answers) and all(cost <= e <= cost + 1 for e in estimates[1:])
    assert figures["upstream_429s"] == 0  # the first answer taught the proxy enough
    assert figures["bucket_peak_use"] >= 0.9  # and the burst did press on the limit
    assert first_took + elapsed < 20.0
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 2. Upstream keeps the whole reservation, not the usage.

KEEP_TPM = 60_000
KEEP_PROMPT_TOKENS = 100
KEEP_MAX_COMPLETION = 1_400  # the mock generates 20 and keeps all 1,400
KEEP_REQUESTS = 48
KEEP_WORKERS = 4


async def test_upstream_keeping_the_whole_reservation_is_followed(
    proxy: Any, mock_upstream: Any, mock_cerebras_module: ModuleType
) -> None:
    """The proxy settles each request to its small usage, but upstream keeps the reservation;
    the x-ratelimit headers show it, and the proxy waits for upstream's bucket instead."""
    body = chat_body(
        prompt_of(mock_cerebras_module, KEEP_PROMPT_TOKENS),
        max_completion_tokens=KEEP_MAX_COMPLETION,
    )
    cost = mock_cost(mock_cerebras_module, body)
    usage = mock_input(mock_cerebras_module, body) + 20
    # The premise: by its own (settled) count the proxy could send everything at once...
    assert KEEP_REQUESTS * usage < KEEP_TPM
    # ... but upstream needs refill time for what it keeps.
    must_wait = (KEEP_REQUESTS * cost - KEEP_TPM) / (KEEP_TPM / 60.0)
    assert 5.0 <= must_wait <= 20.0

    mock_upstream.configure(rpm=600, tpm=KEEP_TPM, refund_unused=False)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": KEEP_TPM})
    async with cooldown.async_client(timeout=CLIENT_TIMEOUT) as client:
        answers, elapsed = await send_all(client, body, KEEP_REQUESTS, KEEP_WORKERS)

    figures = run_figures(
        "refund_unused_false",
        tpm=KEEP_TPM,
        start_level=KEEP_TPM,
        answers=answers,
        elapsed=elapsed,
        history=mock_upstream.history(),
        stats=mock_upstream.stats(),
        upstream_cost=cost,
        usage_total=usage,
        must_wait_s=round(must_wait, 2),
    )
    record_figures(figures)
    assert_recovered(figures, answers)
    assert elapsed >= must_wait * 0.9  # it did wait for upstream's bucket
    assert elapsed < must_wait + 15.0
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 3. Another client of the organization has used 85 % of the budget.
#
# 85 % rather than, say, 70 %: the proxy's pacing releases at most a quarter of the limit at
# once, so with 30 % left upstream would take the whole first burst and nothing would need
# correcting. With 15 % left the first wave overshoots whatever the pacing.

SHARED_TPM = 48_000
SHARED_USED_BY_OTHERS = 0.85
SHARED_PROMPT_TOKENS = 1_500  # with the template about 1,600 tokens, kept whole
SHARED_MAX_COMPLETION = 20  # no refund: every request keeps what it reserved
SHARED_REQUESTS = 12
SHARED_WORKERS = 6


async def test_budget_used_by_another_client_is_seen_in_the_first_headers(
    proxy: Any, mock_upstream: Any, mock_cerebras_module: ModuleType
) -> None:
    """The proxy's window is empty but upstream's bucket is 85 % used; the first answers'
    headers tell the proxy, which then paces the rest to upstream's refill."""
    body = chat_body(
        prompt_of(mock_cerebras_module, SHARED_PROMPT_TOKENS),
        max_completion_tokens=SHARED_MAX_COMPLETION,
    )
    cost = mock_cost(mock_cerebras_module, body)
    used_by_others = round(SHARED_TPM * SHARED_USED_BY_OTHERS)
    start_level = SHARED_TPM - used_by_others
    must_wait = (SHARED_REQUESTS * cost - start_level) / (SHARED_TPM / 60.0)
    assert SHARED_REQUESTS * cost < SHARED_TPM  # by its own count the proxy has room
    assert SHARED_WORKERS * cost <= SHARED_TPM / 4  # the first wave fits any pacing burst
    assert (SHARED_WORKERS - 3) * cost < start_level < (SHARED_WORKERS - 1) * cost  # too many
    assert 5.0 <= must_wait <= 20.0

    mock_upstream.configure(rpm=600, tpm=SHARED_TPM)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": SHARED_TPM})
    # Just before the run, so that the bucket has not refilled while mitmdump started.
    assert mock_upstream.consume(tokens=used_by_others)["tokens-minute"] == start_level
    consumed_at = time.monotonic()  # the mock's clock
    async with cooldown.async_client(timeout=CLIENT_TIMEOUT) as client:
        answers, elapsed = await send_all(client, body, SHARED_REQUESTS, SHARED_WORKERS)

    figures = run_figures(
        "another_client_used_85pct",
        tpm=SHARED_TPM,
        start_level=start_level,
        answers=answers,
        elapsed=elapsed,
        history=mock_upstream.history(),
        stats=mock_upstream.stats(),
        start_at=consumed_at,
        upstream_cost=cost,
        must_wait_s=round(must_wait, 2),
    )
    record_figures(figures)
    assert_recovered(figures, answers)
    assert elapsed >= must_wait * 0.9
    assert elapsed < must_wait + 15.0
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 4. A stream passes through unbuffered, and its usage settles the reservation.

STREAM_TPM = 60_000
STREAM_MAX_COMPLETION = 50_000  # two such reservations do not fit one minute's budget
STREAM_EVENTS = 8  # the mock sends one content chunk per completion token, up to 20
STREAM_INTERVAL = 0.2


def mock_headers(mock: Any) -> httpx.Headers:
    """Upstream's own x-ratelimit-* headers, asked directly (not through the proxy)."""
    return httpx.get(f"{mock.url}/v1/models", timeout=5).headers


async def test_stream_is_unbuffered_and_its_usage_settles_the_reservation(
    proxy: Any, mock_upstream: Any, mock_cerebras_module: ModuleType
) -> None:
    stream_body = {
        **chat_body("Tell me a story.", max_completion_tokens=STREAM_MAX_COMPLETION),
        "stream": True,  # no stream_options: the client does not ask for usage
    }
    big = chat_body("Tell me another story.", max_completion_tokens=STREAM_MAX_COMPLETION)
    small = chat_body("Hi.", max_completion_tokens=5)
    prompt = mock_cerebras_module.count_chat_tokens(stream_body["messages"])
    used = prompt + STREAM_EVENTS
    # The premise: after the stream, `big` fits at once only if the stream's reservation was
    # settled down to its usage; at its estimate it would wait for the window (a minute).
    assert proxy_estimate(stream_body) + proxy_estimate(big) > STREAM_TPM
    assert used + proxy_estimate(small) + proxy_estimate(big) <= STREAM_TPM

    mock_upstream.configure(
        rpm=600, tpm=STREAM_TPM, completion_tokens=STREAM_EVENTS, stream_interval=STREAM_INTERVAL
    )
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": STREAM_TPM})
    async with cooldown.async_client(timeout=httpx.Timeout(20.0, connect=10.0)) as client:
        events: list[tuple[float, str]] = []
        started = time.monotonic()
        async with client.stream("POST", CEREBRAS_CHAT, json=stream_body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic() - started, line.removeprefix("data: ")))
        total = time.monotonic() - started

        first_at, last_at = events[0][0], events[-1][0]
        print(
            f"\nstream: {len(events)} data events, first at {first_at:.3f}s, last at "
            f"{last_at:.3f}s, stream ended at {total:.3f}s"
        )
        # Chunk by chunk: the first event arrives long before the stream ends.
        assert events[-1][1] == "[DONE]"
        chunks = [json.loads(data) for _, data in events[:-1]]
        assert len(chunks) == STREAM_EVENTS >= 5
        assert first_at < 0.5 * total
        assert last_at - first_at >= 0.7 * (STREAM_EVENTS - 1) * STREAM_INTERVAL
        # The proxy asked for usage on the client's behalf: it is in the last chunk only.
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["usage"] == {
            "prompt_tokens": prompt,
            "completion_tokens": STREAM_EVENTS,
            "total_tokens": used,
        }

        # Upstream refunds the unused reservation when the stream ends.
        def refunded() -> bool:
            remaining = mock_headers(mock_upstream)["x-ratelimit-remaining-tokens-minute"]
            return int(remaining) >= STREAM_TPM - used

        deadline = time.monotonic() + 5.0
        while not refunded():
            assert time.monotonic() < deadline, "the mock never refunded the stream"
            await asyncio.sleep(0.05)

        async def follow_up(body: dict[str, Any]) -> tuple[httpx.Response, float]:
            sent = time.monotonic()
            try:
                response = await client.post(CEREBRAS_CHAT, json=body)
            except httpx.ReadTimeout:
                pytest.fail(
                    f"a follow-up of {proxy_estimate(body)} estimated tokens was held for "
                    "20 s: the stream's reservation was not settled to the usage in its "
                    "last chunk",
                    pytrace=False,
                )
            return response, time.monotonic() - sent

        # The stream's headers reported upstream's budget before the refund; a small answer
        # brings the proxy's view of upstream up to date, so that only the proxy's own
        # accounting (where the stream's reservation is settled or not) can hold `big` back.
        assert (await follow_up(small))[0].status_code == 200
        answer, waited = await follow_up(big)
    print(f"follow-up of {proxy_estimate(big)} estimated tokens answered in {waited:.3f}s")
    assert answer.status_code == 200, answer.text
    assert waited < 3.0
    stats = mock_upstream.stats()
    assert (stats["requests"], stats["ok"], stats["rate_limited"]) == (3, 3, 0)
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 5. One upstream 429 with retry-after is retried inside the proxy.


def test_single_upstream_429_is_retried_after_retry_after(proxy: Any, mock_upstream: Any) -> None:
    mock_upstream.configure(rpm=600, tpm=60_000, force_status=429, force_count=1, retry_after="1")
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": 60_000})
    client = cooldown.client(timeout=15.0)

    started = time.monotonic()
    response = client.post(CEREBRAS_CHAT, json=chat_body())
    took = time.monotonic() - started

    print(f"\nretry: client answered {response.status_code} after {took:.3f}s")
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 20
    assert "x-cooldown-refused" not in response.headers
    stats = mock_upstream.stats()
    assert (stats["requests"], stats["forced_429"], stats["rate_limited"], stats["ok"]) == (
        2,
        1,
        1,
        1,
    )
    history = mock_upstream.history()
    assert [entry["status"] for entry in history] == [429, 200]
    assert history[1]["at"] - history[0]["at"] >= 0.95  # upstream's retry-after was honoured
    assert 0.95 <= took < 5.0
    # Service is back to normal: the next request goes straight through.
    again = time.monotonic()
    assert client.post(CEREBRAS_CHAT, json=chat_body()).status_code == 200
    assert time.monotonic() - again < 1.0
    assert mock_upstream.stats()["requests"] == 3
    cooldown.assert_clean_log()
