"""The prompt cache through the addon: prediction at admission, both buckets settled from
`usage`, the learnt correction, the header, the comment and the metrics."""

import asyncio
import json

import pytest
from mitmproxy.test import taddons, tutils

from cooldown.addon import Cooldown

from .helpers import FakeClock
from .test_addon import cerebras_flow, until

SYSTEM = {"role": "system", "content": "You are a careful coding agent. " * 300}  # ~2,100 tokens


def body(*turns: str, out: int = 100) -> dict:
    messages = [SYSTEM] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text}
        for i, text in enumerate(turns)
    ]
    return {"model": "m", "messages": messages, "max_completion_tokens": out}


def answer(prompt: int, completion: int, cached: int | None) -> object:
    usage: dict = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return tutils.tresp(
        content=json.dumps({"choices": [], "usage": usage}).encode(),
        headers=[(b"content-type", b"application/json")],
    )


@pytest.fixture
def proxy(tmp_path):
    def start(extra: str = "", tpm: int = 100_000):
        path = tmp_path / "c.yaml"
        path.write_text(
            f"cerebras_limits: {{rpm_limit: 100, tpm_limit: {tpm}, probe_first: false,"
            " max_retries: 0}\n" + extra
        )
        cooldown = Cooldown()
        context = taddons.context(*cooldown.addons)
        tctx = context.__enter__()
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        cooldown.runtime.gate.clock = FakeClock()  # buckets do not refill under the test
        started.append(context)
        return cooldown

    started: list = []
    yield start
    for context in started:
        context.__exit__(None, None, None)


async def exchange(cooldown, request_body, response):
    f = cerebras_flow(request_body)
    await cooldown.metering.request(f)
    f.response = response
    cooldown.metering.responseheaders(f)
    await cooldown.metering.response(f)  # a whole answer gets the proxy's headers here
    return f, dict(f.response.headers)


async def test_the_second_turn_is_predicted_cached_and_both_buckets_settle_apart(proxy):
    cooldown = proxy()
    runtime = cooldown.runtime
    _, headers = await exchange(cooldown, body("step one"), answer(2_100, 50, 0))
    assert headers["X-Cooldown-Cached-Tokens"] == "0"  # nothing seen yet
    assert "X-RateLimit-Limit-Total-TPM" in headers
    second_body = body("step one", "done", "step two")
    f = cerebras_flow(second_body)
    await cooldown.metering.request(f)
    predicted = f.metadata["cooldown_cached_predicted"]
    assert predicted >= 1_920  # the system prompt's full blocks, at least
    status = runtime.gate.status()
    estimate = f.metadata["cooldown_estimate"]
    # `full` admission: both buckets hold the whole estimate while in flight.
    used_tpm = status["usage"]["m"]["tpm"] * 100_000
    used_total = status["total_usage"]["m"] * 300_000
    assert used_tpm == pytest.approx(2_150 + estimate)
    assert used_total == pytest.approx(2_150 + estimate)
    f.response = answer(2_130, 40, predicted)
    cooldown.metering.responseheaders(f)
    await cooldown.metering.response(f)
    status = runtime.gate.status()
    # Settled: the uncached bucket keeps prompt - cached + completion, the total one all.
    assert status["usage"]["m"]["tpm"] * 100_000 == pytest.approx(
        2_150 + 2_130 - predicted + 40, abs=2
    )
    assert status["total_usage"]["m"] * 300_000 == pytest.approx(2_150 + 2_170, abs=0.01)
    assert f.metadata["cooldown_cached_tokens"] == predicted
    assert f"({predicted} cached)" in f.comment
    snapshot = runtime.metrics.snapshot()
    figures = snapshot["prompt_cache"]["models"]["m"]
    assert figures["cached_share"] == pytest.approx(predicted / (2_100 + 2_130), abs=1e-3)
    assert figures["predicted_over_reported"] == pytest.approx(1.0)
    assert snapshot["open_reservations"] == 0
    prometheus = runtime.metrics.prometheus().decode()
    assert 'cooldown_cached_input_ratio{model="m"}' in prometheus
    assert 'cooldown_limit_usage_ratio{limit="total_tpm",model="m"}' in prometheus


async def test_predicted_admission_reserves_only_the_uncached_input(proxy):
    cooldown = proxy("prompt_cache: {admission: predicted}\n")
    await exchange(cooldown, body("step one"), answer(2_100, 50, 0))
    before = cooldown.runtime.gate.status()["usage"]["m"]["tpm"] * 100_000
    f = cerebras_flow(body("step one", "done", "step two"))
    await cooldown.metering.request(f)
    predicted = f.metadata["cooldown_cached_predicted"]
    in_flight = cooldown.runtime.gate.status()["usage"]["m"]["tpm"] * 100_000 - before
    assert predicted > 0
    assert in_flight == pytest.approx(f.metadata["cooldown_estimate"] - predicted, abs=0.01)


async def test_an_upstream_that_caches_nothing_is_learnt(proxy):
    cooldown = proxy("prompt_cache: {admission: predicted}\n")
    for _ in range(4):
        await exchange(cooldown, body("same question"), answer(2_100, 50, 0))
    f = cerebras_flow(body("same question"))
    await cooldown.metering.request(f)
    assert f.metadata["cooldown_cached_predicted"] == 0  # fell back to charging everything


async def test_a_cache_blind_proxy_is_as_before(proxy):
    cooldown = proxy("prompt_cache: {enabled: false}\n")
    f, headers = await exchange(cooldown, body("step one"), answer(2_100, 50, 2_000))
    assert "X-Cooldown-Cached-Tokens" not in headers
    assert "X-RateLimit-Limit-Total-TPM" not in headers
    status = cooldown.runtime.gate.status()
    assert status["total_usage"] == {}
    assert status["usage"]["m"]["tpm"] * 100_000 == pytest.approx(2_150, abs=1)  # all of it
    assert "cached" not in f.comment


async def test_a_429_naming_the_total_bucket_cools_that_bucket(proxy):
    cooldown = proxy()
    f = cerebras_flow(body("step one"))
    await cooldown.metering.request(f)
    f.response = tutils.tresp(
        status_code=429,
        content=json.dumps(
            {
                "message": "Total tokens per minute limit exceeded - too many tokens processed.",
                "type": "too_many_tokens_error",
                "param": "quota",
                "code": "token_quota_exceeded",
            }
        ).encode(),
    )
    cooldown.metering.responseheaders(f)
    await cooldown.metering.response(f)
    assert cooldown.runtime.gate.status()["total_usage"]["m"] == pytest.approx(1.0, abs=0.01)
    assert cooldown.runtime.gate.status()["usage"]["m"]["tpm"] == pytest.approx(0.0, abs=0.01)


async def test_a_held_request_is_predicted_again_when_released(proxy):
    """The first of a team's wave is in flight when the second arrives (nothing cached yet);
    once upstream has answered the first, the second, released then, expects its prefix."""
    cooldown = proxy(tpm=4_000)
    first = cerebras_flow(body("one"))
    await cooldown.metering.request(first)
    second = cerebras_flow(body("two"))
    task = asyncio.ensure_future(cooldown.metering.request(second))
    await until(lambda: cooldown.runtime.gate.depth == 1)
    assert second.metadata["cooldown_cached_predicted"] == 0
    first.response = answer(2_100, 10, 2_000)  # mostly cached: frees room for the second
    cooldown.metering.responseheaders(first)
    await cooldown.metering.response(first)
    await task
    second.response = answer(2_100, 10, 1_920)
    cooldown.metering.responseheaders(second)
    await cooldown.metering.response(second)
    predicted = int(second.response.headers["X-Cooldown-Cached-Tokens"])
    assert predicted >= 1_920
    assert f"{predicted} cached (predicted)" in second.comment  # mitmweb shows the new one
