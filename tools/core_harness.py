"""Core decisions: what one release decision costs with N requests held.

A *decision cycle* keeps the queue at exactly N held requests while the limiter is saturated:

1. settle the request released by the previous cycle (confirm + finish: a window entry at now),
2. advance the fake clock by one second, so the oldest entry of the requests-per-minute window
   ages out (rpm_limit = 60, so the window always holds 60 entries, one per second),
3. pump: exactly one held request fits and is released (the next head is then refused, which
   is the O(1) "does not fit" path of the limiter),
4. submit one new request, so N stay held.

Requests-per-minute is the binding limit so that exactly one request leaves per cycle whatever
its size; sizes follow the seed's mix (70 % 100-1,000 tokens, 30 % 2,000-8,000), so the
priority heap really reorders (usage is above priority_threshold, so the scheduler is "tight"
and releases by priority). Nothing here reads a real clock or sleeps.

Two layers are measured: the pure core (`Scheduler` + `MemoryLimiter`) and the `Gate` inside a
running event loop (which also arms and cancels its `loop.call_later` timer, and yields to the
loop once per cycle, as production does between hooks).

Used by benchmarks/bench_core.py (timings, instruction counts under valgrind) and by
tests/test_perf_regression.py (operation counts, which do not depend on timing noise).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import heapq
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

from cooldown import queues as queues_module
from cooldown import scheduler as scheduler_module
from cooldown.breaker import CircuitBreaker
from cooldown.config import BreakerConfig, CerebrasLimits, Config
from cooldown.gate import Gate
from cooldown.limiter import MemoryLimiter
from cooldown.scheduler import Outcome, Scheduler, Ticket

WINDOW_ENTRIES = 60  # rpm_limit: one entry ages out per simulated second
KEY = "llama3.1-8b"
START = 1_000.0


def request_sizes(count: int, seed: int = 0) -> list[int]:
    """Token estimates with the seed's mix: 70 % small (100-1,000), 30 % large (2,000-8,000)."""
    rng = random.Random(seed)
    return [
        rng.randint(100, 1_000) if rng.random() < 0.7 else rng.randint(2_000, 8_000)
        for _ in range(count)
    ]


def limits_for(held: int) -> CerebrasLimits:
    # The harness saturates an rpm *window* (one entry ages out per second, one request leaves),
    # which makes every decision cycle alike; no probe, which would hold the fill.
    return CerebrasLimits(
        rpm_limit=WINDOW_ENTRIES,
        tpm_limit=10**12,
        max_queue_depth=held + 10,
        request_timeout=10.0**9,
        algorithm="sliding_window",
        probe_first=False,
    )


class CountingLimiter(MemoryLimiter):
    """A `MemoryLimiter` that counts calls (for the operation counts, not for timing)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def try_acquire(self, *args: Any) -> Any:
        self.calls["try_acquire"] += 1
        return super().try_acquire(*args)

    def confirm(self, *args: Any) -> None:
        self.calls["confirm"] += 1
        super().confirm(*args)

    def settle(self, *args: Any) -> None:
        self.calls["settle"] += 1
        super().settle(*args)

    def release(self, *args: Any) -> None:
        self.calls["release"] += 1
        super().release(*args)

    def used(self, *args: Any) -> float:
        self.calls["used"] += 1
        return super().used(*args)

    def limit(self, *args: Any) -> int:
        self.calls["limit"] += 1
        return super().limit(*args)


class CountingHeapq:
    """Stands in for `heapq` in the scheduler and the queues: counts operations and elements
    touched.

    `heapify` and list rebuilds are O(n); they are counted by the number of elements, so an
    amortized O(n) compaction shows up in the count instead of hiding in one call.
    """

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()

    def heappush(self, heap: list[Any], item: Any) -> None:
        self.ops["heappush"] += 1
        heapq.heappush(heap, item)

    def heappop(self, heap: list[Any]) -> Any:
        self.ops["heappop"] += 1
        return heapq.heappop(heap)

    def heapreplace(self, heap: list[Any], item: Any) -> Any:
        self.ops["heapreplace"] += 1
        return heapq.heapreplace(heap, item)

    def heapify(self, heap: list[Any]) -> None:
        self.ops["heapify"] += 1
        self.ops["heapify_elements"] += len(heap)
        heapq.heapify(heap)


class CoreHarness:
    """`Scheduler` + `MemoryLimiter` with N held requests and a saturated rpm window."""

    def __init__(self, held: int, *, seed: int = 0, limiter: MemoryLimiter | None = None) -> None:
        self.held = held
        self.now = START
        self.sizes = request_sizes(4096, seed)
        self._next_size = 0
        self.limiter = limiter or MemoryLimiter()
        limits = limits_for(held)
        # The rates exactly as the gate builds them from the config (rpm and tpm, with whatever
        # pacing the config adds); only the gate's timer and futures are left out.
        rates = tuple(Gate(Config(cerebras_limits=limits)).rates_for(KEY))
        self.released: list[Ticket] = []
        self.scheduler = Scheduler(
            self.limiter,
            limits,
            CircuitBreaker(BreakerConfig()),
            lambda key: rates,
            on_resolved=self._on_resolved,
        )
        self.decisions = 0
        self._fill()

    def _on_resolved(self, ticket: Ticket) -> None:
        if ticket.outcome is Outcome.RELEASED:
            self.released.append(ticket)

    def _size(self) -> int:
        size = self.sizes[self._next_size]
        self._next_size = (self._next_size + 1) % len(self.sizes)
        return size

    def _fill(self) -> None:
        sched = self.scheduler
        # One release per second for a minute: the rpm window holds 60 entries, 1 s apart.
        for _ in range(WINDOW_ENTRIES):
            sched.submit(KEY, self._size(), self.now)
            sched.pump(self.now)
            self._settle_released()
            self.now += 1.0
        while sched.depth < self.held:
            sched.submit(KEY, self._size(), self.now)
        sched.pump(self.now)  # the entry of the first second has just aged out: one leaves
        while sched.depth < self.held:
            sched.submit(KEY, self._size(), self.now)
        assert sched.depth == self.held, sched.depth
        self.run(WINDOW_ENTRIES * 2)  # steady state

    def _settle_released(self) -> None:
        sched, now = self.scheduler, self.now
        for ticket in self.released:
            sched.confirm(ticket, now)
            sched.finish(ticket, 200, ticket.tokens // 2, now)
        self.released.clear()

    def run(self, cycles: int) -> int:
        """Run `cycles` decision cycles; returns how many requests were released."""
        sched = self.scheduler
        released = 0
        size = self._size
        for _ in range(cycles):
            self._settle_released()
            self.now += 1.0
            sched.pump(self.now)
            count = len(self.released)
            released += count
            for _ in range(count):
                sched.submit(KEY, size(), self.now)
                sched.pump(self.now)
        self.decisions += released
        return released


class GateHarness:
    """The same cycle through `Gate` (timer arming included) in a running event loop."""

    def __init__(self, held: int, *, seed: int = 0) -> None:
        self.held = held
        self.clock_now = START
        self.sizes = request_sizes(4096, seed)
        self._next_size = 0
        config = Config(cerebras_limits=limits_for(held))
        self.gate = Gate(config, clock=lambda: self.clock_now)
        self.released: list[Ticket] = []
        original = self.gate._on_resolved

        def on_resolved(ticket: Ticket) -> None:
            original(ticket)
            if ticket.outcome is Outcome.RELEASED:
                self.released.append(ticket)

        self.gate.scheduler.on_resolved = on_resolved

    def _size(self) -> int:
        size = self.sizes[self._next_size]
        self._next_size = (self._next_size + 1) % len(self.sizes)
        return size

    def _settle_released(self) -> None:
        for ticket in self.released:
            self.gate.confirm(ticket)
            self.gate.finish(ticket, 200, ticket.tokens // 2)
        self.released.clear()

    async def fill(self) -> None:
        gate = self.gate
        for _ in range(WINDOW_ENTRIES):
            gate.submit(self._size(), key=KEY)
            self._settle_released()
            self.clock_now += 1.0
        while gate.scheduler.depth < self.held:
            gate.submit(self._size(), key=KEY)
        gate.pump()
        while gate.scheduler.depth < self.held:
            gate.submit(self._size(), key=KEY)
        await self.run(WINDOW_ENTRIES * 2)

    async def run(self, cycles: int) -> int:
        gate = self.gate
        released = 0
        for _ in range(cycles):
            self._settle_released()
            self.clock_now += 1.0
            gate.pump()  # what the armed timer does when it fires
            count = len(self.released)
            released += count
            for _ in range(count):
                gate.submit(self._size(), key=KEY)
            await asyncio.sleep(0)  # one loop iteration, as between two hooks
        return released


@dataclass
class Timing:
    held: int
    seconds_per_decision: float  # best of the repeats (wall clock)
    cpu_seconds_per_decision: float  # best of the repeats (process CPU time)
    decisions: int


def _timed(run: Callable[[], int]) -> tuple[float, float, int]:
    gc_was = gc.isenabled()
    gc.disable()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        decisions = run()
        return time.perf_counter() - wall, time.process_time() - cpu, decisions
    finally:
        if gc_was:
            gc.enable()


def time_core(sizes: list[int], cycles: int, repeats: int) -> dict[int, Timing]:
    """Best-of-`repeats` per-decision time for every N, the Ns interleaved in each round."""
    harnesses = {n: CoreHarness(n) for n in sizes}
    best: dict[int, Timing] = {}
    for round_ in range(repeats):
        order = sizes if round_ % 2 == 0 else list(reversed(sizes))
        for n in order:
            wall, cpu, decisions = _timed(functools.partial(harnesses[n].run, cycles))
            assert decisions > 0
            previous = best.get(n)
            per_wall, per_cpu = wall / decisions, cpu / decisions
            if previous is None:
                best[n] = Timing(n, per_wall, per_cpu, decisions)
            else:
                previous.seconds_per_decision = min(previous.seconds_per_decision, per_wall)
                previous.cpu_seconds_per_decision = min(previous.cpu_seconds_per_decision, per_cpu)
                previous.decisions += decisions
            assert harnesses[n].scheduler.depth == n
    return best


def time_gate(sizes: list[int], cycles: int, repeats: int) -> dict[int, Timing]:
    async def main() -> dict[int, Timing]:
        harnesses = {n: GateHarness(n) for n in sizes}
        for harness in harnesses.values():
            await harness.fill()
        best: dict[int, Timing] = {}
        for round_ in range(repeats):
            order = sizes if round_ % 2 == 0 else list(reversed(sizes))
            for n in order:
                gc.disable()
                try:
                    wall, cpu = time.perf_counter(), time.process_time()
                    decisions = await harnesses[n].run(cycles)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                finally:
                    gc.enable()
                per_wall, per_cpu = wall / decisions, cpu / decisions
                previous = best.get(n)
                if previous is None:
                    best[n] = Timing(n, per_wall, per_cpu, decisions)
                else:
                    previous.seconds_per_decision = min(previous.seconds_per_decision, per_wall)
                    previous.cpu_seconds_per_decision = min(
                        previous.cpu_seconds_per_decision, per_cpu
                    )
                    previous.decisions += decisions
                assert harnesses[n].gate.scheduler.depth == n
        return best

    return asyncio.run(main())


@dataclass
class OperationCounts:
    held: int
    decisions: int
    per_decision: dict[str, float]


def count_operations(held: int, cycles: int) -> OperationCounts:
    """Deterministic operation counts per decision: heap operations, limiter calls, and Python
    function calls / C calls (sys.setprofile). None of them depends on timing noise."""
    limiter = CountingLimiter()
    heap = CountingHeapq()
    with (
        mock.patch.object(scheduler_module, "heapq", heap),
        mock.patch.object(queues_module, "heapq", heap),  # the held tickets' heaps
    ):
        harness = CoreHarness(held, limiter=limiter)
        heap.ops.clear()
        limiter.calls.clear()
        calls: Counter[str] = Counter()

        def profile(_frame: Any, event: str, _arg: Any) -> None:
            calls[event] += 1

        sys.setprofile(profile)
        try:
            decisions = harness.run(cycles)
        finally:
            sys.setprofile(None)
    per = {f"heap.{k}": v / decisions for k, v in heap.ops.items()}
    per["heap.total_ops"] = sum(v for k, v in heap.ops.items() if k != "heapify_elements") / (
        decisions
    )
    per.update({f"limiter.{k}": v / decisions for k, v in limiter.calls.items()})
    per["limiter.total_calls"] = sum(limiter.calls.values()) / decisions
    per["python_calls"] = calls["call"] / decisions
    per["c_calls"] = calls["c_call"] / decisions
    return OperationCounts(held, decisions, per)


def _cachegrind_main(argv: list[str]) -> None:
    """Entry point under valgrind: `python -m tools.core_harness HELD CYCLES` (0 = setup only)."""
    held, cycles = int(argv[0]), int(argv[1])
    harness = CoreHarness(held)
    if cycles:
        harness.run(cycles)


if __name__ == "__main__":
    _cachegrind_main(sys.argv[1:])
