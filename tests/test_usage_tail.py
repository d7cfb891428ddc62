"""`usage` read from the end of an answer's body (upstream.usage_from_tail): the same answer as
decoding the whole body whenever it answers, and UNSURE (the whole body is decoded) otherwise."""

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cooldown.upstream import UNSURE, _usage_of, usage_from_json, usage_from_tail

USAGE = {"prompt_tokens": 120, "completion_tokens": 5, "total_tokens": 125}
READ = dict(USAGE)


def whole(body: bytes) -> dict[str, int] | None:
    """What decoding the whole body says (the reference)."""
    try:
        return _usage_of(json.loads(body))
    except (ValueError, RecursionError):
        return None


def answer(**members: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        **members,
    }


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(answer(usage=USAGE)).encode(),  # usage last
        json.dumps(answer(usage=USAGE), separators=(",", ":")).encode(),
        json.dumps(answer(usage=USAGE, time_info={"queue_time": 0.1})).encode(),  # Cerebras
        json.dumps(answer(usage=USAGE), indent=2).encode() + b"\n\r\n ",  # whitespace
        b"\n  " + json.dumps(answer(usage=USAGE)).encode(),
        b'{"usage" :\t{"prompt_tokens":120,"completion_tokens":5,"total_tokens":125} }',
        b'{"usage":{"prompt_tokens":120,"completion_tokens":5,"total_tokens":125,'
        b'"prompt_tokens_details":{"cached_tokens":64}},"x":[1,{"y":"}"}]}',
        # Text that mentions usage, with the JSON of one, inside a string after it.
        json.dumps(answer(usage=USAGE, note='"usage": {"total_tokens": 7}}')).encode(),
        json.dumps(answer(usage=USAGE, note=',"usage":{"total_tokens":7}}'), indent=1).encode(),
    ],
)
def test_plain_answers_are_read_from_the_end(body: bytes) -> None:
    assert usage_from_tail(body) is not UNSURE
    assert usage_from_tail(body) == whole(body)
    assert usage_from_json(body) == whole(body)


@pytest.mark.parametrize(
    "body",
    [
        # A usage nested in a message (text or object) is not the answer's.
        json.dumps(answer(usage=USAGE, tail={"usage": {"total_tokens": 1}})).encode(),
        json.dumps(
            {"usage": USAGE, "choices": [{"message": {"usage": {"total_tokens": 9}}}]}
        ).encode(),
        json.dumps(answer(extra={"a": {"usage": {"total_tokens": 3}}})).encode(),
        # Text that mentions usage, with the JSON of one, inside a string, and no usage.
        json.dumps(answer(note=', "usage": {"total_tokens": 7}}')).encode(),
        # A second spelling of the key after it: the later one wins in a full decode.
        json.dumps(answer(usage=USAGE)).encode()[:-1] + b',"\\u0075sage":{"total_tokens":8}}',
        # Duplicate keys, the last one not an object.
        b'{"usage":{"total_tokens":5},"usage":null}',
        # No usage at all, or one that is not an object.
        json.dumps(answer()).encode(),
        b'{"usage": null}',
        b'{"usage": [1, 2]}',
        # Not an object, not UTF-8, not JSON.
        b'["usage", {"total_tokens": 5}]',
        b'"usage"',
        '{"usage":{"total_tokens":5},"x":"\xe9"}'.encode("latin-1"),
        b'\xef\xbb\xbf{"usage":{"total_tokens":5}}',
        b'{"usage":{"total_tokens":5},}',
        b'{"usage":{"total_tokens":5}},',
        b'{"usage":{"total_tokens":5}}}',
        b'{"usage":{"total_tokens":5',
        b'{"a":1 "usage":{"total_tokens":5}}',
    ],
)
def test_anything_unclear_falls_back_to_the_whole_body(body: bytes) -> None:
    assert usage_from_tail(body) is UNSURE
    assert usage_from_json(body) == whole(body)


def test_the_read_usage_is_cleaned_like_the_whole_one() -> None:
    body = json.dumps(answer(usage={"prompt_tokens": 5, "completion_tokens": 7})).encode()
    assert usage_from_tail(body) == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    for bad in ({"total_tokens": -1}, {"total_tokens": True}, {}):
        body = json.dumps(answer(usage=bad)).encode()
        assert usage_from_tail(body) is None
        assert usage_from_json(body) is None


# Texts that look like the key, or like its JSON, to try to fool the end reading.
tricky_text = st.sampled_from(
    ['"usage"', '"usage": {', ',"usage":{"total_tokens":1}}', "}", "{", "\\", '\\"', " ", "é"]
) | st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | tricky_text
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["usage", "a", "content", "usage "]), inner, max_size=3)
    ),
    max_leaves=8,
)
usages = st.dictionaries(
    st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "other"]),
    st.integers(-1, 10**6) | st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    before=st.dictionaries(st.sampled_from(["id", "choices", "note", "usage"]), values, max_size=3),
    usage=usages | values,
    after=st.dictionaries(st.sampled_from(["time_info", "x", "usage", "note"]), values, max_size=2),
    indent=st.none() | st.integers(0, 2),
)
def test_the_end_reading_agrees_with_the_whole_body(
    before: dict[str, Any], usage: Any, after: dict[str, Any], indent: int | None
) -> None:
    document = {**before, "usage": usage}
    document.update({k: v for k, v in after.items() if k not in document})
    for ensure_ascii in (True, False):
        body = json.dumps(document, indent=indent, ensure_ascii=ensure_ascii).encode()
        found = usage_from_tail(body)
        assert found is UNSURE or found == whole(body)
        assert usage_from_json(body) == whole(body)


def test_a_body_that_is_no_json_before_its_end_is_read_by_its_end() -> None:
    """The one case where the two differ (documented in usage_from_tail): what precedes the
    last member is not decoded, so a body that only ends like an answer is read as one."""
    body = b'{not json at all,"usage":{"total_tokens":5}}'
    assert whole(body) is None
    assert usage_from_tail(body) == {"total_tokens": 5}
