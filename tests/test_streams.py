"""A held flow whose client reset its HTTP/2 stream (or left) leaves the queue, is counted as
cancelled and never goes upstream (streams.py, departures.py). mitmproxy gives no event for
it while our request hook waits; these tests stand in for its paused-event queue, and the
first one checks that the internals streams.py reads are still where it reads them."""

import asyncio
import inspect
import json
from collections import deque

from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import HttpLayer, HttpStream
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestProtocolError
from mitmproxy.test import taddons, tflow

import cooldown.metering as metering_module
from cooldown.addon import Cooldown
from cooldown.streams import PAUSED_EVENTS, find_stream, stream_reset


class FakeStream:
    """What streams.py reads of mitmproxy's HttpStream: its queue of events not handled yet."""

    def __init__(self) -> None:
        setattr(self, PAUSED_EVENTS, deque())

    def reset(self) -> None:
        getattr(self, PAUSED_EVENTS).append(
            RequestProtocolError(1, "stream reset by client (CANCEL)", ErrorCode.CANCEL)
        )


def test_the_mitmproxy_internals_read_are_there():
    assert PAUSED_EVENTS in inspect.getsource(layer.Layer.__init__)
    assert "self.streams" in inspect.getsource(HttpLayer.__init__)
    assert "self.flow" in inspect.getsource(HttpStream)
    assert "_paused_event_queue" in inspect.getsource(HttpStream.check_killed)
    assert hasattr(Proxyserver(), "connections")


def test_a_reset_shows_in_the_queue_and_nothing_else_does():
    stream = FakeStream()
    assert not stream_reset(stream)
    getattr(stream, PAUSED_EVENTS).append(object())  # some other event (data, headers)
    assert not stream_reset(stream)
    stream.reset()
    assert stream_reset(stream)
    assert not stream_reset(None)
    assert not stream_reset(object())  # not a layer at all: no answer, no error


def test_a_flow_without_a_live_connection_has_no_stream():
    with taddons.context(Proxyserver()):
        assert find_stream(tflow.tflow()) is None


def cerebras_flow():
    f = tflow.tflow()
    f.request.host = "api.cerebras.ai"
    f.request.method = "POST"
    f.request.path = "/v1/chat/completions"
    f.request.content = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    ).encode()
    return f


async def until(predicate):
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_a_held_flow_whose_stream_is_reset_leaves_and_counts_as_cancelled(
    tmp_path, monkeypatch
):
    streams: dict[str, FakeStream] = {}

    def fake_find(f):
        return streams.setdefault(f.id, FakeStream())

    monkeypatch.setattr(metering_module, "find_stream", fake_find)
    path = tmp_path / "c.yaml"
    path.write_text("cerebras_limits: {rpm_limit: 1, probe_first: false}\n")
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        first, held, other = cerebras_flow(), cerebras_flow(), cerebras_flow()
        await cooldown.metering.request(first)  # takes the only request of the minute
        tasks = [asyncio.ensure_future(cooldown.metering.request(f)) for f in (held, other)]
        await until(lambda: cooldown.runtime.gate.depth == 2)
        assert cooldown.departures.check_resets() == 0
        streams[held.id].reset()
        assert cooldown.departures.check_resets() == 1
        await until(lambda: tasks[0].done())
        assert held.response is None  # nothing to answer: its client is gone
        assert cooldown.runtime.gate.depth == 1 and not tasks[1].done()
        requests = cooldown.runtime.metrics.snapshot()["requests"]["m"]
        assert requests == {"forwarded": 1, "cancelled": 1}
        cooldown.runtime.gate.shutdown()
        await asyncio.gather(*tasks)


async def test_released_in_the_moment_its_stream_was_reset_it_does_not_go(tmp_path, monkeypatch):
    """The reset lands between two checks and the limiter releases the flow: it is aborted
    (its reservation given back), counted as cancelled, and not routed upstream."""
    streams: dict[str, FakeStream] = {}
    monkeypatch.setattr(
        metering_module, "find_stream", lambda f: streams.setdefault(f.id, FakeStream())
    )
    path = tmp_path / "c.yaml"
    path.write_text(
        "cerebras_limits: {rpm_limit: 1, probe_first: false}\n"
        "cerebras_upstream: http://127.0.0.1:9\n"
    )
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        gate = cooldown.runtime.gate
        first, held = cerebras_flow(), cerebras_flow()
        await cooldown.metering.request(first)
        task = asyncio.ensure_future(cooldown.metering.request(held))
        await until(lambda: gate.depth == 1)
        streams[held.id].reset()
        # Capacity comes back before the watcher's next look: `first` is answered and, a
        # minute later (before the request's timeout), the bucket has refilled.
        gate.finish(cooldown.metering.table.get(first.id).ticket, 200, 1)
        later = gate.clock() + 61
        gate.clock = lambda: later
        gate.pump()
        await task
        assert held.request.host == "api.cerebras.ai"  # not routed to cerebras_upstream
        assert held.response is None
        requests = cooldown.runtime.metrics.snapshot()["requests"]["m"]
        assert requests == {"forwarded": 1, "cancelled": 1}
        assert gate.status()["open_reservations"] == 0  # `held`'s was given back
        assert cooldown.metering.table.get(held.id) is None  # nothing of it is left
