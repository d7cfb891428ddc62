"""What is held, per model, in the log line and the status: held.py over a fake clock."""

import pytest

from cooldown.config import CerebrasLimits, Config
from cooldown.gate import Gate
from cooldown.held import HeldLog, HeldModel, describe_wait

from .helpers import FakeClock

CONFIG = Config(
    cerebras_limits=CerebrasLimits(
        rpm_limit=60, tpm_limit=1_000, max_queue_depth=10, probe_first=False
    )
)


def make(config=CONFIG):
    clock = FakeClock()
    return Gate(config, clock=clock), clock


def test_nothing_held_says_nothing():
    gate, clock = make()
    gate.submit(100, key="m")  # released at once
    assert gate.held() == []
    status = gate.status()
    assert status["oldest_held_seconds"] == 0
    assert status["next_release_in_seconds"] is None
    assert status["held"] == {}
    assert HeldLog().lines(gate.held(), clock.now) == []


def test_held_requests_say_how_many_how_long_what_for_and_when():
    gate, clock = make()
    gate.confirm(gate.submit(1_000, key="m"))  # the bucket is empty now
    gate.submit(100, key="m")
    clock.advance(2)
    gate.submit(50, key="m")
    # 100 tokens at 1000/min refill in 6 s from the first submit; 2 s have passed.
    [held] = gate.held()
    assert held == HeldModel("m", 2, pytest.approx(2.0), "tpm", pytest.approx(4.0))
    assert held.line() == (
        "2 held for m, oldest 2.0s, waiting for tokens per minute (tpm_limit), next release in 4.0s"
    )
    status = gate.status()
    assert status["oldest_held_seconds"] == pytest.approx(2.0)
    assert status["next_release_in_seconds"] == pytest.approx(4.0)
    assert status["held"]["m"] == {
        "held": 2,
        "oldest_held_seconds": pytest.approx(2.0),
        "waiting_for": "tpm",
        "next_release_in_seconds": pytest.approx(4.0),
    }


def test_a_pause_after_an_upstream_429_is_what_they_wait_for():
    gate, clock = make()
    gate.submit(100, key="m")
    gate.pause("m", 30)
    gate.submit(100, key="m")
    clock.advance(10)
    [held] = gate.held()
    assert held.waiting_for == "upstream_429"
    assert held.next_release_in == pytest.approx(20)
    assert "waiting for the pause after an upstream 429" in held.line()


def test_models_are_reported_apart_and_the_soonest_release_wins():
    gate, clock = make()
    for key, tokens in (("a", 1_000), ("b", 1_000)):
        gate.confirm(gate.submit(tokens, key=key))
    gate.submit(600, key="a")  # 36 s of refill
    clock.advance(1)
    gate.submit(60, key="b")  # 3.6 s of refill from the start
    held = gate.held()
    assert [h.key for h in held] == ["a", "b"]
    status = gate.status()
    assert status["oldest_held_seconds"] == pytest.approx(1.0)
    assert status["next_release_in_seconds"] == pytest.approx(2.6)


def test_the_log_speaks_at_most_once_per_interval_while_held():
    gate, clock = make()
    gate.confirm(gate.submit(1_000, key="m"))
    gate.submit(900, key="m")  # 54 s until it fits
    log = HeldLog(interval=10)
    assert len(log.lines(gate.held(), clock.now)) == 1  # at once: a hold begins
    clock.advance(9.9)
    assert log.lines(gate.held(), clock.now) == []
    clock.advance(0.1)
    [line] = log.lines(gate.held(), clock.now)
    assert "oldest 10.0s" in line and "next release in 44.0s" in line


def test_reasons_in_words():
    assert describe_wait("tpd") == "tokens per day (tpd_limit)"
    assert describe_wait("probe") == "upstream's first answer (probe_first)"
    assert describe_wait(None) == "their turn"
