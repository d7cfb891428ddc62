import gzip
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cooldown.estimate import (
    TOKENS_PER_MESSAGE,
    TOKENS_PER_REPLY,
    count_text_tokens,
    estimate_request,
)

CHAT = "/v1/chat/completions"
CONTEXT = 8192


def chat(messages, **extra):
    return json.dumps({"model": "llama3.1-8b", "messages": messages, **extra}).encode()


def test_chat_input_counts_text_roles_and_template_overhead():
    text = "The quick brown fox jumps over the lazy dog."
    est = estimate_request(CHAT, chat([{"role": "user", "content": text}], max_tokens=50), CONTEXT)
    expected = (
        TOKENS_PER_REPLY + TOKENS_PER_MESSAGE + count_text_tokens("user") + count_text_tokens(text)
    )
    assert est.input_tokens == expected
    assert est.output_tokens == 50
    assert est.total == expected + 50
    assert est.model == "llama3.1-8b"
    assert est.understood


def test_max_completion_tokens_wins_over_max_tokens():
    body = chat([{"role": "user", "content": "hi"}], max_completion_tokens=7, max_tokens=900)
    assert estimate_request(CHAT, body, CONTEXT).output_tokens == 7


def test_without_output_limit_cerebras_reserves_context_minus_input():
    est = estimate_request(CHAT, chat([{"role": "user", "content": "hi"}]), CONTEXT)
    assert est.total == CONTEXT


def test_input_larger_than_context_reserves_no_output():
    big = "word " * 3000
    est = estimate_request(CHAT, chat([{"role": "user", "content": big}]), 1000)
    assert est.output_tokens == 0
    assert est.input_tokens > 1000


def test_text_parts_count_and_more_messages_cost_more():
    one = estimate_request(
        CHAT, chat([{"role": "user", "content": "hello there"}], max_tokens=1), CONTEXT
    )
    parts = estimate_request(
        CHAT,
        chat(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hello there"},
                        {"type": "text", "text": "again"},
                    ],
                }
            ],
            max_tokens=1,
        ),
        CONTEXT,
    )
    assert parts.input_tokens == one.input_tokens + count_text_tokens("again")
    two = estimate_request(
        CHAT,
        chat(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "hello there"}],
            max_tokens=1,
        ),
        CONTEXT,
    )
    assert two.input_tokens >= one.input_tokens + TOKENS_PER_MESSAGE


def test_tools_and_response_format_schemas_count():
    messages = [{"role": "user", "content": "weather?"}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the weather for a city, in degrees Celsius.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    plain = estimate_request(CHAT, chat(messages, max_tokens=1), CONTEXT).input_tokens
    with_tools = estimate_request(
        CHAT, chat(messages, max_tokens=1, tools=tools), CONTEXT
    ).input_tokens
    with_schema = estimate_request(
        CHAT, chat(messages, max_tokens=1, response_format=schema), CONTEXT
    ).input_tokens
    assert with_tools - plain >= count_text_tokens(
        "Get the weather for a city, in degrees Celsius."
    )
    assert with_schema > plain


def test_assistant_tool_calls_are_counted():
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"q": "a long query string"}'},
            }
        ],
    }
    base = estimate_request(
        CHAT, chat([{"role": "assistant", "content": None}], max_tokens=1), CONTEXT
    )
    est = estimate_request(CHAT, chat([call], max_tokens=1), CONTEXT)
    assert est.input_tokens >= base.input_tokens + count_text_tokens('{"q": "a long query string"}')


def test_n_choices_multiply_the_output_reservation():
    body = chat([{"role": "user", "content": "hi"}], max_tokens=100, n=3)
    assert estimate_request(CHAT, body, CONTEXT).output_tokens == 300


def test_legacy_completions_prompt():
    body = json.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": 20}).encode()
    est = estimate_request("/v1/completions", body, CONTEXT)
    assert est.input_tokens == count_text_tokens("Once upon a time")
    assert est.output_tokens == 20
    tokens = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 1}).encode()
    assert estimate_request("/v1/completions", tokens, CONTEXT).input_tokens == 3


def test_unknown_shapes_get_the_conservative_fallback():
    for body in [
        b"",
        b"not json",
        b"[1,2,3]",
        json.dumps({"messages": "nope"}).encode(),
        b"\xff\xfe\x00garbage",
    ]:
        est = estimate_request(CHAT, body, CONTEXT)
        assert not est.understood
        assert est.total >= CONTEXT
        assert est.input_tokens == len(body)


def test_compressed_body_that_was_not_decoded_is_still_estimated():
    body = gzip.compress(chat([{"role": "user", "content": "hi"}], max_tokens=5))
    est = estimate_request(CHAT, body, CONTEXT)
    assert est.total >= CONTEXT


def test_deeply_nested_json_does_not_raise():
    nested = "[" * 100_000 + "]" * 100_000
    est = estimate_request(CHAT, nested.encode(), CONTEXT)
    assert est.total >= 1
    deep_content = {"role": "user", "content": [{"text": [[["deep"]]]}]}
    assert estimate_request(CHAT, chat([deep_content], max_tokens=1), CONTEXT).total >= 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([CHAT, "/v1/completions", "/v1/other"]))
def test_any_bytes_give_a_positive_estimate(body, path):
    est = estimate_request(path, body, CONTEXT)
    assert isinstance(est.total, int)
    assert est.total > 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "messages",
                "prompt",
                "max_tokens",
                "max_completion_tokens",
                "n",
                "tools",
                "model",
                "response_format",
            ]
        ),
        json_values,
    )
)
def test_any_json_shape_gives_a_positive_estimate(document):
    for path in (CHAT, "/v1/completions"):
        est = estimate_request(path, json.dumps(document).encode(), CONTEXT)
        assert est.total > 0
    assert est.input_tokens >= 0 and est.output_tokens >= 0


def test_output_reservation_replaces_the_context_rule_only_when_no_limit_is_set():
    from cooldown.estimate import parse_request

    unset = parse_request(CHAT, chat([{"role": "user", "content": "hi"}]))
    assert unset.estimate(CONTEXT, output_reservation=500).output_tokens == 500
    assert unset.estimate(CONTEXT).output_tokens == CONTEXT - unset.input_tokens
    explicit = parse_request(CHAT, chat([{"role": "user", "content": "hi"}], max_tokens=5000))
    assert explicit.estimate(CONTEXT, output_reservation=500).output_tokens == 5000


def test_input_factor_scales_understood_input_only():
    from cooldown.estimate import parse_request

    shape = parse_request(CHAT, chat([{"role": "user", "content": "word " * 100}], max_tokens=1))
    assert shape.estimate(CONTEXT, input_factor=1.15).input_tokens == -(
        -shape.input_tokens * 115 // 100
    )
    garbage = parse_request(CHAT, b"nope")
    assert garbage.estimate(CONTEXT, input_factor=2.0).input_tokens == 4


def test_stream_flag_is_read():
    from cooldown.estimate import parse_request

    assert parse_request(CHAT, chat([], stream=True)).stream
    assert not parse_request(CHAT, chat([])).stream


def test_calibration_errs_high_is_bounded_and_ignores_tiny_prompts():
    from cooldown.estimate import InputCalibration

    cal = InputCalibration(window=3, lowest=0.8, highest=2.0, min_tokens=32)
    assert cal.factor("m") == 1.0
    cal.observe("m", 10, 100)  # tiny: template overhead dominates, ignored
    assert cal.factor("m") == 1.0
    cal.observe("m", 1000, 1150)
    cal.observe("m", 1000, 1100)
    assert cal.factor("m") == 1.15  # the largest recent ratio
    cal.observe("m", 1000, 5000)
    assert cal.factor("m") == 2.0  # bounded
    for _ in range(3):
        cal.observe("m", 1000, 500)
    assert cal.factor("m") == 0.8  # old ratios age out; bounded below too
    assert cal.factor("other") == 1.0


def test_text_beyond_any_context_is_bounded_by_its_bytes_without_tokenizing():
    from cooldown.estimate import _EXACT_COUNT_MAX_CHARS

    text = "é" * (_EXACT_COUNT_MAX_CHARS + 1)
    assert count_text_tokens(text) == 2 * len(text)  # its UTF-8 bytes: an upper bound


def test_output_asked_for_is_capped_at_what_the_context_leaves():
    from cooldown.estimate import parse_request

    shape = parse_request(CHAT, chat([{"role": "user", "content": "hi"}], max_tokens=10_000_000))
    est = shape.estimate(CONTEXT)
    assert est.output_tokens == CONTEXT - shape.input_tokens
    assert est.total == CONTEXT
    # ... but what it asked for is what it needs: more than the context holds.
    assert est.need.sequence == shape.input_tokens + 10_000_000
    assert est.need.tokens == CONTEXT
    # With n choices, each may write what the context leaves.
    three = parse_request(CHAT, chat([{"role": "user", "content": "hi"}], max_tokens=9_000, n=3))
    assert three.estimate(CONTEXT).output_tokens == 3 * (CONTEXT - three.input_tokens)


def test_need_keeps_only_what_is_certain():
    from cooldown.estimate import Need, parse_request

    asked = parse_request(CHAT, chat([{"role": "user", "content": "word " * 100}], max_tokens=50))
    # The calibration's margin is not part of the need; a factor below 1 is (our count errs high).
    high = asked.estimate(CONTEXT, input_factor=1.5)
    assert high.total > high.need.tokens == asked.input_tokens + 50
    low = asked.estimate(CONTEXT, input_factor=0.8)
    assert low.need.tokens == low.input_tokens + 50 < asked.input_tokens + 50
    assert high.need == Need(asked.input_tokens, 50, 1, CONTEXT)
    # A default reservation is our guess, not the client's ask: only the input is needed.
    unset = parse_request(CHAT, chat([{"role": "user", "content": "hi"}])).estimate(CONTEXT)
    assert unset.total == CONTEXT and unset.need.tokens == unset.input_tokens
    # A body we could not read needs nothing certain: its byte count is only an upper bound.
    assert parse_request(CHAT, b"nope").estimate(CONTEXT).need == Need()


def test_too_large_names_the_first_limit_it_can_never_fit():
    from cooldown.estimate import Need, TooLarge, too_large

    need = Need(input_tokens=69_000, output_tokens=1_000, context_length=131_072)
    assert too_large(need, [("tpm", 60_000), ("tph", 1_000_000)]) == TooLarge(
        "tpm", 60_000, 70_000, 69_000
    )
    assert too_large(need, [("tpm", 70_000), ("tpd", 1_000_000)]) is None  # exactly fits
    # Input and output asked for longer than the context: refused whatever the limits.
    longer = Need(input_tokens=9, output_tokens=10_000_000, context_length=8_192)
    assert too_large(longer, [("tpm", 1 << 40)]) == TooLarge("context_length", 8_192, 10_000_009, 9)
    assert too_large(Need(input_tokens=8_000, output_tokens=192, context_length=8_192), []) is None
    # n choices: every choice's output counts against the limits.
    many = Need(input_tokens=1_000, output_tokens=1_000, choices=4, context_length=8_192)
    assert too_large(many, [("tpm", 4_999)]) == TooLarge("tpm", 4_999, 5_000, 1_000)
    assert too_large(Need(), [("tpm", 1)]) is None


def test_a_text_counted_by_its_bytes_is_not_a_certain_need():
    """Beyond any context the count is the byte length, an upper bound: never refused on it
    (it is held until the whole bucket is free, as before)."""
    from cooldown.estimate import _EXACT_COUNT_MAX_CHARS, Need, parse_request

    huge = "ab " * (_EXACT_COUNT_MAX_CHARS // 3 + 1)
    shape = parse_request(CHAT, chat([{"role": "user", "content": huge}], max_tokens=20))
    assert shape.understood and not shape.exact
    assert shape.estimate(CONTEXT).need == Need()
