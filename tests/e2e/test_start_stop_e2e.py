"""Starting and stopping, as a user sees it: a bad config stops mitmdump before anything says
it listens, and a signal with connections open ends it without a traceback."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tools.launch import Process, free_port, mitmdump_command

from .conftest import CEREBRAS_CHAT, STOP_TIMEOUT, chat_body
from .faults_support import Launcher, async_wait_metric, cooldown_config, launcher, status_client

pytestmark = pytest.mark.e2e

EXIT_TIMEOUT = 30.0
HELD = 8


@pytest.fixture
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    """`launch(config)` starts mitmdump + Cooldown; a test may stop it with a signal."""
    yield from launcher(request, tmp_path)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ("cerebras_limits:\n  rpm_limit: -3\n", "cerebras_limits.rpm_limit: got -3"),
        ("cerebras_limits: [unclosed\n", "not valid YAML"),
    ],
    ids=["bad-value", "bad-yaml"],
)
def test_a_bad_config_exits_before_any_listener_says_it_listens(
    tmp_path: Path, config: str, named: str
) -> None:
    """Both listeners scripts/run-proxy opens (regular and reverse) are asked for; mitmdump
    exits with status 1 after one line naming the problem, and neither says it listens."""
    config_path = tmp_path / "cooldown.yaml"
    config_path.write_text(config)
    command = mitmdump_command(
        free_port(),
        tmp_path / "confdir",
        config_path=config_path,
        reverse=("https://api.cerebras.ai", free_port()),
    )
    with Process.spawn(command, tmp_path / "mitmdump.log", cwd=tmp_path) as mitmdump:
        try:
            status = mitmdump.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mitmdump kept running:\n{mitmdump.log_tail()}", pytrace=False)
        log = mitmdump.log_text()
    assert status == 1, log
    assert log.count("Cooldown cannot start: cerebras_config: ") == 1, log
    assert str(config_path) in log, log
    assert named in log, log
    assert "listening" not in log, log
    assert "Traceback" not in log, log


async def test_sigterm_with_held_connections_prints_no_traceback(
    launch: Launcher, mock_upstream: Any
) -> None:
    """Held requests on connections of their own, one in flight at a slow upstream and an
    idle keep-alive connection, through both ways in: SIGTERM ends mitmdump with status 0,
    every held client gets an answer, and neither stdout nor stderr shows a traceback
    (Python 3.12.1 printed one per open connection)."""
    mock_upstream.configure(rpm=None, tpm=None, latency=20.0)
    limits = {"tpm_limit": 50, "max_queue_depth": 20, "request_timeout": "60s"}
    cooldown = launch(
        cooldown_config(mock_upstream.url, limits), reverse_to="https://api.cerebras.ai"
    )
    launch.stopped_by_test(cooldown)
    tls = ssl.create_default_context(cafile=str(cooldown.ca_file))
    proxied = [
        httpx.AsyncClient(proxy=cooldown.url, verify=tls, timeout=30.0, trust_env=False)
        for _ in range(HELD // 2 + 2)
    ]
    reverse = [
        httpx.AsyncClient(base_url=cooldown.reverse_url, timeout=30.0, trust_env=False)
        for _ in range(HELD // 2)
    ]
    in_flight_client, idle_client, *held_clients = proxied
    try:
        async with status_client(cooldown) as status:
            await status.get("http://cooldown.local/metrics.json")  # one more open connection
            idle = await idle_client.get("https://api.cerebras.ai/v1/models")
            assert idle.status_code == 200, idle.text
            in_flight = asyncio.create_task(in_flight_client.post(CEREBRAS_CHAT, json=chat_body()))
            assert await async_wait_metric(status, lambda _: mock_upstream.stats()["requests"])
            held = [
                asyncio.create_task(client.post(CEREBRAS_CHAT, json=chat_body()))
                for client in held_clients
            ] + [
                asyncio.create_task(client.post("/v1/chat/completions", json=chat_body()))
                for client in reverse
            ]
            depth = await async_wait_metric(status, lambda m: m["cerebras_queue_depth"] == HELD)
            assert depth is not None, "the requests were not all held"
            cooldown.process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*held, in_flight, return_exceptions=True)
            exit_status = await asyncio.to_thread(cooldown.process.wait, STOP_TIMEOUT)
    finally:
        for client in proxied + reverse:
            await client.aclose()
    log = cooldown.log_text()
    assert exit_status == 0, log
    for answer in answers[:HELD]:
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 503, answer.text
    assert f"answered {HELD} held request(s) with 503" in log, log
    assert "Traceback" not in log, log
    assert "Exception in callback" not in log, log
