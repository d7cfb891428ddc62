"""Metrics: JSON and Prometheus views after a scripted sequence, and where they are served."""

import asyncio
import json

import httpx
import pytest
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client.parser import text_string_to_metric_families

from cooldown.addon import Cooldown

from .test_addon import cerebras_flow, ok_response, until


@pytest.fixture
def addon_ctx(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "cerebras_limits:\n  rpm_limit: 10\n  tpm_limit: 1000\n  max_queue_depth: 1\n"
        "  max_retries: 0\n"
    )
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        yield cooldown


async def scripted_sequence(addon):
    """Forwarded and settled (40 -> 20), a 429 from upstream (given back), one forwarded and
    still in flight (953), one held, one refused."""
    ok = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 37})
    await addon.request(ok)  # estimate 3 + 37 = 40
    ok.response = ok_response(total_tokens=20)
    addon.responseheaders(ok)
    await addon.response(ok)
    limited = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 900})
    await addon.request(limited)
    limited.response = tutils.tresp(
        status_code=429, content=b'{"code":"token_quota_exceeded","param":"quota"}'
    )
    await addon.response(limited)  # refused upstream: given back
    big = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 950})
    await addon.request(big)  # in flight: 20 + 953 of 1000 used
    held = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 500})
    task = asyncio.ensure_future(addon.request(held))
    await until(lambda: addon.runtime.gate.depth == 1)
    refused = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 1})
    await addon.request(refused)
    assert refused.response.status_code == 429
    return task


async def test_json_view_after_a_scripted_sequence(addon_ctx):
    task = await scripted_sequence(addon_ctx.metering)
    snapshot = addon_ctx.runtime.metrics.snapshot()
    assert snapshot["cerebras_queue_depth"] == 1
    # The 429 is not counted. The buckets refill a little during the 1 s cooldown that the 429
    # causes (real clock): 1000 tokens and 10 requests a minute.
    assert snapshot["cerebras_rpm_usage"] == pytest.approx(0.2, abs=0.02)
    assert snapshot["cerebras_tpm_usage"] == pytest.approx(0.973, abs=0.02)
    assert snapshot["cerebras_circuit_breaker_open"] is False
    assert snapshot["usage"]["m"] == {
        "rpm": pytest.approx(0.2, abs=0.02),
        "tpm": pytest.approx(0.973, abs=0.02),
    }
    assert snapshot["requests"]["m"] == {"forwarded": 3, "refused_queue_full": 1}
    assert snapshot["upstream_429s"] == {"m": {"quota": 1}}
    assert snapshot["estimate_to_actual_ratio"]["m"]["p50"] == pytest.approx(2.0)
    # Only what waited in the queue: `big`, held by the 429's cooldown. The other three were
    # released or refused at once (counted in `requests`), the held one is still waiting.
    assert snapshot["queue_wait_seconds"]["m"]["count"] == 1
    assert snapshot["open_reservations"] == 1
    # What is held now: one, waiting for the tokens that `big` holds.
    assert snapshot["held"]["m"]["held"] == 1
    assert snapshot["held"]["m"]["waiting_for"] == "tpm"
    assert snapshot["oldest_held_seconds"] >= 0
    assert snapshot["next_release_in_seconds"] > 0
    json.dumps(snapshot)  # serializable as it is
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_prometheus_text_parses_and_carries_the_series(addon_ctx):
    task = await scripted_sequence(addon_ctx.metering)
    families = {
        f.name: f
        for f in text_string_to_metric_families(addon_ctx.runtime.metrics.prometheus().decode())
    }
    assert families["cooldown_requests"].type == "counter"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    assert samples[("cooldown_requests_total", (("model", "m"), ("outcome", "forwarded")))] == 3
    assert (
        samples[("cooldown_requests_total", (("model", "m"), ("outcome", "refused_queue_full")))]
        == 1
    )
    assert samples[("cooldown_upstream_429_total", (("kind", "quota"), ("model", "m")))] == 1
    assert samples[("cooldown_queue_depth", ())] == 1
    assert samples[
        ("cooldown_limit_usage_ratio", (("limit", "tpm"), ("model", "m")))
    ] == pytest.approx(0.973, abs=0.02)
    assert samples[("cooldown_circuit_breaker_open", ())] == 0
    assert families["cooldown_queue_wait_seconds"].type == "histogram"
    assert samples[("cooldown_queue_wait_seconds_count", (("model", "m"),))] == 1
    assert samples[("cooldown_queue_oldest_held_seconds", (("model", "m"),))] >= 0
    assert samples[("cooldown_queue_next_release_seconds", (("model", "m"),))] > 0
    assert samples[("cooldown_estimate_to_actual_ratio_count", (("model", "m"),))] == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_forwarded_responses_carry_the_proxys_rate_limit_headers(addon_ctx):
    f = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 97})
    await addon_ctx.metering.request(f)
    f.response = ok_response(total_tokens=50)
    f.response.headers["x-ratelimit-remaining-tokens-minute"] = "123456"  # upstream's, untouched
    addon_ctx.metering.responseheaders(f)
    # A whole answer's headers reach the client with its body: the proxy adds its own then,
    # as upstream's answer is confirmed and before it is settled.
    assert "X-RateLimit-Limit-RPM" not in f.response.headers
    await addon_ctx.metering.response(f)
    headers = f.response.headers
    assert headers["X-RateLimit-Limit-RPM"] == "10"
    assert headers["X-RateLimit-Limit-TPM"] == "1000"
    assert headers["X-RateLimit-Remaining-RPM"] == "9"
    assert headers["X-RateLimit-Remaining-TPM"] == "900"  # 100 reserved, in flight
    assert headers["X-Cooldown-Estimated-Tokens"] == "100"
    assert float(headers["X-Cooldown-Wait"]) >= 0
    assert headers["x-ratelimit-remaining-tokens-minute"] == "123456"


@pytest.mark.parametrize(
    ("method", "path", "status", "ctype"),
    [
        ("GET", "/metrics", 200, "text/plain; version=0.0.4"),
        ("GET", "/metrics.json", 200, "application/json"),
        ("GET", "/nope", 404, "text/plain"),
        ("POST", "/metrics", 405, "text/plain"),  # with Allow: GET, HEAD
    ],
)
async def test_reserved_host_answers_status_pages_read_only(addon_ctx, method, path, status, ctype):
    f = tflow.tflow()
    f.request.host = "cooldown.local"
    f.request.scheme = "http"
    f.request.port = 80
    f.request.method = method
    f.request.path = path
    addon_ctx.pages.request(f)
    assert f.response is not None
    await addon_ctx.metering.request(f)  # answered already: not metered
    assert f.response.status_code == status
    assert f.response.headers["content-type"].startswith(ctype)
    if status == 405:
        assert f.response.headers["allow"] == "GET, HEAD"


async def test_separate_listener_serves_metrics(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics_listen: 127.0.0.1:0\n")
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        cooldown.pages.running()
        await until(
            lambda: cooldown.pages.listener is not None and cooldown.pages.listener.serving,
            steps=10_000,
        )
        port = cooldown.pages.listener.port
        async with httpx.AsyncClient(trust_env=False) as client:
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
            as_json = await client.get(f"http://127.0.0.1:{port}/metrics.json")
            post = await client.post(f"http://127.0.0.1:{port}/metrics")
        assert metrics.status_code == 200 and b"cooldown_queue_depth" in metrics.content
        assert as_json.json()["cerebras_queue_depth"] == 0
        assert post.status_code == 405
        cooldown.pages.done()


def test_status_command_prints_json(addon_ctx):
    status = json.loads(addon_ctx.pages.status_command())
    assert status["cerebras_queue_depth"] == 0
    assert status["breaker_state"] == "closed"


def test_foreign_usage_is_shown_per_model():
    """Another client of the organization using 20 tokens a second shows as ~1,200/min."""
    from cooldown.config import parse_config
    from cooldown.gate import Gate
    from cooldown.metrics import Metrics
    from cooldown.upstream import RateReport

    from .helpers import FakeClock

    clock = FakeClock()
    gate = Gate(parse_config({"models": {"m": {"tpm_limit": 6_000}}}), clock=clock)
    metrics = Metrics(gate)
    left = 1_000
    gate.observe("m", [RateReport("tokens", 60.0, 6_000, left, 0.0)])
    for _ in range(12):
        clock.advance(5)
        left += (100 - 20) * 5  # the bucket refills 100 a second; someone else takes 20
        gate.observe("m", [RateReport("tokens", 60.0, 6_000, left, 0.0)])
    assert metrics.snapshot()["foreign_tokens_per_minute"]["m"] == pytest.approx(1_200, rel=0.05)
    families = {f.name: f for f in text_string_to_metric_families(metrics.prometheus().decode())}
    (sample,) = families["cooldown_foreign_tokens_per_minute"].samples
    assert sample.labels == {"model": "m"}
    assert sample.value == pytest.approx(1_200, rel=0.05)


async def test_the_scrape_listener_refuses_an_oversized_request_head():
    """It buffers at most 16 KiB of request head: more is answered 431 and closed, so a
    client cannot make it hold megabytes (mitmproxy's own listener is another matter)."""
    from cooldown.listener import MetricsListener

    listener = MetricsListener("127.0.0.1", 0, lambda path: (200, "text/plain", b"ok\n"))
    await listener.start()
    try:

        async def ask(head: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(head)
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer

        padding = b"X-Pad: " + b"a" * 40_000 + b"\r\n"
        huge = await ask(b"GET /metrics HTTP/1.1\r\n" + padding + b"\r\n")
        normal = await ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        listener.close()
    assert huge.startswith(b"HTTP/1.1 431 ")
    assert normal.startswith(b"HTTP/1.1 200 ") and normal.endswith(b"ok\n")


def test_the_prometheus_page_is_rendered_at_most_once_a_second(addon_ctx, monkeypatch):
    """A client scraping in a loop gets the page as rendered within the last second: it
    cannot make the event loop render 64 models' series over and over."""
    import cooldown.pages as pages

    renders = []
    real = addon_ctx.runtime.metrics.prometheus
    monkeypatch.setattr(
        addon_ctx.runtime.metrics, "prometheus", lambda: renders.append(1) or real()
    )
    now = [1000.0]
    monkeypatch.setattr(pages, "clock", lambda: now[0])
    first = addon_ctx.pages.render("/metrics")[2]
    now[0] += pages.RENDER_TTL / 2
    assert addon_ctx.pages.render("/metrics")[2] is first
    now[0] += pages.RENDER_TTL
    addon_ctx.pages.render("/metrics")
    assert len(renders) == 2
    json_first = addon_ctx.pages.render("/metrics.json")[2]
    assert addon_ctx.pages.render("/metrics.json")[2] is not json_first  # always fresh
