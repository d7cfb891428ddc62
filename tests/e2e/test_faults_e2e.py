"""Nothing lost, nothing hung: faults in the network around a real mitmdump + Cooldown.

Every test injects its faults where they live in reality: clients that go away (while held,
mid-upload, mid-stream), upstreams that refuse, reset, break a stream off, stall, answer 5xx
or storms of 429, bodies the proxy cannot understand, config files edited under a running
proxy, a flood of clients, and signals. After each fault the test reads
http://cooldown.local/metrics.json through the proxy (polling with a deadline: settlement
may lag the client's answer by a moment) and requires that nothing is held and no
reservation is left open, and that every client got an answer (a status code) within its own
timeout, which is set far above the expected time so that a hang fails the test.

Where the numbers allow it, the test also checks *how* a reservation ended, from the tokens
the proxy counts in the model's minute window (`usage.<model>.tpm` x the limit): given back
(0) when upstream was never reached, kept at the estimate when upstream may have counted it,
or settled to the `usage` upstream reported.

Not here: a held flow killed from mitmweb (no HTTP API in mitmdump to do it); that is
tests/test_addon.py::test_killed_while_held_leaves_the_queue.

Figures (fault cases, faults injected, requests lost, reservations leaked) are printed at the
end of the module and appended as one JSON line to $COOLDOWN_E2E_FIGURES when it is set.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import math
import os
import re
import signal
import socket
import statistics
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
from backports import zstd

from cooldown.estimate import estimate_request
from tools.launch import rss_kib

from .conftest import CEREBRAS_CHAT, CEREBRAS_MODELS, PlainServer, chat_body, write_config
from .faults_support import (
    METRICS_JSON,
    METRICS_TEXT,
    FaultyUpstream,
    Launcher,
    Ledger,
    async_metrics,
    async_wait_metric,
    charged_tokens,
    cooldown_config,
    cut_in_body,
    cut_in_headers,
    launcher,
    metrics,
    open_tls,
    read_head,
    request_head,
    reset,
    respond,
    sse_chunk,
    sse_then_close,
    status_client,
    wait_metric,
    wait_settled,
)

pytestmark = pytest.mark.e2e

MODEL = "llama3.1-8b"
CHAT_PATH = "/v1/chat/completions"
CONTEXT_LENGTH = 131_072  # the addon's default
TPM = 1_000_000
# Far above any answer time expected here: a client that reaches it was left hanging.
CLIENT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
BREAKER = {"failure_threshold": 3, "open_duration": "30s"}


def estimate_of(body: dict[str, Any] | bytes) -> int:
    """What the proxy reserves for this body (its own estimator, default context length)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return estimate_request(CHAT_PATH, raw, CONTEXT_LENGTH).total


def assert_proxy_refusal(response: httpx.Response, status: int, code: str) -> None:
    """An OpenAI-style error the Cooldown proxy answered itself, with a Retry-After."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert "not by Cerebras" in error["message"]
    assert response.headers["x-cooldown-refused"] == code
    retry_after = response.headers.get("retry-after", "")
    assert retry_after.isdigit() and int(retry_after) >= 1, response.headers


async def ask(client: httpx.AsyncClient, **kwargs: Any) -> httpx.Response | Exception:
    """POST to Cerebras's chat endpoint; a transport error (a hang, a drop) is returned."""
    kwargs.setdefault("json", chat_body())
    try:
        return await client.post(CEREBRAS_CHAT, **kwargs)
    except httpx.HTTPError as e:
        return e


def unanswered(results: list[httpx.Response | Exception]) -> int:
    return sum(not isinstance(result, httpx.Response) for result in results)


def quantiles(values: list[float]) -> dict[str, float]:
    data = sorted(values)
    if not data:
        return {}

    def pick(q: float) -> float:
        return round(data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))], 3)

    return {
        "n": len(data),
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": round(data[-1], 3),
        "mean": round(statistics.fmean(data), 3),
    }


@pytest.fixture
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    """`launch(config)` starts mitmdump + Cooldown from a whole config dict."""
    yield from launcher(request, tmp_path)


@pytest.fixture(scope="module")
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    """The module's figures: printed at the end, appended to $COOLDOWN_E2E_FIGURES if set."""
    book = Ledger()
    yield book
    summary = book.summary()
    line = json.dumps(summary)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(
            f"\nfaults e2e: {summary['fault_cases']} fault cases, "
            f"{summary['faults_injected']} faults injected, "
            f"{summary['client_requests']} client requests owed an answer, "
            f"{summary['requests_lost']} lost, "
            f"{summary['leaked_reservations']} leaked reservations\n{line}"
        )
    target = os.environ.get("COOLDOWN_E2E_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(line + "\n")


def book(
    ledger: Ledger,
    case: str,
    snapshot: dict[str, Any],
    *,
    faults: int,
    requests: int,
    lost: int = 0,
    breaker_closed: bool = True,
) -> None:
    """Record the case, then assert: no client lost, nothing held, no reservation open, no
    flow still tracked and (unless the case is about the breaker) the breaker closed and no
    upstream 429 counted."""
    leaked = snapshot["open_reservations"] + snapshot["tracked_flows"]
    ledger.record(case, faults=faults, requests=requests, lost=lost, leaked=leaked)
    assert lost == 0, f"{lost} client(s) of {case} got no answer"
    assert snapshot["cerebras_queue_depth"] == 0, snapshot
    assert leaked == 0, snapshot
    if breaker_closed:
        assert snapshot["breaker_state"] == "closed", snapshot
        assert snapshot["upstream_429s"] == {}, snapshot


# ---------------------------------------------------------------------------------------------
# 1. Client faults


def test_client_gone_while_held_leaves_the_queue_and_takes_nothing(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """(a) Two held clients close their TLS connections, one with FIN and one with RST: each
    leaves the queue at once, is counted `cancelled`, and never reaches upstream."""
    mock_upstream.configure(rpm=None, tpm=None)
    limits = {"rpm_limit": 1, "max_queue_depth": 10, "request_timeout": "60s"}
    proxy = launch(cooldown_config(mock_upstream.url, limits))
    client = proxy.client(timeout=CLIENT_TIMEOUT)
    assert client.post(CEREBRAS_CHAT, json=chat_body()).status_code == 200  # the minute's one

    body = json.dumps(chat_body()).encode()
    held = []
    for _ in range(2):
        sock = open_tls(proxy)
        sock.sendall(request_head(CHAT_PATH, len(body)) + body)
        held.append(sock)
    assert wait_metric(proxy, lambda m: m["cerebras_queue_depth"] == 2)
    held[0].close()  # FIN
    assert wait_metric(proxy, lambda m: m["cerebras_queue_depth"] == 1)
    reset(held[1])  # RST
    snapshot = wait_settled(proxy)
    book(ledger, "client gone while held", snapshot, faults=2, requests=1)
    assert snapshot["requests"][MODEL] == {"forwarded": 1, "cancelled": 2}
    assert mock_upstream.stats()["requests"] == 1
    assert client.get(CEREBRAS_MODELS).status_code == 200  # the proxy serves on
    proxy.assert_clean_log()


def test_client_gone_mid_upload_is_never_forwarded(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """(b) Clients announce a 10 MB body, send part of it (or none) and go (FIN or RST).
    mitmproxy reads a request whole before any hook, so the addon never sees these: nothing
    is held, estimated or forwarded, and the next request is served normally."""
    mock_upstream.configure(rpm=None, tpm=None)
    proxy = launch(cooldown_config(mock_upstream.url, {"tpm_limit": TPM}))
    announced = 10_000_000
    start = b'{"model": "llama3.1-8b", "messages": [{"role": "user", "content": "'
    uploads = [(start + b"x" * 300_000, "fin"), (start + b"y" * 300_000, "rst"), (b"", "fin")]
    for part, how in uploads:
        sock = open_tls(proxy)
        sock.sendall(request_head(CHAT_PATH, announced))
        if part:
            sock.sendall(part)
        if how == "rst":
            reset(sock)
        else:
            sock.close()

    # mitmproxy's own debug line for each of them (the metrics polls add their own).
    def all_gone() -> bool:
        text = proxy.log_text()
        return text.count("client disconnect") - text.count("GET http://cooldown.local") >= 3

    assert wait_metric(proxy, lambda _: all_gone()), proxy.log_tail()
    snapshot = wait_settled(proxy)
    assert snapshot["requests"] == {} and snapshot["usage"] == {}, snapshot
    client = proxy.client(timeout=CLIENT_TIMEOUT)
    after = client.post(CEREBRAS_CHAT, json=chat_body())
    assert after.status_code == 200, after.text
    book(ledger, "client gone mid-upload", wait_settled(proxy), faults=3, requests=1)
    assert mock_upstream.stats()["requests"] == 1  # only the last one
    proxy.assert_clean_log()


def test_client_gone_mid_stream_keeps_the_estimate(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """(c) Streaming clients read the first event and go (httpx closes: FIN; a raw socket:
    RST). Upstream has counted the request and the usage event never came, so each
    reservation is settled at its estimate; the stream to upstream is closed too."""
    mock_upstream.configure(rpm=None, tpm=None, stream_interval=0.3)  # 20 events: 6 s
    proxy = launch(cooldown_config(mock_upstream.url, {"tpm_limit": TPM}))
    body = {**chat_body(), "stream": True}
    client = proxy.client(timeout=CLIENT_TIMEOUT)
    with client.stream("POST", CEREBRAS_CHAT, json=body) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data:"))
        assert '"chat.completion.chunk"' in first
    client.close()

    raw = json.dumps(body).encode()
    sock = open_tls(proxy)
    sock.sendall(request_head(CHAT_PATH, len(raw)) + raw)
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    reset(sock)

    snapshot = wait_settled(proxy)
    book(ledger, "client gone mid-stream", snapshot, faults=2, requests=2)
    assert charged_tokens(snapshot, MODEL, TPM) == 2 * estimate_of(body)
    assert mock_upstream.stats()["requests"] == 2
    after = proxy.client(timeout=CLIENT_TIMEOUT).post(CEREBRAS_CHAT, json=chat_body())
    assert after.status_code == 200
    assert wait_settled(proxy)["open_reservations"] == 0
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 2. Upstream faults


def test_upstream_refusing_connections_gets_502_and_gives_everything_back(
    launch: Launcher, ledger: Ledger
) -> None:
    """Upstream's port is closed: each client gets mitmproxy's 502 at once, the reservation
    is given back whole (requests and tokens: upstream never saw it), and the breaker, which
    only counts upstream 429s, stays closed however many there are."""
    closed_port = FaultyUpstream()
    url = closed_port.url
    closed_port.close()  # nothing listens there now
    proxy = launch(cooldown_config(url, {"tpm_limit": TPM}, circuit_breaker=BREAKER))
    client = proxy.client(timeout=CLIENT_TIMEOUT)
    answers = [client.post(CEREBRAS_CHAT, json=chat_body()) for _ in range(4)]
    for answer in answers:
        assert answer.status_code == 502, answer.text
        assert "Connect call failed" in answer.text, answer.text  # ECONNREFUSED
    snapshot = wait_settled(proxy)
    book(ledger, "upstream refuses connections", snapshot, faults=4, requests=4)
    assert snapshot["usage"][MODEL] == {"rpm": 0.0, "tpm": 0.0}, snapshot
    assert snapshot["requests"][MODEL] == {"forwarded": 4}
    proxy.assert_clean_log()


_EVENTS = [sse_chunk("Hello "), sse_chunk("world")]
_USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
_LAST = sse_chunk("", _USAGE, "stop")
# case -> (behaviour, streamed request, what the client sees, tokens charged per fault or
# None for "the estimate")
UPSTREAM_BREAKS = {
    "reset in the headers": (cut_in_headers(), False, "502", None),
    "reset in the body": (cut_in_body(rst=True), False, "502", None),
    "closed in the body": (cut_in_body(rst=False), False, "502", None),
    "stream cut, no usage": (sse_then_close(_EVENTS, chunked=True), True, "cut", None),
    "stream cut after usage": (
        sse_then_close([*_EVENTS, _LAST], chunked=True),
        True,
        "cut",
        _USAGE["total_tokens"],
    ),
    "stream ends without [DONE]": (
        sse_then_close([*_EVENTS, _LAST], chunked=False),
        True,
        "complete",
        _USAGE["total_tokens"],
    ),
}


@pytest.mark.parametrize("case", list(UPSTREAM_BREAKS))
def test_upstream_breaking_off_is_answered_and_settled(
    launch: Launcher, ledger: Ledger, case: str
) -> None:
    """A raw upstream reads the request, then breaks off. Non-streamed: the client gets
    mitmproxy's 502 (nothing was sent to it yet). Streamed: the client already has the 200
    and the events; a chunked stream cut short ends in a protocol error at the client, a
    close-delimited one ends normally without `[DONE]`. Either way the reservation is
    settled: to the usage upstream reported if an event carried it, else at the estimate
    (upstream was reached, it may have counted the request). Three in a row (the breaker's
    threshold) leave the breaker closed: these are not 429s."""
    behaviour, streamed, seen, charge = UPSTREAM_BREAKS[case]
    upstream = FaultyUpstream(default=respond(200, {"id": "ok", "object": "chat.completion"}))
    try:
        upstream.then(behaviour, behaviour, behaviour)
        proxy = launch(cooldown_config(upstream.url, {"tpm_limit": TPM}, circuit_breaker=BREAKER))
        client = proxy.client(timeout=CLIENT_TIMEOUT)
        body = {**chat_body(), "stream": True} if streamed else chat_body()
        answered = 0
        for _ in range(3):
            if not streamed:
                answer = client.post(CEREBRAS_CHAT, json=body)
                assert answer.status_code == 502, answer.text
                assert answer.headers["server"].startswith("mitmproxy")
                answered += 1
                continue
            lines: list[str] = []
            with client.stream("POST", CEREBRAS_CHAT, json=body) as response:
                assert response.status_code == 200
                answered += 1
                if seen == "cut":
                    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked"):
                        for line in response.iter_lines():
                            lines.append(line)
                else:
                    lines.extend(response.iter_lines())
            events = [line for line in lines if line.startswith("data:")]
            assert len(events) == (2 if charge is None else 3), lines
            assert "data: [DONE]" not in lines
        good = client.post(CEREBRAS_CHAT, json=chat_body())
        assert good.status_code == 200, good.text
        snapshot = wait_settled(proxy)
        book(ledger, f"upstream: {case}", snapshot, faults=3, requests=4, lost=3 - answered)
        per_fault = estimate_of(body) if charge is None else charge
        expected = 3 * per_fault + estimate_of(chat_body())  # the good one has no usage
        assert charged_tokens(snapshot, MODEL, TPM) == expected, snapshot
        assert upstream.count() == 4
        proxy.assert_clean_log()
    finally:
        upstream.close()


async def test_slow_upstream_when_the_client_gives_up(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """What "slow upstream (timeout)" can mean through mitmproxy, and what holds.

    mitmproxy has no response timeout: its only one is `tcp_timeout` (600 s of inactivity by
    default, disarmed while a hook runs). So an upstream that stalls after accepting the
    request keeps that flow open until somebody gives up. What the proxy guarantees, and this
    test checks: (1) the stall holds only its own flow: a request sent meanwhile is answered
    at once; (2) when the client gives up (its own read timeout), the flow ends at once, the
    upstream connection is closed and the reservation is settled at the estimate (kept:
    upstream may have counted it), so nothing leaks and the window frees on schedule;
    (3) the breaker is not fed. The next test covers the proxy giving up by itself."""
    mock_upstream.configure(rpm=None, tpm=None, latency=20.0)
    # Without probe_first: the stalled request would be the probe, holding the next one for
    # probe_timeout (2 s), as long as this client waits.
    limits = {"tpm_limit": TPM, "probe_first": False}
    proxy = launch(cooldown_config(mock_upstream.url, limits))
    impatient_timeout = httpx.Timeout(30.0, read=2.0)
    async with (
        proxy.async_client(timeout=impatient_timeout) as impatient,
        proxy.async_client(timeout=CLIENT_TIMEOUT) as patient,
    ):
        started = time.monotonic()
        slow = asyncio.create_task(ask(impatient))
        assert await asyncio.to_thread(
            wait_metric, proxy, lambda _: mock_upstream.stats()["requests"] == 1
        )
        mock_upstream.configure(latency=0.0)  # for the next request; the first keeps its 20 s
        fast = await ask(patient)
        assert isinstance(fast, httpx.Response) and fast.status_code == 200
        fast_usage = fast.json()["usage"]["total_tokens"]
        assert not slow.done()
        gave_up = await asyncio.wait_for(slow, 10.0)
        waited = time.monotonic() - started
    assert isinstance(gave_up, httpx.ReadTimeout), gave_up
    assert 1.9 <= waited < 5.0
    snapshot = await asyncio.to_thread(wait_settled, proxy)
    # The slow one is kept at its estimate, the fast one settled to the mock's usage.
    book(ledger, "slow upstream, client gives up", snapshot, faults=1, requests=1)
    assert charged_tokens(snapshot, MODEL, TPM) == estimate_of(chat_body()) + fast_usage
    assert "Client disconnected" in proxy.log_text()
    proxy.assert_clean_log()


def test_slow_upstream_with_mitmproxys_idle_timeout(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """The proxy gives up by itself only with mitmproxy's `tcp_timeout` (here 3 s): it then
    closes the client's connection *without a status code* (mitmproxy sends no 504) and the
    upstream one; the reservation is settled at the estimate. The client learns of it at
    once (a closed connection, not a hang); this is the one fault here in which the client
    gets no HTTP status, and it is mitmproxy's behaviour, not Cooldown's."""
    mock_upstream.configure(rpm=None, tpm=None, latency=20.0)
    proxy = launch(
        cooldown_config(mock_upstream.url, {"tpm_limit": TPM}), options=("tcp_timeout=3",)
    )
    client = proxy.client(timeout=CLIENT_TIMEOUT)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        client.post(CEREBRAS_CHAT, json=chat_body())
    waited = time.monotonic() - started
    assert 2.9 <= waited < 6.0
    snapshot = wait_settled(proxy)
    # Not lost (the client knew at once), but no status either: booked as `closed`.
    ledger.record("slow upstream, proxy idle timeout", faults=1, requests=0, closed=1)
    book(ledger, "slow upstream, proxy idle timeout", snapshot, faults=0, requests=0)
    assert charged_tokens(snapshot, MODEL, TPM) == estimate_of(chat_body())
    assert "Closing connection due to inactivity" in proxy.log_text()
    mock_upstream.configure(latency=0.0)
    assert proxy.client(timeout=CLIENT_TIMEOUT).post(CEREBRAS_CHAT, json=chat_body()).is_success
    proxy.assert_clean_log()


def test_client_gone_during_a_retry_after_429_settles_at_once(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """Upstream answers 429 once (retry-after 0.1 s), the proxy re-sends by itself and the
    re-sent request stalls (latency 30 s); the client gives up after 2 s. As for a plain
    forwarded request, the retry is stopped and its reservation settled within 4 s, not when
    upstream finally answers (this was an addon bug: the retry ran on, its reservation open,
    up to the retry client's 600 s read timeout)."""
    mock_upstream.configure(
        rpm=None, tpm=None, force_status=429, force_count=1, retry_after="0.1", latency=30.0
    )
    proxy = launch(cooldown_config(mock_upstream.url, {"tpm_limit": TPM, "max_retries": 1}))
    client = proxy.client(timeout=httpx.Timeout(30.0, read=2.0))
    with pytest.raises(httpx.ReadTimeout):
        client.post(CEREBRAS_CHAT, json=chat_body())
    client.close()
    assert mock_upstream.stats()["requests"] == 2  # the 429 and the stalled retry
    snapshot = wait_settled(proxy, timeout=4.0)
    # The client left by itself: it is owed nothing. One upstream 429 is counted (not enough
    # to open the breaker); the stopped retry is kept at its estimate.
    book(
        ledger,
        "client gone during a 429 retry",
        snapshot,
        faults=2,
        requests=0,
        breaker_closed=False,
    )
    assert snapshot["breaker_state"] == "closed", snapshot
    assert snapshot["upstream_429s"] == {MODEL: {"quota": 1}}, snapshot
    assert "left during a retry; retry stopped" in proxy.log_text()
    proxy.assert_clean_log()


def test_upstream_5xx_pass_through_and_do_not_feed_the_breaker(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """500 and 503 from upstream reach the client unchanged (upstream's own body, no
    X-Cooldown-Refused), each settled at the estimate (no usage in an error); three of each
    in a row leave the breaker closed (threshold 3) and count no upstream 429."""
    mock_upstream.configure(rpm=None, tpm=None)
    proxy = launch(cooldown_config(mock_upstream.url, {"tpm_limit": TPM}, circuit_breaker=BREAKER))
    client = proxy.client(timeout=CLIENT_TIMEOUT)
    for status in (500, 503):
        mock_upstream.configure(force_status=status)
        for _ in range(3):
            answer = client.post(CEREBRAS_CHAT, json=chat_body())
            assert answer.status_code == status, answer.text
            assert answer.json()["error"]["code"] == f"forced_{status}"
            assert "x-cooldown-refused" not in answer.headers
            assert answer.headers["x-cooldown-estimated-tokens"] == str(estimate_of(chat_body()))
        assert metrics(proxy)["breaker_state"] == "closed"
    mock_upstream.configure(force_status=None)
    good = client.post(CEREBRAS_CHAT, json=chat_body())
    assert good.status_code == 200
    snapshot = wait_settled(proxy)
    book(ledger, "upstream 5xx", snapshot, faults=6, requests=7)
    charged = 6 * estimate_of(chat_body()) + good.json()["usage"]["total_tokens"]
    assert charged_tokens(snapshot, MODEL, TPM) == charged
    assert mock_upstream.stats()["errors"] == 6
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 3. 429 storms


def _retry_after_forms() -> dict[str, Any]:
    return {
        "none": None,
        "seconds": "1",
        "http-date": "date",  # filled in at the start of the test: 3 s ahead
        "garbage": "soon, probably",
    }


@pytest.mark.parametrize("form", list(_retry_after_forms()))
def test_429_storm_opens_the_breaker_probes_once_and_closes(
    launch: Launcher, mock_upstream: Any, ledger: Ledger, form: str
) -> None:
    """Upstream answers only 429, with each form of retry-after. Config: failure_threshold 3,
    open_duration 2 s, max_retries 1. One retry (not 0) so that upstream's retry-after is
    really read: the proxy pauses the model for it (seconds or an HTTP date; none or garbage:
    1 s) before re-sending; and it keeps the count exact: the first client request costs two
    upstream 429s (the client gets the second, upstream's own body), the second a third,
    which opens the breaker, so its retry is refused with the proxy's 503.

    Then: open -> every request 503 with Retry-After and nothing reaches upstream;
    half-open with upstream still failing -> of three concurrent requests exactly one probe
    reaches upstream (the mock's count grows by exactly 1), its 429 re-opens the breaker and
    all three get 503; upstream recovers -> the next probe closes the breaker and every
    request passes."""
    value = _retry_after_forms()[form]
    if value == "date":
        value = email.utils.formatdate(time.time() + 3, usegmt=True)
    mock_upstream.configure(rpm=None, tpm=None, force_status=429, retry_after=value)
    limits = {"tpm_limit": TPM, "max_retries": 1, "request_timeout": "60s"}
    breaker = {"failure_threshold": 3, "open_duration": "2s"}
    proxy = launch(cooldown_config(mock_upstream.url, limits, circuit_breaker=breaker))
    client = proxy.client(timeout=CLIENT_TIMEOUT)

    def forced() -> int:
        return mock_upstream.stats()["forced_429"]

    # One client request, two upstream 429s; the client gets upstream's second one.
    started = time.time()
    expected_pause = 1.0
    if form == "http-date":
        expected_pause = email.utils.parsedate_to_datetime(value).timestamp() - started
    first = client.post(CEREBRAS_CHAT, json=chat_body())
    took = time.time() - started
    assert first.status_code == 429, first.text
    assert first.json()["code"] == "token_quota_exceeded"  # upstream's own body
    assert "x-cooldown-refused" not in first.headers
    assert first.headers.get("retry-after") == value  # passed through unchanged
    assert forced() == 2
    assert took >= expected_pause - 0.25, (took, expected_pause)  # paused as upstream said
    assert took < expected_pause + 3.0
    assert metrics(proxy)["breaker_state"] == "closed"  # 2 < failure_threshold

    # The third upstream 429 opens the breaker; that request's retry is refused.
    second = client.post(CEREBRAS_CHAT, json=chat_body())
    assert_proxy_refusal(second, 503, "circuit_open")
    assert 1 <= int(second.headers["retry-after"]) <= 2
    assert forced() == 3
    assert metrics(proxy)["breaker_state"] == "open"
    refused = client.post(CEREBRAS_CHAT, json=chat_body())
    assert_proxy_refusal(refused, 503, "circuit_open")
    assert forced() == 3  # nothing reaches upstream while open

    async def concurrently(n: int) -> list[httpx.Response | Exception]:
        async with proxy.async_client(timeout=CLIENT_TIMEOUT) as many:
            return await asyncio.gather(*(ask(many) for _ in range(n)))

    # Half-open, upstream still failing: exactly one probe goes, and re-opens the breaker.
    assert wait_metric(proxy, lambda m: m["breaker_state"] == "half_open", timeout=5.0)
    probes = asyncio.run(concurrently(3))
    assert unanswered(probes) == 0, probes
    for answer in probes:
        assert_proxy_refusal(answer, 503, "circuit_open")  # type: ignore[arg-type]
    assert forced() == 4  # exactly one probe reached upstream
    assert metrics(proxy)["breaker_state"] == "open"

    # Upstream recovers: the next probe closes the breaker, the others follow it.
    mock_upstream.configure(force_status=None)
    assert wait_metric(proxy, lambda m: m["breaker_state"] == "half_open", timeout=5.0)
    recovered = asyncio.run(concurrently(3))
    assert unanswered(recovered) == 0, recovered
    assert [r.status_code for r in recovered] == [200] * 3  # type: ignore[union-attr]
    stats = mock_upstream.stats()
    assert (stats["requests"], stats["forced_429"], stats["ok"]) == (7, 4, 3)

    snapshot = wait_settled(proxy)
    book(
        ledger,
        f"429 storm, retry-after {form}",
        snapshot,
        faults=4,
        requests=9,
        lost=unanswered([*probes, *recovered]),
        breaker_closed=False,
    )
    assert snapshot["breaker_state"] == "closed", snapshot
    assert snapshot["upstream_429s"] == {MODEL: {"quota": 4}}, snapshot
    # The one refused while open and the two probes' companions; a retry the breaker
    # refuses is not counted here (the request was counted `forwarded` already).
    assert snapshot["requests"][MODEL]["refused_breaker_open"] >= 3, snapshot
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 4. Bad request bodies


def _valid(**extra: Any) -> dict[str, Any]:
    return {**chat_body("Bodies the proxy cannot read must still pass."), **extra}


def _bad_bodies() -> dict[str, tuple[bytes, dict[str, str], bytes]]:
    """case -> (bytes sent, extra headers, the decoded body the proxy estimates)."""
    plain = json.dumps(_valid()).encode()
    image = "data:image/png;base64," + "iVBORw0KGgo" * 3000
    multimodal = {
        "model": MODEL,
        "max_completion_tokens": 20,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "Answer in one word."},
                ],
            }
        ],
    }

    def raw(body: bytes, headers: dict[str, str] | None = None) -> tuple[bytes, dict, bytes]:
        return body, headers or {}, body

    def encoded(body: bytes, name: str, data: bytes) -> tuple[bytes, dict, bytes]:
        return data, {"Content-Encoding": name}, body

    def as_json(document: Any) -> tuple[bytes, dict, bytes]:
        return raw(json.dumps(document).encode())

    return {
        "invalid JSON": raw(b'{"model": "llama3.1-8b", "messages": [{"role": "user", "cont'),
        "messages not a list": as_json({"model": MODEL, "messages": "hello"}),
        "content a number": as_json(
            {"model": MODEL, "messages": [{"role": "user", "content": 42}]}
        ),
        "model not a string": as_json({**_valid(), "model": {"name": MODEL}}),
        "body a JSON array": raw(b"[1, 2, 3]"),
        "non-UTF-8 bytes": raw(
            b'{"model": "llama3.1-8b", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
        ),
        "100k nested arrays": raw(
            b'{"model": "llama3.1-8b", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        ),
        "multimodal parts": as_json(multimodal),
        "n = 3": as_json(_valid(n=3)),
        "gzip": encoded(plain, "gzip", gzip.compress(plain)),
        "deflate": encoded(plain, "deflate", zlib.compress(plain)),
        "br": encoded(plain, "br", brotli.compress(plain)),
        "zstd": encoded(plain, "zstd", zstd.compress(plain)),
        "gzip header, plain body": (plain, {"Content-Encoding": "gzip"}, plain),
    }


BIG_BODY_BYTES = 50_000_000
BIG_MODEL = "big-body-model"  # its own minute window: the huge estimate blocks nobody else


def test_bad_request_bodies_are_forwarded_and_the_proxy_keeps_working(
    launch: Launcher, ledger: Ledger
) -> None:
    """Each body goes upstream as sent (byte for byte; a raw upstream records it), is
    estimated (the X-Cooldown-Estimated-Tokens header equals the proxy's estimator run on
    the *decoded* body: so gzip/deflate/br/zstd bodies were decoded, and a body that lies
    about its encoding is estimated as it is), and the proxy neither crashes nor refuses.

    Two bodies are changed on purpose: a stream whose `stream_options` is not an object, and
    a gzip-encoded stream, both get `stream_options.include_usage` (re-encoded with gzip for
    the second). A 50 MB prompt is estimated in a worker thread (the header shows about 9 M
    tokens, not the 50 M of the byte-count fallback); mitmdump's peak RSS is reported. After
    all of them a normal request gets 200 and nothing is held or open."""
    upstream = FaultyUpstream(default=respond(200, {"id": "ok", "object": "chat.completion"}))
    limits = {"tpm_limit": 50_000_000, "rpm_limit": 10_000, "request_timeout": "30s"}
    try:
        proxy = launch(cooldown_config(upstream.url, limits))
        client = proxy.client(timeout=httpx.Timeout(60.0, connect=10.0))
        cases = _bad_bodies()
        for case, (sent, headers, decoded) in cases.items():
            before = upstream.count()
            answer = client.post(
                CEREBRAS_CHAT,
                content=sent,
                headers={"Content-Type": "application/json", **headers},
            )
            assert answer.status_code == 200, (case, answer.text)
            assert answer.headers["x-cooldown-estimated-tokens"] == str(estimate_of(decoded)), case
            assert upstream.count() == before + 1, case
            arrived = upstream.requests[-1]
            assert arrived.body == sent, case
            assert arrived.headers.get("content-encoding") == headers.get("Content-Encoding")

        # Bodies the proxy rewrites to ask for usage in the stream.
        odd_stream = json.dumps(_valid(stream=True, stream_options="yes please")).encode()
        gzip_stream = json.dumps(_valid(stream=True)).encode()
        for case, sent, headers in (
            ("stream_options not an object", odd_stream, {}),
            ("gzip stream", gzip.compress(gzip_stream), {"Content-Encoding": "gzip"}),
        ):
            answer = client.post(
                CEREBRAS_CHAT, content=sent, headers={"Content-Type": "application/json", **headers}
            )
            assert answer.status_code == 200, (case, answer.text)
            arrived = upstream.requests[-1]
            forwarded = arrived.body
            if headers:
                assert arrived.headers["content-encoding"] == "gzip"
                forwarded = gzip.decompress(forwarded)
            assert json.loads(forwarded)["stream_options"] == {"include_usage": True}, case

        # 50 MB of prompt, in one request.
        filler = b"the quick brown fox jumps over a lazy dog while cool breezes drift by "
        head = b'{"model": "%s", "max_completion_tokens": 20, ' % BIG_MODEL.encode()
        head += b'"messages": [{"role": "user", "content": "'
        tail = b'"}]}'
        repeat = (BIG_BODY_BYTES - len(head) - len(tail)) // len(filler)
        big = head + filler * repeat + tail
        pid = proxy.process.pid
        rss_before = rss_kib(pid)
        started = time.monotonic()
        answer = client.post(
            CEREBRAS_CHAT, content=big, headers={"Content-Type": "application/json"}
        )
        big_seconds = time.monotonic() - started
        assert answer.status_code == 200, answer.text
        estimated = int(answer.headers["x-cooldown-estimated-tokens"])
        # Far beyond any context: bounded by its bytes rather than tokenized (no list of
        # millions of token ids), and never below the real count.
        assert len(big) - len(head) - len(tail) <= estimated <= len(big) + 100, estimated
        assert upstream.body_lengths[-1] == len(big)
        peak = rss_kib(pid, "VmHWM")
        del big
        ledger.extra["big_body"] = {
            "bytes": BIG_BODY_BYTES,
            "seconds": round(big_seconds, 2),
            "estimate": estimated,
            "mitmdump_rss_before_mib": rss_before // 1024,
            "mitmdump_peak_rss_mib": peak // 1024,
        }

        normal = client.post(CEREBRAS_CHAT, json=chat_body())
        assert normal.status_code == 200
        total = len(cases) + 3
        assert upstream.count() == total + 1
        snapshot = wait_settled(proxy)
        book(ledger, "bad request bodies", snapshot, faults=total, requests=total + 1)
        proxy.assert_clean_log()
    finally:
        upstream.close()


# ---------------------------------------------------------------------------------------------
# 5. Config reloads


async def test_config_reload_keeps_the_running_config_on_errors_and_releases_held_on_raise(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """Two bad edits of the file the proxy started with (a bad value, broken YAML) are
    logged ("keeping the running config", naming the problem) and change nothing: the two
    requests held under tpm_limit 50 stay held, and a third one is held too. Then a valid
    edit raises tpm_limit: all three are released and answered 200 within a few seconds
    (the file is polled once a second); none is dropped."""
    mock_upstream.configure(rpm=None, tpm=None)
    limits = {"tpm_limit": 50, "max_queue_depth": 10, "request_timeout": "60s"}
    config = cooldown_config(mock_upstream.url, limits)
    proxy = launch(config)
    path = proxy.config_path

    def kept_count() -> int:
        return proxy.log_text().count("keeping the running config")

    async with proxy.async_client(timeout=CLIENT_TIMEOUT) as client, status_client(proxy) as status:
        first = await ask(client)
        assert isinstance(first, httpx.Response) and first.status_code == 200
        held = [asyncio.create_task(ask(client)) for _ in range(2)]
        assert await async_wait_metric(status, lambda m: m["cerebras_queue_depth"] == 2)

        write_config(path, {**config, "cerebras_limits": {**limits, "tpm_limit": "plenty"}})
        assert await async_wait_metric(status, lambda _: kept_count() == 1, timeout=5.0)
        write_config(path, "cerebras_limits: [tpm_limit: 100000\n")
        assert await async_wait_metric(status, lambda _: kept_count() == 2, timeout=5.0)
        held.append(asyncio.create_task(ask(client)))
        assert await async_wait_metric(status, lambda m: m["cerebras_queue_depth"] == 3)
        assert not any(task.done() for task in held)  # the old limit still applies
        assert mock_upstream.stats()["requests"] == 1

        raised = time.monotonic()
        write_config(path, {**config, "cerebras_limits": {**limits, "tpm_limit": 100_000}})
        done, pending = await asyncio.wait(held, timeout=10.0)
        released_in = time.monotonic() - raised
        results = [task.result() for task in done]
        for task in pending:
            task.cancel()
    lost = len(pending) + unanswered(results)
    snapshot = await asyncio.to_thread(wait_settled, proxy)
    book(ledger, "config reload", snapshot, faults=2, requests=4, lost=lost)
    assert [r.status_code for r in results] == [200] * 3  # type: ignore[union-attr]
    assert released_in < 5.0  # the file is polled once a second
    log = proxy.log_text()
    assert "tpm_limit" in log.split("keeping the running config", 1)[1].splitlines()[0]
    assert "config file changed: reloading" in log
    assert mock_upstream.stats()["requests"] == 4
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 6. Load: a flood of clients against a tiny limit

FLOOD_CLIENTS = 2_000
FLOOD_DEPTH = 50
FLOOD_TIMEOUT = 5.0
FLOOD_POOLS = 8
FLOOD_CONNECTIONS_PER_POOL = 50  # 400 TLS connections through the proxy at most


@pytest.mark.slow
async def test_two_thousand_clients_against_a_tiny_limit(
    launch: Launcher, mock_upstream: Any, ledger: Ledger
) -> None:
    """2,000 concurrent client requests (over 8 pools of 50 keep-alive TLS connections)
    against max_queue_depth 50, a tpm and tph that let nothing more through after the first
    request, and request_timeout 5 s. The queue never holds more than 50 (metrics polled
    throughout), the others are refused at once (429 queue_full), the held ones time out
    after 5 s (429 queue_timeout), every client gets an answer, nothing more reaches
    upstream, and mitmdump's memory stays bounded (peak RSS growth under 300 MB)."""
    mock_upstream.configure(rpm=None, tpm=None)
    limits = {
        "tpm_limit": 50,
        # The same per hour: on a loaded machine the flood can outlast the minute, and nothing
        # more may go when the first request's minute is over either.
        "tph_limit": 50,
        "max_queue_depth": FLOOD_DEPTH,
        "request_timeout": f"{FLOOD_TIMEOUT:g}s",
        "max_queue_share_per_client": 1,  # one client fills the whole queue (see test_clients)
    }
    proxy = launch(cooldown_config(mock_upstream.url, limits), verbosity="info")
    pid = proxy.process.pid
    async with proxy.async_client(timeout=CLIENT_TIMEOUT) as warm:
        first = await ask(warm)  # the one request the tpm lets through this minute
        assert isinstance(first, httpx.Response) and first.status_code == 200
    rss_before = rss_kib(pid)

    limits_per_pool = httpx.Limits(
        max_connections=FLOOD_CONNECTIONS_PER_POOL,
        max_keepalive_connections=FLOOD_CONNECTIONS_PER_POOL,
    )
    pools = [
        httpx.AsyncClient(
            proxy=proxy.url,
            verify=proxy.ssl_context(),
            timeout=httpx.Timeout(80.0, connect=30.0, pool=80.0),
            limits=limits_per_pool,
            http2=False,
            trust_env=False,
        )
        for _ in range(FLOOD_POOLS)
    ]
    depth_seen: list[int] = []
    rss_seen: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        async with status_client(proxy) as status:
            while not stop.is_set():
                depth_seen.append((await async_metrics(status))["cerebras_queue_depth"])
                rss_seen.append(rss_kib(pid))
                await asyncio.sleep(0.05)

    async def one(i: int) -> tuple[int | None, str, float, float]:
        """(status, refusal code, seconds from sending the request, seconds in all)."""
        sent: list[float] = []

        async def trace(event: str, _info: dict[str, Any]) -> None:
            if event == "http11.send_request_headers.started":
                sent.append(time.monotonic())

        begun = time.monotonic()
        try:
            response = await pools[i % FLOOD_POOLS].post(
                CEREBRAS_CHAT, json=chat_body(), extensions={"trace": trace}
            )
        except httpx.HTTPError as e:
            return None, type(e).__name__, math.nan, time.monotonic() - begun
        ended = time.monotonic()
        code = response.headers.get("x-cooldown-refused", "")
        return response.status_code, code, ended - (sent[-1] if sent else begun), ended - begun

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(FLOOD_CLIENTS))), timeout=85.0
        )
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        await watcher
        for pool in pools:
            await pool.aclose()
    peak_rss = rss_kib(pid, "VmHWM")

    outcomes = Counter((status, code) for status, code, _, _ in results)
    lost = sum(status is None for status, _, _, _ in results)
    full = [since for status, code, since, _ in results if code == "queue_full"]
    timed_out = [since for status, code, since, _ in results if code == "queue_timeout"]
    overall = [total for *_, total in results]
    figures = {
        "clients": FLOOD_CLIENTS,
        "elapsed_s": round(elapsed, 1),
        "outcomes": {f"{s} {c}".strip(): n for (s, c), n in outcomes.most_common()},
        "queue_depth_max": max(depth_seen, default=0),
        "metrics_samples": len(depth_seen),
        "queue_full_answer_s": quantiles(full),
        "queue_timeout_answer_s": quantiles(timed_out),
        "all_answers_end_to_end_s": quantiles(overall),
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_peak_mib": round(peak_rss / 1024, 1),
        "rss_growth_mib": round((peak_rss - rss_before) / 1024, 1),
        "rss_sampled_max_mib": round(max(rss_seen, default=0) / 1024, 1),
    }
    ledger.extra["flood"] = figures
    print(f"\nflood figures: {json.dumps(figures)}")

    snapshot = await asyncio.to_thread(wait_settled, proxy, 10.0)
    book(ledger, "flood of 2,000 clients", snapshot, faults=1, requests=FLOOD_CLIENTS, lost=lost)
    assert set(outcomes) <= {(429, "queue_full"), (429, "queue_timeout")}, outcomes
    assert len(timed_out) >= FLOOD_DEPTH
    assert 0 < max(depth_seen) <= FLOOD_DEPTH, figures
    assert mock_upstream.stats()["requests"] == 1  # nothing more was let through
    # Refusals are not held: answered well before a held request could even time out
    # (measured from the moment the request was written; mitmdump's one thread is saturated
    # by 2,000 requests and 400 TLS handshakes, and this machine is shared, so "at once" is
    # about a second here). Held requests wait their request_timeout, and not much longer.
    assert quantiles(full)["p50"] < FLOOD_TIMEOUT / 2, figures
    assert quantiles(full)["p90"] < FLOOD_TIMEOUT, figures
    assert min(timed_out) >= FLOOD_TIMEOUT - 0.1, figures
    assert max(timed_out) < FLOOD_TIMEOUT + 5.0, figures
    assert peak_rss - rss_before < 300 * 1024, figures
    assert elapsed < 85.0
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 7. Shutdown


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_answers_every_held_request_at_once(
    launch: Launcher, mock_upstream: Any, ledger: Ledger, signum: signal.Signals
) -> None:
    """A signal with five requests held (60 s request_timeout) and one in flight at a slow
    upstream: every held client gets the proxy's 503 `proxy_shutting_down` with Retry-After
    within 3 s, nothing waits for the queue timeout, and mitmdump exits with status 0.

    The request in flight is not the addon's to answer (it was forwarded): mitmproxy closes
    its connection as it exits, so that client sees a closed connection without a status
    (httpx: RemoteProtocolError), at once. Booked as `closed`, not lost."""
    mock_upstream.configure(rpm=None, tpm=None, latency=20.0)
    limits = {"tpm_limit": 50, "max_queue_depth": 10, "request_timeout": "60s"}
    proxy = launch(cooldown_config(mock_upstream.url, limits))
    launch.stopped_by_test(proxy)
    async with proxy.async_client(timeout=CLIENT_TIMEOUT) as client, status_client(proxy) as status:
        in_flight = asyncio.create_task(ask(client))
        assert await async_wait_metric(status, lambda _: mock_upstream.stats()["requests"] == 1)
        held = [asyncio.create_task(ask(client)) for _ in range(5)]
        assert await async_wait_metric(status, lambda m: m["cerebras_queue_depth"] == 5)
        signalled = time.monotonic()
        proxy.process.send_signal(signum)
        done, pending = await asyncio.wait(held, timeout=10.0)
        answered_in = time.monotonic() - signalled
        flight = await asyncio.wait_for(in_flight, 10.0)
        flight_ended_in = time.monotonic() - signalled
        for task in pending:
            task.cancel()
    results = [task.result() for task in done]
    exit_code = await asyncio.to_thread(proxy.process.wait, 10.0)
    lost = len(pending) + unanswered(results)
    closed = int(not isinstance(flight, httpx.Response))
    ledger.record(f"shutdown by {signum.name}", faults=1, requests=5, lost=lost, closed=closed)
    assert lost == 0
    for answer in results:
        assert_proxy_refusal(answer, 503, "proxy_shutting_down")  # type: ignore[arg-type]
        assert answer.headers["retry-after"] == "5"  # type: ignore[union-attr]
    assert answered_in < 3.0
    # mitmproxy 12.3 closes it (RemoteProtocolError); an answer would be fine too. A hang not.
    assert isinstance(flight, httpx.Response | httpx.TransportError), flight
    assert not isinstance(flight, httpx.TimeoutException), flight
    assert flight_ended_in < 3.0
    assert exit_code == 0, proxy.log_tail()
    assert "shutting down: answered 5 held request(s) with 503" in proxy.log_text()
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 8. Security

SECRET_KEY = "sk-cooldown-e2e-0123456789abcdefSECRET"
PROMPT_MARK = "PROMPT-CANARY-7f3a9c-do-not-log"


async def test_no_key_or_prompt_leaks_and_status_pages_are_read_only(
    launch: Launcher, mock_upstream: Any, ledger: Ledger, plain_server: PlainServer
) -> None:
    """With debug logging, a run with `Authorization: Bearer <key>` and a recognizable prompt
    in every request: a 429 retried by the proxy, a stream, a held request that times out,
    one refused for a full queue, a 429 storm that opens the breaker (503), and a shutdown
    with one held (503). Neither the key nor the prompt appears in the mitmdump log, in
    /metrics or /metrics.json, or in any error body the proxy wrote. The status pages answer
    only GET (405 for POST/PUT/DELETE/PATCH) and only at cooldown.local: /metrics on another
    host is that host's business. The scrape listener (`metrics_listen`) is checked the same
    way. (HEAD through the proxy: see the next test.)"""
    mock_upstream.configure(rpm=None, tpm=None, force_status=429, force_count=1, retry_after="0.2")
    held_model = "held-model"
    config = cooldown_config(
        mock_upstream.url,
        {"tpm_limit": TPM, "max_queue_depth": 1, "request_timeout": "3s"},
        circuit_breaker={"failure_threshold": 3, "open_duration": "1s"},
        models={held_model: {"rpm_limit": 1}},
        metrics_listen="127.0.0.1:0",
    )
    proxy = launch(config)
    launch.stopped_by_test(proxy)
    headers = {"Authorization": f"Bearer {SECRET_KEY}"}
    prompt = f"Summarize {PROMPT_MARK} in one word."
    proxy_bodies: list[str] = []
    answers: list[httpx.Response | Exception] = []

    async with proxy.async_client(timeout=CLIENT_TIMEOUT) as client, status_client(proxy) as status:

        async def send(model: str = MODEL, **extra: Any) -> httpx.Response:
            answer = await ask(
                client, json={**chat_body(prompt, model=model), **extra}, headers=headers
            )
            answers.append(answer)
            assert isinstance(answer, httpx.Response), answer
            if "x-cooldown-refused" in answer.headers:
                proxy_bodies.append(answer.text)
            return answer

        retried = await send()
        assert retried.status_code == 200  # upstream's 429, retried after 0.2 s
        assert mock_upstream.stats()["forced_429"] == 1
        streamed = await send(stream=True)
        assert streamed.status_code == 200 and PROMPT_MARK not in streamed.text
        assert (await send(held_model)).status_code == 200  # its one request this minute
        timing_out = asyncio.create_task(send(held_model))
        assert await async_wait_metric(status, lambda m: m["cerebras_queue_depth"] == 1)
        assert_proxy_refusal(await send(held_model), 429, "queue_full")
        assert_proxy_refusal(await timing_out, 429, "queue_timeout")

        mock_upstream.configure(force_status=429, force_count=None, retry_after="0.1")
        storm = await send()  # 429, retried twice: three upstream 429s open the breaker
        assert storm.status_code == 429
        assert_proxy_refusal(await send(), 503, "circuit_open")
        mock_upstream.configure(force_status=None)
        assert await async_wait_metric(status, lambda m: m["breaker_state"] == "half_open")
        assert (await send()).status_code == 200  # the probe closes the breaker

        pages = {}
        for path in (METRICS_JSON, METRICS_TEXT):
            page = await status.get(path)
            assert page.status_code == 200
            pages[path] = page.text
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                refused = await status.request(method, path, content=b"{}")
                assert refused.status_code == 405, (method, path)
        assert "cooldown_queue_depth" in pages[METRICS_TEXT]
        # The scrape listener (metrics_listen) serves the same pages, read-only too.
        found = re.search(
            r"Cooldown metrics listening at (http://127\.0\.0\.1:\d+)/metrics", proxy.log_text()
        )
        assert found, proxy.log_tail()
        async with httpx.AsyncClient(base_url=found[1], timeout=10.0, trust_env=False) as scrape:
            for path in ("/metrics", "/metrics.json"):
                page = await scrape.get(path)
                assert page.status_code == 200
                pages[f"listener {path}"] = page.text
                assert (await scrape.post(path, content=b"{}")).status_code == 405
                head = await scrape.head(path)
                assert head.status_code == 200 and head.content == b""
        # /metrics elsewhere is not the addon's: another host answers for itself.
        elsewhere = await status.get(f"{plain_server.url}/metrics")
        assert elsewhere.json() == {"served_by": "plain-server", "path": "/metrics"}
        cerebras = await client.get("https://api.cerebras.ai/metrics")
        assert cerebras.status_code == 404 and "cooldown_queue_depth" not in cerebras.text
        assert (await status.get("http://cooldown.local/other")).status_code == 404

        # Shutdown with one held: its 503 body is checked too.
        last = asyncio.create_task(send(held_model))
        assert await async_wait_metric(status, lambda m: m["cerebras_queue_depth"] == 1)
        proxy.process.send_signal(signal.SIGTERM)
        assert_proxy_refusal(await asyncio.wait_for(last, 10.0), 503, "proxy_shutting_down")
    await asyncio.to_thread(proxy.process.wait, 10.0)

    log = proxy.log_text()
    proxy.assert_clean_log()
    assert len(proxy_bodies) == 4, proxy_bodies
    ledger.record("security run", faults=0, requests=len(answers), lost=unanswered(answers))
    for where, text in [("log", log), *pages.items(), *(("error body", b) for b in proxy_bodies)]:
        for secret in (SECRET_KEY, "SECRET", PROMPT_MARK, "Summarize"):
            assert secret not in text, f"{secret!r} in the {where}"
    assert "flow" in log and "released" in log  # debug logging was on


def test_head_on_a_status_page_sends_no_body(launch: Launcher, mock_upstream: Any) -> None:
    """HEAD, then GET on the same connection: the bytes after the HEAD answer's headers must
    be the GET's answer (a raw socket, so no client library hides stray bytes). This was an
    addon bug: HEAD got the whole body, which a keep-alive client then read as the next
    response (RFC 9110 9.3.2: a HEAD answer has no content)."""
    proxy = launch(cooldown_config(mock_upstream.url))
    for path in ("/metrics", "/metrics.json"):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10.0) as sock:
            host = "Host: cooldown.local\r\n\r\n"
            sock.sendall(f"HEAD http://cooldown.local{path} HTTP/1.1\r\n{host}".encode())
            data = read_head(sock)
            assert data.startswith(b"HTTP/1.1 200"), data
            sock.sendall(f"GET http://cooldown.local/metrics.json HTTP/1.1\r\n{host}".encode())
            while b"open_reservations" not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        after_head = data.split(b"\r\n\r\n", 1)[1]
        assert after_head.startswith(b"HTTP/1.1 200"), (path, after_head[:80])
    proxy.assert_clean_log()
