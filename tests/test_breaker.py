from cooldown.breaker import BreakerState, CircuitBreaker
from cooldown.config import BreakerConfig


def make(threshold=3, duration=60.0):
    return CircuitBreaker(BreakerConfig(failure_threshold=threshold, open_duration=duration))


def test_opens_after_threshold_consecutive_429s():
    breaker = make()
    for _ in range(2):
        breaker.record_429(now=0)
    assert breaker.state(0) is BreakerState.CLOSED
    breaker.record_429(now=1)
    assert breaker.state(1) is BreakerState.OPEN
    assert breaker.retry_after(31) == 30


def test_any_other_answer_resets_the_count():
    breaker = make()
    breaker.record_429(now=0)
    breaker.record_429(now=0)
    breaker.record_success(now=0)
    breaker.record_429(now=0)
    breaker.record_429(now=0)
    assert breaker.state(0) is BreakerState.CLOSED


def test_half_open_allows_one_probe_and_success_closes():
    breaker = make(threshold=1, duration=10)
    breaker.record_429(now=0)
    assert breaker.state(10) is BreakerState.HALF_OPEN
    assert breaker.try_start_probe(10)
    assert not breaker.try_start_probe(10)
    breaker.record_success(now=11)
    assert breaker.state(11) is BreakerState.CLOSED
    assert breaker.consecutive_429s == 0


def test_probe_429_reopens_for_the_full_duration():
    breaker = make(threshold=5, duration=10)
    for _ in range(5):
        breaker.record_429(now=0)
    assert breaker.try_start_probe(10)
    breaker.record_429(now=12)
    assert breaker.state(12) is BreakerState.OPEN
    assert breaker.retry_after(12) == 10


def test_aborted_probe_frees_the_slot():
    breaker = make(threshold=1, duration=1)
    breaker.record_429(now=0)
    assert breaker.try_start_probe(2)
    breaker.probe_aborted()
    assert breaker.try_start_probe(2)


def test_no_probe_while_closed_or_open():
    breaker = make(threshold=1, duration=10)
    assert not breaker.try_start_probe(0)
    breaker.record_429(now=0)
    assert not breaker.try_start_probe(5)
