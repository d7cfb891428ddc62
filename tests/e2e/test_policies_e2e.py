"""Policies end to end: the priority header and the output cap as upstream sees them, and
per-domain pacing of another host, through a real mitmdump.

A plain server that records every request stands in for both upstreams: Cerebras (through
`cerebras_upstream`) and "another host" (reached as http://127.0.0.1:<port>, paced by an
exact `rate_limits` entry for 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import CEREBRAS_CHAT, PlainServer, Proxy, chat_body, start_proxy

pytestmark = pytest.mark.e2e


@pytest.fixture
def policy_proxy(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[dict[str, Any]], Proxy]]:
    """Factory: mitmdump + Cooldown with a whole config (stopped at teardown)."""
    started: list[Proxy] = []
    yield lambda config: start_proxy(request, tmp_path, started, config)
    problems = [problem for p in started if (problem := p.stop())]
    assert not problems, problems


def test_the_priority_header_never_reaches_upstream_and_the_cap_does(
    policy_proxy: Callable[[dict[str, Any]], Proxy], plain_server: PlainServer
) -> None:
    cooldown = policy_proxy(
        {
            "cerebras_upstream": plain_server.url,
            "models": {"llama3.1-8b": {"max_completion_tokens_cap": 1024}},
        }
    )
    client = cooldown.client()
    response = client.post(
        CEREBRAS_CHAT,
        json=chat_body("Write a long story.", max_completion_tokens=8000),
        headers={"X-Cooldown-Priority": "high"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Cooldown-Clamped"] == "max_completion_tokens=8000->1024"
    (seen,) = plain_server.seen
    assert json.loads(seen.body)["max_completion_tokens"] == 1024
    assert not any(name.lower() == "x-cooldown-priority" for name in seen.headers)
    metrics = client.get("http://cooldown.local/metrics.json").json()
    assert metrics["clamped_requests"] == {"llama3.1-8b": 1}
    cooldown.assert_clean_log()


def test_another_host_is_paced_not_refused(
    policy_proxy: Callable[[dict[str, Any]], Proxy], plain_server: PlainServer
) -> None:
    """The issue's figure: 20 concurrent requests to a host paced at 5 per second (burst 1)
    all get 200, and upstream sees them spread over at least 19 intervals of 0.2 s."""
    cooldown = policy_proxy({"rate_limits": [{"domain": "127.0.0.1", "requests_per_second": 5}]})

    async def send_all() -> list[int]:
        async with cooldown.async_client(timeout=30.0) as client:
            answers = await asyncio.gather(
                *(client.get(f"{plain_server.url}/item/{i}") for i in range(20))
            )
        return [a.status_code for a in answers]

    started = time.monotonic()
    assert asyncio.run(send_all()) == [200] * 20
    elapsed = time.monotonic() - started
    assert len(plain_server.seen) == 20
    # A lower bound (the proxy held them at least this long); never an upper one.
    assert elapsed >= 3.8 - 0.05, elapsed
    metrics = cooldown.client().get("http://cooldown.local/metrics.json").json()
    assert metrics["paced_requests"] == {"127.0.0.1": {"forwarded": 20}}
    assert metrics["paced_held"] == 0
    cooldown.assert_clean_log()
