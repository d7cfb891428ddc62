"""A request retried after an upstream 429 goes out the way the original did.

The retry is a copy of the request replayed through mitmproxy itself, so whatever routes the
original routes the retry too. Two routes that a separate HTTP client would bypass:

(a) another addon that moves the server connection in `server_connect` (tests/e2e/
    redirect_addon.py): the request names 127.0.0.1:<a port nobody listens on>, the addon
    sends its connection to the mock. Without the addon both attempts would fail.
(b) `--mode upstream:http://127.0.0.1:PORT`: every upstream request goes through a small
    forward proxy started here, which counts what it forwards to the mock.

In both the mock answers the first attempt 429 (retry-after 0.2 s), then 200: the client gets
the 200, the mock sees two requests, and both passed the route under test. Everything binds
and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import (
    CEREBRAS_CHAT,
    Proxy,
    chat_body,
    serving,
    start_proxy,
    wait_until,
)
from .faults_support import metrics, wait_settled

pytestmark = pytest.mark.e2e

REDIRECT_ADDON = Path(__file__).resolve().parent / "redirect_addon.py"
MODEL = "llama3.1-8b"
CLIENT_TIMEOUT = 15.0
SOCKET_TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------
# mitmdump with extra command-line arguments


@pytest.fixture
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """`launch(config, *extra_args)`: mitmdump + Cooldown with `config` and more arguments."""
    started: list[Proxy] = []

    def start(config: dict[str, Any], *extra_args: str) -> Proxy:
        return start_proxy(request, tmp_path, started, config, args=extra_args)

    yield start
    # A test that stops mitmdump itself checks how it exited; the rest must still be running.
    problems = [problem for proxy in started if (problem := proxy.stop())]
    assert all("had already exited with status 0" in problem for problem in problems), problems


def cooldown_config(**extra: Any) -> dict[str, Any]:
    return {"cerebras_limits": {"tpm_limit": 60_000, "max_retries": 2}, **extra}


def one_429_then_200(mock: Any) -> None:
    mock.configure(rpm=None, tpm=None, force_status=429, force_count=1, retry_after="0.2")


def assert_retried_once(proxy: Proxy, mock: Any, answer: httpx.Response) -> None:
    """The client got upstream's 200 from the second attempt; everything settled once."""
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["total_tokens"] > 0
    assert "x-cooldown-refused" not in answer.headers
    assert "x-cooldown-estimated-tokens" in answer.headers  # the proxy's headers, on the retry
    stats = mock.stats()
    assert (stats["requests"], stats["forced_429"], stats["ok"]) == (2, 1, 1), stats
    snapshot = wait_settled(proxy)
    assert snapshot["open_reservations"] == 0, snapshot
    assert snapshot["cerebras_queue_depth"] == 0, snapshot
    # One client request: forwarded once; the retry is counted as a retry, not a new request.
    assert snapshot["requests"] == {MODEL: {"forwarded": 1}}, snapshot
    assert snapshot["upstream_429s"] == {MODEL: {"quota": 1}}, snapshot
    prometheus = httpx.get(
        "http://cooldown.local/metrics", proxy=proxy.url, timeout=CLIENT_TIMEOUT, trust_env=False
    ).text
    assert f'cooldown_retries_total{{model="{MODEL}"}} 1.0' in prometheus
    log = proxy.log_text()
    assert "[replay]" in log  # mitmproxy's own replay of the copy
    assert "retry of flow" not in log or "failed" not in log
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# (a) Another addon redirects the server connection.


def test_retry_passes_through_another_addons_server_connect(
    launch: Callable[..., Proxy], mock_upstream: Any
) -> None:
    one_429_then_200(mock_upstream)
    # A port that refuses connections: bound (so nobody else takes it) but never listening.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as nowhere:
        nowhere.bind(("127.0.0.1", 0))
        dead_port = nowhere.getsockname()[1]
        proxy = launch(
            cooldown_config(cerebras_hosts=["127.0.0.1"]),  # no cerebras_upstream
            "-s",
            str(REDIRECT_ADDON),
            "--set",
            f"redirect_from=127.0.0.1:{dead_port}",
            "--set",
            f"redirect_to=127.0.0.1:{mock_upstream.port}",
        )
        with httpx.Client(proxy=proxy.url, timeout=CLIENT_TIMEOUT, trust_env=False) as client:
            answer = client.post(
                f"http://127.0.0.1:{dead_port}/v1/chat/completions", json=chat_body(model=MODEL)
            )
    assert_retried_once(proxy, mock_upstream, answer)
    redirects = re.findall(r"redirect: 127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:(\d+)", proxy.log_text())
    assert redirects == [(str(dead_port), str(mock_upstream.port))] * 2  # both attempts


# ---------------------------------------------------------------------------------------------
# (b) Upstream mode: a forward proxy in front of the mock.


class ForwardProxy(socketserver.ThreadingTCPServer):
    """A tiny HTTP forward proxy on 127.0.0.1: absolute-URI requests and CONNECT, to
    127.0.0.1 only (anything else: 403). One request per connection (it asks upstream to
    close), so every request it forwards is counted in `forwarded`."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self) -> None:
        self.forwarded: list[str] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ForwardHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def note(self, entries: list[str], line: str) -> None:
        with self.lock:
            entries.append(line)


class _ForwardHandler(socketserver.BaseRequestHandler):
    server: ForwardProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        client.settimeout(SOCKET_TIMEOUT)
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = [line for line in lines[1:] if line]
            if method == "CONNECT":
                self._tunnel(client, target, rest)
            else:
                self._forward(client, method, target, headers, rest)
        except OSError:
            pass

    def _refuse(self, client: socket.socket, line: str) -> None:
        self.server.note(self.server.refused, line)
        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def _tunnel(self, client: socket.socket, target: str, rest: bytes) -> None:
        host, _, port = target.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            self._refuse(client, f"CONNECT {target}")
            return
        self.server.note(self.server.forwarded, f"CONNECT {target}")
        with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT) as upstream:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
            back.start()
            _pipe(client, upstream)
            back.join(SOCKET_TIMEOUT)

    def _forward(
        self, client: socket.socket, method: str, target: str, headers: list[str], rest: bytes
    ) -> None:
        url = urlsplit(target)
        if url.scheme != "http" or url.hostname != "127.0.0.1" or url.port is None:
            self._refuse(client, f"{method} {target}")
            return
        length = 0
        kept = []
        for header in headers:
            name, _, value = header.partition(":")
            lowered = name.strip().lower()
            if lowered == "content-length":
                length = int(value.strip())
            if lowered == "transfer-encoding":
                self._refuse(client, f"{method} {target} (chunked request body)")
                return
            if lowered not in ("connection", "proxy-connection", "keep-alive"):
                kept.append(header)
        body = rest
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                return
            body += chunk
        path = url.path + (f"?{url.query}" if url.query else "")
        request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""])
        self.server.note(self.server.forwarded, f"{method} {target}")
        with socket.create_connection((url.hostname, url.port), timeout=SOCKET_TIMEOUT) as up:
            up.sendall(request.encode("latin-1") + body[:length])
            _pipe(up, client)  # the whole answer, until upstream closes


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > 65536:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until `source` ends, then end `sink`'s sending side."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    server = ForwardProxy()
    with serving(server):
        yield server


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_retry_goes_through_the_upstream_proxy_of_upstream_mode(
    launch: Callable[..., Proxy], mock_upstream: Any, forward_proxy: ForwardProxy, scheme: str
) -> None:
    """https: the client tunnels (CONNECT) to api.cerebras.ai, and mitmproxy reaches the mock
    with a CONNECT through the forward proxy; http: the client sends an absolute-URI request,
    and mitmproxy forwards one too. A retry must do as its original did."""
    one_429_then_200(mock_upstream)
    proxy = launch(
        cooldown_config(cerebras_upstream=mock_upstream.url),
        "--mode",
        f"upstream:{forward_proxy.url}",
    )
    with httpx.Client(
        proxy=proxy.url, verify=proxy.ssl_context(), timeout=CLIENT_TIMEOUT, trust_env=False
    ) as client:
        answer = client.post(
            f"{scheme}://api.cerebras.ai/v1/chat/completions", json=chat_body(model=MODEL)
        )
    assert answer.status_code == 200, answer.text
    if scheme == "https":
        expected = f"CONNECT 127.0.0.1:{mock_upstream.port}"
    else:
        expected = f"POST {mock_upstream.url}/v1/chat/completions"
    assert forward_proxy.forwarded == [expected, expected]  # both attempts, nothing else
    assert forward_proxy.refused == []
    assert_retried_once(proxy, mock_upstream, answer)


# ---------------------------------------------------------------------------------------------
# Shutdown while a retry is under way: nothing hangs.


@pytest.mark.parametrize("phase", ["held", "in_flight"])
def test_shutdown_during_a_retry_does_not_hang(
    launch: Callable[..., Proxy], mock_upstream: Any, phase: str
) -> None:
    """held: the model cools down for 30 s after the 429, so the copy waits in the queue; the
    shutdown answers it, and the client, with the proxy's 503 at once. in_flight: the copy
    is at a slow upstream (20 s); mitmproxy exits promptly, the client sees its connection
    close or an answer, never a hang."""
    retry_after = "30" if phase == "held" else "0.1"
    mock_upstream.configure(
        rpm=None, tpm=None, force_status=429, force_count=1, retry_after=retry_after, latency=20.0
    )
    proxy = launch(
        {
            "cerebras_limits": {"max_retries": 1, "request_timeout": "60s"},
            "cerebras_upstream": mock_upstream.url,
        }
    )
    client = httpx.Client(
        proxy=proxy.url, verify=proxy.ssl_context(), timeout=CLIENT_TIMEOUT, trust_env=False
    )
    with client, ThreadPoolExecutor(1) as pool:
        asked = pool.submit(client.post, CEREBRAS_CHAT, json=chat_body(model=MODEL))
        if phase == "held":
            reached = wait_until(lambda: metrics(proxy)["cerebras_queue_depth"] == 1, 5.0)
        else:
            reached = wait_until(lambda: mock_upstream.stats()["requests"] == 2, 5.0)
        assert reached, proxy.log_tail()
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        try:
            answer: httpx.Response | Exception = asked.result(timeout=10.0)
        except httpx.TransportError as e:
            answer = e
        ended_in = time.monotonic() - signalled
    exit_code = proxy.process.wait(10.0)
    assert exit_code == 0, proxy.log_tail()
    assert ended_in < 3.0, (ended_in, answer)
    if phase == "held":
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "proxy_shutting_down"
    else:
        assert not isinstance(answer, httpx.TimeoutException), answer
    assert mock_upstream.stats()["requests"] == (1 if phase == "held" else 2)
    proxy.assert_clean_log()


def test_a_retry_idle_at_upstream_ends_with_mitmproxys_idle_timeout(
    launch: Callable[..., Proxy], mock_upstream: Any
) -> None:
    """A replay has no client connection of its own, so mitmproxy's idle timeout
    (`tcp_timeout`, here 2 s) is applied to it by the addon: a retry stalled at upstream is
    closed after 2 s and its client gets the proxy's 502 `retry_failed`, not a hang (the
    client's own connection does not time out while the addon's hook waits)."""
    mock_upstream.configure(
        rpm=None, tpm=None, force_status=429, force_count=1, retry_after="0.1", latency=20.0
    )
    proxy = launch(
        {"cerebras_limits": {"max_retries": 1}, "cerebras_upstream": mock_upstream.url},
        "--set",
        "tcp_timeout=2",
    )
    client = httpx.Client(
        proxy=proxy.url, verify=proxy.ssl_context(), timeout=CLIENT_TIMEOUT, trust_env=False
    )
    started = time.monotonic()
    with client:
        answer = client.post(CEREBRAS_CHAT, json=chat_body(model=MODEL))
    took = time.monotonic() - started
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "retry_failed"
    assert 2.0 <= took < 5.0, took
    assert "retry idle for 2s" in proxy.log_text()
    snapshot = wait_settled(proxy)
    assert (snapshot["open_reservations"], snapshot["cerebras_queue_depth"]) == (0, 0), snapshot
    assert mock_upstream.stats()["requests"] == 2
    proxy.assert_clean_log()
