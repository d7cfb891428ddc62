"""The two ways into the proxy, as scripts/run-proxy opens them: the regular proxy (a client
sets HTTPS_PROXY, or an agent, and trusts mitmproxy's CA) and a reverse proxy to
api.cerebras.ai (a client sets only its base URL: no proxy setting, no CA). A flow that comes
in either way is metered, held and reported alike.

The Node tests run the `openai` npm package as a Node agent does: Node's built-in fetch
ignores HTTPS_PROXY, so the proxy way needs undici's ProxyAgent. The packages are installed
once per virtualenv (`<venv>/node-clients/`), with npm from the package registry.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Proxy, chat_body
from .faults_support import async_wait_metric, metrics, status_client, wait_settled
from .test_proxy_e2e import assert_only_local_upstreams

pytestmark = pytest.mark.e2e

CEREBRAS = "https://api.cerebras.ai"
MODEL = "llama3.1-8b"
# The openai 7.x line needs Node >= 22; these machines have Node 20. undici 6 is the line
# Node 20's own fetch is built on.
NODE_PACKAGES = {"openai": "^6.0.0", "undici": "^6.0.0"}
NODE_CLIENT = Path(__file__).resolve().parent / "node_client.mjs"
NPM_TIMEOUT = 300.0
NODE_TIMEOUT = 60.0
# Whatever the machine has set must not carry the request: each way in is the only one open.
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "NODE_EXTRA_CA_CERTS",
    "NODE_USE_ENV_PROXY",
)


def forwarded(snapshot: dict[str, Any]) -> int:
    return snapshot["requests"].get(MODEL, {}).get("forwarded", 0)


# ---------------------------------------------------------------------------------------------
# Python clients through the reverse proxy


def test_reverse_proxy_meters_routes_and_reports_like_the_regular_proxy(
    proxy: Callable[..., Proxy], mock_upstream: Any
) -> None:
    """A plain-HTTP client with only a base URL: the metered request is estimated, forwarded
    to the (mock) upstream and answered with the proxy's headers; an unmetered Cerebras path
    goes the same route; the status pages count it (read through the regular proxy)."""
    mock_upstream.configure(rpm=600, tpm=100_000)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": 100_000}, reverse_to=CEREBRAS)
    with httpx.Client(base_url=f"{cooldown.reverse_url}/v1", trust_env=False) as client:
        answer = client.post("/chat/completions", json=chat_body(max_completion_tokens=5))
        models = client.get("/models")
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 5
    assert int(answer.headers["x-cooldown-estimated-tokens"]) > 5
    assert float(answer.headers["x-cooldown-wait"]) >= 0
    assert answer.headers["x-ratelimit-limit-tpm"] == "100000"
    assert answer.headers["x-ratelimit-limit-tokens-minute"] == "100000"  # upstream's own
    assert models.status_code == 200, models.text
    assert MODEL in [m["id"] for m in models.json()["data"]]
    assert mock_upstream.stats()["requests"] == 1  # the completion; /v1/models is not counted
    snapshot = wait_settled(cooldown)
    assert forwarded(snapshot) == 1
    assert snapshot["tracked_flows"] == 0
    assert_only_local_upstreams(cooldown, mock_upstream.port)
    cooldown.assert_clean_log()


async def test_reverse_proxy_holds_a_request_until_it_fits(
    proxy: Callable[..., Proxy], mock_upstream: Any
) -> None:
    """Two requests that do not fit together: the second is held (queue depth 1) until the
    first's unused reservation comes back, then forwarded with the wait in X-Cooldown-Wait."""
    mock_upstream.configure(rpm=600, tpm=600, latency=1.0)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": 600}, reverse_to=CEREBRAS)
    body = chat_body(max_completion_tokens=390)  # ~400 of 600 tokens reserved, 28 used
    async with (
        httpx.AsyncClient(base_url=f"{cooldown.reverse_url}/v1", timeout=30.0) as client,
        status_client(cooldown) as status,
    ):
        first = asyncio.create_task(client.post("/chat/completions", json=body))
        assert await async_wait_metric(status, lambda _: mock_upstream.stats()["requests"] == 1)
        second = asyncio.create_task(client.post("/chat/completions", json=body))
        held = await async_wait_metric(status, lambda m: m["cerebras_queue_depth"] == 1)
        assert held is not None, "the second request was not held"
        answers = await asyncio.gather(first, second)
    for answer in answers:
        assert answer.status_code == 200, answer.text
    assert float(answers[0].headers["x-cooldown-wait"]) < 0.5
    assert float(answers[1].headers["x-cooldown-wait"]) >= 0.3
    assert mock_upstream.stats()["rate_limited"] == 0
    snapshot = wait_settled(cooldown)
    assert forwarded(snapshot) == 2
    assert snapshot["tracked_flows"] == 0
    cooldown.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# The `openai` npm package, both ways in


@pytest.fixture(scope="session")
def node_client_dir() -> Path:
    """A directory with the `openai` and `undici` npm packages and the Node client script,
    installed once per virtualenv (reinstalled when NODE_PACKAGES changes)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("npm and node are needed to run the Node openai client; not on PATH")
    directory = Path(sys.prefix) / "node-clients"
    directory.mkdir(exist_ok=True)
    manifest = json.dumps(
        {"name": "cooldown-e2e-node-clients", "private": True, "dependencies": NODE_PACKAGES},
        indent=2,
    )
    package_json = directory / "package.json"
    installed = all((directory / "node_modules" / name).is_dir() for name in NODE_PACKAGES)
    if not installed or not package_json.is_file() or package_json.read_text() != manifest:
        package_json.write_text(manifest)
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-package-lock"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
        )
        if result.returncode != 0:
            package_json.unlink()  # the next run tries again
            pytest.fail(f"npm install failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
    # ES modules resolve packages from the script's own folder: it runs from there.
    shutil.copyfile(NODE_CLIENT, directory / NODE_CLIENT.name)
    return directory


def run_node_client(directory: Path, way: str, env: dict[str, str]) -> dict[str, Any]:
    """Run node_client.mjs one way in; its JSON line, or a failure with its output."""
    clean = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARIABLES}
    result = subprocess.run(
        ["node", NODE_CLIENT.name, way],
        cwd=directory,
        env={**clean, "COOLDOWN_API_KEY": "csk-e2e-node-test", **env},
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
    )
    assert result.returncode == 0, f"node client ({way}) failed:\n{result.stdout}{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("way", ["base-url", "proxy"])
def test_node_openai_reaches_cerebras_through_the_proxy(
    proxy: Callable[..., Proxy], mock_upstream: Any, node_client_dir: Path, way: str
) -> None:
    """base-url: `baseURL: http://127.0.0.1:<reverse port>/v1`, nothing else (plain HTTP to
    the proxy, so no CA). proxy: the default Cerebras URL through undici's ProxyAgent, with
    mitmproxy's CA in NODE_EXTRA_CA_CERTS. Either way the request is metered and answered by
    the (mock) upstream, with the proxy's headers."""
    mock_upstream.configure(rpm=600, tpm=100_000)
    cooldown = proxy({"rpm_limit": 600, "tpm_limit": 100_000}, reverse_to=CEREBRAS)
    if way == "base-url":
        env = {"COOLDOWN_BASE_URL": f"{cooldown.reverse_url}/v1"}
    else:
        env = {
            "COOLDOWN_BASE_URL": f"{CEREBRAS}/v1",
            "COOLDOWN_PROXY": cooldown.url,
            "NODE_EXTRA_CA_CERTS": str(cooldown.ca_file),
        }
    result = run_node_client(node_client_dir, way, env)
    assert result["status"] == 200, result
    assert result["usage"]["completion_tokens"] == 20, result
    assert int(result["estimated"]) > 20, result
    assert float(result["waited"]) >= 0, result
    assert mock_upstream.stats()["requests"] == 1
    assert forwarded(metrics(cooldown)) == 1
    assert_only_local_upstreams(cooldown, mock_upstream.port)
    cooldown.assert_clean_log()
