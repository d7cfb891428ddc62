"""Fixtures for end-to-end tests: a real mitmdump subprocess in front of the mock upstream.

Everything binds and connects to 127.0.0.1 only. Clients talk real HTTPS to
`api.cerebras.ai` through the proxy (CONNECT, then TLS with mitmproxy's CA), exactly as a
user with HTTPS_PROXY set would; the addon's `cerebras_upstream` key sends the requests on
to the mock, and mitmproxy's lazy connection strategy (set by the addon) means no
connection to the real host is ever attempted. `Proxy.upstream_targets()` checks that.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tools.launch import Mitmdump, StartError

# mitmdump's start-up and shutdown limits in these tests (tools.launch does the waiting).
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

CEREBRAS_CHAT = "https://api.cerebras.ai/v1/chat/completions"
CEREBRAS_MODELS = "https://api.cerebras.ai/v1/models"


def write_config(path: Path, config: dict[str, Any] | str) -> None:
    """Replace the config file in one step (the addon polls it once a second)."""
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    partial = path.with_suffix(".tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll `condition` until it is truthy (returned) or `timeout` passes (returns None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


async def async_wait_until(
    condition: Callable[[], Any], timeout: float, interval: float = 0.05
) -> bool:
    """`wait_until` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


def chat_body(
    content: str = "Say hello to the rate limiter.",
    *,
    max_completion_tokens: int | None = 20,
    model: str = "llama3.1-8b",
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if max_completion_tokens is not None:
        body["max_completion_tokens"] = max_completion_tokens
    return body


# mitmproxy's own upstream connections, and those of any httpx client inside the addon
# (httpcore logs its connects at DEBUG, which termlog_verbosity=debug shows).
_SERVER_CONNECT = re.compile(r"server connect(?:ion to)? (\S+)")
_HTTPCORE_CONNECT = re.compile(r"connect_tcp\.started host='([^']+)' port=(\d+)")


@dataclass(kw_only=True)
class Proxy(Mitmdump):
    """A running mitmdump with the Cooldown addon (see tools.launch), and clients through it.

    Its log is a file, read on demand (`log_text`, `log_tail`)."""

    config_path: Path
    _clients: list[httpx.Client] = field(default_factory=list)

    def ssl_context(self) -> ssl.SSLContext:
        # Same as verify=<ca path>; httpx 0.28 deprecates passing the path as a string.
        return ssl.create_default_context(cafile=str(self.ca_file))

    def client(self, timeout: float | httpx.Timeout = 10.0) -> httpx.Client:
        """A client through the proxy; closed at teardown, before mitmdump is stopped."""
        client = httpx.Client(
            proxy=self.url, verify=self.ssl_context(), timeout=timeout, trust_env=False
        )
        self._clients.append(client)
        return client

    def async_client(self, timeout: float | httpx.Timeout = 10.0) -> httpx.AsyncClient:
        """Use it as `async with proxy.async_client() as client:`."""
        return httpx.AsyncClient(
            proxy=self.url, verify=self.ssl_context(), timeout=timeout, trust_env=False
        )

    def upstream_targets(self) -> set[str]:
        """Every host:port the proxy opened (or tried to open) an upstream connection to."""
        text = self.log_text()
        targets = set(_SERVER_CONNECT.findall(text))
        targets.update(f"{host}:{port}" for host, port in _HTTPCORE_CONNECT.findall(text))
        return targets

    def assert_clean_log(self) -> None:
        """No addon error and no traceback: the addon must not crash on any path tested, and
        shutdown is quiet (Python 3.12.1 printed asyncio tracebacks when mitmdump exited with
        connections open: .python-version names 3.13, which does not)."""
        text = self.log_text()
        for marker in ("Addon error", "Traceback", "Error in hook"):
            assert marker not in text, f"{marker!r} in the mitmdump log:\n{self.log_tail()}"

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def stop(self) -> str | None:
        """Close clients, SIGTERM, wait, then kill. Returns a problem description, if any."""
        self.close_clients()
        return super().stop()


_PROXIES = pytest.StashKey[list[Proxy]]()
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e is an e2e test (`-m "not e2e"` skips them all)."""
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach each started mitmdump's log to the report of a failed test."""
    report = yield
    if report.failed:
        for proxy in item.stash.get(_PROXIES, []):
            report.sections.append((f"mitmdump log ({proxy.log_path})", proxy.log_tail()))
    return report


@pytest.fixture
def mock_upstream(mock_cerebras_module: ModuleType) -> Iterator[Any]:
    """The mock Cerebras on a free 127.0.0.1 port; each test sets its own limits."""
    mock = mock_cerebras_module.MockCerebras(port=0).start()
    try:
        yield mock
    finally:
        mock.stop()


def start_proxy(
    request: pytest.FixtureRequest,
    directory: Path,
    started: list[Proxy],
    config: dict[str, Any],
    *,
    verbosity: str = "debug",
    reverse_to: str | None = None,
    options: Sequence[str] = (),
    args: Sequence[str] = (),
) -> Proxy:
    """mitmdump + Cooldown with `config` (files and log in `directory`), once it listens.

    `reverse_to`: also a reverse proxy to that URL (`Proxy.reverse_url`), as
    scripts/run-proxy starts one to Cerebras. `options` are more `--set name=value`, `args`
    more command-line arguments. The proxy is
    added to `started` (the calling fixture stops it) and to the test's list of proxies whose
    logs a failed test's report shows. A proxy that does not come up fails the test.
    """
    every: list[Proxy] = request.node.stash.setdefault(_PROXIES, [])
    index = len(every)
    config_path = directory / f"cooldown-{index}.yaml"
    write_config(config_path, config)
    try:
        proxy = Proxy.start(
            confdir=directory / f"confdir-{index}",
            log_path=directory / f"mitmdump-{index}.log",
            config_path=config_path,
            reverse_to=reverse_to,
            options=(f"termlog_verbosity={verbosity}", *options),
            args=args,
            cwd=directory,
            start_timeout=START_TIMEOUT,
            stop_timeout=STOP_TIMEOUT,
        )
    except StartError as exc:
        pytest.fail(str(exc), pytrace=False)
    every.append(proxy)
    started.append(proxy)
    return proxy


@pytest.fixture
def proxy(
    request: pytest.FixtureRequest, tmp_path: Path, mock_upstream: Any
) -> Iterator[Callable[..., Proxy]]:
    """Factory: `proxy(limits, circuit_breaker=..., reverse_to=...)` starts mitmdump and waits
    until it listens."""
    started: list[Proxy] = []

    def start(
        limits: dict[str, Any] | None = None,
        *,
        circuit_breaker: dict[str, Any] | None = None,
        reverse_to: str | None = None,
    ) -> Proxy:
        config: dict[str, Any] = {
            "cerebras_limits": limits or {},
            "cerebras_upstream": mock_upstream.url,
        }
        if circuit_breaker is not None:
            config["circuit_breaker"] = circuit_breaker
        return start_proxy(request, tmp_path, started, config, reverse_to=reverse_to)

    yield start

    problems = [(p, problem) for p in started if (problem := p.stop())]
    if problems:
        details = "\n\n".join(f"{problem}\n{p.log_tail()}" for p, problem in problems)
        pytest.fail(details, pytrace=False)


# ---------------------------------------------------------------------------------------------
# A plain-HTTP server on 127.0.0.1 that stands in for a host that is not Cerebras.


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class PlainServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        self.seen: list[SeenRequest] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _PlainHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _PlainHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PlainServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.seen.append(
                SeenRequest(self.command, self.path, dict(self.headers.items()), body)
            )
        data = json.dumps({"served_by": "plain-server", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _answer
    do_POST = _answer


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    """Run a socketserver in a daemon thread for the duration of the block, then stop it."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def plain_server() -> Iterator[PlainServer]:
    server = PlainServer()
    with serving(server):
        yield server
