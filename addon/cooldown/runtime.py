"""What Cooldown's addons share: the running config, the gate, the metrics, the calibration.

mitmproxy keeps addons apart (each has its own hooks and options); Cooldown's three addons
(settings, status pages, metering) act on one limiter, so they hold one `Runtime` each,
the same object. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import Config
from .estimate import Estimate, InputCalibration, RequestShape
from .gate import Gate
from .metrics import Metrics
from .pacing import Pacer

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self) -> None:
        self.config = Config()
        self.gate = Gate(self.config)
        self.calibration = InputCalibration()
        self.metrics = Metrics(self.gate)
        self.pacer = Pacer()  # other hosts' rate_limits (the gate is Cerebras's)
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

    def on_config(self, listener: Callable[[Config], None]) -> None:
        """Call `listener(config)` whenever a new config is applied."""
        self._on_config.append(listener)

    def apply(self, config: Config) -> None:
        """Apply a new config without dropping anything held or in flight."""
        self.config = config
        self.gate.reconfigure(config)
        self.pacer.reconfigure(config.rate_limits, config.default_rate_limit)
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
