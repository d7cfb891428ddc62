"""The limits Cerebras sets, named once: requests and tokens per minute, hour and day.

`rpm` is requests per minute, `tpd` tokens per day, and so on; the config keys are these
names with `_limit` (`tpm_limit`), upstream's headers use the period's word
(`x-ratelimit-limit-tokens-minute`).
"""

from __future__ import annotations

from typing import Literal

# "tokens" are the uncached tokens when the prompt cache is modelled (Cerebras's primary limit),
# "total_tokens" cached and uncached together (its second bucket, see prompt_cache.py).
Unit = Literal["requests", "tokens", "total_tokens"]

PERIODS: dict[str, float] = {"minute": 60.0, "hour": 3600.0, "day": 86400.0}

# "rpm" -> ("requests", 60.0), ..., "tpd" -> ("tokens", 86400.0)
RATE_NAMES: dict[str, tuple[Unit, float]] = {
    f"{unit[0]}p{word[0]}": (unit, seconds)
    for unit in ("requests", "tokens")
    for word, seconds in PERIODS.items()
}


# Cerebras's second token bucket: cached and uncached tokens per minute (config key
# `total_tpm_limit`). Only per minute: that is the only one its documentation names.
TOTAL_TPM = "total_tpm"


def describe(name: str) -> str:
    """`tpm` -> "tokens per minute" (an unknown name is returned as it is)."""
    if name == TOTAL_TPM:
        return "total tokens per minute"
    if name not in RATE_NAMES:
        return name
    unit, seconds = RATE_NAMES[name]
    word = next(word for word, length in PERIODS.items() if length == seconds)
    return f"{unit} per {word}"
