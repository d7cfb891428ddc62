"""Small shared test helpers (not fixtures)."""

from __future__ import annotations


class FakeClock:
    """A clock the test moves by hand: decisions repeat exactly, nothing sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
