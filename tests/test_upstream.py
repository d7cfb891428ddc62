import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cooldown.upstream import (
    RateReport,
    SSEUsageTap,
    classify_429,
    parse_rate_headers,
    parse_retry_after,
    read_answer_head,
    usage_from_json,
)


def test_rate_headers_parse_the_whole_family():
    headers = {
        "x-ratelimit-limit-requests-day": "14400",
        "x-ratelimit-remaining-requests-day": "14390",
        "x-ratelimit-reset-requests-day": "33011.5",
        "X-RateLimit-Limit-Tokens-Minute": "60000",
        "x-ratelimit-remaining-tokens-minute": "59000",
        "x-ratelimit-reset-tokens-minute": "1.2",
        "x-ratelimit-limit-requests-hour": "900",  # no remaining: skipped
        "content-type": "application/json",
    }
    assert parse_rate_headers(headers) == [
        RateReport("requests", 86400.0, 14400, 14390, 33011.5),
        RateReport("tokens", 60.0, 60000, 59000, 1.2),
    ]


@pytest.mark.parametrize("value", ["", "abc", "-5", "nan", "inf"])
def test_unreadable_rate_headers_are_skipped(value):
    headers = {"x-ratelimit-limit-tokens-minute": value, "x-ratelimit-remaining-tokens-minute": "1"}
    assert parse_rate_headers(headers) == []


def test_missing_reset_means_a_full_period():
    headers = {"x-ratelimit-limit-tokens-hour": "10", "x-ratelimit-remaining-tokens-hour": "5"}
    assert parse_rate_headers(headers)[0].reset == 3600.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("0.5", 0.5),
        ("Sun, 29 Nov 2026 06:00:10 GMT", 10.0),
        ("Sun, 29 Nov 2026 05:59:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("-3", None),
    ],
)
def test_retry_after_as_seconds_date_or_garbage(value, expected):
    now = 1795932000.0  # 2026-11-29 06:00:00 UTC
    assert parse_retry_after(value, now) == expected


@pytest.mark.parametrize(
    ("body", "kind", "unit"),
    [
        (
            b'{"message":"Tokens per minute limit exceeded - too many tokens processed.",'
            b'"type":"too_many_tokens_error","param":"quota","code":"token_quota_exceeded"}',
            "quota",
            "tokens",
        ),
        (
            b'{"message":"Requests per day limit exceeded","type":"too_many_requests_error",'
            b'"param":"quota","code":"request_quota_exceeded"}',
            "quota",
            "requests",
        ),
        (
            b'{"message":"We\'re experiencing high traffic right now!","code":"queue_exceeded"}',
            "capacity",
            None,
        ),
        (b'{"error": {"code": "queue_exceeded"}}', "capacity", None),
        (b"<html>rate limited</html>", "quota", None),
        (None, "quota", None),
    ],
)
def test_429_kinds(body, kind, unit):
    verdict = classify_429(body)
    assert (verdict.kind, verdict.unit) == (kind, unit)


def test_usage_from_json():
    body = json.dumps(
        {"usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}
    ).encode()
    assert usage_from_json(body) == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert (
        usage_from_json(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 7}}')["total_tokens"]
        == 12
    )
    for bad in [
        b"",
        b"nope",
        b'{"usage": null}',
        b'{"usage": {"total_tokens": -1}}',
        b'{"usage": {"total_tokens": true}}',
    ]:
        assert usage_from_json(bad) is None


def sse(*events):
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )


STREAM = sse(
    {"choices": [{"delta": {"content": "Hel"}}], "usage": None},
    {
        "choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    },
    b"[DONE]",
)


@pytest.mark.parametrize("piece", [1, 2, 7, 64, len(STREAM)])
def test_sse_tap_passes_bytes_through_and_reads_usage_whatever_the_chunking(piece):
    seen = []
    tap = SSEUsageTap(on_usage=seen.append)
    out = b"".join(tap(STREAM[i : i + piece]) for i in range(0, len(STREAM), piece)) + tap(b"")
    assert out == STREAM
    assert tap.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert seen == [tap.usage]
    assert tap.done


def test_sse_tap_without_usage_or_done():
    tap = SSEUsageTap()
    tap(sse({"choices": [], "usage": None}))
    tap(b"")
    assert tap.usage is None and not tap.done


def test_sse_tap_reads_a_final_line_without_newline():
    tap = SSEUsageTap()
    tap(b'data: {"usage": {"total_tokens": 9}}')
    tap(b"")
    assert tap.usage == {"total_tokens": 9}


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_sse_tap_never_raises_and_never_changes_a_byte(chunks):
    tap = SSEUsageTap()
    for chunk in chunks:
        assert tap(chunk) == chunk
    assert tap(b"") == b""


def test_an_answers_head_is_read_in_one_pass():
    head = read_answer_head(
        [
            (b"Content-Type", b"text/event-stream; charset=utf-8"),
            (b"content-type", b"application/json"),  # only the first counts
            (b"X-RateLimit-Limit-Tokens-Minute", b"1000"),
            (b"x-ratelimit-remaining-tokens-minute", b" 400 "),
            (b"Content-Encoding", b"gzip"),
            (b"x-other", b"1"),
        ],
        ours=frozenset([b"x-other"]),
    )
    assert head.stream and head.encoded and head.has_ours
    assert head.content_type == "text/event-stream; charset=utf-8"
    assert head.reports() == [RateReport("tokens", 60.0, 1000, 400, 60.0)]
    plain = read_answer_head([(b"content-type", b"application/json")])
    assert not (plain.stream or plain.encoded or plain.has_ours)
    assert plain.reports() == []
