"""Helpers for the fault-injection end-to-end tests (tests/e2e/test_faults_e2e.py).

* `launch`: a fixture that starts mitmdump with Cooldown from a *whole* config dict, so a test
  can point `cerebras_upstream` anywhere (a closed port, a misbehaving raw upstream), choose
  the log verbosity, and stop the proxy itself (signals) without the teardown calling that a
  failure.
* `FaultyUpstream`: a raw-socket HTTP/1.1 "upstream" on 127.0.0.1 that reads each request
  whole, records it, then misbehaves as scripted: cut the headers, cut the body, reset (RST,
  `SO_LINGER` 0) or close (FIN), stop a stream without `[DONE]`.
* `open_tls`: a raw TLS socket to a Cerebras host through the proxy (CONNECT, then TLS with
  mitmproxy's CA), for clients that misbehave below HTTP (close mid-upload).
* `metrics` / `wait_settled`: the addon's JSON metrics through the proxy, and a bounded poll
  until nothing is held and no reservation is open.
* `Ledger`: counts of injected faults, lost requests and leaked reservations or flow entries
  for the run.

Everything binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Proxy, start_proxy, wait_until

METRICS_JSON = "http://cooldown.local/metrics.json"
METRICS_TEXT = "http://cooldown.local/metrics"
SETTLE_TIMEOUT = 5.0
FIGURES_ENV = "COOLDOWN_E2E_FIGURES"


# ---------------------------------------------------------------------------------------------
# The proxy


def cooldown_config(
    upstream: str,
    limits: dict[str, Any] | None = None,
    *,
    circuit_breaker: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A whole Cooldown config: limits, breaker and the upstream every Cerebras request goes to.

    The fault tests read exact charges back from the tpm usage ratio (`charged_tokens`), so
    they count in the sliding window, which holds a charge for a minute; a bucket refills by
    the second. Where requests are held does not depend on it.
    """
    config: dict[str, Any] = {
        "cerebras_limits": {"algorithm": "sliding_window", **(limits or {})},
        "cerebras_upstream": upstream,
    }
    if circuit_breaker is not None:
        config["circuit_breaker"] = circuit_breaker
    config.update(extra)
    return config


class Launcher:
    """Starts mitmdump + Cooldown processes for one test; the fixture stops them."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.started: list[Proxy] = []
        self._stopped_by_test: set[int] = set()

    def __call__(
        self,
        config: dict[str, Any],
        *,
        verbosity: str = "debug",
        reverse_to: str | None = None,
        options: tuple[str, ...] = (),
    ) -> Proxy:
        return start_proxy(
            self.request,
            self.tmp_path,
            self.started,
            config,
            verbosity=verbosity,
            reverse_to=reverse_to,
            options=options,
        )

    def stopped_by_test(self, proxy: Proxy) -> None:
        """The test ends this process itself (a signal): its exit is not a teardown problem."""
        self._stopped_by_test.add(id(proxy))

    def stop_all(self) -> list[str]:
        problems = []
        for proxy in self.started:
            if id(proxy) in self._stopped_by_test:
                proxy.close_clients()
                if proxy.kill():
                    problems.append(f"mitmdump {proxy.port} was still running at teardown")
                continue
            problem = proxy.stop()
            if problem:
                problems.append(f"{problem}\n{proxy.log_tail()}")
        return problems


def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    """The body of a `launch` fixture (wrap it with `yield from` in the test module):
    `launch(config_dict)` starts mitmdump + Cooldown; failed tests get the logs attached."""
    launcher = Launcher(request, tmp_path)
    yield launcher
    problems = launcher.stop_all()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


# ---------------------------------------------------------------------------------------------
# Metrics through the proxy


def record_figures(figures: dict[str, Any]) -> None:
    """Print the run's figures and append them to $COOLDOWN_E2E_FIGURES (one JSON line)."""
    line = json.dumps(figures, sort_keys=True)
    print(f"\nFIGURES {line}")
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def metrics(proxy: Proxy, timeout: float = 10.0) -> dict[str, Any]:
    """GET http://cooldown.local/metrics.json through the proxy (plain HTTP, absolute form)."""
    response = httpx.get(METRICS_JSON, proxy=proxy.url, timeout=timeout, trust_env=False)
    assert response.status_code == 200, response.text
    return response.json()


def status_client(proxy: Proxy) -> httpx.AsyncClient:
    """A plain-HTTP client for cooldown.local through the proxy (use it in `async with`)."""
    return httpx.AsyncClient(proxy=proxy.url, timeout=30.0, trust_env=False)


async def async_metrics(client: httpx.AsyncClient) -> dict[str, Any]:
    """`metrics` for async tests, with a client from `status_client`."""
    response = await client.get(METRICS_JSON)
    assert response.status_code == 200, response.text
    return response.json()


async def async_wait_metric(
    client: httpx.AsyncClient, condition: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any] | None:
    """`wait_metric` for async tests: the first snapshot that satisfies `condition`, or None."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = await async_metrics(client)
        if condition(snapshot):
            return snapshot
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.05)


def wait_settled(proxy: Proxy, timeout: float = SETTLE_TIMEOUT) -> dict[str, Any]:
    """Poll until nothing is held, no reservation is open and no flow is tracked (or
    `timeout`); the last snapshot.

    Settlement may lag the client's answer by a moment (the response hook runs after the last
    byte is sent), so a test asserts on what this returns rather than on a single read.
    """
    deadline = time.monotonic() + timeout
    while True:
        snapshot = metrics(proxy)
        settled = (
            snapshot["cerebras_queue_depth"] == 0
            and snapshot["open_reservations"] == 0
            and snapshot["tracked_flows"] == 0
        )
        if settled or time.monotonic() >= deadline:
            return snapshot
        time.sleep(0.05)


def wait_metric(
    proxy: Proxy, condition: Callable[[dict[str, Any]], bool], timeout: float = 5.0
) -> dict[str, Any] | None:
    """Poll the metrics until `condition(snapshot)` holds; the snapshot, or None on timeout."""
    last: dict[str, Any] | None = None

    def check() -> bool:
        nonlocal last
        last = metrics(proxy)
        return condition(last)

    return last if wait_until(check, timeout) else None


def charged_tokens(snapshot: dict[str, Any], model: str, tpm_limit: int) -> int:
    """Tokens the proxy counts against `model` in the last minute (from the tpm usage ratio)."""
    return round(snapshot["usage"].get(model, {}).get("tpm", 0.0) * tpm_limit)


def assert_settled(snapshot: dict[str, Any], *, breaker_closed: bool = True) -> None:
    assert snapshot["cerebras_queue_depth"] == 0, snapshot
    assert snapshot["open_reservations"] == 0, snapshot
    assert snapshot["tracked_flows"] == 0, snapshot  # every flow that ended left nothing behind
    if breaker_closed:
        assert snapshot["breaker_state"] == "closed", snapshot
        assert snapshot["upstream_429s"] == {}, snapshot


# ---------------------------------------------------------------------------------------------
# Raw clients


def read_head(sock: socket.socket, limit: int = 65536) -> bytes:
    """Read up to and including the blank line that ends an HTTP head."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    return data


def open_tls(proxy: Proxy, host: str = "api.cerebras.ai", timeout: float = 10.0) -> ssl.SSLSocket:
    """A TLS connection to `host` through the proxy, as an HTTPS_PROXY client opens it."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    try:
        sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        return proxy.ssl_context().wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def request_head(
    path: str, length: int, host: str = "api.cerebras.ai", extra: dict[str, str] | None = None
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
    ]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------------------------------------
# A misbehaving upstream


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Behaviour = Callable[[socket.socket, RawRequest], None]


@dataclass
class FaultyUpstream:
    """A threaded raw-socket server on 127.0.0.1: reads each request whole, then runs the next
    scripted behaviour (`default` when the script is empty) and closes the connection.

    Bodies over `keep_body_bytes` are recorded as their length only (`RawRequest.body` then
    holds the first bytes), so a 50 MB upload does not stay in memory.
    """

    default: Behaviour | None = None
    keep_body_bytes: int = 1 << 20
    requests: list[RawRequest] = field(default_factory=list)
    body_lengths: list[int] = field(default_factory=list)
    script: deque[Behaviour] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._serve, name="faulty-upstream", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def then(self, *behaviours: Behaviour) -> FaultyUpstream:
        with self._lock:
            self.script.extend(behaviours)
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
        try:
            conn.settimeout(30.0)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = self._read_request(conn)
            if request is None:
                return
            with self._lock:
                behaviour = self.script.popleft() if self.script else self.default
            if behaviour is None:
                behaviour = respond(200, {"id": "faulty-upstream", "choices": []})
            behaviour(conn, request)
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _read_request(self, conn: socket.socket) -> RawRequest | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body, length = self._read_chunked(conn, rest)
        else:
            body, length = self._read_sized(conn, rest, int(headers.get("content-length", "0")))
        request = RawRequest(method, path, headers, body)
        with self._lock:
            self.requests.append(request)
            self.body_lengths.append(length)
        return request

    def _read_sized(self, conn: socket.socket, rest: bytes, length: int) -> tuple[bytes, int]:
        kept = bytearray(rest[: self.keep_body_bytes])
        received = len(rest)
        while received < length:
            chunk = conn.recv(min(1 << 20, length - received))
            if not chunk:
                break
            received += len(chunk)
            if len(kept) < self.keep_body_bytes:
                kept += chunk[: self.keep_body_bytes - len(kept)]
        return bytes(kept), received

    def _read_chunked(self, conn: socket.socket, rest: bytes) -> tuple[bytes, int]:
        buffer = rest
        body = bytearray()

        def need(n: int) -> None:
            nonlocal buffer
            while len(buffer) < n:
                chunk = conn.recv(65536)
                if not chunk:
                    raise OSError("closed inside a chunked body")
                buffer += chunk

        while True:
            while b"\r\n" not in buffer:
                need(len(buffer) + 1)
            line, buffer = buffer.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n" not in buffer:  # (no trailers are sent by mitmproxy)
                    need(len(buffer) + 1)
                return bytes(body[: self.keep_body_bytes]), len(body)
            need(size + 2)
            body += buffer[:size]
            buffer = buffer[size + 2 :]


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def respond(status: int, body: dict[str, Any]) -> Behaviour:
    """A complete JSON answer, then close."""
    data = json.dumps(body).encode()

    def behave(conn: socket.socket, _request: RawRequest) -> None:
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Connection", "close"),
        ]
        conn.sendall(_head(status, headers) + data)

    return behave


def cut_in_headers() -> Behaviour:
    """Half a status line and header block, then RST."""

    def behave(conn: socket.socket, _request: RawRequest) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: applic")
        reset(conn)

    return behave


def cut_in_body(*, rst: bool) -> Behaviour:
    """Whole headers announcing 4,000 bytes, 100 of them, then RST (or FIN)."""

    def behave(conn: socket.socket, _request: RawRequest) -> None:
        headers = [("Content-Type", "application/json"), ("Content-Length", "4000")]
        conn.sendall(_head(200, headers) + b'{"id": "cut", "choices": [' + b" " * 74)
        if rst:
            reset(conn)
        else:
            conn.shutdown(socket.SHUT_WR)

    return behave


def sse_chunk(
    content: str, usage: dict[str, int] | None = None, finish: str | None = None
) -> bytes:
    event = {
        "id": "chatcmpl-faulty",
        "object": "chat.completion.chunk",
        "model": "llama3.1-8b",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
        "usage": usage,
    }
    return f"data: {json.dumps(event)}\n\n".encode()


def sse_then_close(events: list[bytes], *, chunked: bool) -> Behaviour:
    """A 200 event stream that ends without `data: [DONE]`: FIN after the events.

    Chunked: the terminating zero-size chunk never comes, so the body is incomplete. Not
    chunked (no Content-Length either): the body is delimited by the close, so it is a
    complete HTTP message that merely lacks `[DONE]`.
    """

    def behave(conn: socket.socket, _request: RawRequest) -> None:
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            headers.append(("Connection", "close"))
        conn.sendall(_head(200, headers))
        for event in events:
            conn.sendall(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
        conn.shutdown(socket.SHUT_WR)
        # Let the peer read everything before the socket goes (a close with unread input
        # would turn into an RST that can discard what was sent).
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    return behave


# ---------------------------------------------------------------------------------------------
# The run's figures


@dataclass
class Ledger:
    """Faults injected, requests lost and reservations or flow entries leaked, summed over the
    test module."""

    cases: set[str] = field(default_factory=set)
    faults: int = 0
    requests: int = 0
    lost: int = 0
    leaked: int = 0
    closed: int = 0
    per_case: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(
        self,
        case: str,
        *,
        faults: int,
        requests: int,
        lost: int = 0,
        leaked: int = 0,
        closed: int = 0,
    ) -> None:
        """`requests`: client requests of the case that were owed an answer; `lost`: those
        that got none (no status code before the client's own, generous, timeout);
        `closed`: requests, not among `requests`, whose connection the proxy closed promptly
        without a status code (the client knows at once; mitmproxy's own behaviour)."""
        if faults:
            self.cases.add(case)
        counts = {
            "faults": faults,
            "requests": requests,
            "lost": lost,
            "leaked": leaked,
            "closed": closed,
        }
        entry = self.per_case.setdefault(case, dict.fromkeys(counts, 0))
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)
            entry[name] += value

    def summary(self) -> dict[str, Any]:
        return {
            "suite": "test_faults_e2e",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fault_cases": len(self.cases),
            "faults_injected": self.faults,
            "client_requests": self.requests,
            "requests_lost": self.lost,
            "leaked_reservations": self.leaked,
            "closed_without_status": self.closed,
            "per_case": dict(sorted(self.per_case.items())),
            **self.extra,
        }
