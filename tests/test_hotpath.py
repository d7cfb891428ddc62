"""The hot-path shortcuts (issue 12) give the same answers as the straightforward code."""

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow
from prometheus_client.parser import text_string_to_metric_families

from cooldown import estimate
from cooldown.config import Config
from cooldown.estimate import _texts, count_text_tokens, parse_request
from cooldown.flows import header_values, prepare, take_priority
from cooldown.gate import Gate
from cooldown.limiter import RateReport
from cooldown.metrics import Metrics
from cooldown.upstream import _number, _number_of, parse_rate_headers, reports_from

# -- x-ratelimit-* parsing: the table lookup finds what the regex found -------------------------

_RATE_HEADER = re.compile(
    r"x-ratelimit-(limit|remaining|reset)-(requests|tokens)-(minute|hour|day)"
)


def reference_rate_headers(pairs: list[tuple[str, str]]) -> list[RateReport]:
    """The parser as it was: a regex over every (latin-1 decoded) name."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for name, value in pairs:
        match = _RATE_HEADER.fullmatch(name.lower())
        if match is None:
            continue
        number = _number(value)
        if number is not None:
            kind, unit, period = match.groups()
            found.setdefault((unit, period), {})[kind] = number
    return reports_from(found)  # the same assembly: only the finding of names differs


_NAMES = [
    f"{prefix}-{kind}-{unit}-{period}"
    for prefix in ("x-ratelimit", "X-RateLimit", "X-RATELIMIT")
    for kind in ("limit", "remaining", "reset", "used")
    for unit in ("requests", "tokens")
    for period in ("minute", "hour", "day", "week")
] + ["content-type", "x-ratelimit-", "x-ratelimit-limit-tokens-minutes", "X-Ratelimit-Lïmit"]
_VALUES = ["0", "100", " 250 ", "1.5", "1e3", "-3", "nan", "inf", "", "x", "12\xa0", "9" * 30]


@given(
    st.lists(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)),
        max_size=20,
    )
)
def test_rate_headers_match_the_regex_parser(pairs: list[tuple[str, str]]) -> None:
    expected = reference_rate_headers(pairs)
    headers = http.Headers([(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs])
    assert parse_rate_headers(headers) == expected
    lower_dict = {}
    for name, value in pairs:  # a plain mapping with lower-case keys: the last value wins
        lower_dict[name.lower()] = value
    assert parse_rate_headers(lower_dict) == reference_rate_headers(list(lower_dict.items()))


@pytest.mark.parametrize("value", [*_VALUES, "\xa012\xa0", "\x8512", "1_000", "+7"])
def test_a_raw_value_reads_as_its_decoded_text(value: str) -> None:
    assert _number_of(value.encode("latin-1")) == _number(value)


def test_rate_headers_with_non_ascii_names_are_ignored() -> None:
    headers = http.Headers(
        [
            (b"X-RATELIMIT-LIMIT-TOKENS-MINUTE", b"100"),
            (b"x-ratelimit-remaining-tokens-minute", b"40"),
            ("x-ratelimit-limit-tokens-\xc4ay".encode("latin-1"), b"5"),
        ]
    )
    assert parse_rate_headers(headers) == [RateReport("tokens", 60.0, 100, 40, 60.0)]


# -- token counting: the walk and the cache change no count -------------------------------------

_TEXT = st.text(alphabet=st.sampled_from("ab cé\n{}\"'🙂<|endoftext|>"), max_size=30)
_LEAF = _TEXT | st.integers() | st.none() | st.booleans()
_KEYS = st.sampled_from(
    [
        "role",
        "content",
        "text",
        "name",
        "arguments",
        "refusal",
        "reasoning",
        "tool_calls",
        "function",
        "type",
        "other",
    ]
)
_VALUE = st.recursive(
    _LEAF,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=25,
)


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"content": [value, "x"]}
    return value


@given(_VALUE)
def test_text_walk_counts_what_texts_yields(value: Any) -> None:
    texts: Iterator[str] = _texts(value)
    assert estimate._text_tokens(value) == sum(count_text_tokens(t) for t in texts)


@pytest.mark.parametrize("depth", [10, 16, 17, 40])
def test_text_walk_stops_at_the_same_depth(depth: int) -> None:
    value = _deep(depth)
    assert estimate._text_tokens(value) == sum(count_text_tokens(t) for t in _texts(value))


def _uncached(text: str) -> int:
    return len(estimate._encoding().encode_ordinary(text))


@given(_TEXT)
def test_cached_counts_equal_fresh_ones(text: str) -> None:
    first = count_text_tokens(text)
    assert first == count_text_tokens(text) == (_uncached(text) if text else 0)


def test_count_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    estimate.clear_count_cache()
    monkeypatch.setattr(estimate, "_COUNT_CACHE_MAX_ENTRIES", 8)
    monkeypatch.setattr(estimate, "_COUNT_CACHE_MAX_CHARS", 100)
    monkeypatch.setattr(estimate, "_COUNT_CACHE_MAX_TEXT", 40)
    texts = [f"text number {i} " * 2 for i in range(30)]
    for text in texts:
        assert count_text_tokens(text) == _uncached(text)
    assert len(estimate._COUNT_CACHE) <= 8
    assert estimate._count_cache_chars == sum(map(len, estimate._COUNT_CACHE)) <= 100
    assert texts[-1] in estimate._COUNT_CACHE  # the newest stay, the oldest went
    assert texts[0] not in estimate._COUNT_CACHE
    long = "y" * 41
    assert count_text_tokens(long) == _uncached(long)
    assert long not in estimate._COUNT_CACHE  # too long to keep
    estimate.clear_count_cache()
    assert not estimate._COUNT_CACHE and estimate._count_cache_chars == 0


def test_request_estimate_is_the_same_cold_and_warm() -> None:
    body = (
        b'{"model":"m","messages":[{"role":"system","content":"Be terse."},'
        b'{"role":"user","content":[{"type":"text","text":"Hello there"}]}],'
        b'"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],'
        b'"max_completion_tokens":10}'
    )
    estimate.clear_count_cache()
    cold = parse_request("/v1/chat/completions", body)
    warm = parse_request("/v1/chat/completions", body)
    assert cold == warm
    assert cold.input_tokens == (
        estimate.TOKENS_PER_REPLY
        + 2 * estimate.TOKENS_PER_MESSAGE
        + sum(_uncached(t) for t in ("system", "Be terse.", "user", "Hello there"))
        + _uncached('[{"type":"function","function":{"name":"f","parameters":{}}}]')
    )


# -- metrics: cached children expose exactly the same series ------------------------------------


def _series(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.prometheus().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_metrics_series_are_created_by_the_same_events() -> None:
    metrics = Metrics(Gate(Config()))
    metrics.request_outcome("a", "cancelled", 3.0)
    names = {name for name, _ in _series(metrics)}
    assert "cooldown_queue_wait_seconds_count" not in names  # a cancel observes no wait
    assert metrics.snapshot()["queue_wait_seconds"] == {}
    for waited in (0.0, 0.02, 7.0):
        metrics.request_outcome("a", "forwarded", waited)
    metrics.request_outcome("b", "refused_timeout", 600.0)
    metrics.request_outcome("a", "cancelled", 1.0)
    metrics.estimate_vs_actual("a", 120, 100)
    metrics.estimate_vs_actual("a", 80, 100)
    metrics.estimate_vs_actual("a", 80, 0)  # ignored
    series = _series(metrics)
    assert series[("cooldown_requests_total", (("model", "a"), ("outcome", "forwarded")))] == 3
    assert series[("cooldown_requests_total", (("model", "a"), ("outcome", "cancelled")))] == 2
    assert series[("cooldown_queue_wait_seconds_count", (("model", "a"),))] == 3
    assert series[("cooldown_queue_wait_seconds_sum", (("model", "a"),))] == pytest.approx(7.02)
    assert series[("cooldown_queue_wait_seconds_count", (("model", "b"),))] == 1
    assert series[("cooldown_estimate_to_actual_ratio_count", (("model", "a"),))] == 2
    snapshot = metrics.snapshot()
    assert snapshot["requests"] == {
        "a": {"cancelled": 2, "forwarded": 3},
        "b": {"refused_timeout": 1},
    }
    assert snapshot["queue_wait_seconds"]["a"]["count"] == 3
    assert snapshot["estimate_to_actual_ratio"]["a"]["count"] == 2


# -- header reading: one pass over the raw fields finds what mitmproxy's Headers finds ----------

_HEADER_NAMES = [
    "Authorization",
    "authorization",
    "AUTHORIZATION",
    "X-Cooldown-Priority",
    "x-cooldown-priority",
    "Content-Encoding",
    "content-encoding",
    "Content-Type",
    "Host",
    "X-Other",
]
_HEADER_VALUES = ["Bearer sk-1", "bearer  sk-2 ", "high", "low", "gzip", "", "x\xe9"]


@given(
    st.lists(st.tuples(st.sampled_from(_HEADER_NAMES), st.sampled_from(_HEADER_VALUES)), max_size=8)
)
def test_take_priority_reads_what_headers_say(pairs: list[tuple[str, str]]) -> None:
    fields = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]
    request = http.Request.make("POST", "http://api.cerebras.ai/v1/chat/completions", b"{}")
    request.headers = http.Headers(fields)
    reference = http.Headers(fields)
    first = {n.lower(): v for n, v in reversed(pairs)}  # the first value of each name
    sent = take_priority(request)
    assert sent.priority == first.get("x-cooldown-priority")
    assert sent.authorization == first.get("authorization")
    assert sent.encoded == ("content-encoding" in reference)
    assert "x-cooldown-priority" not in request.headers
    assert [f for f in request.headers.fields if f[0].lower() != b"x-cooldown-priority"] == [
        f for f in fields if f[0].lower() != b"x-cooldown-priority"
    ]
    names = (b"content-type", b"content-encoding", b"authorization", b"content-type")
    assert header_values(reference, *names) == [first.get(n.decode()) for n in names]


async def test_an_encoded_request_body_is_estimated_decoded() -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hello " * 50}]}
    ).encode()
    plain = tflow.tflow()
    plain.request.path = "/v1/chat/completions"
    plain.request.content = body
    packed = tflow.tflow()
    packed.request.path = "/v1/chat/completions"
    packed.request.headers["content-encoding"] = "gzip"
    packed.request.content = body  # encoded as the header says
    assert packed.request.raw_content != body
    plain_shape = await prepare(plain, None, take_priority(plain.request).encoded)
    packed_sent = take_priority(packed.request)
    assert packed_sent.encoded
    packed_shape = await prepare(packed, None, packed_sent.encoded)
    assert packed_shape == plain_shape
    assert plain_shape.understood and plain_shape.input_tokens > 50


# -- hooks given to mitmproxy only while they have something to do -----------------------------


async def test_the_update_hooks_are_there_only_while_something_is_held(tmp_path) -> None:
    from tests.helpers import running_cooldown
    from tests.test_addon import cerebras_flow

    config = "cerebras_limits:\n  rpm_limit: 1\n  probe_first: false\n"
    with running_cooldown(tmp_path, config) as cooldown:
        departures, pacing = cooldown.departures, cooldown.pacing
        assert departures.update is None and pacing.update is None
        assert pacing.request is None  # no rate_limits, no default_rate_limit
        await cooldown.metering.request(cerebras_flow())  # the minute's only request
        assert departures.update is None
        held = cerebras_flow()
        task = asyncio.ensure_future(cooldown.metering.request(held))
        for _ in range(50):
            await asyncio.sleep(0)
            if held.intercepted:
                break
        assert held.intercepted and cooldown.metering.table.held == 1
        assert callable(departures.update)
        held.kill()
        departures.update([held])  # what mitmproxy calls after the kill
        await task
        assert cooldown.metering.table.held == 0
        assert departures.update is None


def test_the_pacing_request_hook_is_there_with_pacing_rules(tmp_path) -> None:
    from tests.helpers import running_cooldown

    config = "rate_limits:\n  - domain: '*.example.com'\n    requests_per_second: 5\n"
    with running_cooldown(tmp_path, config) as cooldown:
        assert callable(cooldown.pacing.request)
