"""Cooldown end to end: real mitmdump, real HTTPS through CONNECT, the mock as upstream.

Each test starts its own mock (port 0) and its own mitmdump with the limits it needs; the
client calls https://api.cerebras.ai/... through the proxy and the addon routes the request
to the mock. The burst test takes about two minutes of real time (limits are per minute);
every other test takes a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import ModuleType
from typing import Any

import httpx
import pytest

from cooldown.estimate import estimate_request

from .conftest import (
    CEREBRAS_CHAT,
    CEREBRAS_MODELS,
    PlainServer,
    async_wait_until,
    chat_body,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONTEXT_LENGTH = 131_072  # the addon's default and the mock's default
MINUTE_HEADERS = [
    f"x-ratelimit-{field}-{resource}-minute"
    for resource in ("requests", "tokens")
    for field in ("limit", "remaining", "reset")
]


def proxy_estimate(body: dict[str, Any]) -> int:
    """What the proxy reserves for this request."""
    return estimate_request("/v1/chat/completions", json.dumps(body).encode(), CONTEXT_LENGTH).total


def mock_cost(mock_module: ModuleType, body: dict[str, Any]) -> int:
    """What the mock takes from its buckets for this request (input + reservation)."""
    parsed = mock_module.parse_completion_request(
        json.dumps(body).encode(), chat=True, context_length=CONTEXT_LENGTH
    )
    return parsed.cost


def assert_proxy_refusal(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An OpenAI-style error that the Cooldown proxy (not Cerebras) answered itself."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert "Cooldown proxy" in error["message"]
    assert "not by Cerebras" in error["message"]
    retry_after = response.headers.get("retry-after")
    assert retry_after is not None and retry_after.isdigit(), response.headers
    assert int(retry_after) >= 1
    return error


def assert_only_local_upstreams(proxy: Any, *allowed_ports: int) -> None:
    """mitmproxy connected upstream only to our local servers, never to *.cerebras.ai."""
    assert "error establishing server connection" not in proxy.log_text()
    targets = proxy.upstream_targets()
    allowed = {f"127.0.0.1:{port}" for port in allowed_ports}
    assert targets, "no upstream connection logged at all (is termlog_verbosity=debug on?)"
    assert targets <= allowed, f"unexpected upstream connections: {targets - allowed}"


# ---------------------------------------------------------------------------------------------
# (a) Below the limits nothing changes.


def test_below_limits_requests_pass_through_unchanged(
    proxy: Any, mock_upstream: Any, plain_server: PlainServer, mock_cerebras_module: ModuleType
) -> None:
    mock_upstream.configure(rpm=600, tpm=100_000)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": 100_000})
    client = cooldown.client()

    sent = [
        ("https://api.cerebras.ai", chat_body("Say hello.", max_completion_tokens=5)),
        ("https://api.cerebras.ai", chat_body("Name a colour.", model="qwen-3-32b")),
        ("https://inference.cerebras.ai", chat_body("Count to three.", max_completion_tokens=7)),
    ]
    for base, body in sent:
        response = client.post(f"{base}/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "chat.completion"
        assert answer["model"] == body["model"]
        assert answer["choices"][0]["message"]["role"] == "assistant"
        # The mock priced exactly the body we sent: the proxy did not alter it on the way.
        prompt_tokens = mock_cerebras_module.count_chat_tokens(body["messages"])
        completion_tokens = min(body["max_completion_tokens"], 20)  # mock generates 20
        assert answer["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        # Upstream's rate-limit headers reach the client.
        for name in MINUTE_HEADERS:
            assert name in response.headers, name
        assert response.headers["x-ratelimit-limit-requests-minute"] == "600"
        assert response.headers["x-ratelimit-limit-tokens-minute"] == "100000"
        assert 0 <= int(response.headers["x-ratelimit-remaining-tokens-minute"]) < 100_000
        assert float(response.headers["x-ratelimit-reset-tokens-minute"]) >= 0
        assert "x-cooldown-refused" not in response.headers

    stats = mock_upstream.stats()
    assert (stats["requests"], stats["ok"], stats["rate_limited"]) == (3, 3, 0)

    # Not metered, but still a Cerebras path: routed to the mock, answered by it.
    models = client.get(CEREBRAS_MODELS)
    assert models.status_code == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == list(mock_cerebras_module.MODEL_IDS)
    assert models.headers["x-ratelimit-limit-tokens-minute"] == "100000"

    # A host that is not Cerebras: neither routed to the mock nor changed.
    other_body = json.dumps(chat_body("not for cerebras")).encode()
    other = client.post(
        f"{plain_server.url}/v1/chat/completions",
        content=other_body,
        headers={"content-type": "application/json"},
    )
    assert other.status_code == 200, other.text
    assert other.json() == {"served_by": "plain-server", "path": "/v1/chat/completions"}
    assert len(plain_server.seen) == 1
    seen = plain_server.seen[0]
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions", other_body)
    assert seen.headers["Host"] == f"127.0.0.1:{plain_server.port}"
    assert mock_upstream.stats()["requests"] == 3  # the mock saw nothing of it

    assert_only_local_upstreams(cooldown, mock_upstream.port, plain_server.port)
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# (b) A burst far beyond the token limit is spread out; upstream never answers 429.

BURST_REQUESTS = 20
BURST_TPM = 12_000
BURST_PROMPT_WORDS = 1_420  # about 1,490 tokens of input


@pytest.mark.slow
async def test_burst_beyond_tpm_is_spread_and_never_rate_limited(
    proxy: Any, mock_upstream: Any, mock_cerebras_module: ModuleType
) -> None:
    prompt = " ".join(mock_cerebras_module.filler_words(BURST_PROMPT_WORDS))
    body = chat_body(prompt, max_completion_tokens=20)
    estimate = proxy_estimate(body)
    cost = mock_cost(mock_cerebras_module, body)  # the mock generates exactly 20: no refund
    per_window = BURST_TPM // estimate
    total_tokens = BURST_REQUESTS * cost
    # Any schedule that upstream's bucket accepts needs at least this long.
    ideal = total_tokens / BURST_TPM * 60.0 - 60.0
    assert 1_400 <= cost <= 1_600 and total_tokens >= 2.4 * BURST_TPM  # the premise

    mock_upstream.configure(rpm=600, tpm=BURST_TPM)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": BURST_TPM})

    async with cooldown.async_client(timeout=httpx.Timeout(150.0, connect=10.0)) as client:
        started = time.monotonic()

        async def one() -> tuple[int, float, dict[str, Any]]:
            response = await client.post(CEREBRAS_CHAT, json=body)
            return response.status_code, time.monotonic() - started, response.json()

        results = await asyncio.gather(*(one() for _ in range(BURST_REQUESTS)))
    elapsed = max(finished for _, finished, _ in results)
    stats = mock_upstream.stats()
    finish_times = sorted(round(finished, 1) for _, finished, _ in results)
    print(
        f"\nburst: {BURST_REQUESTS} requests sent, proxy estimate {estimate} tokens each, "
        f"mock cost {cost} each ({total_tokens} total = {total_tokens / BURST_TPM:.2f}x tpm "
        f"{BURST_TPM}); upstream 429s: {stats['rate_limited']}; "
        f"elapsed {elapsed:.1f}s vs ideal {ideal:.1f}s; finish times {finish_times}"
    )

    assert [status for status, _, _ in results] == [200] * BURST_REQUESTS
    assert all(answer["usage"]["total_tokens"] == cost for _, _, answer in results)
    assert stats["requests"] == BURST_REQUESTS
    assert stats["ok"] == BURST_REQUESTS
    assert stats["rate_limited"] == 0
    assert elapsed >= ideal
    # The limit is used, not just respected: the bucket mirrors upstream's, so the burst takes
    # about what upstream's bucket needs (a 60 s window would take until ~ideal + 30 s).
    assert elapsed < ideal + 12.0
    # In the first 30 s: the full bucket at once, then what refilled, never more.
    early = sum(1 for _, finished, _ in results if finished < 30.0)
    assert per_window < early <= (BURST_TPM + BURST_TPM // 2) // cost + 1
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# (c) Queue full: the proxy answers 429 itself; held requests time out with 429 too.


async def test_queue_full_is_answered_by_the_proxy(
    proxy: Any, mock_upstream: Any, plain_server: PlainServer
) -> None:
    mock_upstream.configure(rpm=600, tpm=60_000)
    body = chat_body(max_completion_tokens=20)
    assert 2 * proxy_estimate(body) > 50  # after the first, the next one does not fit
    cooldown = proxy(
        {"rpm_limit": 600, "tpm_limit": 50, "max_queue_depth": 2, "request_timeout": "3s"}
    )

    async with cooldown.async_client() as client:
        first = await client.post(CEREBRAS_CHAT, json=body)
        assert first.status_code == 200, first.text
        assert mock_upstream.stats()["requests"] == 1

        submitted = time.monotonic()
        tasks = [asyncio.create_task(client.post(CEREBRAS_CHAT, json=body)) for _ in range(5)]
        # Two are held (the queue's depth); the other three are refused at once.
        assert await async_wait_until(lambda: sum(t.done() for t in tasks) >= 3, 5.0)
        done = [task for task in tasks if task.done()]
        pending = [task for task in tasks if not task.done()]
        assert (len(done), len(pending)) == (3, 2)
        for task in done:
            assert_proxy_refusal(task.result(), 429, "queue_full")

        # While the queue is full, what is not metered still flows.
        other = await client.post(f"{plain_server.url}/v1/chat/completions", json=body)
        assert other.status_code == 200
        assert len(plain_server.seen) == 1
        models = await client.get(CEREBRAS_MODELS)
        assert models.status_code == 200
        assert not any(task.done() for task in pending)

        timed_out = await asyncio.wait_for(asyncio.gather(*pending), timeout=10.0)
        waited = time.monotonic() - submitted
    for response in timed_out:
        assert_proxy_refusal(response, 429, "queue_timeout")
    assert 2.8 <= waited < 8.0
    assert mock_upstream.stats()["requests"] == 1  # the mock never saw the refused ones
    assert_only_local_upstreams(cooldown, mock_upstream.port, plain_server.port)
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# (d) Upstream 429s open the circuit breaker; a successful probe closes it.


def test_circuit_breaker_opens_after_upstream_429s_and_closes_after_probe(
    proxy: Any, mock_upstream: Any
) -> None:
    mock_upstream.configure(rpm=600, tpm=60_000, force_status=429)
    cooldown = proxy(
        # No retries inside the proxy: every upstream 429 goes straight to the client.
        {"rpm_limit": 1000, "tpm_limit": 1_000_000, "max_retries": 0},
        circuit_breaker={"failure_threshold": 10, "open_duration": "3s"},
    )
    client = cooldown.client()

    for i in range(10):
        response = client.post(CEREBRAS_CHAT, json=chat_body())
        assert response.status_code == 429, (i, response.text)
        # The mock's own top-level quota body, passed through untouched.
        assert response.json()["code"] == "token_quota_exceeded"
        assert "error" not in response.json()
        assert response.headers["x-ratelimit-limit-tokens-minute"] == "60000"
    opened = time.monotonic()
    assert mock_upstream.stats()["forced_429"] == 10

    refused = client.post(CEREBRAS_CHAT, json=chat_body())
    assert_proxy_refusal(refused, 503, "circuit_open")
    assert 1 <= int(refused.headers["retry-after"]) <= 3
    assert mock_upstream.stats()["requests"] == 10

    mock_upstream.configure(force_status=None)
    refusals = 0

    def probe_answered() -> httpx.Response | None:
        nonlocal refusals
        response = client.post(CEREBRAS_CHAT, json=chat_body())
        if response.status_code == 200:
            return response
        assert_proxy_refusal(response, 503, "circuit_open")
        assert mock_upstream.stats()["requests"] == 10  # nothing reaches upstream while open
        refusals += 1
        return None

    probe = wait_until(probe_answered, timeout=10.0, interval=0.1)
    closed_after = time.monotonic() - opened
    assert probe is not None, "the breaker never let a probe through"
    assert probe.json()["usage"]["completion_tokens"] == 20
    assert refusals >= 1
    assert 2.5 <= closed_after < 6.0  # open for open_duration (3 s), then half-open at once
    assert mock_upstream.stats()["requests"] == 11

    for _ in range(3):  # closed again: everything passes
        assert client.post(CEREBRAS_CHAT, json=chat_body()).status_code == 200
    stats = mock_upstream.stats()
    assert (stats["requests"], stats["ok"], stats["forced_429"]) == (14, 4, 10)
    assert_only_local_upstreams(cooldown, mock_upstream.port)
    cooldown.assert_clean_log()


def test_upstream_429_is_retried_after_retry_after_then_passed_through(
    proxy: Any, mock_upstream: Any
) -> None:
    """`max_retries`: a 429 is re-sent after upstream's retry-after; the last one reaches the
    client. Every upstream 429 counts toward the breaker, retries included."""
    mock_upstream.configure(rpm=600, tpm=60_000, force_status=429, retry_after="0.3")
    cooldown = proxy(
        {"rpm_limit": 1000, "tpm_limit": 1_000_000, "max_retries": 2},
        circuit_breaker={"failure_threshold": 5, "open_duration": "30s"},
    )
    client = cooldown.client()

    started = time.monotonic()
    response = client.post(CEREBRAS_CHAT, json=chat_body())
    took = time.monotonic() - started
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "token_quota_exceeded"  # upstream's body, not ours
    assert mock_upstream.stats()["forced_429"] == 3  # the first attempt and two retries
    assert took >= 0.6  # waited upstream's retry-after (0.3 s) before each retry

    # Two more upstream 429s open the breaker (threshold 5) in the middle of the next
    # request's retries: its last retry is refused by the proxy; nothing more goes upstream.
    refused = client.post(CEREBRAS_CHAT, json=chat_body())
    assert_proxy_refusal(refused, 503, "circuit_open")
    assert mock_upstream.stats()["forced_429"] == 5
    assert_proxy_refusal(client.post(CEREBRAS_CHAT, json=chat_body()), 503, "circuit_open")
    assert mock_upstream.stats()["requests"] == 5
    assert_only_local_upstreams(cooldown, mock_upstream.port)
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# (e) A client that gives up while held leaves the queue at once and is never forwarded.


async def test_client_disconnect_while_held_leaves_queue_and_never_reaches_upstream(
    proxy: Any, mock_upstream: Any
) -> None:
    tpm = 1_000
    small = chat_body(max_completion_tokens=20)
    big_input = proxy_estimate(chat_body(max_completion_tokens=0))  # input tokens only
    big = chat_body(max_completion_tokens=tpm - big_input)  # reserves the whole tpm
    assert proxy_estimate(big) == tpm
    # Slow upstream: the big request stays in flight (holding the whole tpm) for 3 s.
    mock_upstream.configure(rpm=600, tpm=60_000, latency=3.0)
    cooldown = proxy(
        {"rpm_limit": 600, "tpm_limit": tpm, "max_queue_depth": 1, "request_timeout": "30s"}
    )

    async with cooldown.async_client() as client:
        big_task = asyncio.create_task(client.post(CEREBRAS_CHAT, json=big))
        assert await async_wait_until(lambda: mock_upstream.stats()["requests"] == 1, 5.0)
        mock_upstream.configure(latency=0.0)  # for later requests; the big one keeps its 3 s

        # Held (the tpm is taken); the client gives up after 1 s and closes its connection.
        async with cooldown.async_client(timeout=httpx.Timeout(10.0, read=1.0)) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post(CEREBRAS_CHAT, json=small)
        # mitmproxy's own debug line: it has seen that client go.
        assert await async_wait_until(lambda: "client disconnect" in cooldown.log_text(), 5.0)
        assert mock_upstream.stats()["requests"] == 1
        assert not big_task.done()

        # The queue holds one request; had the gone one kept its place, this would be
        # refused (queue_full). Instead it is held until the big one is answered, then sent.
        after = await client.post(CEREBRAS_CHAT, json=small)
        big_response = await asyncio.wait_for(big_task, 10.0)
    assert big_response.status_code == 200, big_response.text
    assert after.status_code == 200, after.text
    stats = mock_upstream.stats()
    assert (stats["requests"], stats["ok"]) == (2, 2)  # the big one and the last one
    # mitmproxy's dump of the impatient request: a complete flow that ended with its client.
    assert "<< Client disconnected." in cooldown.log_text()
    assert_only_local_upstreams(cooldown, mock_upstream.port)
    cooldown.assert_clean_log()
