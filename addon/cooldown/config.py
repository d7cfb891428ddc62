"""Typed configuration: YAML in, validated frozen dataclasses out.

A proxy that every LLM call of a team goes through must not start on a typo and then behave
strangely, so every key is checked and every error is one line that names the key, the value
it got and what is allowed. Unknown keys are errors for the same reason: a misspelt
`tpm_limt` silently falling back to a default is how people get rate-limited.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

log = logging.getLogger(__name__)

DEFAULT_HOSTS = ("api.cerebras.ai", "inference.cerebras.ai")
Algorithm = Literal["token_bucket", "sliding_window"]
ALGORITHMS: tuple[Algorithm, ...] = ("token_bucket", "sliding_window")
Admission = Literal["full", "predicted"]
OnError = Literal["local", "hold", "reject"]
ON_ERRORS: tuple[OnError, ...] = ("local", "hold", "reject")
ADMISSIONS: tuple[Admission, ...] = ("full", "predicted")
# Cerebras's total-tokens limit is this many times the uncached one unless set.
TOTAL_TPM_FACTOR = 3


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line meant for the user."""


@dataclass(frozen=True)
class CerebrasLimits:
    rpm_limit: int = 1000
    tpm_limit: int = 1_000_000
    max_queue_depth: int = 100
    request_timeout: float = 600.0
    priority_threshold: float = 0.7
    # Beyond the original Cooldown Proxy's keys: the context length assumed when a request
    # sets no output limit (Cerebras then reserves context length minus input), and how fast
    # a waiting request's priority grows, so that a large request cannot starve behind a
    # stream of small ones.
    context_length: int = 131_072
    priority_aging: float = 30.0
    # Hour and day limits (Cerebras has them too); None means not enforced locally.
    rph_limit: int | None = None
    rpd_limit: int | None = None
    tph_limit: int | None = None
    tpd_limit: int | None = None
    # Output tokens to reserve when a request sets no max_completion_tokens/max_tokens; None
    # is Cerebras's documented rule (context length minus input), the conservative choice.
    output_reservation: int | None = None
    # How often a request that upstream answered 429 is retried after the cooldown before the
    # client sees the 429.
    max_retries: int = 2
    # Share of a per-minute limit that may be released at once; below 1 the rest is paced at
    # the limit's rate, so under sustained saturation capacity is handed out as it returns
    # instead of in one burst a minute (at the price of part of the first minute's allowance).
    burst: float = 1.0
    # How the limits are counted. `token_bucket` mirrors Cerebras (capacity refills
    # continuously); `sliding_window` never lets more than a limit through in any period, for
    # upstreams that count in windows (it gives away the bucket's first-minute refill).
    algorithm: Algorithm = "token_bucket"
    # When nothing is known of upstream's state for a model (start, config reload, a quiet
    # spell longer than a bucket takes to refill), release one request, wait for its response
    # headers (at most `probe_timeout`), sync from them, then release the rest.
    probe_first: bool = True
    probe_timeout: float = 2.0
    # The most of `max_queue_depth` one client (API key, else source address) may hold, so a
    # runaway agent cannot lock the others out; 1 turns the cap off.
    max_queue_share_per_client: float = 0.9
    # Opt-in: the most output a request may ask for. Cerebras reserves a request's whole
    # max_completion_tokens up front, so agents asking for 32K each drain the minute's tokens
    # with a handful of requests; larger asks are lowered to this, and a request asking for
    # none is given it. A model's own entry overrides this default.
    max_completion_tokens_cap: int | None = None
    # Cerebras's second token bucket, cached and uncached tokens together (`tpm_limit` and the
    # hour/day token limits count uncached tokens, its primary limit). None: 3 x `tpm_limit`;
    # 0: not enforced. Only with the prompt cache modelled (`prompt_cache.enabled`).
    total_tpm_limit: int | None = None


@dataclass(frozen=True)
class PromptCacheConfig:
    """The model of Cerebras's prompt cache (prompt_cache.py).

    `admission` says how upstream charges the uncached bucket when it admits a request:
    `full` (the whole input, the cached part refunded once processed: Cerebras's documented
    behaviour) or `predicted` (only the input it does not find cached). The proxy charges the
    same way, with its prediction in place of upstream's knowledge.
    """

    enabled: bool = True
    admission: Admission = "full"
    block_tokens: int = 128
    ttl: float = 300.0
    max_blocks: int = 100_000


@dataclass(frozen=True)
class SharedLimitsConfig:
    """Limits shared by several proxies through Redis (backends/shared.py).

    `on_error` says what a proxy does while Redis cannot be reached: `local` decides alone on
    its share of the limits (1/N, N the proxies last seen alive), `hold` keeps requests held
    (each until its `request_timeout`), `reject` answers 503 with Retry-After.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "cooldown:"
    on_error: OnError = "hold"


@dataclass(frozen=True)
class ModelLimits:
    """One model's own limits; a None falls back to `cerebras_limits`."""

    rpm_limit: int | None = None
    rph_limit: int | None = None
    rpd_limit: int | None = None
    tpm_limit: int | None = None
    tph_limit: int | None = None
    tpd_limit: int | None = None
    context_length: int | None = None
    output_reservation: int | None = None
    algorithm: Algorithm | None = None
    max_completion_tokens_cap: int | None = None
    total_tpm_limit: int | None = None


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 10
    open_duration: float = 60.0


@dataclass(frozen=True)
class Pace:
    """Requests per second to one host (or pattern), `burst` of them back to back."""

    requests_per_second: float
    burst: int = 1


@dataclass(frozen=True)
class DomainRateLimit(Pace):
    """A `rate_limits` entry: an exact host name, or `*.` and a domain for its subdomains."""

    domain: str = ""


Priority = Literal["high", "normal", "low"]
PRIORITY_NAMES: tuple[Priority, ...] = ("high", "normal", "low")


@dataclass(frozen=True)
class ClientConfig:
    """One client's place: its default priority class and its weight within a class."""

    priority: Priority = "normal"
    weight: float = 1.0


@dataclass(frozen=True)
class Config:
    cerebras_limits: CerebrasLimits = field(default_factory=CerebrasLimits)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    cerebras_hosts: tuple[str, ...] = DEFAULT_HOSTS
    # For tests, demos and benchmarks only: send intercepted requests to this base URL
    # (e.g. a local mock of Cerebras) instead of the host the client asked for.
    cerebras_upstream: str | None = None
    # The original Cooldown Proxy's per-domain pacing of other hosts (pacing.py); without a
    # default, hosts no entry names pass unpaced.
    rate_limits: tuple[DomainRateLimit, ...] = ()
    default_rate_limit: Pace | None = None
    models: Mapping[str, ModelLimits] = field(default_factory=dict)
    # By client fingerprint (`sha256:` + 12 hex digits of the API key's hash, or
    # `address:<ip>`, as cooldown.status shows them): default priority and fair-share weight.
    clients: Mapping[str, ClientConfig] = field(default_factory=dict)
    # Optional separate address for Prometheus scrapes, e.g. ("127.0.0.1", 9464).
    metrics_listen: tuple[str, int] | None = None
    prompt_cache: PromptCacheConfig = field(default_factory=PromptCacheConfig)
    # None: every limit lives in this process alone.
    shared_limits: SharedLimitsConfig | None = None
    source: str = "built-in defaults"

    def total_tpm_limit(self, model: str) -> int:
        """The total-tokens-per-minute limit of `model`; 0 when it is not enforced (set to 0,
        or the prompt cache not modelled: every token then counts as uncached, and the total
        limit is at least the uncached one)."""
        if not self.prompt_cache.enabled:
            return 0
        limits = self.model_limits(model)
        if limits.total_tpm_limit is not None:
            return limits.total_tpm_limit
        return TOTAL_TPM_FACTOR * (limits.tpm_limit or self.cerebras_limits.tpm_limit)

    def model_limits(self, model: str) -> ModelLimits:
        """The limits that apply to `model`: its own entry, else `cerebras_limits`.

        Asked on every request; the answer is kept per model for this (immutable) config.
        """
        cache: dict[str, ModelLimits] = self.__dict__.setdefault("_model_limits", {})
        limits = cache.get(model)
        if limits is None:
            own = self.models.get(model, _NO_OVERRIDES)
            defaults = self.cerebras_limits
            limits = ModelLimits(
                **{
                    name: value
                    if (value := getattr(own, name)) is not None
                    else getattr(defaults, name)
                    for name in ModelLimits.__dataclass_fields__
                }
            )
            if len(cache) < _MODEL_LIMITS_KEPT:  # model names come from clients: bounded
                cache[model] = limits
        return limits

    def output_cap(self, model: str | None) -> int | None:
        """The `max_completion_tokens_cap` for `model` (None: no cap).

        Asked before the model has a limiter key, possibly from a worker thread: a plain
        lookup, no cache."""
        own = self.models.get(model) if model is not None else None
        if own is not None and own.max_completion_tokens_cap is not None:
            return own.max_completion_tokens_cap
        return self.cerebras_limits.max_completion_tokens_cap


_NO_OVERRIDES = ModelLimits()
_MODEL_LIMITS_KEPT = 256

# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes the dotted key (for the message) and the raw YAML value.


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}: got {value!r}; expected {expected}")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(key, value, "a positive integer")
    return value


def _optional_positive_int(key: str, value: Any) -> int | None:
    return None if value is None else _positive_int(key, value)


def _non_negative_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "a whole number, 0 or more")
    return value


def _burst(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise _fail(key, value, "a share of the limit, more than 0 and at most 1")
    return float(value)


def _share(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise _fail(key, value, "a share, more than 0 and at most 1")
    return float(value)


def _fraction(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _fail(key, value, "a number from 0 to 1")
    return float(value)


def _algorithm(key: str, value: Any) -> Algorithm:
    if value not in ALGORITHMS:
        raise _fail(key, value, " or ".join(ALGORITHMS))
    return value  # type: ignore[no-any-return]


def _optional_algorithm(key: str, value: Any) -> Algorithm | None:
    return None if value is None else _algorithm(key, value)


def _admission(key: str, value: Any) -> Admission:
    if value not in ADMISSIONS:
        raise _fail(key, value, " or ".join(ADMISSIONS))
    return value  # type: ignore[no-any-return]


def _optional_non_negative_int(key: str, value: Any) -> int | None:
    return None if value is None else _non_negative_int(key, value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`: for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _redis_url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(key, value, "a URL such as redis://127.0.0.1:6379/0")
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        # Never echo the value: it may carry a password.
        raise ConfigError(
            f"{key}: got {redact_url(value)!r}; expected redis://host:port/db, "
            "rediss://host:port/db or unix:///path/to/socket"
        )
    return value


def _key_prefix(key: str, value: Any) -> str:
    # Braces would make the prefix the hash tag of every key: all models on one Cluster slot.
    if not isinstance(value, str) or not value or "{" in value or "}" in value:
        raise _fail(key, value, 'a non-empty string without braces, such as "cooldown:"')
    return value


def _on_error(key: str, value: Any) -> OnError:
    if value not in ON_ERRORS:
        raise _fail(key, value, " or ".join(ON_ERRORS))
    return value  # type: ignore[no-any-return]


def _positive_number(key: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _fail(key, value, "a positive number")
    return float(value)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str | int | float) -> float:
    """`10m`, `30s`, `1h30m`, `250ms` or a plain number of seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError("not a duration") from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError("not a duration")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("not a positive duration")
    return seconds


def _duration(key: str, value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise _fail(key, value, "a duration such as 30s, 10m, 1h or a number of seconds") from None


def _hostname(key: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9*.-]+", value):
        raise _fail(key, value, "a host name such as api.cerebras.ai")
    return value.lower()


def _upstream_url(key: str, value: Any) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
    ):
        raise _fail(key, value, "a base URL such as http://127.0.0.1:8765 (no path), or null")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _fail(key, value, "a base URL with a valid port") from None
    url: str = value
    return url.rstrip("/")


def _mapping(key: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, value, "a mapping of keys to values")
    return value


def _section(
    key: str, value: Any, fields: Mapping[str, Callable[[str, Any], Any]]
) -> dict[str, Any]:
    """Parse a mapping whose keys must all be known; returns only the keys present."""
    parsed: dict[str, Any] = {}
    for name, raw in _mapping(key, value).items():
        parser = fields.get(name)
        if parser is None:
            allowed = ", ".join(fields)
            raise ConfigError(f"{key}.{name}: unknown key; allowed keys are {allowed}")
        parsed[name] = parser(f"{key}.{name}", raw)
    return parsed


_LIMIT_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "rpm_limit": _positive_int,
    "tpm_limit": _positive_int,
    "max_queue_depth": _positive_int,
    "request_timeout": _duration,
    "priority_threshold": _fraction,
    "context_length": _positive_int,
    "priority_aging": _duration,
    "rph_limit": _optional_positive_int,
    "rpd_limit": _optional_positive_int,
    "tph_limit": _optional_positive_int,
    "tpd_limit": _optional_positive_int,
    "output_reservation": _optional_positive_int,
    "max_retries": _non_negative_int,
    "burst": _burst,
    "algorithm": _algorithm,
    "probe_first": _bool,
    "probe_timeout": _duration,
    "max_queue_share_per_client": _share,
    "max_completion_tokens_cap": _optional_positive_int,
    "total_tpm_limit": _optional_non_negative_int,
}

_PROMPT_CACHE_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "enabled": _bool,
    "admission": _admission,
    "block_tokens": _positive_int,
    "ttl": _duration,
    "max_blocks": _positive_int,
}

_SHARED_LIMITS_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "redis_url": _redis_url,
    "key_prefix": _key_prefix,
    "on_error": _on_error,
}

_MODEL_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    **{name: _optional_positive_int for name in ModelLimits.__dataclass_fields__},
    "algorithm": _optional_algorithm,
    "total_tpm_limit": _optional_non_negative_int,
}

_BREAKER_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "failure_threshold": _positive_int,
    "open_duration": _duration,
}

_PACE_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "requests_per_second": _positive_number,
    "burst": _positive_int,
}


def _hosts(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(key, value, "a non-empty list of host names")
    return tuple(_hostname(f"{key}[{i}]", host) for i, host in enumerate(value))


def _rate_limits(key: str, value: Any) -> tuple[DomainRateLimit, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(key, value, "a list of {domain, requests_per_second, burst} entries")
    entries = []
    for i, item in enumerate(value):
        fields = {"domain": _domain_pattern, **_PACE_FIELDS}
        parsed = _section(f"{key}[{i}]", item, fields)
        missing = [name for name in ("domain", "requests_per_second") if name not in parsed]
        if missing:
            raise ConfigError(f"{key}[{i}]: missing {', '.join(missing)}")
        entries.append(DomainRateLimit(**parsed))
    return tuple(entries)


def _domain_pattern(key: str, value: Any) -> str:
    """A host name, or `*.` and a domain: a `*` anywhere else would match in surprising ways."""
    name = _hostname(key, value)
    if "*" in name.removeprefix("*.") or name == "*.":
        raise _fail(key, value, "a host name, or *. and a domain such as *.openai.com")
    return name


def _default_pace(key: str, value: Any) -> Pace | None:
    if value is None:
        return None
    parsed = _section(key, value, _PACE_FIELDS)
    if "requests_per_second" not in parsed:
        raise ConfigError(f"{key}: missing requests_per_second")
    return Pace(**parsed)


def _models(key: str, value: Any) -> dict[str, ModelLimits]:
    models = {}
    for name, entry in _mapping(key, value).items():
        if not isinstance(name, str) or not name:
            raise _fail(key, name, "model names as keys, e.g. llama3.1-8b")
        models[name] = ModelLimits(**_section(f"{key}.{name}", entry, _MODEL_FIELDS))
    return models


def _priority(key: str, value: Any) -> Priority:
    if value not in PRIORITY_NAMES:
        raise _fail(key, value, " or ".join(PRIORITY_NAMES))
    return value  # type: ignore[no-any-return]


_CLIENT_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "priority": _priority,
    "weight": _positive_number,
}
_CLIENT_NAME = re.compile(r"sha256:[0-9a-f]{12}|address:[0-9A-Fa-f.:]+|address:unknown")


def _clients(key: str, value: Any) -> dict[str, ClientConfig]:
    clients = {}
    for name, entry in _mapping(key, value).items():
        if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
            # Not echoed: someone may have pasted an API key instead of its fingerprint.
            size = len(name) if isinstance(name, str) else 0
            raise ConfigError(
                f"{key}: a client name of {size} characters (not shown) is not a fingerprint; "
                "expected sha256: and 12 hex digits, or address:IP, as cooldown.status shows"
            )
        clients[name] = ClientConfig(**_section(f"{key}.{name}", entry, _CLIENT_FIELDS))
    return clients


def _listen_address(key: str, value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise _fail(key, value, "host:port such as 127.0.0.1:9464, or null")
    return host.strip("[]"), int(port)


def _server(key: str, value: Any) -> None:
    # The original Cooldown Proxy (a Go program) had its own listener settings; mitmproxy's
    # --listen-host and --listen-port play that role here. Accept the section so old files
    # keep loading.
    if _mapping(key, value):
        log.warning("%s: ignored; use mitmproxy's --listen-host/--listen-port instead", key)


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate a parsed YAML document (None = empty file) into a Config."""
    top = _mapping("(top level)", data)
    known = {
        "cerebras_limits",
        "circuit_breaker",
        "cerebras_hosts",
        "cerebras_upstream",
        "rate_limits",
        "default_rate_limit",
        "server",
        "models",
        "clients",
        "metrics_listen",
        "prompt_cache",
        "shared_limits",
    }
    for name in top:
        if name not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"{name}: unknown key; allowed top-level keys are {allowed}")

    limits = CerebrasLimits(
        **_section("cerebras_limits", top.get("cerebras_limits"), _LIMIT_FIELDS)
    )
    breaker = BreakerConfig(
        **_section("circuit_breaker", top.get("circuit_breaker"), _BREAKER_FIELDS)
    )
    hosts = (
        _hosts("cerebras_hosts", top["cerebras_hosts"])
        if "cerebras_hosts" in top
        else DEFAULT_HOSTS
    )
    upstream = _upstream_url("cerebras_upstream", top.get("cerebras_upstream"))
    rate_limits = _rate_limits("rate_limits", top.get("rate_limits"))
    default_pace = _default_pace("default_rate_limit", top.get("default_rate_limit"))
    _server("server", top.get("server"))
    shared = _shared_limits(top.get("shared_limits"), limits, top.get("models"))
    return Config(
        cerebras_limits=limits,
        circuit_breaker=breaker,
        cerebras_hosts=hosts,
        cerebras_upstream=upstream,
        rate_limits=rate_limits,
        default_rate_limit=default_pace,
        models=_models("models", top.get("models")),
        clients=_clients("clients", top.get("clients")),
        metrics_listen=_listen_address("metrics_listen", top.get("metrics_listen")),
        prompt_cache=PromptCacheConfig(
            **_section("prompt_cache", top.get("prompt_cache"), _PROMPT_CACHE_FIELDS)
        ),
        shared_limits=shared,
        source=source,
    )


def _shared_limits(value: Any, limits: CerebrasLimits, models: Any) -> SharedLimitsConfig | None:
    if value is None:
        return None
    shared = SharedLimitsConfig(**_section("shared_limits", value, _SHARED_LIMITS_FIELDS))
    # The shared scripts keep token buckets only (a window's log per limit in Redis would cost
    # a sorted set per limit and model, for an algorithm upstream does not use).
    windowed = limits.algorithm == "sliding_window" or any(
        isinstance(m, Mapping) and m.get("algorithm") == "sliding_window"
        for m in _mapping("models", models).values()
    )
    if windowed:
        raise ConfigError(
            "shared_limits: works with algorithm: token_bucket only; remove "
            "algorithm: sliding_window or the shared_limits section"
        )
    return shared


def load_config(path: str | Path | None) -> Config:
    """Load and validate the YAML file at `path`; None means built-in defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{at}: {problem}") from e
    try:
        return parse_config(data, source=str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def resolve_config_path(option_value: str | None, cwd: Path | None = None) -> Path | None:
    """The contract: the `cerebras_config` option, else ./config.yaml if present, else None."""
    if option_value:
        return Path(option_value).expanduser()
    candidate = (cwd or Path.cwd()) / "config.yaml"
    return candidate if candidate.is_file() else None
