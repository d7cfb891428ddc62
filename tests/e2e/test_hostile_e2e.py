"""Hostile clients (issue 15) against a real mitmdump + Cooldown and the mock upstream.

1. One HTTP/2 connection holds 100 streams, then resets them all (RST_STREAM CANCEL) and keeps
   the connection open: the queue empties within seconds, the streams count as `cancelled`,
   never as `forwarded` (the mock's request count is the ground truth), no reservation or
   flow entry is left, and the connection serves a new stream. The same when the model is
   given room (a config edit) the moment its streams are reset: reset check or release,
   whichever comes first, a reset stream is never forwarded.
2. One API key floods the queue with twice its depth: it holds its share (ceil(0.9 x 20) =
   18), the rest are refused at once with 429 `client_queue_full`, and another key still finds
   room; `queue_by_client` shows fingerprints, never keys.
3. 70 requests whose model is a 256 KiB name, and 200 invented names: the status pages stay
   small, at most 64 names (+ the shared `(other models)`) become keys, none longer than 256
   characters, and the long name never reaches the log.

Everything binds and connects to 127.0.0.1 only. Figures (seconds until the reset streams
left the queue, refusal times, page sizes) are printed at the end of the module and appended
as one JSON line to $COOLDOWN_E2E_FIGURES when it is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tools.h2client import H2Client

from .conftest import CEREBRAS_CHAT, async_wait_until, chat_body, write_config
from .faults_support import (
    METRICS_JSON,
    METRICS_TEXT,
    Launcher,
    async_metrics,
    async_wait_metric,
    cooldown_config,
    launcher,
    status_client,
)

pytestmark = pytest.mark.e2e

MODEL = "llama3.1-8b"
FREE_MODEL = "roomy-model"  # configured with room to spare: answers a stream deterministically
CHAT_PATH = "/v1/chat/completions"
OTHER_MODELS = "(other models)"
# Far above any answer time expected here: a client that reaches it was left hanging.
CLIENT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
# The tpm lets the first small request through and then nothing for a minute (sliding window).
TINY_TPM = 50


def fingerprint(key: str) -> str:
    """The client id the proxy derives from a bearer token (routing.client_of)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def body_bytes(model: str = MODEL) -> bytes:
    return json.dumps(chat_body(model=model)).encode()


async def wait_settled(status: httpx.AsyncClient, timeout: float = 10.0) -> dict[str, Any]:
    """The first snapshot with nothing held, no reservation open and no flow tracked (or the
    last one after `timeout`: the caller's asserts then say what is left)."""
    snapshot = await async_wait_metric(
        status,
        lambda m: (
            m["cerebras_queue_depth"] == 0
            and m["open_reservations"] == 0
            and m["tracked_flows"] == 0
        ),
        timeout,
    )
    return snapshot if snapshot is not None else await async_metrics(status)


def assert_settled(snapshot: dict[str, Any]) -> None:
    assert snapshot["cerebras_queue_depth"] == 0, snapshot
    assert snapshot["open_reservations"] == 0, snapshot
    assert snapshot["tracked_flows"] == 0, snapshot
    assert snapshot["queue_by_client"] == {}, snapshot


def forwarded_total(snapshot: dict[str, Any]) -> int:
    return sum(outcomes.get("forwarded", 0) for outcomes in snapshot["requests"].values())


@pytest.fixture
def launch(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    """`launch(config)` starts mitmdump + Cooldown from a whole config dict."""
    yield from launcher(request, tmp_path)


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The module's figures: printed at the end, appended to $COOLDOWN_E2E_FIGURES if set."""
    found: dict[str, Any] = {}
    yield found
    line = json.dumps(
        {"suite": "test_hostile_e2e", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **found}
    )
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nhostile e2e: {line}")
    target = os.environ.get("COOLDOWN_E2E_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(line + "\n")


# ---------------------------------------------------------------------------------------------
# 1. Reset streams


RESET_STREAMS = 100  # mitmproxy's (h2's) MAX_CONCURRENT_STREAMS for a client connection
RESET_BOUND_S = 15.0  # the design says ~1 s (one poll); generous for a noisy 2-core machine


async def test_reset_http2_streams_leave_the_queue_and_are_never_forwarded(
    launch: Launcher, mock_upstream: Any, figures: dict[str, Any]
) -> None:
    """100 held streams on one HTTP/2 connection, all reset by the client (RST_STREAM CANCEL)
    with the connection kept open (PINGs): the queue is empty again within seconds; each
    stream counts as `cancelled` and none as `forwarded` (the mock saw only the warm-up);
    no reservation, no tracked flow; then a new stream on the same connection is answered."""
    mock_upstream.configure(rpm=None, tpm=None)
    limits = {
        "tpm_limit": TINY_TPM,
        "max_queue_depth": 120,
        "request_timeout": "60s",
        "max_queue_share_per_client": 1,
    }
    config = cooldown_config(mock_upstream.url, limits, models={FREE_MODEL: {"tpm_limit": 10**6}})
    proxy = launch(config)
    async with status_client(proxy) as status:
        h2 = await H2Client.open(proxy.port, proxy.ca_file)
        try:
            warm = await h2.response(h2.post(CHAT_PATH, body_bytes()), timeout=30.0)
            assert warm.status == 200, warm  # the one request the tpm lets through
            streams = [h2.post(CHAT_PATH, body_bytes()) for _ in range(RESET_STREAMS)]
            held = await async_wait_metric(
                status, lambda m: m["cerebras_queue_depth"] == RESET_STREAMS, timeout=20.0
            )
            assert held is not None, await async_metrics(status)
            assert not any(h2.answered(s) for s in streams)
            assert mock_upstream.stats()["requests"] == 1

            pings_before = h2.pings_acked
            for stream_id in streams:
                h2.reset(stream_id)
            reset_at = time.monotonic()

            def empty(m: dict[str, Any]) -> bool:
                h2.ping()  # the connection is in use all along
                return m["cerebras_queue_depth"] == 0

            emptied = await async_wait_metric(status, empty, timeout=RESET_BOUND_S + 5.0)
            seconds_to_empty = time.monotonic() - reset_at
            figures["reset_streams"] = RESET_STREAMS
            figures["reset_seconds_to_queue_empty"] = round(seconds_to_empty, 3)
            assert emptied is not None, await async_metrics(status)
            assert seconds_to_empty < RESET_BOUND_S

            snapshot = await wait_settled(status)
            upstream_saw = mock_upstream.stats()["requests"]
            figures["reset_forwarded"] = snapshot["requests"][MODEL].get("forwarded", 0)
            figures["reset_upstream_requests"] = upstream_saw
            assert_settled(snapshot)
            assert forwarded_total(snapshot) == upstream_saw == 1, snapshot
            assert snapshot["requests"][MODEL] == {"forwarded": 1, "cancelled": RESET_STREAMS}

            # The connection was kept, and it still works: a stream of a model with room.
            assert not h2.closed.is_set()
            assert await async_wait_until(lambda: h2.pings_acked > pings_before, 5.0)
            after = await h2.response(h2.post(CHAT_PATH, body_bytes(FREE_MODEL)), timeout=30.0)
            assert after.status == 200, after
            assert json.loads(after.body)["model"] == FREE_MODEL
        finally:
            await h2.close()
        snapshot = await wait_settled(status)
    assert_settled(snapshot)
    assert mock_upstream.stats()["requests"] == forwarded_total(snapshot) == 2
    proxy.assert_clean_log()


RACED_STREAMS = 50


async def test_reset_streams_given_room_at_that_moment_are_not_forwarded(
    launch: Launcher, mock_upstream: Any
) -> None:
    """The race behind "never forwarded": 50 held streams are reset and at once a config edit
    gives their model room. Whichever reaches each stream first, the reset check (a 1 s poll)
    or the release (the file is read within a second), the stream counts as `cancelled` and
    nothing more reaches upstream; then a new stream of that model is answered (the edit
    applied)."""
    mock_upstream.configure(rpm=None, tpm=None)
    limits = {
        "tpm_limit": TINY_TPM,
        "max_queue_depth": 120,
        "request_timeout": "60s",
        "max_queue_share_per_client": 1,
    }
    proxy = launch(cooldown_config(mock_upstream.url, limits))
    async with status_client(proxy) as status:
        h2 = await H2Client.open(proxy.port, proxy.ca_file)
        try:
            warm = await h2.response(h2.post(CHAT_PATH, body_bytes()), timeout=30.0)
            assert warm.status == 200, warm
            streams = [h2.post(CHAT_PATH, body_bytes()) for _ in range(RACED_STREAMS)]
            held = await async_wait_metric(
                status, lambda m: m["cerebras_queue_depth"] == RACED_STREAMS, timeout=20.0
            )
            assert held is not None, await async_metrics(status)
            for stream_id in streams:
                h2.reset(stream_id)
            roomy = cooldown_config(mock_upstream.url, {**limits, "tpm_limit": 10**6})
            write_config(proxy.config_path, roomy)
            snapshot = await wait_settled(status, timeout=RESET_BOUND_S)
            assert_settled(snapshot)
            assert snapshot["requests"][MODEL] == {"forwarded": 1, "cancelled": RACED_STREAMS}
            assert mock_upstream.stats()["requests"] == 1
            # The edit applied (within a second): the model has room now.
            after = await h2.response(h2.post(CHAT_PATH, body_bytes()), timeout=30.0)
            assert after.status == 200, after
        finally:
            await h2.close()
        snapshot = await wait_settled(status)
    assert_settled(snapshot)
    assert mock_upstream.stats()["requests"] == forwarded_total(snapshot) == 2
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 2. One key floods the queue


FLOOD_DEPTH = 20
FLOOD_SHARE = 18  # ceil(0.9 x 20), the default max_queue_share_per_client
KEY_A = "key-A-hostile-e2e-0123456789"
KEY_B = "key-B-hostile-e2e-9876543210"


async def test_one_key_flooding_the_queue_leaves_room_for_another(
    launch: Launcher, mock_upstream: Any, figures: dict[str, Any]
) -> None:
    """Key A sends 2 x max_queue_depth = 40 requests at once against a tpm that lets nothing
    more through: 18 are held (its share), 22 get 429 `client_queue_full` at once; key B's two
    requests are then held, not refused. `queue_by_client` shows the two fingerprints (18 and
    2) and no key. Raising the tpm (a config edit) answers all 20 held with 200; afterwards
    nothing is held, no reservation is open and no flow is tracked."""
    mock_upstream.configure(rpm=None, tpm=None)
    limits = {"tpm_limit": TINY_TPM, "max_queue_depth": FLOOD_DEPTH, "request_timeout": "60s"}
    config = cooldown_config(mock_upstream.url, limits)
    proxy = launch(config)

    async def ask(client: httpx.AsyncClient, key: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return await client.post(CEREBRAS_CHAT, json=chat_body(), headers=headers)

    pool = httpx.Limits(max_connections=2 * FLOOD_DEPTH, max_keepalive_connections=2 * FLOOD_DEPTH)
    async with (
        status_client(proxy) as status,
        proxy.async_client(timeout=CLIENT_TIMEOUT) as warm,
        httpx.AsyncClient(
            proxy=proxy.url,
            verify=proxy.ssl_context(),
            timeout=CLIENT_TIMEOUT,
            limits=pool,
            trust_env=False,
        ) as client,
    ):
        first = await warm.post(CEREBRAS_CHAT, json=chat_body())  # by address: uses the tpm
        assert first.status_code == 200, first.text

        started = time.monotonic()
        flood = [asyncio.create_task(ask(client, KEY_A)) for _ in range(2 * FLOOD_DEPTH)]
        refused_count = 2 * FLOOD_DEPTH - FLOOD_SHARE
        assert await async_wait_until(
            lambda: sum(t.done() for t in flood) >= refused_count, timeout=20.0
        ), f"{sum(t.done() for t in flood)} of A's answered"
        refusals_in = time.monotonic() - started
        held_a = await async_wait_metric(
            status, lambda m: m["cerebras_queue_depth"] == FLOOD_SHARE, timeout=10.0
        )
        assert held_a is not None, await async_metrics(status)
        refused = [t.result() for t in flood if t.done()]
        assert len(refused) == refused_count
        for answer in refused:
            assert answer.status_code == 429, answer.text
            assert answer.headers["x-cooldown-refused"] == "client_queue_full", answer.headers
            assert answer.json()["error"]["code"] == "client_queue_full"
            assert int(answer.headers["retry-after"]) >= 1

        others = [asyncio.create_task(ask(client, KEY_B)) for _ in range(2)]
        both = await async_wait_metric(
            status, lambda m: m["cerebras_queue_depth"] == FLOOD_SHARE + 2, timeout=10.0
        )
        assert both is not None, await async_metrics(status)
        assert not any(t.done() for t in others), [t.result() for t in others if t.done()]
        assert both["queue_by_client"] == {fingerprint(KEY_A): FLOOD_SHARE, fingerprint(KEY_B): 2}
        pages = [(await status.get(url)).text for url in (METRICS_JSON, METRICS_TEXT)]
        for page in pages:
            for secret in (KEY_A, KEY_B, "key-A", "key-B"):
                assert secret not in page

        # Room for everyone: the held 20 are released and answered by the mock.
        write_config(
            proxy.config_path, cooldown_config(mock_upstream.url, {**limits, "tpm_limit": 10**6})
        )
        _, pending = await asyncio.wait([*flood, *others], timeout=20.0)
        assert not pending, f"{len(pending)} held requests not answered after the edit"
        snapshot = await wait_settled(status)

    outcomes_a = Counter(t.result().status_code for t in flood)
    outcomes_b = Counter(t.result().status_code for t in others)
    figures["flood"] = {
        "depth": FLOOD_DEPTH,
        "a_sent": len(flood),
        "a_held": FLOOD_SHARE,
        "a_refusals_answered_in_s": round(refusals_in, 3),
        "b_found_room": sum(1 for t in others if t.result().status_code == 200),
        "b_sent": len(others),
    }
    assert outcomes_a == {200: FLOOD_SHARE, 429: refused_count}, outcomes_a
    assert outcomes_b == {200: 2}, outcomes_b
    assert_settled(snapshot)
    assert snapshot["requests"][MODEL] == {
        "forwarded": 1 + FLOOD_SHARE + 2,
        "refused_client_queue_full": refused_count,
    }, snapshot
    assert mock_upstream.stats()["requests"] == 1 + FLOOD_SHARE + 2
    log = proxy.log_text()
    assert KEY_A not in log and KEY_B not in log
    proxy.assert_clean_log()


# ---------------------------------------------------------------------------------------------
# 3. Long and invented model names


LONG_NAMES = 70
LONG_NAME_CHARS = 256 * 1024
INVENTED_NAMES = 200
PAGE_BOUND = 2_000_000
PATTERN = "hostile.model-"  # safe characters only: refused as a key for its length alone


def long_name(index: int) -> str:
    prefix = f"{index:03d}-"
    return prefix + (PATTERN * (LONG_NAME_CHARS // len(PATTERN) + 1))[: LONG_NAME_CHARS - 4]


def invented_name(index: int) -> str:
    """Mostly plausible names; every tenth has characters a key may not have."""
    return f"odd name <{index}> ü" if index % 10 == 0 else f"invented-{index:03d}"


async def test_long_and_invented_model_names_stay_bounded(
    launch: Launcher, mock_upstream: Any, figures: dict[str, Any]
) -> None:
    """70 requests with a 256 KiB model name each, then 200 invented names (20 of them with
    unsafe characters), all forwarded (the limits have room). /metrics and /metrics.json
    through the proxy stay under 2 MB each, `usage` has at most 65 keys (64 names and the
    shared `(other models)`), none over 256 characters and none of the unsafe names; the
    Prometheus labels likewise; and no 1 KB run of the long name is in the (debug) log."""
    mock_upstream.configure(rpm=None, tpm=None)
    limits = {
        "rpm_limit": 100_000,
        "tpm_limit": 10**9,
        "max_queue_depth": 1_000,
        "request_timeout": "60s",
    }
    proxy = launch(cooldown_config(mock_upstream.url, limits))
    slots = asyncio.Semaphore(10)

    async def send(client: httpx.AsyncClient, model: str) -> int:
        async with slots:
            response = await client.post(CEREBRAS_CHAT, json=chat_body(model=model))
            return response.status_code

    started = time.monotonic()
    async with proxy.async_client(timeout=CLIENT_TIMEOUT) as client, status_client(proxy) as status:
        long_statuses = await asyncio.gather(
            *(send(client, long_name(i)) for i in range(LONG_NAMES))
        )
        invented = [invented_name(i) for i in range(INVENTED_NAMES)]
        short_statuses = await asyncio.gather(*(send(client, name) for name in invented))
        sent_in = time.monotonic() - started
        snapshot = await wait_settled(status)
        json_page = await status.get(METRICS_JSON)
        text_page = await status.get(METRICS_TEXT)

    assert Counter(long_statuses) == {200: LONG_NAMES}
    assert Counter(short_statuses) == {200: INVENTED_NAMES}
    assert json_page.status_code == text_page.status_code == 200
    sizes = {"metrics_json_bytes": len(json_page.content), "metrics_bytes": len(text_page.content)}
    figures["names"] = {**sizes, "keys": len(snapshot["usage"]), "sent_in_s": round(sent_in, 2)}
    assert all(size <= PAGE_BOUND for size in sizes.values()), sizes

    assert_settled(snapshot)
    page = json_page.json()
    unsafe = {name for name in invented if not name.startswith("invented-")}
    for table in ("usage", "requests", "algorithm"):
        keys = set(page[table])
        assert len(keys) <= 65, (table, len(keys))
        assert OTHER_MODELS in keys, table
        assert max(len(key) for key in keys) <= 256, table
        assert not keys & unsafe, table
    # Every request was forwarded, under its own key or the shared one.
    assert forwarded_total(page) == mock_upstream.stats()["requests"] == LONG_NAMES + INVENTED_NAMES
    labels = set(re.findall(r'model="([^"]*)"', text_page.text))
    assert OTHER_MODELS in labels and len(labels) <= 65
    assert max(len(label) for label in labels) <= 256

    log = proxy.log_text()
    runs = {(PATTERN * (1024 // len(PATTERN) + 2))[i : i + 1024] for i in range(len(PATTERN))}
    assert not any(run in log for run in runs), "a 1 KB run of the long model name is in the log"
    proxy.assert_clean_log()
