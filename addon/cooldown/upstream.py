"""What upstream tells us: rate-limit headers, 429 kinds, retry-after, usage (JSON and SSE).

Pure parsing, no mitmproxy: every function takes plain strings/bytes and never raises on bad
input, because a proxy must not fail a response over a header it cannot read.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import re
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .limiter import RateReport as RateReport
from .limiter import Unit
from .periods import PERIODS  # parsed here, defined with the limits

log = logging.getLogger(__name__)


def _number(value: str) -> float | None:
    try:
        number = float(value.strip())
    except (ValueError, AttributeError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _number_of(value: bytes) -> float | None:
    """`_number` of a raw header value: float() reads ASCII bytes and strips ASCII spaces
    (anything else, such as a latin-1 no-break space, is read as `_number` reads it)."""
    try:
        number = float(value)
    except ValueError:
        return _number(value.decode("latin-1"))
    return number if 0 <= number < math.inf else None


# Every name of the family, lower-case, with what it says: a dictionary lookup per header
# instead of a regex. Cerebras has not published names for its total-tokens bucket; an
# upstream that reports it as `x-ratelimit-*-total-tokens-*` (the project's mock does) is read.
_RATE_NAMES: dict[str, tuple[str, str, str]] = {
    f"x-ratelimit-{kind}-{word}-{period}": (kind, unit, period)
    for kind in ("limit", "remaining", "reset")
    for word, unit in (
        ("requests", "requests"),
        ("tokens", "tokens"),
        ("total-tokens", "total_tokens"),
    )
    for period in ("minute", "hour", "day")
}
_RATE_NAMES_BYTES = {name.encode(): parts for name, parts in _RATE_NAMES.items()}
_PREFIX = "x-ratelimit-"


def parse_rate_headers(headers: Mapping[str, str] | Any) -> list[RateReport]:
    """Every complete limit/remaining triple in the `x-ratelimit-*` family.

    `headers` is any mapping-like object with case-insensitive `.items()` (mitmproxy's
    Headers, a dict with lower-case keys, ...). A triple with a missing or unreadable limit
    or remaining is skipped; a missing reset is taken as a full period (the safe side).
    """
    fields = getattr(headers, "fields", None)
    if fields is not None:
        # mitmproxy's raw (name, value) byte pairs: only the family's few lines are decoded.
        return read_answer_head(fields).reports()
    found: dict[tuple[str, str], dict[str, float]] = {}
    for name, value in headers.items():
        if not name[:12].lower().startswith(_PREFIX):
            continue
        parts = _RATE_NAMES.get(name.lower())
        if parts is None:
            continue
        number = _number(value)
        if number is not None:
            kind, unit, period = parts
            found.setdefault((unit, period), {})[kind] = number
    return reports_from(found)


_CONTENT_TYPE = b"content-type"
_CONTENT_ENCODING = b"content-encoding"
_EVENT_STREAM = "text/event-stream"


@dataclass(slots=True)
class AnswerHead:
    """What the proxy reads of an answer's header fields, all in one pass (`read_answer_head`):
    mitmproxy's `Headers.get` scans and re-encodes every field per name asked, and an answer
    is looked at for its content type, its encoding, upstream's `x-ratelimit-*` report and
    whether it already carries a header the proxy sets."""

    content_type: str | None = None
    encoded: bool = False  # a Content-Encoding is set: the body is read decoded
    # upstream's x-ratelimit-* numbers by (unit, period word): {"limit", "remaining", "reset"}
    rate_numbers: dict[tuple[str, str], dict[str, float]] | None = None
    has_ours: bool = False  # one of the names in `ours` (see read_answer_head) is set

    @property
    def stream(self) -> bool:
        """An SSE answer: its end may be long after its headers."""
        return self.content_type is not None and self.content_type.startswith(_EVENT_STREAM)

    def reports(self) -> list[RateReport]:
        """Upstream's report, as `parse_rate_headers` reads it."""
        return reports_from(self.rate_numbers) if self.rate_numbers else []


def read_answer_head(
    fields: Iterable[tuple[bytes, bytes]], ours: Container[bytes] = ()
) -> AnswerHead:
    """One pass over mitmproxy's raw (name, value) fields; `ours`: lower-case names whose
    presence is noted (the proxy's own, which it replaces rather than repeats)."""
    head = AnswerHead()
    for name, value in fields:
        lowered = name.lower()
        parts = _RATE_NAMES_BYTES.get(lowered)
        if parts is not None:
            # (A non-ASCII latin-1 name never lower-cases to an ASCII one, so comparing
            # ASCII-lower-cased bytes finds exactly the names the decoded comparison would.)
            number = _number_of(value)
            if number is not None:
                kind, unit, period = parts
                if head.rate_numbers is None:
                    head.rate_numbers = {}
                head.rate_numbers.setdefault((unit, period), {})[kind] = number
        elif lowered == _CONTENT_TYPE:
            if head.content_type is None:
                head.content_type = value.decode("latin-1")
        elif lowered == _CONTENT_ENCODING:
            head.encoded = True
        elif lowered in ours:
            head.has_ours = True
    return head


def reports_from(found: dict[tuple[str, str], dict[str, float]]) -> list[RateReport]:
    """Reports from the numbers found per (unit, period word): {"limit", "remaining", "reset"}.

    A triple without limit or remaining is skipped; a missing reset is taken as a full period.
    """
    reports = []
    for (unit, period), values in sorted(found.items()):
        if "limit" not in values or "remaining" not in values:
            continue
        seconds = PERIODS[period]
        reports.append(
            RateReport(
                unit=unit,  # type: ignore[arg-type]
                period=seconds,
                limit=int(values["limit"]),
                remaining=int(values["remaining"]),
                reset=min(values.get("reset", seconds), seconds),
            )
        )
    return reports


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP date; None if unreadable."""
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_epoch)


Kind = Literal["quota", "capacity"]


@dataclass(frozen=True)
class Upstream429:
    """Why upstream said 429: our picture of the quota was wrong, or upstream is busy."""

    kind: Kind
    unit: Unit | None  # which quota, when the body says


def classify_429(body: bytes | None) -> Upstream429:
    """Tell quota 429s (`param: quota`, `*_quota_exceeded`) from capacity ones (`queue_exceeded`).

    Anything unrecognized counts as quota: correcting our picture and backing off is the
    safe reaction to a 429 we do not understand.
    """
    try:
        data = json.loads(body or b"")
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = data["error"]  # OpenAI-style wrapping, in case upstream ever uses it
    if not isinstance(data, dict):
        return Upstream429("quota", None)
    code = str(data.get("code") or "")
    error_type = str(data.get("type") or "")
    message = str(data.get("message") or "").lower()
    if code == "queue_exceeded" or "high traffic" in message:
        return Upstream429("capacity", None)
    unit: Unit | None = None
    if "total token" in message:  # Cerebras's 429s name the bucket: total or uncached
        unit = "total_tokens"
    elif code == "token_quota_exceeded" or "token" in error_type:
        unit = "tokens"
    elif code == "request_quota_exceeded" or "request" in error_type:
        unit = "requests"
    return Upstream429("quota", unit)


def usage_from_json(content: bytes | None) -> dict[str, int] | None:
    """The `usage` object of a completion response body, if it has a sane one.

    Read from the body's end when it is plainly there (`usage_from_tail`), which spares
    decoding the whole answer; otherwise from the whole document."""
    if not content:
        return None
    found = usage_from_tail(content)
    if found is not UNSURE:
        return found  # type: ignore[no-any-return]
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return None
    return _usage_of(data)


# What usage_from_tail says when it cannot tell from the end alone.
UNSURE: Any = object()
_USAGE_KEY = b'"usage"'
_JSON_SPACE = b" \t\r\n"
_TEXT_SPACE = " \t\r\n"
_OPENERS = b"{,"
_TAIL_DECODER = json.JSONDecoder()


def usage_from_tail(content: bytes) -> Any:  # dict[str, int] | None, or UNSURE
    """The top-level `usage` of a JSON object body, read from its end; UNSURE unless certain.

    Upstream writes `usage` among the last members of its answer (OpenAI's and Cerebras's
    completions: after `choices`, before `time_info`), so only the tail after the last
    `"usage"` is decoded. That occurrence is the top-level key when it is preceded by `{` or
    `,`, followed by `:` and an object, and what follows that object, closed by `}`, is the
    rest of one object that ends the body and has no other `usage` member: then the object
    holding it is the body's top level. (Within a JSON string every quote is escaped, so an
    unescaped `"usage"` after `{` or `,` opens a key: text in a message that mentions usage
    cannot look like one.) Anything else (no such occurrence, a `usage` nested deeper, a
    body that does not start with `{`, bytes that are not UTF-8, a second spelling of the
    key such as `\\u0075sage` after it) is UNSURE, and the caller parses the whole body.
    What it cannot see is a body whose start is not JSON at all: one that ends like an
    answer is read as one.
    """
    start = content.rfind(_USAGE_KEY)
    if start <= 0 or (content[:1] != b"{" and content.lstrip(_JSON_SPACE)[:1] != b"{"):
        return UNSURE
    before = start - 1
    while content[before] in _JSON_SPACE:  # (content starts with `{`: this stops)
        before -= 1
    if content[before] not in _OPENERS:
        return UNSURE
    try:
        tail = content[start + len(_USAGE_KEY) :].decode("utf-8").lstrip(_TEXT_SPACE)
        if tail[:1] != ":":
            return UNSURE
        tail = tail[1:].lstrip(_TEXT_SPACE)
        if tail[:1] != "{":
            return UNSURE
        usage, end = _TAIL_DECODER.raw_decode(tail)
        rest = tail[end:].strip(_TEXT_SPACE)
        if rest != "}":
            if rest[:1] != ",":
                return UNSURE
            after = json.loads("{" + rest[1:])  # the members after usage, and the last `}`
            if not after or "usage" in after:  # (`,}` is no JSON; a second usage wins)
                return UNSURE
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return UNSURE
    return _usage_of({"usage": usage})


def _usage_of(data: Any) -> dict[str, int] | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    clean = {
        key: value
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        if isinstance(value := usage.get(key), int) and not isinstance(value, bool) and value >= 0
    }
    if "total_tokens" not in clean and {"prompt_tokens", "completion_tokens"} <= clean.keys():
        clean["total_tokens"] = clean["prompt_tokens"] + clean["completion_tokens"]
    # The prompt cache's part of the input (Cerebras, as OpenAI: prompt_tokens_details).
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0:
        clean["cached_tokens"] = min(cached, clean.get("prompt_tokens", cached))
    return clean if "total_tokens" in clean else None


_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_MAX_PENDING_LINE = 1 << 20  # an SSE line longer than this is not one we need to read


class SSEUsageTap:
    """A `flow.response.stream` callable: passes every chunk through untouched, reads usage.

    mitmproxy calls it synchronously for each piece of the body, and a final time with b"".
    It only splits lines and JSON-decodes the rare event that carries a usage object, so it
    costs almost nothing per chunk; it never raises (a raising stream callable silently drops
    the chunk).
    """

    def __init__(self, on_usage: Callable[[dict[str, int]], None] | None = None) -> None:
        self.usage: dict[str, int] | None = None
        self.done = False  # saw `data: [DONE]`
        self._pending = b""
        self._on_usage = on_usage

    def __call__(self, chunk: bytes) -> bytes:
        try:
            self._feed(chunk)
        except Exception:
            # Never break the stream over bookkeeping: usage just stays unknown, and the
            # reservation is settled at its estimate.
            log.debug("could not read usage from a stream chunk", exc_info=True)
            self._pending = b""
        return chunk

    def _feed(self, chunk: bytes) -> None:
        lines = (self._pending + chunk).split(b"\n")
        # Keep the unfinished last line for the next piece; at the end (b"") read it too.
        self._pending = lines.pop() if chunk else b""
        if len(self._pending) > _MAX_PENDING_LINE:
            self._pending = b""
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
            elif _USAGE_OBJECT.search(payload):
                self._read_usage(payload)

    def _read_usage(self, payload: bytes) -> None:
        try:
            usage = _usage_of(json.loads(payload))
        except (ValueError, RecursionError):
            return
        if usage is not None:
            self.usage = usage
            if self._on_usage is not None:
                self._on_usage(usage)
