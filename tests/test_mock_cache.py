"""The mock's dual bucket and prompt cache: blocks, TTL, both admission rules, usage, 429s.

On a fake clock, so bucket levels are exact. The last test checks the proxy's model of the
cache against the mock's on a growing conversation: the benchmark's accuracy rests on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cooldown.estimate import parse_request
from cooldown.prompt_cache import PromptCache
from tools.mock_cerebras import MockCerebras, MockSettings

from .test_mock_upstream import FakeClock

SYSTEM = {"role": "system", "content": "You are a careful coding agent. " * 150}  # 1,051 tokens


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def start(clock: FakeClock) -> Iterator[Any]:
    servers: list[MockCerebras] = []
    clients: list[httpx.Client] = []

    def run(**settings: Any) -> httpx.Client:
        defaults = {"rpm": 1000, "tpm": 10_000, "total_tpm": 30_000, "prompt_cache": True}
        mock = MockCerebras(MockSettings(**{**defaults, **settings}), clock=clock).start()
        servers.append(mock)
        clients.append(httpx.Client(base_url=mock.url, timeout=5))
        return clients[-1]

    yield run
    for client in clients:
        client.close()
    for server in servers:
        server.stop()


def chat(client: httpx.Client, *turns: str, out: int = 100) -> httpx.Response:
    messages = [SYSTEM] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text}
        for i, text in enumerate(turns)
    ]
    body = {"model": "m", "messages": messages, "max_completion_tokens": out}
    return client.post("/v1/chat/completions", json=body)


def cached(response: httpx.Response) -> int:
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def left(response: httpx.Response, bucket: str = "tokens") -> int:
    return int(response.headers[f"x-ratelimit-remaining-{bucket}-minute"])


def test_a_repeated_prefix_is_found_in_whole_blocks_until_its_ttl(start, clock):
    client = start()
    first = chat(client, "step one")
    assert cached(first) == 0
    second = chat(client, "step one", "done", "step two")
    prompt = first.json()["usage"]["prompt_tokens"]
    assert cached(second) == (prompt - 3) // 128 * 128  # all but the reply's priming
    clock.advance(301)
    assert cached(chat(client, "step one", "done", "step two")) == 0


def test_full_admission_charges_everything_then_refunds_the_cached_part(start):
    client = start(completion_tokens=10)
    chat(client, "step one", out=100)
    answer = chat(client, "step one", out=100)
    usage = answer.json()["usage"]
    hit = cached(answer)
    first_prompt = usage["prompt_tokens"]
    # Uncached bucket keeps prompt - cached + completion; the total one prompt + completion.
    assert left(answer) == 10_000 - (first_prompt + 10) - (first_prompt - hit + 10)
    assert left(answer, "total-tokens") == 30_000 - 2 * (first_prompt + 10)


def test_predicted_admission_needs_room_only_for_the_uncached_input(start):
    client = start(tpm=3_000, cache_admission="predicted", completion_tokens=10)
    first = chat(client, "step one", out=100)  # ~1,160 of 3,000
    assert first.status_code == 200
    second = chat(client, "step one", out=1_500)  # needs 1,160 + 1,500 > 1,830 left, but ...
    assert second.status_code == 200, second.text  # ... only ~40 uncached + 1,500
    full = start(tpm=3_000, cache_admission="full", completion_tokens=10)
    chat(full, "step one", out=100)
    refused = chat(full, "step one", out=1_500)
    assert refused.status_code == 429
    assert refused.json()["message"].startswith("Uncached tokens per minute limit exceeded")


def test_the_total_bucket_refuses_with_its_own_message(start):
    client = start(tpm=100_000, total_tpm=2_000)
    assert chat(client, "one", out=100).status_code == 200
    refused = chat(client, "one", out=800)
    assert refused.status_code == 429
    assert refused.json()["message"] == (
        "Total tokens per minute limit exceeded - too many tokens processed."
    )
    assert refused.headers["x-ratelimit-limit-total-tokens-minute"] == "2000"


def test_without_the_cache_usage_and_history_are_as_before(start):
    client = start(prompt_cache=False, total_tpm=None)
    answer = chat(client, "one")
    assert "prompt_tokens_details" not in answer.json()["usage"]
    assert "x-ratelimit-limit-total-tokens-minute" not in answer.headers
    history = json.loads(client.get("/_mock/history").text)["history"]
    assert set(history[0]) == {"at", "status", "cost", "kept", "tokens_left"}


def test_the_proxys_model_predicts_what_the_mock_finds(start):
    """A growing conversation: at each turn the proxy's blocks (over its own rendering and
    token counts) predict the mock's cached tokens to within one block."""
    client = start(tpm=1_000_000, total_tpm=3_000_000)
    model = PromptCache()
    turns: list[str] = []
    for step in range(8):
        turns += [f"step {step}: " + "look at the file and report. " * (20 + 7 * step)]
        messages = [SYSTEM] + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text}
            for i, text in enumerate(turns)
        ]
        body = {"model": "m", "messages": messages, "max_completion_tokens": 50}
        shape = parse_request("/v1/chat/completions", json.dumps(body), segments=True)
        keys = model.keys_for("m", shape.segments)
        predicted = model.predict("m", keys, 0.0, shape.input_tokens).raw
        answer = client.post("/v1/chat/completions", json=body)
        found = cached(answer)
        assert abs(predicted - found) <= 128, (step, predicted, found)
        model.record(keys, 0.0)
        turns.append(answer.json()["choices"][0]["message"]["content"])
