"""What clients name and who they are: bounded model names, API-key fingerprints, and each
client's share of the queue (issue 15)."""

import json

import pytest
from mitmproxy.test import taddons, tflow

from cooldown.addon import Cooldown
from cooldown.breaker import CircuitBreaker
from cooldown.config import BreakerConfig, CerebrasLimits, Config, ConfigError, parse_config
from cooldown.limiter import MemoryLimiter, Rate
from cooldown.routing import MAX_MODEL_NAME, OTHER_MODELS_KEY, client_of, key_for
from cooldown.scheduler import Outcome, Scheduler

SECRET = "sk-live-0123456789abcdefSECRET"


def flow_from(authorization: str | None = None, body: dict | None = None):
    f = tflow.tflow()
    f.request.host = "api.cerebras.ai"
    f.request.method = "POST"
    f.request.path = "/v1/chat/completions"
    if authorization is not None:
        f.request.headers["authorization"] = authorization
    body = body or {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    f.request.content = json.dumps(body).encode()
    return f


# -- model names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "becomes"),
    [
        ("llama-3.3-70b", "llama-3.3-70b"),
        ("org/model:v2@a+b", "org/model:v2@a+b"),
        ("x" * MAX_MODEL_NAME, "x" * MAX_MODEL_NAME),
        ("x" * (MAX_MODEL_NAME + 1), OTHER_MODELS_KEY),
        ("x" * 256 * 1024, OTHER_MODELS_KEY),
        ("with space", OTHER_MODELS_KEY),
        ('quote"s', OTHER_MODELS_KEY),
        ("new\nline", OTHER_MODELS_KEY),
        ("ünïcode", OTHER_MODELS_KEY),
        ("", OTHER_MODELS_KEY),
    ],
)
def test_a_model_name_becomes_a_key_only_if_short_and_of_safe_characters(name, becomes):
    assert key_for(Config(), set(), name) == becomes


def test_a_configured_model_keeps_its_key_whatever_is_known():
    config = parse_config({"models": {"my model": {"tpm_limit": 10}}})
    assert key_for(config, {f"n{i}" for i in range(100)}, "my model") == "my model"


def test_pages_stay_small_whatever_names_clients_send(tmp_path):
    """70 names of 256 KiB and 200 invented ones: at most 64 keys, pages of a few hundred KB."""
    path = tmp_path / "c.yaml"
    path.write_text("cerebras_limits: {max_queue_share_per_client: 1}\n")
    cooldown = Cooldown()

    async def send_all():
        for i in range(70):
            body = {"model": f"{i}-" + "n" * 256 * 1024, "messages": [], "max_tokens": 1}
            await cooldown.metering.request(flow_from(body=body))
        for i in range(200):
            body = {"model": f"invented-{i}-" + "n" * 200, "messages": [], "max_tokens": 1}
            await cooldown.metering.request(flow_from(body=body))

    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        tctx.master.event_loop.run_until_complete(send_all())
        keys = cooldown.runtime.gate.keys
        prometheus = cooldown.runtime.metrics.prometheus()
        as_json = json.dumps(cooldown.runtime.metrics.snapshot())
    assert len(keys) <= 65  # 64 names and the shared key
    assert OTHER_MODELS_KEY in keys
    assert max(len(key) for key in keys) <= MAX_MODEL_NAME
    assert len(prometheus) < 2_000_000 and len(as_json) < 2_000_000
    assert b"n" * 300 not in prometheus


# -- who a client is -------------------------------------------------------------------------


def test_a_client_is_named_by_a_fingerprint_of_its_key_never_the_key():
    name = client_of(flow_from(f"Bearer {SECRET}"))
    assert name.startswith("sha256:") and len(name) == len("sha256:") + 12
    assert SECRET not in name and SECRET[-12:] not in name
    assert client_of(flow_from(f"bearer   {SECRET}")) == name  # scheme case, extra spaces
    assert client_of(flow_from("Bearer another-key")) != name


def test_without_a_key_a_client_is_its_address():
    f = flow_from()
    assert client_of(f) == f"address:{f.client_conn.peername[0]}"
    assert client_of(flow_from("Basic dXNlcjpwYXNz")).startswith("address:")


# -- each client's share of the queue --------------------------------------------------------


def scheduler(share: float, depth: int = 10) -> Scheduler:
    limits = CerebrasLimits(
        rpm_limit=1,
        max_queue_depth=depth,
        max_queue_share_per_client=share,
        probe_first=False,
    )
    rates = (Rate("rpm", "requests", 1),)
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=3, open_duration=30))
    return Scheduler(MemoryLimiter(), limits, breaker, lambda key: rates)


def test_one_client_cannot_hold_more_than_its_share_and_others_still_get_in():
    s = scheduler(share=0.5)
    assert s.submit("m", 1, 0, client="a").outcome is Outcome.RELEASED  # uses the rpm
    flood = [s.submit("m", 1, 0, client="a") for _ in range(20)]
    held = [t for t in flood if t.held]
    refused = [t for t in flood if t.outcome is Outcome.CLIENT_QUEUE_FULL]
    assert len(held) == 5 and len(refused) == 15
    assert all(t.retry_after >= 1 for t in refused)
    others = [s.submit("m", 1, 0, client="b") for _ in range(5)]
    assert all(t.held for t in others)  # the queue had room left for them
    assert s.shares.held() == {"a": 5, "b": 5}


def test_a_share_frees_as_its_requests_leave_and_retries_are_never_refused_for_it():
    s = scheduler(share=0.2)
    s.submit("m", 1, 0, client="a")  # released
    first, second = (s.submit("m", 1, 0, client="a") for _ in range(2))
    assert first.held and second.held
    assert s.submit("m", 1, 0, client="a").outcome is Outcome.CLIENT_QUEUE_FULL
    assert s.submit("m", 1, 0, client="a", requeue=True).held  # a retry was admitted once
    s.cancel(first, 1)
    assert s.shares.held() == {"a": 2}
    s.cancel(second, 1)
    assert s.submit("m", 1, 1, client="a").held
    assert s.submit("m", 1, 1).held  # no client known: only the whole queue bounds it


def test_a_share_of_one_is_the_whole_queue():
    s = scheduler(share=1.0, depth=3)
    s.submit("m", 1, 0, client="a")  # released
    assert [s.submit("m", 1, 0, client="a").outcome for _ in range(4)] == [
        None,
        None,
        None,
        Outcome.QUEUE_FULL,
    ]


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "half", True])
def test_a_share_outside_0_to_1_is_a_config_error(value):
    with pytest.raises(ConfigError, match="max_queue_share_per_client"):
        parse_config({"cerebras_limits": {"max_queue_share_per_client": value}})


def test_the_proxy_answers_a_client_over_its_share_itself(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "cerebras_limits: {rpm_limit: 1, max_queue_depth: 4, max_queue_share_per_client: 0.5}\n"
    )
    cooldown = Cooldown()
    flows = [flow_from(f"Bearer {SECRET}") for _ in range(4)] + [flow_from("Bearer other")]
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        loop = tctx.master.event_loop
        tasks = [loop.create_task(cooldown.metering.request(f)) for f in flows]
        loop.run_until_complete(_settle(loop))
        snapshot = cooldown.runtime.metrics.snapshot()
        cooldown.runtime.gate.shutdown()
        loop.run_until_complete(_gather(tasks))
    refused = flows[3].response
    assert refused is not None and refused.status_code == 429
    assert refused.headers["X-Cooldown-Refused"] == "client_queue_full"
    assert "max_queue_share_per_client" in refused.json()["error"]["message"]
    assert SECRET not in json.dumps(snapshot)
    assert sorted(snapshot["queue_by_client"].values()) == [1, 2]  # 2 of ours, the other's 1
    assert snapshot["requests"]["m"]["refused_client_queue_full"] == 1


async def _settle(loop):
    import asyncio

    for _ in range(50):
        await asyncio.sleep(0)


async def _gather(tasks):
    import asyncio

    await asyncio.gather(*tasks, return_exceptions=True)
