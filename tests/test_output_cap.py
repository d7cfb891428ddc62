"""max_completion_tokens_cap: the request that goes upstream, the header, the metric."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import tutils

from cooldown.config import parse_config
from cooldown.estimate import clamp_output
from cooldown.flows import prepare_request
from tests.helpers import running_cooldown
from tests.test_addon import cerebras_flow, ok_response

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("document", "path", "after", "said"),
    [
        (
            {"max_completion_tokens": 32768},
            CHAT,
            {"max_completion_tokens": 8192},
            "max_completion_tokens=32768->8192",
        ),
        ({"max_tokens": 9000}, CHAT, {"max_tokens": 8192}, "max_tokens=9000->8192"),
        ({"max_completion_tokens": 100}, CHAT, {"max_completion_tokens": 100}, None),
        ({}, CHAT, {"max_completion_tokens": 8192}, "max_completion_tokens=unset->8192"),
        ({}, "/v1/completions", {"max_tokens": 8192}, "max_tokens=unset->8192"),
        (
            {"max_completion_tokens": None, "max_tokens": "lots"},
            CHAT,
            {"max_completion_tokens": 8192},
            "max_completion_tokens=unset->8192",
        ),
        (
            {"max_completion_tokens": 10_000, "max_tokens": 20_000},
            CHAT,
            {"max_completion_tokens": 8192, "max_tokens": 8192},
            "max_completion_tokens=10000->8192, max_tokens=20000->8192",
        ),
    ],
)
def test_clamp_output(document, path, after, said):
    assert clamp_output(document, path, 8192) == said
    assert document == after


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cap=st.integers(1, 200_000),
    fields=st.dictionaries(
        st.sampled_from(["max_completion_tokens", "max_tokens"]),
        st.one_of(st.integers(0, 10**6), st.none(), st.text(max_size=3), st.booleans()),
    ),
)
def test_after_clamping_no_output_field_exceeds_the_cap_and_one_is_set(cap, fields):
    document = dict(fields)
    clamp_output(document, CHAT, cap)
    numbers = [v for v in document.values() if isinstance(v, int) and not isinstance(v, bool)]
    assert numbers, document  # upstream always sees an output limit
    assert all(0 <= v <= cap for v in numbers)
    assert len(document) <= 2


def test_prepare_request_clamps_and_the_estimate_follows():
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000}
    ).encode()
    shape, new_body, added_usage = prepare_request(CHAT, body, lambda model: 1024)
    assert json.loads(new_body)["max_tokens"] == 1024
    assert shape.requested_output == 1024 and not added_usage
    assert shape.clamped == "max_tokens=8000->1024"
    assert shape.estimate(131_072).output_tokens == 1024
    # No cap for this model: the body stays as it is.
    assert prepare_request(CHAT, body, lambda model: None)[1] is None


def test_a_stream_is_clamped_and_asked_for_usage_in_one_edit():
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    _, new_body, added_usage = prepare_request(CHAT, body, lambda model: 512)
    sent = json.loads(new_body)
    assert sent["stream_options"] == {"include_usage": True} and added_usage
    assert sent["max_completion_tokens"] == 512


def test_the_cap_is_per_model_with_a_default():
    config = parse_config(
        {
            "cerebras_limits": {"max_completion_tokens_cap": 8192},
            "models": {"qwen-3-coder": {"max_completion_tokens_cap": 1024}},
        }
    )
    assert config.output_cap("qwen-3-coder") == 1024
    assert config.output_cap("llama3.1-8b") == 8192
    assert config.output_cap(None) == 8192
    assert parse_config({}).output_cap("m") is None


async def test_the_clamped_request_goes_upstream_with_the_cap_and_the_answer_says_so(tmp_path):
    config = "models:\n  m:\n    max_completion_tokens_cap: 1024\n"
    with running_cooldown(tmp_path, config) as cooldown:
        addon = cooldown.metering
        f = cerebras_flow(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000}
        )
        await addon.request(f)
        assert json.loads(f.request.content)["max_tokens"] == 1024
        assert f.metadata["cooldown_estimate"] < 1100
        f.response = ok_response()
        addon.responseheaders(f)
        await addon.response(f)
        assert f.response.headers["X-Cooldown-Clamped"] == "max_tokens=8000->1024"
        untouched = cerebras_flow()  # asks for 10: under the cap
        await addon.request(untouched)
        untouched.response = tutils.tresp(headers=[(b"content-type", b"application/json")])
        addon.responseheaders(untouched)
        await addon.response(untouched)
        assert "X-Cooldown-Estimated-Tokens" in untouched.response.headers
        assert "X-Cooldown-Clamped" not in untouched.response.headers
        assert cooldown.runtime.metrics.snapshot()["clamped_requests"] == {"m": 1}
        assert b'cooldown_clamped_requests_total{model="m"} 1.0' in (
            cooldown.runtime.metrics.prometheus()
        )
