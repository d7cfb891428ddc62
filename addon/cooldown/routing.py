"""Which flows Cooldown meters, under which limiter key, and where they are sent.

Plain functions of the running config and the flow; the metering addon calls them.
"""

from __future__ import annotations

import fnmatch
from urllib.parse import urlsplit

from mitmproxy import http

from .config import Config
from .gate import DEFAULT_KEY

METERED_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_MODELS = 64
OTHER_MODELS_KEY = "(other models)"
_HOST_VERDICTS_KEPT = 1024


def is_cerebras(config: Config, f: http.HTTPFlow) -> bool:
    """Whether the flow goes to a Cerebras host: its destination, or (transparent mode, where
    the destination is an address) the Host header, matches one of `cerebras_hosts`."""
    return _matches(config, f.request.host) or _matches(config, f.request.pretty_host)


def _matches(config: Config, host: str) -> bool:
    verdicts: dict[str, bool] = config.__dict__.setdefault("_cerebras_hosts_seen", {})
    verdict = verdicts.get(host)
    if verdict is None:
        name = host.lower()
        verdict = any(fnmatch.fnmatchcase(name, pattern) for pattern in config.cerebras_hosts)
        if len(verdicts) < _HOST_VERDICTS_KEPT:  # host names come from clients: bounded
            verdicts[host] = verdict
    return verdict


def is_metered_path(request: http.Request) -> bool:
    return request.method == "POST" and request.path.split("?", 1)[0].rstrip("/") in METERED_PATHS


def route(config: Config, f: http.HTTPFlow) -> None:
    """Point the flow at the configured test upstream, if any."""
    upstream = config.cerebras_upstream
    if upstream is None:
        return
    parts = urlsplit(upstream)
    f.request.scheme = parts.scheme
    f.request.host = parts.hostname or f.request.host
    f.request.port = parts.port or (443 if parts.scheme == "https" else 80)


def key_for(config: Config, known: set[str], model: str | None) -> str:
    """The limiter key for a model name, which comes from the client.

    Every key has its own buckets, queue and metric series; past MAX_MODELS distinct names
    (`known`) not in the config, further ones share one key, so a client inventing names
    cannot grow the proxy without bound.
    """
    if model is None:
        return DEFAULT_KEY
    if model in known or model in config.models:
        return model
    return model if len(known) < MAX_MODELS else OTHER_MODELS_KEY
