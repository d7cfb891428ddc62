"""A lower bound, not a proxy: the least per-request work of an addon that meters tokens.

It decodes the request's JSON and guesses its tokens from its length, takes them from one
token bucket, and at the answer reads one `x-ratelimit-*` header and `usage` from the body's
end, settles the bucket and adds two headers. No queue, no second limit, no upstream view,
no prompt cache model, no metrics, no retries. `benchmarks.together --script
benchmarks/floor_addon.py` sets it beside Cooldown: what metering by itself costs mitmdump,
against what Cooldown's features cost on top.
"""

from __future__ import annotations

import json
import time

from mitmproxy import http

LIMIT = 10**12  # tokens per minute: bench_proxy's config, never reached


class Floor:
    name = "bench_floor"

    def __init__(self) -> None:
        self.used = 0.0
        self.at = time.monotonic()
        self.flying: dict[str, int] = {}

    async def request(self, f: http.HTTPFlow) -> None:
        document = json.loads(f.request.raw_content or b"{}")
        chars = sum(len(message.get("content", "")) for message in document.get("messages", ()))
        tokens = chars // 4 + int(document.get("max_completion_tokens") or 0)
        now = time.monotonic()
        self.used = max(0.0, self.used - (now - self.at) * LIMIT / 60)
        self.at = now
        if self.used + tokens <= LIMIT:
            self.used += tokens
            self.flying[f.id] = tokens

    def responseheaders(self, f: http.HTTPFlow) -> None:
        return None

    async def response(self, f: http.HTTPFlow) -> None:
        assert f.response is not None
        tokens = self.flying.pop(f.id, 0)
        for name, value in f.response.headers.fields:
            if name.lower() == b"x-ratelimit-remaining-tokens-minute":
                self.used = max(self.used, LIMIT - int(value))
        body = f.response.raw_content or b""
        at = body.rfind(b'"usage"')
        usage = json.loads(body[at + 8 : -1]) if at >= 0 else {}
        self.used += usage.get("total_tokens", tokens) - tokens
        f.response.headers.fields = (
            *f.response.headers.fields,
            (b"X-RateLimit-Remaining-TPM", b"%d" % (LIMIT - self.used)),
            (b"X-Cooldown-Estimated-Tokens", b"%d" % tokens),
        )


addons = [Floor()]
