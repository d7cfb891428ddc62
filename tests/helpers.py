"""Small shared test helpers (not fixtures)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cooldown.addon import Cooldown


class FakeClock:
    """A clock the test moves by hand: decisions repeat exactly, nothing sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@contextlib.contextmanager
def running_cooldown(directory: Path, config_text: str) -> Iterator[Cooldown]:
    """All of Cooldown's addons in a mitmproxy test context, configured from `config_text`."""
    from mitmproxy.test import taddons

    from cooldown.addon import Cooldown

    path = directory / "cooldown.yaml"
    path.write_text(config_text)
    cooldown = Cooldown()
    with taddons.context(*cooldown.addons) as tctx:
        tctx.configure(cooldown.settings, cerebras_config=str(path))
        yield cooldown
