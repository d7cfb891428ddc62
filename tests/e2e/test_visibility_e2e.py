"""What a user sees at mitmproxy's default log level: a held request says why, at once.

Issue 14: a 60 s hold logged nothing at the default level, and the proxy's own answers looked
like Cerebras's in mitmdump's flow line. Here mitmdump runs at termlog_verbosity=info.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cooldown.estimate import estimate_request

from .conftest import CEREBRAS_CHAT, Proxy, async_wait_until, chat_body, start_proxy

pytestmark = pytest.mark.e2e


def estimate(body: dict[str, Any]) -> int:
    return estimate_request("/v1/chat/completions", json.dumps(body).encode(), 131_072).total


@pytest.fixture
def quiet_proxy(
    request: pytest.FixtureRequest, tmp_path: Path, mock_upstream: Any
) -> Iterator[Callable[[dict[str, Any]], Proxy]]:
    """Like `proxy`, at mitmproxy's default log level (info) instead of debug."""
    started: list[Proxy] = []

    def start(limits: dict[str, Any]) -> Proxy:
        config = {"cerebras_limits": limits, "cerebras_upstream": mock_upstream.url}
        return start_proxy(request, tmp_path, started, config, verbosity="info")

    yield start
    problems = [(p, problem) for p in started if (problem := p.stop())]
    if problems:
        details = "\n\n".join(f"{problem}\n{p.log_tail()}" for p, problem in problems)
        pytest.fail(details, pytrace=False)


async def test_a_held_request_says_why_at_the_default_level(
    quiet_proxy: Callable[[dict[str, Any]], Proxy], mock_upstream: Any
) -> None:
    first, second = chat_body(max_completion_tokens=200), chat_body(max_completion_tokens=40)
    # The mock generates all it may, so the first one's tokens stay charged; the second one is
    # 20 tokens short: held for 20 / (tpm / 60) s, about 4 s.
    mock_upstream.configure(rpm=600, tpm=60_000, completion_tokens=10_000)
    tpm = estimate(first) + estimate(second) - 20
    cooldown = quiet_proxy(
        {"rpm_limit": 600, "tpm_limit": tpm, "probe_first": False, "request_timeout": "60s"}
    )
    async with cooldown.async_client(timeout=30.0) as client:
        assert (await client.post(CEREBRAS_CHAT, json=first)).status_code == 200
        held = asyncio.ensure_future(client.post(CEREBRAS_CHAT, json=second))
        line = re.compile(
            r"Cooldown: 1 held for llama3\.1-8b, oldest \d+\.\ds, waiting for tokens per "
            r"minute \(tpm_limit\), next release in \d+\.\ds"
        )
        # The first line comes within a second of the hold (then at most every 10 s).
        assert await async_wait_until(lambda: line.search(cooldown.log_text()), 3.0), (
            cooldown.log_tail()
        )
        assert not held.done()
        response = await asyncio.wait_for(held, 20.0)
    assert response.status_code == 200
    assert float(response.headers["x-cooldown-wait"]) > 1.0
    cooldown.assert_clean_log()


def test_the_proxys_own_answers_are_marked_in_the_flow_line(
    quiet_proxy: Callable[[dict[str, Any]], Proxy], mock_upstream: Any
) -> None:
    mock_upstream.configure(rpm=600, tpm=60_000)
    cooldown = quiet_proxy({"rpm_limit": 600, "tpm_limit": 60_000})
    client = cooldown.client(timeout=5.0)
    assert client.post(CEREBRAS_CHAT, json=chat_body()).status_code == 200
    refused = client.post(CEREBRAS_CHAT, json=chat_body(max_completion_tokens=70_000))
    assert refused.status_code == 413
    log = cooldown.log_text()
    assert re.search(r"<< 413 [A-Za-z ]+ \[Cooldown: request_too_large\]", log), log
    # Cerebras's own answer (here the mock's) carries no marker.
    assert re.search(r"<< 200 OK \d+b", log), log
    assert mock_upstream.stats()["requests"] == 1
    cooldown.assert_clean_log()
