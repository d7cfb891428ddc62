"""Limits shared through Redis: what only the shared backend does, on a real redis-server.

The contract both backends keep is tests/test_backends.py; here: exactly k admitted when
many proxies race for k, the queue heads that let the oldest request of any proxy go first,
leases, Redis Cluster hash tags, the script reloaded after Redis forgot it, and
`SharedLimiter` while Redis is away (`on_error`) and when it comes back.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cooldown.backends.redis import RedisLimiter
from cooldown.backends.shared import SharedLimiter
from cooldown.config import Config, SharedLimitsConfig, parse_config
from cooldown.gate import Gate
from cooldown.limiter import (
    SHARED_QUEUE,
    UPSTREAM_429,
    MemoryLimiter,
    Rate,
    RateReport,
    UpstreamDrift,
)
from cooldown.limiter import SHARED_UNAVAILABLE as UNAVAILABLE
from cooldown.runtime import Runtime
from cooldown.tickets import Outcome

RPM = Rate("rpm", "requests", 10)
TPM = Rate("tpm", "tokens", 600)

_prefixes = itertools.count(1)


@pytest.fixture
def prefix():
    return f"s{next(_prefixes)}:"


@pytest.fixture
def clients(shared_redis):
    """Fresh clients of the run's shared redis-server, closed after the test."""
    made = []

    def client():
        made.append(redis.Redis.from_url(shared_redis.url))
        return made[-1]

    yield client
    for c in made:
        c.close()


def proxy(clients, prefix, name, **options):
    """One proxy's limiter on the test's clock (`now` as passed)."""
    options.setdefault("max_wait", math.inf)
    options.setdefault("fresh_for", 0.0)
    return RedisLimiter(clients(), prefix, name, use_redis_time=False, **options)


# -- exactly k ---------------------------------------------------------------------------------


def test_eight_proxies_racing_for_k_admit_exactly_k(clients, prefix):
    """8 proxies x 200 concurrent reserves against a limit of k: exactly k go (Redis's own
    clock; a day's limit, so that nothing refills while they race)."""
    k = 500
    day = Rate("rpd", "requests", k, 86_400.0)
    limiters = [RedisLimiter(clients(), prefix, f"p{i}") for i in range(8)]
    counts = [0] * 8
    start = threading.Barrier(8)

    def race(i):
        start.wait()
        for _ in range(200):
            if limiters[i].try_acquire("m", (day,), 1, now=0.0).granted:
                counts[i] += 1

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == k
    assert sum(limiter.open_reservations() for limiter in limiters) == k


# -- the queue across proxies ------------------------------------------------------------------


def test_an_older_head_of_another_proxy_goes_first_when_both_do_not_fit(clients, prefix):
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.confirm(a.try_acquire("m", (TPM,), 600, now=0).reservation, now=0)
    # a's head (400 tokens, waiting since 0) fits at 40 s; b's fresh 100 alone would fit at 10
    for t in (10, 35):  # a asks again (as a waiting proxy does every second), then b
        assert a.try_acquire("m", (TPM,), 400, now=t, waited=t).binding == "tpm"
        behind = b.try_acquire("m", (TPM,), 100, now=t)
        assert (behind.granted, behind.binding) == (False, SHARED_QUEUE)
    assert a.try_acquire("m", (TPM,), 400, now=40, waited=40).granted  # a's head goes
    assert b.try_acquire("m", (TPM,), 100, now=41).binding == "tpm"  # no room left at all
    assert b.try_acquire("m", (TPM,), 100, now=50).granted


def test_a_higher_class_goes_before_an_older_request(clients, prefix):
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.confirm(a.try_acquire("m", (TPM,), 600, now=0).reservation, now=0)
    assert not a.try_acquire("m", (TPM,), 400, now=5, waited=5).granted
    # b's request is high priority: a's older normal one does not hold it back
    assert b.try_acquire("m", (TPM,), 100, now=10, priority=1).granted


def test_a_head_not_refreshed_is_forgotten(clients, prefix):
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.confirm(a.try_acquire("m", (TPM,), 600, now=0).reservation, now=0)
    assert not a.try_acquire("m", (TPM,), 400, now=5, waited=5).granted
    # a's client left; a never asks again. Its head stops counting within its TTL.
    assert b.try_acquire("m", (TPM,), 100, now=45).granted


def test_a_later_request_goes_beside_an_older_head_when_both_fit(clients, prefix):
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.confirm(a.try_acquire("m", (TPM,), 200, now=0).reservation, now=0)
    assert not a.try_acquire("m", (TPM,), 500, now=1, waited=1).granted  # fits at 10 s
    assert not b.try_acquire("m", (TPM,), 10, now=2).granted  # 180 + 500 + 10 > 600
    assert b.try_acquire("m", (TPM,), 10, now=12).granted  # 80 + 500 + 10: room for both
    assert a.try_acquire("m", (TPM,), 500, now=12, waited=12).granted


# -- leases, tags, scripts, restarts -----------------------------------------------------------


def test_a_reservation_nobody_settles_is_dropped_at_its_lease(clients, prefix):
    dead = proxy(clients, prefix, "dead", lease=30.0)
    alive = proxy(clients, prefix, "alive")
    flying = dead.try_acquire("m", (TPM,), 600, now=0)
    assert flying.granted
    assert not alive.try_acquire("m", (TPM,), 10, now=29).granted
    assert alive.try_acquire("m", (TPM,), 600, now=31).granted  # its in-flight amount is back
    assert alive.state("m")["tokens:60:f"] == 600  # only the new one in flight


def test_every_key_of_a_model_carries_its_hash_tag(clients, prefix):
    limiter = proxy(clients, prefix, "a")
    keys = limiter.keys_of("gpt-oss-120b")
    assert all(key.startswith(f"{prefix}{{gpt-oss-120b}}:") for key in keys)
    assert len(set(keys)) == len(keys)


def test_the_script_is_loaded_again_after_redis_forgot_it(clients, prefix):
    limiter = proxy(clients, prefix, "a")
    assert limiter.try_acquire("m", (TPM,), 10, now=0).granted
    clients().script_flush()
    assert limiter.try_acquire("m", (TPM,), 10, now=0).granted


def test_operations_on_reservations_a_restarted_redis_forgot_are_dropped(clients, prefix):
    limiter = proxy(clients, prefix, "a")
    reservation = limiter.try_acquire("m", (TPM,), 100, now=0).reservation
    clients().flushall()  # as after a restart: nothing on disk
    limiter.settle(reservation, 50, now=1)
    assert limiter.open_reservations() == 0
    assert limiter.used("m", TPM, 1) == 0  # the settle found nothing and charged nothing


# -- the Lua script decides as the in-process limiter does -------------------------------------

_op = st.one_of(
    st.tuples(st.just("acquire"), st.integers(1, 700), st.sampled_from([None, 300])),
    st.tuples(st.just("confirm"), st.integers(0, 30), st.none()),
    st.tuples(st.just("settle"), st.integers(0, 30), st.integers(0, 900)),
    st.tuples(st.just("release"), st.integers(0, 30), st.none()),
    st.tuples(st.just("wait"), st.integers(1, 40), st.none()),
    st.tuples(st.just("report"), st.integers(0, 600), st.integers(0, 5)),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(_op, max_size=40))
# Found by this test: the script's pace forgot the refill it computed for a refusal.
@example(
    ops=[("acquire", 1, None), ("wait", 1, None), ("acquire", 1, None), ("acquire", 299, None)]
)
def test_the_script_and_the_memory_limiter_make_the_same_decisions(clients, monkeypatch, ops):
    """Any sequence of acquires, confirms, settles, releases, waits and upstream's reports
    gets the same grants, the same waits and the same usage from both backends: buckets,
    paces, and upstream's view with its skip and stale rules, what a report carried by an
    answer may have missed (its reservation held, settled, or none), and others' usage
    learnt. (Refunds
    are not credited here: upstream refunds nothing, so both views learn a share of 0; the
    script credits them in batches, see test_backends.py. Nor is others' usage learnt: the
    shared view gets each proxy's estimate with its next report, one report later than the
    in-process view, so the learner, the same Python on both sides, is switched off.)"""
    monkeypatch.setattr(UpstreamDrift, "add", lambda self, *sample: None)
    rates = (
        Rate("rpm", "requests", 5),
        Rate("tpm", "tokens", 600, burst=0.5),
        Rate("total_tpm", "total_tokens", 900),
    )
    memory = MemoryLimiter(view_margin=0)
    shared = RedisLimiter(
        clients(),
        f"d{next(_prefixes)}:",
        "p",
        use_redis_time=False,
        lease=math.inf,
        max_wait=math.inf,
        fresh_for=0.0,
        view_margin=0.0,
    )
    now, held, finished = 0.0, [], []
    for kind, n, extra in ops:
        if kind == "wait":
            now += n / 4
        elif kind == "report":
            reports = [RateReport("tokens", 60.0, 600, n, float(extra) * 10)]
            if extra % 2:
                reports.append(RateReport("requests", 60.0, 5, extra, 5.0))
            # Carried by the answer to a reservation still held, to one no longer held, or none.
            pair = (None, None)
            if extra >= 3 and held:
                pair = held[n % len(held)]
            elif extra == 2 and finished:
                pair = finished[-1]
            one_news = memory.observe("m", reports, now, reporter=pair[0])
            assert one_news == shared.observe("m", reports, now, reporter=pair[1])
        elif kind == "acquire":
            one = memory.try_acquire("m", rates, n, now, extra)
            two = shared.try_acquire("m", rates, n, now, extra)
            assert (one.granted, one.binding) == (two.granted, two.binding)
            assert one.wait == pytest.approx(two.wait, abs=1e-6)
            if one.granted:
                held.append((one.reservation, two.reservation))
        elif held:
            first, second = held[n % len(held)]
            if kind == "confirm":
                memory.confirm(first, now)
                shared.confirm(second, now)
            elif kind == "settle":
                memory.settle(first, extra, now, refund=0)
                shared.settle(second, extra, now, refund=0)
                held.remove((first, second))
                finished.append((first, second))
            else:
                memory.release(first, now)
                shared.release(second, now)
                held.remove((first, second))
                finished.append((first, second))
        for rate in rates:
            assert memory.used("m", rate, now) == pytest.approx(shared.used("m", rate, now))
    assert memory.open_reservations() == shared.open_reservations()


# -- SharedLimiter: Redis away and back --------------------------------------------------------


def reconnects(limiter, now=0.0, timeout=10.0):
    """Tick (as the proxy does every second) until the watcher thread has seen Redis answer
    and the limiter shares again; False after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        limiter.tick(now)
        if limiter.up:
            return True
        time.sleep(0.05)
    return False


def shared_limiter(server, on_error, prefix, instance="p1"):
    config = SharedLimitsConfig(redis_url=server.url, key_prefix=prefix, on_error=on_error)
    limiter = SharedLimiter(config, instance=instance)
    limiter.start(0.0)
    return limiter


@pytest.fixture
def own_redis(redis_server):
    """A redis-server of this test's own: it is killed and started again."""
    return redis_server


def test_while_redis_is_away_hold_keeps_requests_waiting(own_redis, prefix, caplog):
    limiter = shared_limiter(own_redis, "hold", prefix)
    assert limiter.shared_status()["state"] == "shared"
    own_redis.kill()
    with caplog.at_level(logging.WARNING, logger="cooldown.backends.shared"):
        for t in range(3):
            decision = limiter.try_acquire("m", (TPM,), 10, now=float(t))
            assert (decision.granted, decision.binding) == (False, UNAVAILABLE)
            assert not decision.unavailable and decision.wait > 0
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "unavailable" in caplog.records[0].message and "hold" in caplog.records[0].message
    assert own_redis.url.split("@")[-1] in caplog.records[0].message
    assert limiter.shared_status()["state"] == "holding"
    own_redis.start()
    assert reconnects(limiter)
    assert limiter.shared_status()["state"] == "shared"
    assert limiter.try_acquire("m", (TPM,), 10, now=11.0).granted
    limiter.close()


def test_while_redis_is_away_reject_answers_503(own_redis, prefix):
    config = SharedLimitsConfig(redis_url=own_redis.url, key_prefix=prefix, on_error="reject")
    gate = Gate(Config(), clock=lambda: 0.0, limiter=SharedLimiter(config))
    own_redis.kill()
    ticket = gate.submit(10, key="m")
    assert ticket.outcome is Outcome.LIMITS_UNAVAILABLE
    assert ticket.retry_after > 0
    assert gate.status()["shared_limits"]["state"] == "rejecting"


def test_local_decides_on_its_share_and_reconciles_when_redis_is_back(own_redis, prefix):
    one = shared_limiter(own_redis, "local", prefix, "p1")
    two = shared_limiter(own_redis, "local", prefix, "p2")
    one.tick(0.0)
    assert one.presence.instances == 2
    before = one.try_acquire("m", (RPM,), 1, now=0.0).reservation  # made in Redis
    own_redis.kill()
    admitted = [one.try_acquire("m", (RPM,), 1, now=1.0) for _ in range(8)]
    assert sum(d.granted for d in admitted) == 5  # 10 a minute, two proxies: 5 alone
    assert one.shared_status()["state"] == "local"
    one.settle(before, 1, now=2.0)  # waits for Redis
    for decision in admitted[:2]:
        one.settle(decision.reservation, 1, now=2.0)  # settled where it was made
    own_redis.start()  # empty: a restart keeps nothing
    assert reconnects(one, now=3.0)
    # What p1 counted alone (5 requests at 1 s, less 2 s of its 5-a-minute refill) is in the
    # shared bucket now, once (the shared bucket runs on Redis's clock: hardly any later).
    assert one.used("m", RPM, 3.0) == pytest.approx(5 - 2 * 5 / 60, abs=0.01)
    for decision in admitted[2:5]:
        one.settle(decision.reservation, 1, now=4.0)
    assert one.open_reservations() == 0
    # settled where they were made: the shared bucket does not count them again
    assert one.used("m", RPM, 4.0) == pytest.approx(5 - 2 * 5 / 60, abs=0.01)
    one.close()
    two.close()


def test_a_proxy_that_leaves_stops_counting_among_the_alive(own_redis, prefix):
    one = shared_limiter(own_redis, "local", prefix, "p1")
    two = shared_limiter(own_redis, "local", prefix, "p2")
    two.close()
    one.tick(1.0)
    assert one.presence.instances == 1
    one.close()


def test_redis_away_at_start_up_is_tried_again(own_redis, prefix):
    own_redis.kill()
    limiter = shared_limiter(own_redis, "hold", prefix)
    assert limiter.shared_status()["state"] == "holding"
    limiter.tick(0.5)  # nothing answered the watcher yet: the tick waits for nothing
    assert limiter.shared_status()["state"] == "holding"
    own_redis.start()
    assert reconnects(limiter)
    assert limiter.shared_status()["state"] == "shared"
    limiter.close()


def test_a_proxy_with_nothing_waiting_withdraws_its_head(clients, prefix):
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.confirm(a.try_acquire("m", (TPM,), 600, now=0).reservation, now=0)
    assert not a.try_acquire("m", (TPM,), 400, now=10, waited=10).granted
    assert b.try_acquire("m", (TPM,), 100, now=10.2).binding == SHARED_QUEUE
    a.withdraw("m", now=10.3)  # its client left: nothing of "m" waits at a
    a.flush(10.3)
    assert b.try_acquire("m", (TPM,), 100, now=10.4).granted


def test_the_runtime_keeps_limits_where_shared_limits_says(shared_redis, prefix, caplog):
    runtime = Runtime()
    shared = {"redis_url": shared_redis.url, "key_prefix": prefix}
    runtime.apply(parse_config({"shared_limits": shared}))
    assert isinstance(runtime.gate.limiter, SharedLimiter)
    assert runtime.gate.status()["shared_limits"]["state"] == "shared"
    held = runtime.gate.submit(10, key="m")
    assert held.outcome is Outcome.RELEASED  # holds a reservation: no switching now
    with caplog.at_level(logging.WARNING):
        runtime.apply(parse_config({}))
    assert isinstance(runtime.gate.limiter, SharedLimiter)
    assert "restart the proxy" in caplog.text
    runtime.gate.finish(held, 200, 10)
    runtime.apply(parse_config({}))  # nothing held or in flight: applied
    assert isinstance(runtime.gate.limiter, MemoryLimiter)
    assert "shared_limits" not in runtime.gate.status()
    runtime.close()


def test_a_proxy_starts_while_redis_is_away_and_says_so(own_redis, prefix, caplog):
    own_redis.kill()
    runtime = Runtime()
    config = {"shared_limits": {"redis_url": own_redis.url, "key_prefix": prefix}}
    with caplog.at_level(logging.WARNING):
        runtime.apply(parse_config(config))
    assert runtime.gate.status()["shared_limits"]["state"] == "holding"
    assert "unavailable" in caplog.text
    runtime.close()


def test_an_upstream_429_pauses_every_proxy(clients, prefix):
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.pause("m", 5.0, now=0)
    paused = b.try_acquire("m", (TPM,), 10, now=1)
    assert (paused.granted, paused.binding) == (False, UPSTREAM_429)
    assert paused.wait == pytest.approx(4)
    assert b.try_acquire("m", (TPM,), 10, now=5.1).granted


def test_a_redis_that_lost_its_data_is_noticed(own_redis, prefix):
    """Killed and started again between two calls, Redis never looked away; its epoch token
    says it forgot everything, and the limiter's tick says so (the gate then probes)."""
    limiter = shared_limiter(own_redis, "hold", prefix)
    assert limiter.tick(0.0) is False
    own_redis.kill()
    own_redis.start()
    deadline, lost = time.monotonic() + 10, False
    while not lost and time.monotonic() < deadline:
        lost = limiter.tick(0.0)  # (the first may find the old connection gone: away, back)
        time.sleep(0.05)
    assert lost and limiter.up
    assert limiter.tick(0.0) is False  # said once
    limiter.close()


class _Forgetful(MemoryLimiter):
    """A limiter whose next tick says what it knew of upstream may be lost."""

    lost = False

    def tick(self, now):
        lost, self.lost = self.lost, False
        return lost


def test_when_the_limiter_lost_upstreams_state_the_next_wave_probes_first():
    """A Redis that restarted has forgotten every bucket and upstream's view: full buckets
    would let a whole wave go into an upstream that is still drained. So one request goes
    first and the rest wait for its answer (its report re-syncs the view)."""
    limiter = _Forgetful()
    gate = Gate(Config(), limiter=limiter)
    first = gate.submit(10, key="m")
    gate.confirm(first)
    gate.finish(first, 200, 10)  # upstream has answered: its state is known
    assert gate.submit(10, key="m").outcome is Outcome.RELEASED
    limiter.lost = True
    gate.tick()
    probe, behind = gate.submit(10, key="m"), gate.submit(10, key="m")
    assert probe.outcome is Outcome.RELEASED
    assert behind.held and gate.scheduler.waiting["m"][0] == "probe"
    gate.finish(probe, 200, 10)
    assert behind.outcome is Outcome.RELEASED


def test_a_later_request_that_fits_beside_a_fresh_older_head_goes_at_once(clients, prefix):
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.confirm(a.try_acquire("m", (TPM,), 200, now=0).reservation, now=0)
    assert not a.try_acquire("m", (TPM,), 500, now=9.5, waited=9.5).granted  # fits at 10 s
    # At 10.2 s: 98 used, a's 500 and b's 1 fit together: b does not wait for a's next ask.
    assert b.try_acquire("m", (TPM,), 1, now=10.2).granted
    assert a.try_acquire("m", (TPM,), 500, now=10.3, waited=10.3).granted


def test_a_report_that_waited_does_not_put_back_a_newer_view(clients, prefix):
    """A proxy's report riding with its settle may arrive after another proxy applied a newer
    one: the older says nothing the view does not know better."""
    a, b = proxy(clients, prefix, "a"), proxy(clients, prefix, "b")
    a.observe("m", [RateReport("tokens", 60.0, 600, 500, 0.0)], now=1.0, defer=True)
    assert b.observe("m", [RateReport("tokens", 60.0, 600, 100, 0.0)], now=1.5)
    a.flush(2.0)  # a's report of 1.0 arrives now
    # b's view: 100 left at 1.5 s, 10 a second back since, 3 (0.5 %) kept in reserve
    assert a.used("m", TPM, 2.0) == pytest.approx(600 - (100 + 5) + 3)


def test_a_lease_renewed_by_its_proxy_lasts_and_one_left_alone_runs_out(clients, prefix):
    alive = proxy(clients, prefix, "alive", lease=30.0)
    dead = proxy(clients, prefix, "dead", lease=30.0)
    assert alive.try_acquire("m", (TPM,), 300, now=0).granted
    assert dead.try_acquire("m", (TPM,), 300, now=0).granted
    for t in (10.0, 20.0, 30.0, 40.0):
        alive.renew(t)  # (the tick, every second in a proxy)
    assert alive.used("m", TPM, 45.0) == 300  # still in flight; the dead proxy's is gone
    assert alive.state("m")["tokens:60:f"] == 300
