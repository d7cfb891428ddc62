import asyncio
from dataclasses import replace

from cooldown.config import CerebrasLimits, Config
from cooldown.gate import Gate
from cooldown.scheduler import Outcome

from .helpers import FakeClock

CONFIG = Config(cerebras_limits=CerebrasLimits(rpm_limit=2, tpm_limit=1_000, max_queue_depth=3))


def make():
    clock = FakeClock()
    return Gate(CONFIG, clock=clock), clock


async def test_released_at_once_when_it_fits():
    gate, _ = make()
    ticket = gate.submit(100)
    assert await gate.wait(ticket) is Outcome.RELEASED
    assert gate.status()["open_reservations"] == 1
    gate.finish(ticket, 200, 40)
    assert gate.status()["open_reservations"] == 0


async def test_held_waiter_wakes_when_capacity_frees():
    gate, clock = make()
    first = gate.submit(900)
    waiter = asyncio.ensure_future(gate.wait(gate.submit(500)))
    await asyncio.sleep(0)
    assert not waiter.done()
    assert gate.status()["queue_depth"] == 1
    clock.advance(1)
    gate.finish(first, 200, 100)  # settling frees tokens: the held request goes
    assert await waiter is Outcome.RELEASED


async def test_timer_is_armed_for_the_next_release():
    gate, clock = make()
    gate.confirm(gate.submit(1_000))
    held = gate.submit(10)
    assert gate._timer is not None
    assert gate._timer_at == clock.now + 60  # when the first reservation ages out
    clock.advance(60)
    gate._timer.cancel()
    gate._on_timer()  # what the loop would run at that moment
    assert held.outcome is Outcome.RELEASED


async def test_cancelling_the_waiting_task_cancels_the_ticket():
    gate, _ = make()
    gate.submit(1_000)
    ticket = gate.submit(500)
    task = asyncio.ensure_future(gate.wait(ticket))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert ticket.outcome is Outcome.CANCELLED
    assert gate.status()["queue_depth"] == 0
    assert gate.status()["open_reservations"] == 1  # only the first, which was released


async def test_waiter_cancelled_in_the_same_instant_as_release_gives_the_reservation_back():
    gate, _ = make()
    first = gate.submit(1_000)
    ticket = gate.submit(500)
    task = asyncio.ensure_future(gate.wait(ticket))
    await asyncio.sleep(0)
    gate.finish(first, 200, 0)  # releases `ticket` and resolves its future...
    task.cancel()  # ...but its waiter dies before it runs
    await asyncio.gather(task, return_exceptions=True)
    assert ticket.outcome is Outcome.RELEASED
    assert ticket.finished
    assert gate.status()["open_reservations"] == 0


async def test_shutdown_answers_held_waiters():
    gate, _ = make()
    gate.submit(1_000)
    waiters = [asyncio.ensure_future(gate.wait(gate.submit(10))) for _ in range(2)]
    await asyncio.sleep(0)
    assert gate.shutdown() == 2
    assert await asyncio.gather(*waiters) == [Outcome.SHUTDOWN, Outcome.SHUTDOWN]


async def test_reconfigure_applies_new_limits_to_held_requests():
    gate, _ = make()
    gate.submit(1_000)
    held = gate.submit(500)
    assert held.held
    bigger = replace(CONFIG, cerebras_limits=replace(CONFIG.cerebras_limits, tpm_limit=2_000))
    gate.reconfigure(bigger)
    assert held.outcome is Outcome.RELEASED


async def test_stats_count_forwarded_refused_and_upstream_429s():
    gate, _ = make()
    a = gate.submit(1_000)
    for _ in range(3):
        gate.submit(10)
    refused = gate.submit(10)
    assert refused.outcome is Outcome.QUEUE_FULL
    gate.finish(a, 429, None)
    status = gate.status()
    assert status["forwarded"] == 1
    assert status["refused"] == {"queue_full": 1}
    assert status["upstream_429s"] == 1
