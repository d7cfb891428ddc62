"""The mitmproxy shell, driven with mitmproxy's own test helpers (no sockets)."""

import asyncio
import json
import logging
import time

import pytest
from mitmproxy import connection, ctx, exceptions, flow
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from cooldown.addon import Cooldown
from cooldown.flows import snapshot_request
from cooldown.scheduler import Outcome

SECRET = "sk-test-0123456789abcdefSECRET"


def cerebras_flow(
    body: dict | bytes | None = None, path="/v1/chat/completions", host="api.cerebras.ai"
):
    f = tflow.tflow()
    f.request.host = host
    f.request.port = 443
    f.request.scheme = "https"
    f.request.method = "POST"
    f.request.path = path
    f.request.headers["authorization"] = f"Bearer {SECRET}"
    if body is None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 10,
        }
    f.request.content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return f


def ok_response(total_tokens: int | None = 12):
    usage = (
        {}
        if total_tokens is None
        else {"usage": {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": total_tokens}}
    )
    return tutils.tresp(
        content=json.dumps({"choices": [], **usage}).encode(),
        headers=[(b"content-type", b"application/json")],
    )


@pytest.fixture
def config_file(tmp_path):
    def write(text: str):
        path = tmp_path / "cooldown.yaml"
        path.write_text(text)
        return str(path)

    return write


@pytest.fixture
def addon_ctx(config_file):
    """A Cooldown addon in a mitmproxy test context with tiny limits."""
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings,
            cerebras_config=config_file(
                "cerebras_limits:\n  rpm_limit: 2\n  tpm_limit: 1000\n  max_queue_depth: 2\n"
                "  max_retries: 0\n"
                "circuit_breaker:\n  failure_threshold: 3\n  open_duration: 30s\n"
            ),
        )
        yield addon, tctx


def departures():
    """The departures addon of the Cooldown in the current mitmproxy test context."""
    return ctx.master.addons.get("cooldown-departures")


async def until(predicate, steps=100):
    """Let other tasks run until `predicate()` holds (bounded; no wall-clock sleeps)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def hold_one(addon):
    """Fill the bucket (tpm 1000) with one request, then hold a second: (flow, its task)."""
    await addon.request(cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 990}))
    held = cerebras_flow()
    task = asyncio.ensure_future(addon.request(held))
    await until(lambda: held.intercepted)
    return held, task


async def test_other_hosts_pass_untouched(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow(host="api.openai.com")
    await addon.request(f)
    assert f.response is None
    assert "cooldown_estimate" not in f.metadata
    assert addon.status()["submitted"] == 0


async def test_unmetered_cerebras_paths_are_not_held(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow(path="/v1/models")
    f.request.method = "GET"
    await addon.request(f)
    assert f.response is None
    assert addon.status()["submitted"] == 0


async def test_request_under_the_limits_is_forwarded_and_settled(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow()
    await addon.request(f)
    assert f.response is None
    assert f.metadata["cooldown_estimate"] > 10
    assert addon.status()["in_flight_flows"] == 1
    f.response = ok_response(total_tokens=12)
    await addon.response(f)
    status = addon.status()
    assert status["open_reservations"] == 0
    assert status["usage"]["m"]["tpm"] == pytest.approx(12 / 1000, abs=1e-4)
    assert f.metadata["cooldown_actual_tokens"] == 12
    estimate = f.metadata["cooldown_estimate"]
    # With the prompt cache modelled (the default): predicted, then reported, cached tokens.
    assert f.comment == (
        f"Cooldown: forwarded at once, estimate {estimate} tokens, 0 cached (predicted), "
        "actual 12 tokens (0 cached)"
    )


async def test_held_flow_is_intercepted_with_a_comment_then_released(addon_ctx):
    addon, _ = addon_ctx
    first = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 900})
    await addon.request(first)
    second = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 500})
    task = asyncio.ensure_future(addon.request(second))
    await until(lambda: second.intercepted)
    assert second.comment.startswith("Cooldown: HELD for m (#1 in queue), waiting for")
    assert addon.status()["queue_depth"] == 1
    first.response = ok_response(total_tokens=50)
    await addon.response(first)  # frees capacity: the held flow goes
    await task
    assert not second.intercepted
    assert second.response is None
    assert second.comment.startswith("Cooldown: waited ")
    assert addon.status()["queue_depth"] == 0


async def test_a_request_larger_than_the_token_limit_is_answered_at_once(addon_ctx):
    addon, _ = addon_ctx  # tpm_limit 1000
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    f = cerebras_flow({**body, "max_completion_tokens": 5_000})
    await addon.request(f)  # returns without waiting: nothing else could release it
    assert not f.intercepted
    assert f.response.status_code == 413
    error = json.loads(f.response.content)["error"]
    assert error["code"] == "request_too_large"
    needed = f.metadata["cooldown_estimate"]
    assert f"needs at least {needed:,} tokens" in error["message"]
    assert "tokens per minute limit of m (tpm_limit: 1,000)" in error["message"]
    assert "Cooldown proxy, not by Cerebras" in error["message"]
    assert "retry-after" not in f.response.headers  # no retry can ever succeed
    assert f.response.headers["x-cooldown-refused"] == "request_too_large"
    assert f.metadata["cooldown_refused"] == "too_large"
    assert "REFUSED (too_large) by the proxy" in f.comment
    status = addon.status()
    assert status["refused"] == {"too_large": 1}
    assert status["open_reservations"] == 0 and status["tracked_flows"] == 0
    assert addon.runtime.metrics.snapshot()["requests"]["m"] == {"refused_too_large": 1}
    # Without an output limit the reservation is our guess, not the client's ask: held, as
    # before, rather than refused.
    guessed = cerebras_flow(body)
    await addon.request(guessed)
    assert guessed.response is None


async def test_more_than_the_context_is_answered_400_like_upstream(config_file):
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings,
            cerebras_config=config_file("models:\n  m:\n    context_length: 100\n"),
        )
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        f = cerebras_flow({**body, "max_completion_tokens": 10_000_000})
        await cooldown.metering.request(f)
    assert f.response.status_code == 400
    error = json.loads(f.response.content)["error"]
    assert error["code"] == "context_length_exceeded"
    assert "it asks for 10,000,009 tokens (9 of input, 10,000,000 of output)" in error["message"]
    assert "more than the context length of m (100, context_length" in error["message"]


async def test_queue_full_gets_the_proxys_own_429(addon_ctx):
    addon, _ = addon_ctx
    await addon.request(cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 990}))
    held = [cerebras_flow() for _ in range(2)]
    tasks = [asyncio.ensure_future(addon.request(f)) for f in held]
    await until(lambda: addon.status()["queue_depth"] == 2)
    refused = cerebras_flow()
    await addon.request(refused)
    assert refused.response.status_code == 429
    body = json.loads(refused.response.content)
    assert body["error"]["code"] == "queue_full"
    assert "Cooldown proxy, not by Cerebras" in body["error"]["message"]
    assert int(refused.response.headers["retry-after"]) >= 1
    assert refused.metadata["cooldown_refused"] == "queue_full"
    # What mitmdump's flow line prints (HTTP/1): the proxy's own answer, not Cerebras's.
    assert refused.response.reason == "Too Many Requests [Cooldown: queue_full]"
    assert refused.comment.startswith("Cooldown: REFUSED (queue_full) by the proxy")
    assert not refused.marked  # mitmweb would show any marker as an emoji
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_client_disconnect_while_held_leaves_the_queue_and_takes_nothing(addon_ctx):
    addon, _ = addon_ctx
    first = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 990})
    await addon.request(first)
    held = cerebras_flow()
    task = asyncio.ensure_future(addon.request(held))
    await until(lambda: addon.status()["queue_depth"] == 1)
    held.client_conn.state = connection.ConnectionState.CLOSED
    departures().client_disconnected(held.client_conn)
    await task
    assert held.response is None
    status = addon.status()
    assert status["queue_depth"] == 0
    assert status["held_flows"] == 0
    assert status["tracked_flows"] == 1  # `first`, in flight; nothing left of `held`
    assert status["open_reservations"] == 1  # only the first flow's


async def test_killed_while_held_leaves_the_queue(addon_ctx):
    addon, tctx = addon_ctx
    held, task = await hold_one(addon)
    tctx.master.commands.call("flow.kill", [held])  # the console's kill: an update hook
    await task
    assert held.error.msg == flow.Error.KILLED_MESSAGE
    assert addon.status()["queue_depth"] == 0
    assert addon.status()["open_reservations"] == 1


@pytest.mark.parametrize("where", ["console", "mitmweb"])
async def test_resumed_by_hand_is_paused_again_and_says_so(addon_ctx, where):
    """The console's flow.resume triggers an update hook; mitmweb's Resume button does not."""
    addon, tctx = addon_ctx
    held, task = await hold_one(addon)
    for _ in range(2):  # twice: paused again each time, the note not repeated
        if where == "console":
            tctx.master.commands.call("flow.resume", [held])
        else:
            held.resume()  # what mitmweb's ResumeFlow handler does (then refreshes its view)
        await until(lambda: held.intercepted)  # re-paused: the limiter still decides
    assert held.comment.count("resumed by hand, still HELD: the rate limits decide") == 1
    assert addon.status()["queue_depth"] == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_killed_in_mitmweb_leaves_the_queue_at_the_next_check(addon_ctx):
    """mitmweb's Kill button kills the flow and triggers no update hook."""
    addon, _ = addon_ctx
    held, task = await hold_one(addon)
    for _ in range(3):
        await asyncio.sleep(0)  # the resume watch starts waiting
    held.kill()  # what mitmweb's KillFlow handler does
    assert departures().check_resets() == 1  # what the once-a-second check finds
    await task
    assert addon.status()["queue_depth"] == 0 and addon.status()["tracked_flows"] == 1
    assert departures().watching == 1  # its resume never comes: the next check ends it
    departures().check_resets()
    assert departures().watching == 0


async def test_a_held_request_is_logged_at_info_with_why(addon_ctx, caplog):
    addon, tctx = addon_ctx
    _, task = await hold_one(addon)
    pages = tctx.master.addons.get("cooldown-status")
    with caplog.at_level(logging.INFO):
        [line] = pages.report_held()
        assert pages.report_held() == []  # not again within the interval
    assert line.startswith("1 held for m, oldest ")
    assert "waiting for upstream's first answer (probe_first), next release in 2.0s" in line
    assert f"Cooldown: {line}" in caplog.messages
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert pages.report_held() == []  # nothing held: nothing to say


async def test_breaker_opens_after_consecutive_upstream_429s(addon_ctx):
    from .helpers import FakeClock

    addon, _ = addon_ctx
    clock = addon.runtime.gate.clock = FakeClock()
    for _ in range(3):
        f = cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 1})
        await addon.request(f)
        assert f.response is None
        f.response = tutils.tresp(
            status_code=429, content=b'{"message":"Tokens per minute limit exceeded"}'
        )
        await addon.response(f)  # the reservation is given back; the model cools down 1 s
        clock.advance(1.0)
    refused = cerebras_flow()
    await addon.request(refused)
    assert refused.response.status_code == 503
    body = json.loads(refused.response.content)
    assert body["error"]["code"] == "circuit_open"
    assert int(refused.response.headers["retry-after"]) == 29  # opened 1 s ago, for 30 s
    assert addon.status()["breaker"] == "open"


async def test_error_before_upstream_gives_the_reservation_back(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow()
    await addon.request(f)
    f.server_conn.timestamp_tcp_setup = None
    f.error = flow.Error("Connect call failed")
    addon.error(f)
    status = addon.status()
    assert status["open_reservations"] == 0
    assert status["usage"]["m"] == {"rpm": 0.0, "tpm": 0.0}


async def test_error_after_upstream_keeps_the_estimate(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow()
    await addon.request(f)
    f.server_conn.timestamp_tcp_setup = 1.0
    f.error = flow.Error("server closed connection")
    addon.error(f)
    status = addon.status()
    assert status["open_reservations"] == 0
    estimate = f.metadata["cooldown_estimate"]
    assert status["usage"]["m"]["tpm"] == pytest.approx(estimate / 1000, abs=1e-4)


async def test_response_without_usage_keeps_the_estimate(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow()
    await addon.request(f)
    f.response = ok_response(total_tokens=None)
    await addon.response(f)
    assert addon.status()["usage"]["m"]["tpm"] == pytest.approx(
        f.metadata["cooldown_estimate"] / 1000, abs=1e-4
    )


async def test_unparseable_body_is_estimated_conservatively_not_refused(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow(b"\xff\x00 not json at all")
    await addon.request(f)
    assert f.response is None  # forwarded (the limit is 1000 tokens; the fallback is clamped)
    assert f.metadata["cooldown_estimate"] >= 131072


async def test_upstream_override_routes_metered_and_unmetered_requests(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings,
            cerebras_config=config_file("cerebras_upstream: http://127.0.0.1:8765\n"),
        )
        for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
            f = cerebras_flow(path=path)
            f.request.method = method
            await addon.request(f)
            assert (f.request.scheme, f.request.host, f.request.port) == ("http", "127.0.0.1", 8765)


def test_bad_config_at_start_up_exits_with_one_clear_line(config_file, caplog):
    """SystemExit with a message: Python prints it on stderr and exits with status 1."""
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx, pytest.raises(SystemExit) as exited:
        tctx.configure(
            cooldown.settings, cerebras_config=config_file("cerebras_limits:\n  rpm_limit: lots\n")
        )
    message = exited.value.code
    assert isinstance(message, str)
    assert message.startswith("Cooldown cannot start: cerebras_config: ")
    assert "cerebras_limits.rpm_limit: got 'lots'; expected a positive integer" in message
    assert "\n" not in message
    assert exited.value.__cause__ is None and exited.value.__suppress_context__
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class ListeningProxyserver:
    """Stands in for mitmproxy's proxyserver once its listeners are up."""

    name = "proxyserver"

    def listen_addrs(self):
        return [("127.0.0.1", 8080)]


def test_bad_config_when_the_script_reloads_in_a_running_proxy_does_not_exit(config_file, caplog):
    """mitmproxy re-runs addon/cerebras.py on a script edit: fresh addons, servers already
    up. Exiting then would drop every flow; the error is logged and the defaults apply."""
    cooldown = Cooldown()
    with taddons.context(ListeningProxyserver(), *cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings, cerebras_config=config_file("cerebras_limits:\n  rpm_limit: 0\n")
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("Cooldown cannot start: cerebras_config: ")
    assert cooldown.runtime.config.cerebras_limits.rpm_limit == 1000  # the built-in default


def test_bad_config_on_reload_keeps_the_running_config(config_file, tmp_path):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings, cerebras_config=config_file("cerebras_limits:\n  rpm_limit: 7\n")
        )
        addon.runtime.running = True
        bad = tmp_path / "bad.yaml"
        bad.write_text("cerebras_limits: {rpm_limit: 0}\n")
        with pytest.raises(exceptions.OptionsError, match="keeping the running config"):
            tctx.configure(cooldown.settings, cerebras_config=str(bad))
        assert addon.runtime.config.cerebras_limits.rpm_limit == 7


async def test_no_secret_or_prompt_in_debug_logs(addon_ctx, caplog):
    addon, _ = addon_ctx
    caplog.set_level(logging.DEBUG)
    prompt = "my very private prompt text"

    def private_flow(max_tokens):
        messages = [{"role": "user", "content": prompt}]
        return cerebras_flow(
            {"model": "m", "messages": messages, "max_completion_tokens": max_tokens}
        )

    first = private_flow(980)
    await addon.request(first)  # forwarded
    held = [private_flow(5) for _ in range(2)]
    tasks = [asyncio.ensure_future(addon.request(f)) for f in held]
    await until(lambda: addon.status()["queue_depth"] == 2)
    await addon.request(private_flow(5))  # refused: queue full
    held[0].client_conn.state = connection.ConnectionState.CLOSED
    departures().client_disconnected(held[0].client_conn)  # leaves the queue
    first.response = ok_response()
    await addon.response(first)  # settles and releases the other held flow
    await asyncio.gather(*tasks)
    assert len(caplog.records) >= 4, "expected decision records to inspect"
    for record in caplog.records:
        text = record.getMessage()
        assert SECRET not in text and "Bearer" not in text and prompt not in text


async def test_shutdown_answers_held_flows_with_503(addon_ctx):
    addon, _ = addon_ctx
    await addon.request(cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 990}))
    held = cerebras_flow()
    task = asyncio.ensure_future(addon.request(held))
    await until(lambda: addon.status()["queue_depth"] == 1)
    addon.done()
    await task
    assert held.response.status_code == 503
    assert json.loads(held.response.content)["error"]["code"] == "proxy_shutting_down"
    assert held.metadata["cooldown_refused"] == Outcome.SHUTDOWN.value


# -- streaming, upstream headers, retries ------------------------------------------------------


async def test_stream_request_gets_include_usage_and_the_response_is_tapped(addon_ctx):
    addon, _ = addon_ctx
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 10,
    }
    f = cerebras_flow(body)
    await addon.request(f)
    sent = json.loads(f.request.content)
    assert sent["stream_options"] == {"include_usage": True}
    assert f.metadata["cooldown_added_include_usage"]
    f.response = tutils.tresp(content=None, headers=[(b"content-type", b"text/event-stream")])
    addon.responseheaders(f)
    tap = f.response.stream
    assert callable(tap)
    usage = b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}'
    chunk = b'data: {"choices":[],' + usage + b"}\n\ndata: [DONE]\n\n"
    assert tap(chunk) == chunk
    tap(b"")
    await addon.response(f)
    assert f.metadata["cooldown_actual_tokens"] == 7
    assert addon.status()["usage"]["m"]["tpm"] == pytest.approx(7 / 1000, abs=1e-4)


async def test_client_asking_for_usage_keeps_its_body(addon_ctx):
    addon, _ = addon_ctx
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "messages": []}
    f = cerebras_flow(body)
    raw = f.request.content
    await addon.request(f)
    assert f.request.content == raw
    assert "cooldown_added_include_usage" not in f.metadata


async def test_stream_broken_after_usage_settles_on_usage(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow({"model": "m", "stream": True, "messages": [], "max_completion_tokens": 500})
    await addon.request(f)
    f.response = tutils.tresp(content=None, headers=[(b"content-type", b"text/event-stream")])
    addon.responseheaders(f)
    f.response.stream(b'data: {"usage":{"total_tokens":42}}\n\n')
    f.error = flow.Error("connection reset")
    addon.error(f)
    status = addon.status()
    assert status["open_reservations"] == 0
    assert status["usage"]["m"]["tpm"] == pytest.approx(42 / 1000, abs=1e-4)


async def test_upstream_headers_correct_the_local_picture(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow()
    await addon.request(f)
    f.response = ok_response(total_tokens=12)
    f.response.headers["x-ratelimit-limit-tokens-minute"] = "1000"
    f.response.headers["x-ratelimit-remaining-tokens-minute"] = "100"  # another client used 900
    f.response.headers["x-ratelimit-reset-tokens-minute"] = "54"
    addon.responseheaders(f)
    await addon.response(f)
    assert addon.status()["usage"]["m"]["tpm"] == pytest.approx(0.9, abs=0.01)


def reported(response, remaining: str):
    """`response` with upstream's report of its tokens-per-minute limit (1000)."""
    response.headers["x-ratelimit-limit-tokens-minute"] = "1000"
    response.headers["x-ratelimit-remaining-tokens-minute"] = remaining
    response.headers["x-ratelimit-reset-tokens-minute"] = "54"
    return response


async def test_a_whole_answer_is_confirmed_with_its_body_and_a_stream_at_its_headers(addon_ctx):
    addon, _ = addon_ctx
    whole = cerebras_flow()
    await addon.request(whole)
    whole.response = reported(ok_response(total_tokens=12), "100")
    addon.responseheaders(whole)
    # Its client gets the headers only with the body: nothing is read or added before.
    assert "X-Cooldown-Wait" not in whole.response.headers
    assert addon.status()["usage"]["m"]["tpm"] < 0.5
    await addon.response(whole)
    assert whole.response.headers["X-RateLimit-Limit-TPM"] == "1000"
    assert addon.status()["usage"]["m"]["tpm"] == pytest.approx(0.9, abs=0.01)

    stream = cerebras_flow({"model": "m", "stream": True, "messages": []})
    await addon.request(stream)
    stream.response = reported(
        tutils.tresp(content=None, headers=[(b"content-type", b"text/event-stream")]), "50"
    )
    addon.responseheaders(stream)
    # A stream's headers go at once: the proxy's view and upstream's report are taken now.
    assert "X-Cooldown-Wait" in stream.response.headers
    assert addon.status()["usage"]["m"]["tpm"] >= 0.95


async def test_a_whole_answer_broken_off_after_its_headers_is_confirmed_and_settled(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow()
    await addon.request(f)
    f.response = reported(ok_response(total_tokens=12), "100")
    addon.responseheaders(f)
    f.error = flow.Error("connection reset")
    addon.error(f)
    status = addon.status()
    assert status["open_reservations"] == 0
    assert status["tracked_flows"] == 0
    assert status["usage"]["m"]["tpm"] == pytest.approx(0.9, abs=0.01)  # its report counted


async def test_the_proxys_headers_replace_any_an_answer_already_had(addon_ctx):
    addon, _ = addon_ctx
    f = cerebras_flow()
    await addon.request(f)
    f.response = ok_response()
    f.response.headers["X-Cooldown-Wait"] = "99"
    f.response.headers["x-ratelimit-limit-rpm"] = "7"
    addon.responseheaders(f)
    await addon.response(f)
    assert f.response.headers.get_all("X-Cooldown-Wait") != ["99"]
    assert len(f.response.headers.get_all("X-Cooldown-Wait")) == 1
    assert f.response.headers.get_all("X-RateLimit-Limit-RPM") == ["2"]


async def test_429_without_retries_left_reaches_the_client_and_is_counted(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings, cerebras_config=config_file("cerebras_limits:\n  max_retries: 0\n")
        )
        f = cerebras_flow()
        await addon.request(f)
        f.response = tutils.tresp(status_code=429, content=b'{"code":"token_quota_exceeded"}')
        await addon.response(f)
        assert f.response.status_code == 429
        assert addon.status()["upstream_429s"] == 1
        assert addon.status()["open_reservations"] == 0


@pytest.fixture
def mock_upstream(mock_cerebras_module):
    with mock_cerebras_module.MockCerebras(
        mock_cerebras_module.MockSettings(rpm=None, tpm=None)
    ) as mock:
        yield mock


async def test_429_is_retried_transparently_after_the_cooldown(config_file, mock_upstream):
    """The real path: a copy replayed by mitmproxy's replay handler, sent to the mock."""
    cooldown = Cooldown()
    addon = cooldown.metering
    # Proxyserver brings the options mitmproxy's connection handling reads.
    with taddons.context(*cooldown.addons, Proxyserver()) as tctx:
        tctx.configure(
            cooldown.settings,
            cerebras_config=config_file(
                f"cerebras_upstream: {mock_upstream.url}\ncerebras_limits:\n  max_retries: 2\n"
            ),
        )
        f = cerebras_flow()
        await addon.request(f)
        assert f.request.port == mock_upstream.port
        f.response = rate_limited(retry_after=b"0")
        addon.responseheaders(f)
        await asyncio.wait_for(addon.response(f), 10)  # holds a copy, replays it to the mock
        assert f.response.status_code == 200
        body = json.loads(f.response.content)
        assert body["usage"]["total_tokens"] > 0
        assert f.response.headers["x-cooldown-estimated-tokens"] == str(
            f.metadata["cooldown_estimate"]
        )
        assert f.metadata["cooldown_attempts"] == 2
        assert f.metadata["cooldown_actual_tokens"] == body["usage"]["total_tokens"]
        assert mock_upstream.stats()["ok"] == 1
        await until(lambda: addon.status()["retrying_flows"] == 0)
        status = addon.status()
        assert status["upstream_429s"] == 1
        assert status["open_reservations"] == 0
        assert status["queue_depth"] == 0
        assert status["in_flight_flows"] == 0


def rate_limited(retry_after: bytes = b"0"):
    return tutils.tresp(
        status_code=429,
        content=b'{"message":"Tokens per minute limit exceeded","param":"quota",'
        b'"code":"token_quota_exceeded"}',
        headers=[(b"retry-after", retry_after)],
    )


class FakeReplays:
    """Stands in for mitmproxy's replay of a retry's copy (no sockets): runs the copy through
    the addon's hooks as mitmproxy would and answers it with the next of `answers`: a
    Response; "error" (the connection failed); "stall" (upstream reached, no answer until
    the replay is stopped); or "stall, then 429" (stopped, then upstream's 429 arrives)."""

    def __init__(self, addon, *answers):
        self.addon = addon
        self.answers = list(answers)
        self.copies = []
        self.stopped = 0
        addon.retries.replay_handler = self

    def __call__(self, f, options):
        return FakeReplay(self, f)


class FakeReplay:
    def __init__(self, replays, f):
        self.replays = replays
        self.flow = f
        self._stop = asyncio.Event()

    def stop(self):
        self.replays.stopped += 1
        self._stop.set()
        return True

    async def replay(self):
        f, addon = self.flow, self.replays.addon
        f.live = True
        self.replays.copies.append(f)
        await addon.request(f)
        if f.error:  # killed in the request hook: mitmproxy runs the error hook
            addon.error(f)
            return
        if f.response is None:  # released: "send" it
            answer = self.replays.answers.pop(0)
            if answer in ("stall", "stall, then 429"):
                f.server_conn.timestamp_tcp_setup = time.time()
                await self._stop.wait()
                answer = "error" if answer == "stall" else rate_limited()
            if answer == "error":
                f.error = flow.Error("Connection closed")
                addon.error(f)
                return
            f.response = answer
        addon.responseheaders(f)
        await addon.response(f)


def retry_config(config_file, extra=""):
    return config_file(
        "cerebras_limits:\n  tpm_limit: 100000\n  max_retries: 2\n"
        "circuit_breaker:\n  failure_threshold: 10\n" + extra
    )


async def test_retry_is_a_metered_copy_settled_by_its_own_hooks(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        replays = FakeReplays(addon, ok_response(total_tokens=15))
        f = cerebras_flow()
        await addon.request(f)
        estimate = f.metadata["cooldown_estimate"]
        f.response = rate_limited()
        addon.responseheaders(f)
        await asyncio.wait_for(addon.response(f), 5)

        (copy,) = replays.copies
        assert copy.id != f.id
        assert copy.is_replay == "request"
        assert copy.metadata["cooldown_retry_of"] == f.id
        assert copy.metadata["cooldown_attempt"] == 2
        assert copy.comment.startswith(f"Cooldown: retry of flow {f.id} (attempt 2)")
        # The copy re-sends the request as the addon released it: to Cerebras, not routed yet.
        assert copy.request.pretty_host == "api.cerebras.ai"
        assert copy.request.content == f.request.content
        assert copy.metadata["cooldown_estimate"] == estimate
        assert copy.metadata["cooldown_actual_tokens"] == 15

        assert f.response.status_code == 200
        assert json.loads(f.response.content)["usage"]["total_tokens"] == 15
        assert f.response.headers["x-cooldown-estimated-tokens"] == str(estimate)
        assert f.metadata["cooldown_attempts"] == 2
        assert f.metadata["cooldown_actual_tokens"] == 15
        assert copy.id in f.comment
        await until(lambda: addon.status()["retrying_flows"] == 0)
        assert addon.status()["open_reservations"] == 0
        snapshot = addon.runtime.metrics.snapshot()
        # Settled once, on the copy's usage (the 429'd attempt has no usage).
        ratios = snapshot["estimate_to_actual_ratio"]["m"]
        assert (ratios["count"], ratios["p50"]) == (1, pytest.approx(estimate / 15))
        # One client request: forwarded once; the copy is counted as a retry.
        assert snapshot["requests"] == {"m": {"forwarded": 1}}
        assert snapshot["upstream_429s"] == {"m": {"quota": 1}}
        assert b'cooldown_retries_total{model="m"} 1.0' in addon.runtime.metrics.prometheus()


async def test_a_copy_that_draws_a_429_is_retried_in_turn(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        replays = FakeReplays(addon, rate_limited(), ok_response(total_tokens=9))
        f = cerebras_flow()
        await addon.request(f)
        f.response = rate_limited()
        await asyncio.wait_for(addon.response(f), 5)
        first, second = replays.copies
        assert second.metadata["cooldown_retry_of"] == first.id
        assert second.metadata["cooldown_attempt"] == 3
        assert f.response.status_code == 200
        assert f.metadata["cooldown_attempts"] == 3
        await until(lambda: addon.status()["retrying_flows"] == 0)
        assert addon.status()["open_reservations"] == 0
        snapshot = addon.runtime.metrics.snapshot()
        assert snapshot["requests"] == {"m": {"forwarded": 1}}
        assert snapshot["upstream_429s"] == {"m": {"quota": 2}}
        assert b'cooldown_retries_total{model="m"} 2.0' in addon.runtime.metrics.prometheus()


async def test_the_last_429_reaches_the_client_when_retries_run_out(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        replays = FakeReplays(addon, rate_limited(), rate_limited())
        f = cerebras_flow()
        await addon.request(f)
        f.response = rate_limited()
        await asyncio.wait_for(addon.response(f), 5)
        assert len(replays.copies) == 2  # max_retries: 2
        assert f.response.status_code == 429
        assert f.metadata["cooldown_attempts"] == 3
        await until(lambda: addon.status()["retrying_flows"] == 0)
        assert addon.status()["open_reservations"] == 0
        assert addon.runtime.metrics.snapshot()["upstream_429s"] == {"m": {"quota": 3}}


async def test_a_retried_stream_is_buffered_and_settled_on_its_usage(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        events = (
            b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,'
            b'"total_tokens":7}}\n\ndata: [DONE]\n\n'
        )
        stream = tutils.tresp(content=events, headers=[(b"content-type", b"text/event-stream")])
        replays = FakeReplays(addon, stream)
        f = cerebras_flow({"model": "m", "messages": [], "stream": True})
        await addon.request(f)
        estimate = f.metadata["cooldown_estimate"]
        f.response = rate_limited()
        await asyncio.wait_for(addon.response(f), 5)
        (copy,) = replays.copies
        assert copy.response.stream is False  # buffered, not tapped on the way
        assert f.response.content == events  # the client gets the stream whole
        assert f.metadata["cooldown_actual_tokens"] == 7
        await until(lambda: addon.status()["retrying_flows"] == 0)
        assert addon.status()["open_reservations"] == 0
        ratios = addon.runtime.metrics.snapshot()["estimate_to_actual_ratio"]["m"]
        assert (ratios["count"], ratios["p50"]) == (1, pytest.approx(estimate / 7))


async def test_client_gone_while_the_copy_is_held_stops_it(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        replays = FakeReplays(addon)  # nothing may be sent
        f = cerebras_flow()
        await addon.request(f)
        f.response = rate_limited(retry_after=b"30")  # the model pauses: the copy is held
        task = asyncio.ensure_future(addon.response(f))
        await until(lambda: replays.copies and replays.copies[0].intercepted)
        assert addon.status()["queue_depth"] == 1
        departures().client_disconnected(f.client_conn)
        await asyncio.wait_for(task, 5)
        (copy,) = replays.copies
        assert copy.error is not None and copy.error.msg == flow.Error.KILLED_MESSAGE
        assert f.metadata["cooldown_refused"] == "client_gone"
        await until(lambda: addon.status()["retrying_flows"] == 0)
        status = addon.status()
        assert (status["queue_depth"], status["open_reservations"]) == (0, 0)
        assert addon.runtime.metrics.snapshot()["requests"]["m"] == {"forwarded": 1, "cancelled": 1}


async def test_client_gone_while_the_copy_is_in_flight_stops_it(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        replays = FakeReplays(addon, "stall")
        f = cerebras_flow()
        await addon.request(f)
        f.response = rate_limited()
        task = asyncio.ensure_future(addon.response(f))
        await until(lambda: addon.status()["in_flight_flows"] == 1 and replays.copies)
        departures().client_disconnected(f.client_conn)
        await asyncio.wait_for(task, 5)
        assert replays.stopped == 1
        assert f.metadata["cooldown_refused"] == "client_gone"
        await until(lambda: addon.status()["retrying_flows"] == 0)
        status = addon.status()
        assert (status["in_flight_flows"], status["open_reservations"]) == (0, 0)


async def test_a_stopped_copy_that_draws_a_429_is_not_retried(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        replays = FakeReplays(addon, "stall, then 429")
        f = cerebras_flow()
        await addon.request(f)
        f.response = rate_limited()
        task = asyncio.ensure_future(addon.response(f))
        await until(lambda: addon.status()["in_flight_flows"] == 1 and replays.copies)
        departures().client_disconnected(f.client_conn)
        await asyncio.wait_for(task, 5)
        await until(lambda: addon.status()["retrying_flows"] == 0)
        assert len(replays.copies) == 1  # its 429 is settled, not retried for nobody
        status = addon.status()
        assert (status["in_flight_flows"], status["open_reservations"]) == (0, 0)
        assert addon.runtime.metrics.snapshot()["upstream_429s"] == {"m": {"quota": 2}}


async def test_a_failed_retry_answers_502(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=retry_config(config_file))
        FakeReplays(addon, "error")
        f = cerebras_flow()
        await addon.request(f)
        f.response = rate_limited()
        await asyncio.wait_for(addon.response(f), 5)
        assert f.response.status_code == 502
        error = json.loads(f.response.content)["error"]
        assert error["code"] == "retry_failed"
        assert "Connection closed" in error["message"]
        assert f.metadata["cooldown_refused"] == "retry_failed"
        await until(lambda: addon.status()["retrying_flows"] == 0)
        assert addon.status()["open_reservations"] == 0


async def test_a_retry_refused_by_the_open_breaker_answers_503(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings,
            cerebras_config=config_file(
                "cerebras_limits:\n  max_retries: 2\n"
                "circuit_breaker:\n  failure_threshold: 1\n  open_duration: 30s\n"
            ),
        )
        replays = FakeReplays(addon)
        f = cerebras_flow()
        await addon.request(f)
        f.response = rate_limited()
        await asyncio.wait_for(addon.response(f), 5)
        assert len(replays.copies) == 1
        assert f.response.status_code == 503
        assert f.response.headers["x-cooldown-refused"] == "circuit_open"
        assert f.metadata["cooldown_refused"] == "breaker_open"
        await until(lambda: addon.status()["retrying_flows"] == 0)
        assert addon.status()["open_reservations"] == 0
        requests = addon.runtime.metrics.snapshot()["requests"]["m"]
        assert requests == {"forwarded": 1, "refused_breaker_open": 1}


async def test_no_retry_without_the_request_as_released(config_file):
    """`max_retries: 0` keeps no copy of the request (nothing to retry with)."""
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings, cerebras_config=config_file("cerebras_limits:\n  max_retries: 0\n")
        )
        f = cerebras_flow()
        await addon.request(f)
        assert addon.table.get(f.id).request is None


def test_the_request_snapshot_does_not_follow_later_changes():
    f = cerebras_flow()
    snapshot = snapshot_request(f.request)
    f.request.host = "127.0.0.1"
    f.request.port = 8080
    f.request.headers["x-added"] = "1"
    f.request.content = b"changed"
    assert snapshot.host == "api.cerebras.ai" and snapshot.port == 443
    assert "x-added" not in snapshot.headers
    assert snapshot.content != b"changed"
    snapshot.headers["x-other"] = "2"
    assert "x-other" not in f.request.headers


async def test_a_huge_body_is_estimated_off_the_event_loop(config_file, monkeypatch):
    """A large body is tokenized in a worker thread (other flows keep moving meanwhile); a
    small one inline (a thread hop would cost more than it saves). Checked by where the
    work ran, not by timing it."""
    import threading

    import cooldown.flows as metering_module

    ran_on: list[threading.Thread] = []
    real = metering_module.prepare_request

    def recording(*args):
        ran_on.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(metering_module, "prepare_request", recording)
    words = " ".join(f"token{i % 5000} means {i}" for i in range(5_000))
    huge = cerebras_flow(
        {"model": "m", "messages": [{"role": "user", "content": words}], "max_tokens": 1}
    )
    assert len(huge.request.content) > metering_module.OFFLOAD_BODY_BYTES
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=config_file("cerebras_limits: {}\n"))
        await cooldown.metering.request(huge)
        await cooldown.metering.request(cerebras_flow())
    assert ran_on[0] is not threading.main_thread()
    assert ran_on[1] is threading.main_thread()
    assert huge.metadata["cooldown_estimate"] > 25_000
    assert "cooldown_refused" not in huge.metadata


async def test_config_file_changes_are_applied_and_bad_ones_kept_out(tmp_path, caplog):
    import os

    path = tmp_path / "live.yaml"
    path.write_text("cerebras_limits:\n  rpm_limit: 2\n  tpm_limit: 1000\n")
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        await addon.request(
            cerebras_flow({"model": "m", "messages": [], "max_completion_tokens": 990})
        )
        held = cerebras_flow()
        task = asyncio.ensure_future(addon.request(held))
        await until(lambda: addon.status()["queue_depth"] == 1)
        assert not cooldown.settings.reload_if_changed()  # unchanged

        path.write_text("cerebras_limits:\n  rpm_limit: [oops\n")
        os.utime(path, (1, 1))
        assert not cooldown.settings.reload_if_changed()
        assert addon.runtime.config.cerebras_limits.rpm_limit == 2
        assert any("keeping the running config" in r.getMessage() for r in caplog.records)
        assert addon.status()["queue_depth"] == 1  # still held, still served

        path.write_text("cerebras_limits:\n  rpm_limit: 5\n  tpm_limit: 5000\n")
        os.utime(path, (2, 2))
        assert cooldown.settings.reload_if_changed()
        assert addon.runtime.config.cerebras_limits.tpm_limit == 5000
        await task  # the new limit releases the held request; nothing was dropped
        assert held.response is None
        assert addon.status()["queue_depth"] == 0


async def test_after_shutdown_new_requests_are_answered_at_once(addon_ctx):
    addon, _ = addon_ctx
    addon.runtime.stopping = True  # what the shutdown watcher sets when mitmproxy is exiting
    f = cerebras_flow()
    await addon.request(f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["error"]["code"] == "proxy_shutting_down"
    assert addon.status()["submitted"] == 0


async def test_invented_model_names_share_one_key_past_the_cap(config_file, monkeypatch):
    import cooldown.routing as routing

    monkeypatch.setattr(routing, "MAX_MODELS", 3)
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings, cerebras_config=config_file("cerebras_limits:\n  rpm_limit: 100\n")
        )
        for i in range(6):
            body = {"model": f"made-up-{i}", "messages": [], "max_completion_tokens": 1}
            await addon.request(cerebras_flow(body))
        assert sorted(addon.runtime.gate.keys) == [
            "(other models)",
            "made-up-0",
            "made-up-1",
            "made-up-2",
        ]


async def test_a_huge_retry_after_is_capped_at_the_request_timeout(config_file):
    cooldown = Cooldown()
    addon = cooldown.metering
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(
            cooldown.settings,
            cerebras_config=config_file(
                "cerebras_limits:\n  max_retries: 0\n  request_timeout: 30s\n"
            ),
        )
        f = cerebras_flow()
        await addon.request(f)
        f.response = tutils.tresp(
            status_code=429, content=b"{}", headers=[(b"retry-after", b"86400")]
        )
        await addon.response(f)
        now = addon.runtime.gate.clock()
        assert addon.runtime.gate.scheduler.pauses.until("m", now) == pytest.approx(now + 30, abs=1)


def test_the_refund_credited_is_the_unused_output_and_only_for_streams():
    """Upstream gives back the output it reserved and did not use; a whole answer's own
    report (written when it is complete) may already show that, so it is not credited."""
    from cooldown.estimate import parse_request
    from cooldown.flows import MeteredFlow
    from cooldown.scheduler import Ticket
    from cooldown.settle import refund
    from cooldown.upstream import SSEUsageTap

    body = json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 500,
        }
    ).encode()
    shape = parse_request("/v1/chat/completions", body)
    estimate = shape.estimate(8192, None, 1.0)
    metered = MeteredFlow(cerebras_flow(body), "m", shape, retries_left=0)
    metered.estimate = estimate
    metered.ticket = Ticket(1, "m", estimate.total, 0.0, 60.0)
    usage = {"prompt_tokens": 9, "completion_tokens": 120, "total_tokens": 129}
    assert refund(metered, usage) == 0  # not streamed
    metered.tap = SSEUsageTap()
    assert estimate.output_tokens == 500
    assert refund(metered, usage) == 380
    assert refund(metered, None) is None


def test_under_mitmweb_the_flow_list_gets_a_comment_column():
    from mitmproxy.tools.web.webaddons import WebAddon

    cooldown = Cooldown()
    with taddons.context(WebAddon(), *cooldown.addons) as tctx:
        cooldown.web.configure(set(tctx.options.keys()))  # what loading the script runs
        assert tctx.options.web_columns == [*tctx.options.default("web_columns"), "comment"]
        tctx.configure(cooldown.web, web_columns=["path"])  # changed later: the user's
        assert tctx.options.web_columns == ["path"]


def test_a_web_columns_choice_of_the_users_stands():
    from mitmproxy.tools.web.webaddons import WebAddon

    cooldown = Cooldown()
    with taddons.context(WebAddon(), *cooldown.addons) as tctx:
        tctx.options.update(web_columns=["path", "status"])  # --set web_columns=...
        cooldown.web.configure(set(tctx.options.keys()))
        assert tctx.options.web_columns == ["path", "status"]


def test_without_mitmweb_no_column_is_added():
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        cooldown.web.configure(set(tctx.options.keys()))
        assert "web_columns" not in tctx.options
