"""What Cooldown's addons share: the running config, the gate, the metrics, the calibration.

mitmproxy keeps addons apart (each has its own hooks and options); Cooldown's three addons
(settings, status pages, metering) act on one limiter, so they hold one `Runtime` each,
the same object. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .backends.shared import SharedLimiter
from .config import Config
from .estimate import Estimate, InputCalibration, RequestShape
from .gate import Gate
from .limiter import MemoryLimiter, Settled
from .metrics import Metrics
from .pacing import Pacer
from .prompt_cache import Prediction, PromptCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheGuess:
    """A request's blocks in the prompt cache model, and what it predicted from them."""

    keys: list[int]
    prediction: Prediction


@dataclass(frozen=True)
class Charge:
    """What one answer settles: uncached tokens (the `tokens` limits) and total tokens."""

    uncached: int | None
    refund: int | None
    total: Settled | None
    cached: int  # reported by upstream (0 when it says nothing)


class Runtime:
    def __init__(self) -> None:
        self.config = Config()
        self.gate = Gate(self.config)
        self.calibration = InputCalibration()
        self.cache = PromptCache()
        self.metrics = Metrics(self.gate)
        self.pacer = Pacer()  # other hosts' rate_limits (the gate is Cerebras's)
        self.metrics.cache = self.cache
        self.running = False  # mitmproxy's `running` hook has run: config errors no longer fatal
        self.stopping = False  # mitmproxy is exiting: new requests are answered, not held
        # Per-request debug lines cost a formatted record each; only worth it when shown.
        self.debug = True
        self._on_config: list[Callable[[Config], None]] = []

    def estimate(self, key: str, shape: RequestShape) -> Estimate:
        """What a request of this shape reserves under `key`'s limits, as calibrated now."""
        config = self.config
        limits = config.model_limits(key)
        return shape.estimate(
            limits.context_length or config.cerebras_limits.context_length,
            limits.output_reservation,
            self.calibration.factor(key),
        )

    def predict(self, key: str, shape: RequestShape, estimate: Estimate) -> CacheGuess | None:
        """The prompt cache model's guess for a request (None: cache-blind, or no prompt)."""
        if not self.config.prompt_cache.enabled or not shape.segments:
            return None
        return self.repredict(key, self.cache.keys_for(key, shape.segments), estimate)

    def repredict(self, key: str, keys: list[int], estimate: Estimate) -> CacheGuess:
        """The prediction for these blocks now: at release, others' prompts answered while
        this one was held (the first of a team's wave) may have put its prefix in the cache."""
        prediction = self.cache.predict(
            key, keys, self.gate.clock(), estimate.input_tokens, self.calibration.factor(key)
        )
        return CacheGuess(keys, prediction)

    def processed(self, guess: CacheGuess | None) -> None:
        """Upstream has begun answering the prompt of `guess`: it holds its blocks now."""
        if guess is not None:
            self.cache.record(guess.keys, self.gate.clock())

    def admission(self, estimate: Estimate, guess: CacheGuess | None) -> tuple[int, int | None]:
        """(uncached, total) tokens to reserve: the whole estimate on both, less the predicted
        cached input on the uncached one with `admission: predicted`."""
        if not self.config.prompt_cache.enabled:
            return estimate.total, None
        uncached = estimate.total
        if guess is not None and self.config.prompt_cache.admission == "predicted":
            uncached -= guess.prediction.cached
        return uncached, estimate.total

    def charge(
        self,
        key: str,
        guess: CacheGuess | None,
        usage: dict[str, int] | None,
        refund: int | None,
    ) -> Charge:
        """What an answer with `usage` settles (see settle.account), and, if it reports the
        prompt cache's part, what the model learns: upstream holds the prompt's blocks now.

        `refund` is the unused output upstream gives back; with `admission: full` it also
        gives back the cached input on the uncached bucket.
        """
        total = usage.get("total_tokens") if usage else None
        if not self.config.prompt_cache.enabled or total is None or usage is None:
            return Charge(total, refund, None, 0)
        cached = usage.get("cached_tokens", 0)
        uncached_refund = refund
        if refund and self.config.prompt_cache.admission == "full":
            uncached_refund = refund + cached
        if guess is not None:
            self.cache.learn(key, guess.prediction, cached)
        return Charge(total - cached, uncached_refund, Settled(total, refund), cached)

    def _share_limits(self, config: Config) -> None:
        """Keep the limits where `shared_limits` says: Redis, or this process. A change
        takes effect only while nothing is held or in flight (at start-up, or when idle)."""
        current = self.gate.limiter
        wanted = config.shared_limits
        if wanted == (current.config if isinstance(current, SharedLimiter) else None):
            return
        shared = None if wanted is None else SharedLimiter(wanted)
        if not self.gate.use_limiter(shared if shared is not None else MemoryLimiter()):
            log.warning(
                "shared_limits changed while requests are held or in flight: not applied; "
                "restart the proxy to apply it"
            )
            if shared is not None:
                shared.close()
            return
        if isinstance(current, SharedLimiter):
            current.close()
        if shared is not None:
            shared.start(self.gate.clock())  # (logs how it went)

    def close(self) -> None:
        """The proxy is stopping: let the limiter say goodbye (shared limits: leave)."""
        limiter = self.gate.limiter
        if isinstance(limiter, SharedLimiter):
            limiter.close()

    def on_config(self, listener: Callable[[Config], None]) -> None:
        """Call `listener(config)` whenever a new config is applied."""
        self._on_config.append(listener)

    def apply(self, config: Config) -> None:
        """Apply a new config without dropping anything held or in flight."""
        self.config = config
        self._share_limits(config)
        self.gate.reconfigure(config)
        self.pacer.reconfigure(config.rate_limits, config.default_rate_limit)
        cache = config.prompt_cache
        self.cache.resize(cache.block_tokens, cache.ttl, cache.max_blocks)
        for listener in self._on_config:
            listener(config)
        limits = config.cerebras_limits
        log.info(
            "Cooldown config from %s: rpm_limit=%d tpm_limit=%d max_queue_depth=%d "
            "request_timeout=%gs hosts=%s%s",
            config.source,
            limits.rpm_limit,
            limits.tpm_limit,
            limits.max_queue_depth,
            limits.request_timeout,
            ",".join(config.cerebras_hosts),
            f" upstream={config.cerebras_upstream}" if config.cerebras_upstream else "",
        )
