"""What every benchmark gets from the runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Context:
    quick: bool
    workdir: Path  # scratch space for logs, configs and confdirs of this run
    profile: bool = False  # record py-spy profiles of the processes under test where it helps

    def pick(self, quick: float, full: float) -> float:
        return quick if self.quick else full
