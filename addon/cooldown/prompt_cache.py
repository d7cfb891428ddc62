"""A model of Cerebras's prompt cache: which part of a request's input upstream will find cached.

Cerebras caches prompt prefixes automatically, per organization and model, in blocks of 128
tokens, for at least 5 minutes; cached tokens count toward the *total* token limit but not the
*uncached* one (the primary limit). The proxy sees every prompt of the organization that passes
through it, so it can keep the same blocks and say, before a request goes, how much of it
upstream will find: a team of agents whose requests share a long prefix then gets several times
the tokens per minute that a cache-blind limiter would allow.

**Blocks.** A prompt is rendered as a sequence of segments (tool definitions, then each message
with its chat-template overhead, then the reply's priming; see `estimate.RequestShape`), each a
digest and a token count. Block j covers tokens [0, 128 (j + 1)) and its key is a chain hash of
every segment up to the one in which the block ends, and where in it: block j can only be a hit
if blocks 0..j are, as upstream's prefix match. A block that ends inside a segment depends on the
*whole* segment, where upstream compares tokens: two prompts that agree on the first part of a
message and differ later share upstream's block but not ours. That errs on the safe side
(under-predicting cached tokens only ever charges the uncached bucket more).

**Memory.** One LRU of block keys with their expiry, across models, at most `max_blocks`
entries (about `BYTES_PER_BLOCK` bytes each, measured by `benchmarks/bench_cache.py`); a block
past its TTL is a miss and leaves when it reaches the LRU's old end.

**Learning.** Upstream reports what it found (`usage.prompt_tokens_details.cached_tokens`).
Per model the recent sum of reported over predicted cached tokens (capped at 1) scales later
predictions: a model that over-predicts (traffic that bypasses the proxy evicts nothing, but an
upstream that caches less, or not at all, does) falls back toward charging the whole input.

Nothing here reads a clock: every call takes `now`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Segment = tuple[int, int]  # (digest of the rendered piece, its tokens)

# Measured on CPython 3.12 (benchmarks/bench_cache.py, tracemalloc): an OrderedDict entry of an
# int key and a float expiry, with the key, the float and the table's slack once the LRU
# evicts (about 115 bytes while it only grows).
BYTES_PER_BLOCK = 215
# Responses per model the prediction's correction is learnt from.
LEARN_WINDOW = 64


def block_keys(model: str, segments: Iterable[Segment], block_tokens: int) -> list[int]:
    """The key of every *full* block of a prompt, in order (see the module's docstring)."""
    keys: list[int] = []
    chain = hash(model)
    position = 0
    boundary = block_tokens
    for digest, tokens in segments:
        end = position + tokens
        chain = hash((chain, digest))
        while boundary <= end:
            keys.append(hash((chain, boundary - position)))
            boundary += block_tokens
        position = end
    return keys


@dataclass(frozen=True)
class Prediction:
    """How many of a request's input tokens upstream should find cached."""

    raw: int  # by the blocks alone
    cached: int  # after the model's learnt correction: what the proxy counts on


class _Learning:
    """Recent answers of one model, as running sums over the last `LEARN_WINDOW`."""

    __slots__ = ("abs_error", "answers", "counted", "found", "raw", "reported", "used")

    def __init__(self) -> None:
        self.answers: deque[tuple[int, int, int]] = deque()  # (raw, used, reported)
        self.raw = 0  # predicted by the blocks, where they predicted any ...
        self.found = 0  # ... and what upstream reported for those: the correction
        self.used = 0  # predicted after correction, every answer ...
        self.reported = 0  # ... and reported, every answer: the accuracy
        self.abs_error = 0
        self.counted = 0

    def add(self, raw: int, used: int, reported: int) -> None:
        self._apply(raw, used, reported, 1)
        self.answers.append((raw, used, reported))
        if len(self.answers) > LEARN_WINDOW:
            self._apply(*self.answers.popleft(), -1)

    def _apply(self, raw: int, used: int, reported: int, sign: int) -> None:
        if raw > 0:  # a miss says nothing of how far the blocks can be trusted
            self.raw += sign * raw
            self.found += sign * reported
        self.used += sign * used
        self.reported += sign * reported
        self.abs_error += sign * abs(used - reported)

    def correction(self) -> float:
        """Reported over predicted, at most 1: only over-prediction is corrected."""
        if self.raw <= 0:
            return 1.0
        return min(1.0, self.found / self.raw)


class PromptCache:
    """The blocks upstream should hold, and how good the predictions from them have been.

    Usage::

        cache = PromptCache(block_tokens=128, ttl=300.0, max_blocks=100_000)
        keys = block_keys("llama3.1-8b", shape.segments, 128)
        guess = cache.predict("llama3.1-8b", keys, now)       # before admission
        cache.learn("llama3.1-8b", guess, reported_cached, now)  # from the answer's usage
        cache.record(keys, now)                                # upstream holds them now
    """

    def __init__(self, block_tokens: int = 128, ttl: float = 300.0, max_blocks: int = 100_000):
        self.block_tokens = block_tokens
        self.ttl = ttl
        self.max_blocks = max_blocks
        self._expiry: OrderedDict[int, float] = OrderedDict()
        self._learning: dict[str, _Learning] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def keys_for(self, model: str, segments: Iterable[Segment]) -> list[int]:
        return block_keys(model, segments, self.block_tokens)

    def cached_blocks(self, keys: Sequence[int], now: float) -> int:
        """How many leading blocks are held and not expired."""
        expiry = self._expiry
        hits = 0
        for key in keys:
            until = expiry.get(key)
            if until is None or until <= now:
                break
            hits += 1
        return hits

    def predict(
        self, model: str, keys: Sequence[int], now: float, limit: int, scale: float = 1.0
    ) -> Prediction:
        """Cached tokens to expect, never more than `limit` (the request's input). `scale`
        turns our token count into upstream's (the input calibration's factor)."""
        raw = min(int(self.cached_blocks(keys, now) * self.block_tokens * scale), limit)
        learning = self._learning.get(model)
        correction = 1.0 if learning is None else learning.correction()
        return Prediction(raw, int(raw * correction))

    def record(self, keys: Sequence[int], now: float) -> None:
        """Upstream has processed a prompt with these blocks: it holds them for a TTL."""
        expiry = self._expiry
        until = now + self.ttl
        for key in keys:
            if key in expiry:
                expiry.move_to_end(key)
            expiry[key] = until
        while len(expiry) > self.max_blocks:
            expiry.popitem(last=False)

    def learn(self, model: str, prediction: Prediction, reported: int) -> None:
        """Upstream says it found `reported` cached tokens where `prediction` was made."""
        learning = self._learning.get(model)
        if learning is None:
            if len(self._learning) >= _MODELS_KEPT:  # model names come from clients
                return
            learning = self._learning[model] = _Learning()
        learning.add(prediction.raw, prediction.cached, max(reported, 0))

    def accuracy(self, model: str) -> dict[str, float] | None:
        """The recent prediction error of `model`: bias (predicted / reported) and the mean
        absolute error over reported cached tokens; None before any answer."""
        learning = self._learning.get(model)
        if learning is None or not learning.answers:
            return None
        reported = max(learning.reported, 1)
        return {
            "predicted_over_reported": round(learning.used / reported, 4),
            "abs_error_share": round(learning.abs_error / reported, 4),
            "correction": round(learning.correction(), 4),
            "answers": len(learning.answers),
        }

    def models(self) -> list[str]:
        return sorted(self._learning)

    def resize(self, block_tokens: int, ttl: float, max_blocks: int) -> None:
        """New settings (config reload); blocks of another size are not blocks any more."""
        if block_tokens != self.block_tokens:
            self._expiry.clear()
        self.block_tokens, self.ttl, self.max_blocks = block_tokens, ttl, max_blocks
        while len(self._expiry) > max_blocks:
            self._expiry.popitem(last=False)


_MODELS_KEPT = 256
