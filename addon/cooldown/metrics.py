"""Counters, gauges and distributions: one source, two views (JSON and Prometheus text).

Events (a request forwarded, refused, waited so long, estimated vs actual) are recorded here as
they happen; states (queue depth, usage of every limit, breaker) are read from the gate at the
moment of a scrape, so they are never stale and never double-booked. Each addon instance has its
own registry: mitmproxy's script reload creates a new instance, and a process-wide registry
would then refuse the duplicate metric names.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .gate import Gate
    from .prompt_cache import PromptCache

WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RATIO_BUCKETS = (0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2, 4, 10)
_SAMPLES = 2048  # recent waits / ratios kept per model for the JSON quantiles
_MODELS_SHOWN = 256  # model names come from clients: the per-model cache figures are bounded
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _quantiles(values: Iterable[float]) -> dict[str, float] | None:
    data = sorted(values)
    if not data:
        return None

    def pick(q: float) -> float:
        return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]

    return {
        "p50": pick(0.5),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": data[-1],
        "mean": statistics.fmean(data),
        "count": len(data),
    }


def _per_model(
    name: str, documentation: str, values: Mapping[str, float | None]
) -> GaugeMetricFamily:
    """A gauge labelled by model; a None value is left out (unknown, not zero)."""
    gauge = GaugeMetricFamily(name, documentation, labels=["model"])
    for model, value in values.items():
        if value is not None:
            gauge.add_metric([model], value)
    return gauge


class _GateCollector(Collector):
    """Reads the gate's live state at scrape time."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def collect(self) -> Iterable[GaugeMetricFamily]:
        status = self.gate.status()
        depth = GaugeMetricFamily("cooldown_queue_depth", "Requests held in the queue now.")
        depth.add_metric([], status["queue_depth"])
        reservations = GaugeMetricFamily(
            "cooldown_open_reservations",
            "Released requests whose reservation is not settled yet (in flight).",
        )
        reservations.add_metric([], status["open_reservations"])
        breaker = GaugeMetricFamily(
            "cooldown_circuit_breaker_open", "1 while the circuit breaker refuses requests."
        )
        breaker.add_metric([], 1.0 if status["breaker"] == "open" else 0.0)
        usage = GaugeMetricFamily(
            "cooldown_limit_usage_ratio",
            "Share of each limit in use (the stricter of the local and upstream views).",
            labels=["model", "limit"],
        )
        for model, limits in status["usage"].items():
            for name, ratio in limits.items():
                usage.add_metric([model, name], ratio)
        foreign = _per_model(
            "cooldown_foreign_tokens_per_minute",
            "Tokens per minute others of the organization use of a model's limit, estimated from "
            "upstream's x-ratelimit reports (they are charged to the limiter between reports).",
            status["foreign_tokens_per_minute"],
        )
        for model, ratio in status["total_usage"].items():
            usage.add_metric([model, "total_tpm"], ratio)
        held = status["held"]
        oldest = _per_model(
            "cooldown_queue_oldest_held_seconds",
            "How long the longest-held request of a model has waited (models with requests held).",
            {model: h["oldest_held_seconds"] for model, h in held.items()},
        )
        next_release = _per_model(
            "cooldown_queue_next_release_seconds",
            "Seconds until the head of a model's queue may go, as of the last decision "
            "(absent while it waits for an answer from upstream).",
            {model: h["next_release_in_seconds"] for model, h in held.items()},
        )
        yield from (depth, reservations, breaker, usage, foreign, oldest, next_release)
        yield from _shared_gauges(status.get("shared_limits"))


def _shared_gauges(shared: dict[str, Any] | None) -> Iterable[GaugeMetricFamily]:
    """Only with shared_limits: whether Redis is in use, and how many proxies share it."""
    if shared is None:
        return
    up = GaugeMetricFamily(
        "cooldown_shared_limits_up",
        "1 while decisions go through the limits shared in Redis; 0 while Redis is away "
        "(shared_limits.on_error decides then).",
    )
    up.add_metric([], 1.0 if shared["state"] == "shared" else 0.0)
    instances = GaugeMetricFamily(
        "cooldown_shared_limits_instances", "Proxies sharing the limits, as last seen alive."
    )
    instances.add_metric([], shared["instances"])
    yield from (up, instances)


class _CacheCollector(Collector):
    """The prompt cache model's figures at scrape time (see Metrics.cache_view)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        view = self.metrics.cache_view()
        share = GaugeMetricFamily(
            "cooldown_cached_input_ratio",
            "Share of input tokens upstream reported as found in its prompt cache.",
            labels=["model"],
        )
        bias = GaugeMetricFamily(
            "cooldown_cache_prediction_ratio",
            "Predicted cached tokens divided by reported ones, recent answers (above 1: the "
            "model over-predicts; its correction then scales predictions down).",
            labels=["model"],
        )
        error = GaugeMetricFamily(
            "cooldown_cache_prediction_error_ratio",
            "Mean absolute error of the predicted cached tokens over the reported ones.",
            labels=["model"],
        )
        blocks = GaugeMetricFamily(
            "cooldown_prompt_cache_blocks", "Blocks the prompt cache model holds now."
        )
        blocks.add_metric([], view["blocks"])
        for model, figures in view["models"].items():
            share.add_metric([model], figures["cached_share"])
            if "predicted_over_reported" in figures:
                bias.add_metric([model], figures["predicted_over_reported"])
                error.add_metric([model], figures["abs_error_share"])
        yield from (share, bias, error, blocks)


class Metrics:
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_GateCollector(gate))
        self.cache: PromptCache | None = None  # the runtime's model, when there is one
        self._prompt_tokens: Counter[str] = Counter()
        self._cached_tokens: Counter[str] = Counter()
        self.registry.register(_CacheCollector(self))
        self._requests = PromCounter(
            "cooldown_requests",
            "Metered requests by what became of them (forwarded, or refused and why).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self._upstream_429 = PromCounter(
            "cooldown_upstream_429",
            "429 answers from upstream, by kind (quota or capacity).",
            ["model", "kind"],
            registry=self.registry,
        )
        self._retries = PromCounter(
            "cooldown_retries",
            "Requests re-sent after an upstream 429.",
            ["model"],
            registry=self.registry,
        )
        self._clamped = PromCounter(
            "cooldown_clamped_requests",
            "Requests whose max_completion_tokens was lowered (or set) to the model's "
            "max_completion_tokens_cap.",
            ["model"],
            registry=self.registry,
        )
        self._paced = PromCounter(
            "cooldown_paced_requests",
            "Requests to other hosts paced by rate_limits/default_rate_limit, by entry and by "
            "what became of them.",
            ["rule", "outcome"],
            registry=self.registry,
        )
        self._paced_wait = Histogram(
            "cooldown_paced_wait_seconds",
            "Time a paced request to another host was held before it went.",
            ["rule"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        # Paced requests held now; set by the pacing addon (like tracked_flows).
        self.paced_held: Callable[[], int] = lambda: 0
        Gauge(
            "cooldown_paced_held",
            "Requests to other hosts held for their turn now.",
            registry=self.registry,
        ).set_function(lambda: self.paced_held())
        self._wait = Histogram(
            "cooldown_queue_wait_seconds",
            "Time a request waited in the queue before release or refusal; requests released "
            "or refused at once are not observed (cooldown_requests_total counts them).",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self._estimate_ratio = Histogram(
            "cooldown_estimate_to_actual_ratio",
            "Estimated tokens divided by the tokens upstream reported (above 1: conservative).",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=self.registry,
        )
        # How many flows the metering addon still tracks (0 when nothing is held, in flight
        # or retrying: a flow that ended left nothing behind). Set by the metering addon.
        self.tracked_flows: Callable[[], int] = lambda: 0
        self._counts: Counter[tuple[str, str]] = Counter()
        self._429s: Counter[tuple[str, str]] = Counter()
        self._clamps: Counter[str] = Counter()
        self._paced_counts: Counter[tuple[str, str]] = Counter()
        self._waits: dict[str, deque[float]] = {}
        self._ratios: dict[str, deque[float]] = {}
        # The labelled children and sample deques each event updates, found with one lookup
        # (prometheus_client's `labels()` validates and locks on every call). Created at the
        # same first event as before, so the exposition is unchanged.
        self._outcome_children: dict[tuple[str, str], tuple[Any, Any, deque[float] | None]] = {}
        self._ratio_children: dict[str, tuple[Any, deque[float]]] = {}

    # -- events --------------------------------------------------------------------------------

    def request_outcome(self, model: str, outcome: str, waited: float | None) -> None:
        """One request's end; `waited` only for one that waited in the queue (None: released
        or refused at once), so that the waits describe waiting, not the instant path."""
        key = (model, outcome)
        self._counts[key] += 1
        children = self._outcome_children.get(key)
        if children is None:
            if outcome != "cancelled":
                children = (
                    self._requests.labels(model, outcome),
                    self._wait.labels(model),
                    self._waits.setdefault(model, deque(maxlen=_SAMPLES)),
                )
            else:
                children = (self._requests.labels(model, outcome), None, None)
            self._outcome_children[key] = children
        requests, wait, waits = children
        requests.inc()
        if wait is not None and waited is not None:
            wait.observe(waited)
            waits.append(waited)  # type: ignore[union-attr]

    def upstream_429(self, model: str, kind: str) -> None:
        self._429s[(model, kind)] += 1
        self._upstream_429.labels(model, kind).inc()

    def clamped(self, model: str) -> None:
        self._clamps[model] += 1
        self._clamped.labels(model).inc()

    def paced(self, rule: str, outcome: str, waited: float) -> None:
        self._paced_counts[(rule, outcome)] += 1
        self._paced.labels(rule, outcome).inc()
        if outcome == "forwarded":
            self._paced_wait.labels(rule).observe(waited)

    def retry(self, model: str) -> None:
        self._retries.labels(model).inc()

    def estimate_vs_actual(self, model: str, estimated: int, actual: int) -> None:
        if actual <= 0:
            return
        ratio = estimated / actual
        children = self._ratio_children.get(model)
        if children is None:
            children = self._ratio_children[model] = (
                self._estimate_ratio.labels(model),
                self._ratios.setdefault(model, deque(maxlen=_SAMPLES)),
            )
        children[0].observe(ratio)
        children[1].append(ratio)

    def cached_input(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        """An answer's input tokens and the part upstream found in its prompt cache."""
        if len(self._prompt_tokens) < _MODELS_SHOWN or model in self._prompt_tokens:
            self._prompt_tokens[model] += prompt_tokens
            self._cached_tokens[model] += cached_tokens

    # -- views ---------------------------------------------------------------------------------

    def cache_view(self) -> dict[str, Any]:
        """Per model: the share of input found cached, and how good the predictions are."""
        models: dict[str, dict[str, Any]] = {}
        for model, prompt in sorted(self._prompt_tokens.items()):
            figures: dict[str, Any] = {
                "cached_share": round(self._cached_tokens[model] / prompt, 4) if prompt else 0.0,
                "prompt_tokens": prompt,
                "cached_tokens": self._cached_tokens[model],
            }
            accuracy = self.cache.accuracy(model) if self.cache is not None else None
            figures.update(accuracy or {})
            models[model] = figures
        return {"blocks": len(self.cache) if self.cache is not None else 0, "models": models}

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """The JSON view: the contract's fields first (docs: Metrics), then the detail."""
        status = self.gate.status()
        usage = status["usage"]

        def highest(limit: str) -> float:
            return max((limits.get(limit, 0.0) for limits in usage.values()), default=0.0)

        outcomes: dict[str, dict[str, int]] = {}
        for (model, outcome), count in sorted(self._counts.items()):
            outcomes.setdefault(model, {})[outcome] = count
        paced: dict[str, dict[str, int]] = {}
        for (rule, outcome), count in sorted(self._paced_counts.items()):
            paced.setdefault(rule, {})[outcome] = count
        upstream_429s: dict[str, dict[str, int]] = {}
        for (model, kind), count in sorted(self._429s.items()):
            upstream_429s.setdefault(model, {})[kind] = count
        return {
            "cerebras_queue_depth": status["queue_depth"],
            "cerebras_rpm_usage": highest("rpm"),
            "cerebras_tpm_usage": highest("tpm"),
            "cerebras_circuit_breaker_open": status["breaker"] == "open",
            "oldest_held_seconds": status["oldest_held_seconds"],
            "next_release_in_seconds": status["next_release_in_seconds"],
            "held": status["held"],
            "breaker_state": status["breaker"],
            "open_reservations": status["open_reservations"],
            "tracked_flows": self.tracked_flows(),
            "queue_by_client": status["queue_by_client"],
            "usage": usage,
            "total_usage": status["total_usage"],
            "prompt_cache": self.cache_view(),
            "algorithm": status["algorithm"],
            "foreign_tokens_per_minute": status["foreign_tokens_per_minute"],
            "requests": outcomes,
            "upstream_429s": upstream_429s,
            "clamped_requests": dict(sorted(self._clamps.items())),
            "paced_held": self.paced_held(),
            "paced_requests": paced,
            "queue_wait_seconds": {m: _quantiles(w) for m, w in sorted(self._waits.items())},
            "estimate_to_actual_ratio": {m: _quantiles(r) for m, r in sorted(self._ratios.items())},
            **({"shared_limits": status["shared_limits"]} if "shared_limits" in status else {}),
        }
