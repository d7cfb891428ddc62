"""Which flows Cooldown meters, under which limiter key, and where they are sent.

Plain functions of the running config and the flow; the metering addon calls them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from .config import Config
from .flows import AUTHORIZATION, header_values
from .gate import DEFAULT_KEY

METERED_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_MODELS = 64
MAX_MODEL_NAME = 256
_SAFE_NAME = re.compile(r"[A-Za-z0-9._:/@+-]+")
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

    Every key has its own buckets, queue and metric series, and appears in logs and flow
    comments; so a name becomes a key only if it is at most MAX_MODEL_NAME characters of a
    safe set (letters, digits and `._-:/@+`), and only the first MAX_MODELS distinct names not
    in the config do: any other shares OTHER_MODELS_KEY. A client sending huge or invented
    names cannot grow the proxy, its pages or its logs.
    """
    if model is None:
        return DEFAULT_KEY
    if len(model) > MAX_MODEL_NAME:
        return OTHER_MODELS_KEY
    if model in known or model in config.models:
        return model
    if len(known) >= MAX_MODELS or not _SAFE_NAME.fullmatch(model):
        return OTHER_MODELS_KEY
    return model


_UNREAD: Any = object()


def client_of(f: http.HTTPFlow, authorization: str | None = _UNREAD) -> str:
    """Who sent the flow, for its share of the queue: a fingerprint of its API key
    (`sha256:` + 12 hex digits of the bearer token's hash; never the key), else its address.
    `authorization`: the header's value if the caller has read it already (flows.take_priority).
    """
    if authorization is _UNREAD:
        (authorization,) = header_values(f.request.headers, AUTHORIZATION)
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
        return f"sha256:{digest[:12]}"
    peer = f.client_conn.peername
    return f"address:{peer[0]}" if peer else "address:unknown"
