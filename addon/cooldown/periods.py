"""The limits Cerebras sets, named once: requests and tokens per minute, hour and day.

`rpm` is requests per minute, `tpd` tokens per day, and so on; the config keys are these
names with `_limit` (`tpm_limit`), upstream's headers use the period's word
(`x-ratelimit-limit-tokens-minute`).
"""

from __future__ import annotations

from typing import Literal

Unit = Literal["requests", "tokens"]

PERIODS: dict[str, float] = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}

# "rpm" -> ("requests", 60.0), ..., "tpd" -> ("tokens", 86400.0)
RATE_NAMES: dict[str, tuple[Unit, float]] = {
    f"{unit[0]}p{word[0]}": (unit, seconds)
    for unit in ("requests", "tokens")
    for word, seconds in PERIODS.items()
}


def describe(name: str) -> str:
    """`tpm` -> "tokens per minute" (an unknown name is returned as it is)."""
    if name not in RATE_NAMES:
        return name
    unit, seconds = RATE_NAMES[name]
    word = next(word for word, length in PERIODS.items() if length == seconds)
    return f"{unit} per {word}"
