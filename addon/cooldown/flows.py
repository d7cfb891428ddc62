"""One metered flow's life in one object, and the table that finds it by flow or by client.

A metered flow is tracked from the moment the metering addon takes it until it has ended in
any way: answered, refused, failed, cancelled, or retried to the end. Its entry leaves the
table in one place (`FlowTable.remove`), so nothing about a finished flow can be left behind
in a second map.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mitmproxy import http

from .estimate import Estimate, RequestShape, clamp_output, parse_request
from .runtime import CacheGuess
from .tickets import NORMAL, Policy, Ticket
from .upstream import AnswerHead, SSEUsageTap


class Phase(enum.Enum):
    ADMITTING = "admitting"  # being estimated or submitted
    HELD = "held"  # paused, waiting for the gate
    IN_FLIGHT = "in_flight"  # released, upstream's answer not settled yet
    RETRYING = "retrying"  # drew a 429; waits for a copy re-sent through mitmproxy
    ENDED = "ended"  # a retry's copy that has ended; its entry goes when its replay is over


@dataclass(eq=False)
class Retry:
    """A copy of a flow, re-sent through mitmproxy after the flow drew an upstream 429."""

    copy: http.HTTPFlow
    done: asyncio.Future[None]  # the copy ended (answered, failed or refused), or was stopped
    handler: Any = None  # its replay handler (see retry.py)
    task: asyncio.Task[None] | None = None
    stopped: str | None = None  # why it was stopped: "client_gone", "killed", "shutdown"


@dataclass(eq=False)
class MeteredFlow:
    """Everything Cooldown knows about one metered flow (or one retry's copy of it)."""

    flow: http.HTTPFlow
    key: str  # the limiter key: the model, bounded (see Metering.key_for)
    shape: RequestShape
    retries_left: int
    attempt: int = 1  # 1 for the client's own flow; 2, 3, ... for a retry's copies
    parent: MeteredFlow | None = None  # for a copy: the flow it retries
    # for a copy: how long its earlier attempts waited in the queue (off its request_timeout)
    waited_before: float = 0.0
    phase: Phase = Phase.ADMITTING
    estimate: Estimate | None = None
    ticket: Ticket | None = None
    tap: SSEUsageTap | None = None  # reads usage from a streamed answer on its way through
    head: AnswerHead | None = None  # what its answer's header fields say, once they came
    answered: bool = False  # confirmed with its answer's report (a stream's at its headers)
    # The request as it was released (before routing and later addons): what a retry re-sends.
    # Only kept while retries are left.
    request: http.Request | None = None
    retry: Retry | None = None  # while RETRYING: the copy it waits for
    stopped: str | None = field(default=None)  # for a copy: why nobody waits for it any more
    client: str | None = None  # who sent it: an API-key fingerprint or an address (routing.py)
    stream: Any = None  # while held: mitmproxy's layer for its stream, to notice a reset
    policy: Policy = NORMAL  # its priority class and its client's weight (tickets.policy_of)
    cache: CacheGuess | None = None  # its blocks in the prompt cache model, and the prediction

    @property
    def id(self) -> str:
        return self.flow.id

    @property
    def client_id(self) -> str | None:
        """The client connection whose leaving ends this flow; a copy has none of its own
        (its original, waiting for it, is stopped instead, and stops it)."""
        return self.flow.client_conn.id if self.parent is None else None


class FlowTable:
    """Metered flows by flow id, and by client connection (a disconnect finds them at once)."""

    def __init__(self) -> None:
        self._by_flow: dict[str, MeteredFlow] = {}
        self._by_client: dict[str, dict[str, MeteredFlow]] = {}
        self._copies = 0  # entries that are retries' copies (parent is not None)
        self.held = 0  # entries in Phase.HELD (counted by the metering addon's _hold)

    def __len__(self) -> int:
        return len(self._by_flow)

    def __iter__(self) -> Iterator[MeteredFlow]:
        return iter(list(self._by_flow.values()))

    def get(self, flow_id: str) -> MeteredFlow | None:
        return self._by_flow.get(flow_id)

    def add(self, metered: MeteredFlow) -> None:
        replaced = self._by_flow.get(metered.id)
        if replaced is not None and replaced.parent is not None:
            self._copies -= 1
        if metered.parent is not None:
            self._copies += 1
        self._by_flow[metered.id] = metered
        client = metered.client_id
        if client is not None:
            self._by_client.setdefault(client, {})[metered.id] = metered

    def remove(self, metered: MeteredFlow) -> None:
        """Forget `metered` (idempotent; an entry that was replaced stays)."""
        if self._by_flow.get(metered.id) is not metered:
            return
        del self._by_flow[metered.id]
        if metered.parent is not None:
            self._copies -= 1
        client = metered.client_id
        siblings = self._by_client.get(client) if client is not None else None
        if siblings is not None:
            siblings.pop(metered.id, None)
            if not siblings:
                del self._by_client[client]  # type: ignore[arg-type]

    def of_client(self, client_id: str) -> list[MeteredFlow]:
        return list(self._by_client.get(client_id, {}).values())

    def counts(self) -> dict[str, int]:
        """How many flows are in each phase (every phase listed)."""
        counts = {phase.value: 0 for phase in Phase}
        for metered in self._by_flow.values():
            counts[metered.phase.value] += 1
        return counts

    def copies(self) -> int:
        """Retries' copies whose replay is not over yet."""
        return self._copies


# Tokenizing is fast but not free (roughly 1 ms per 4K tokens); above this many body bytes,
# estimate in a worker thread so other flows keep moving.
OFFLOAD_BODY_BYTES = 32 * 1024


async def prepare(f: http.HTTPFlow, cap_of: OutputCap = None, encoded: bool = True) -> RequestShape:
    """Tokenize and edit the request (see prepare_request), in a worker thread if it is large.

    `encoded`: False when the request has no Content-Encoding (take_priority saw none): its
    raw body is the body, as `get_content` would find after looking the header up again."""
    body = (f.request.get_content(strict=False) if encoded else f.request.raw_content) or b""
    path = f.request.path
    if len(body) > OFFLOAD_BODY_BYTES:
        shape, new_body, added_usage = await asyncio.to_thread(prepare_request, path, body, cap_of)
    else:
        shape, new_body, added_usage = prepare_request(path, body, cap_of)
    if new_body is not None:
        f.request.content = new_body  # re-encoded as the content-encoding says
    if added_usage:
        f.metadata["cooldown_added_include_usage"] = True
    if shape.clamped is not None:
        f.metadata["cooldown_clamped"] = shape.clamped
    return shape


# The output cap for a model name (config.Config.output_cap), or None for no cap at all.
OutputCap = Callable[[str | None], int | None] | None


def prepare_request(
    path: str, body: bytes, cap_of: OutputCap = None
) -> tuple[RequestShape, bytes | None, bool]:
    """Tokenize once; for a stream that does not ask for usage, ask for it; apply the output
    cap (estimate.clamp_output). One JSON edit for both.

    Upstream reports `usage` in a stream only with `stream_options.include_usage`; without it
    the reservation could only be settled at its estimate. The client then sees `usage` in
    the stream's last data chunk (the one with `finish_reason`), a field OpenAI-compatible
    clients ignore unless asked. Returns the shape, the new body (None when the body stays as
    it is) and whether `include_usage` was added.
    """
    # The prompt's segments for the prompt cache model cost a hash of each message's texts,
    # which the token count's lookup has already computed: rendered whether used or not.
    shape = parse_request(path, body, segments=True)
    if not shape.understood:
        return shape, None, False
    cap = cap_of(shape.model) if cap_of is not None else None
    clamp = cap is not None and (shape.requested_output is None or shape.requested_output > cap)
    if not (shape.stream or clamp):
        return shape, None, False
    try:
        document = json.loads(body)
        options = document.get("stream_options")
        add_usage = shape.stream and not (
            isinstance(options, dict) and options.get("include_usage") is True
        )
        if add_usage:
            document["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        if cap is not None and clamp:
            clamped = clamp_output(document, path, cap)
            output = cap if shape.requested_output is None else min(shape.requested_output, cap)
            shape = dataclasses.replace(shape, requested_output=output, clamped=clamped)
        elif not add_usage:
            return shape, None, False
        return shape, json.dumps(document, ensure_ascii=False).encode(), add_usage
    except (ValueError, TypeError, RecursionError):
        return shape, None, False


def header_values(headers: http.Headers, *names: bytes) -> list[str | None]:
    """The first value of each of `names` (lower-case), in one pass over the raw fields:
    mitmproxy's `Headers.get` scans and re-encodes every field per name asked."""
    found: dict[bytes, str | None] = dict.fromkeys(names)
    for name, value in headers.fields:
        lowered = name.lower()
        if lowered in found and found[lowered] is None:
            found[lowered] = value.decode("latin-1")
    return [found[name] for name in names]


PRIORITY_HEADER = b"x-cooldown-priority"
AUTHORIZATION = b"authorization"
CONTENT_ENCODING = b"content-encoding"


class ClientHeaders(NamedTuple):
    """What the metering addon reads of a request's headers, in one pass (take_priority)."""

    priority: str | None  # X-Cooldown-Priority, now removed from the request
    authorization: str | None  # for routing.client_of
    encoded: bool  # a Content-Encoding is set: the body is read decoded (see prepare)


def take_priority(request: http.Request) -> ClientHeaders:
    """The X-Cooldown-Priority a client sent, removed (it is the proxy's, not upstream's),
    with the Authorization it sent and whether it set a Content-Encoding: one pass over the
    raw fields (mitmproxy's `Headers.get` scans and re-encodes every field per name)."""
    asked = authorization = None
    encoded = False
    for name, value in request.headers.fields:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            if authorization is None:
                authorization = value.decode("latin-1")
        elif lowered == PRIORITY_HEADER:
            if asked is None:
                asked = value.decode("latin-1")
        elif lowered == CONTENT_ENCODING:
            encoded = True
    if asked is not None:
        request.headers.fields = tuple(
            field for field in request.headers.fields if field[0].lower() != PRIORITY_HEADER
        )
    return ClientHeaders(asked, authorization, encoded)


def snapshot_request(request: http.Request) -> http.Request:
    """A copy of `request` as it is now that later changes to `request` do not reach.

    Cheap enough for every metered flow (a few microseconds; `Request.copy()` serializes the
    whole message): mitmproxy never changes a header list or a body in place, it replaces
    the (immutable) tuple or bytes, so copying the containers is enough.
    """
    snapshot = _shallow(request)
    snapshot.data = data = _shallow(request.data)
    data.headers = _shallow(data.headers)
    if data.trailers is not None:
        data.trailers = _shallow(data.trailers)
    return snapshot


def _shallow[T](obj: T) -> T:
    """`copy.copy` for plain objects, without its generic dispatch (this runs per request)."""
    twin = object.__new__(type(obj))
    twin.__dict__.update(obj.__dict__)
    return twin
