"""py-spy profiles of a running process, summarized as text (own time and inclusive time)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .common import BIN

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    local = BIN / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start_record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into a collapsed-stack file (returns at once)."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy, or the bench extra)")
    command = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(out),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/addon/", "/lib/python3.12/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


def summarize(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """Own-time and inclusive-time shares of the busiest functions, and Cooldown's share."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    cooldown = 0
    idle = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        if leaf.startswith(("select (", "poll (", "epoll")) or "selectors.py" in leaf:
            idle += count
        own[leaf] += count
        for frame in set(frames):
            inclusive[frame] += count
        if any("cooldown/" in f for f in frames):
            cooldown += count
    busy = max(total - idle, 1)

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / busy, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "idle_samples": idle,
        "cooldown_share_of_busy_pct": round(100 * cooldown / busy, 1),
        "own_time_pct_of_busy": share(own),
        "inclusive_pct_of_busy": share(
            Counter({k: v for k, v in inclusive.items() if "cooldown/" in k})
        ),
    }


def render(summary: dict[str, Any]) -> str:
    lines = [
        f"samples {summary['samples']} (idle {summary['idle_samples']}); "
        f"Cooldown frames on the stack in {summary['cooldown_share_of_busy_pct']} %"
        " of busy samples",
        "own time (% of busy samples):",
    ]
    lines += [f"  {pct:5.1f}  {name}" for name, pct in summary["own_time_pct_of_busy"]]
    lines.append("Cooldown functions, inclusive (% of busy samples):")
    lines += [f"  {pct:5.1f}  {name}" for name, pct in summary["inclusive_pct_of_busy"]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarize(Path(sys.argv[1]))))
