"""One progress line for long commands (train, benchmark): what runs, how far, ETA.

On a terminal the line is redrawn in place; otherwise (a log file, CI) it is printed as
a new line at most every `interval` seconds, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """12 -> '12s', 95 -> '1m35s', 3725 -> '1h02m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`done/total` of a task with its rate-based ETA, plus free-form details."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        initial: int = 0,
        file: TextIO | None = None,
        interval: float = 2.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total, self.desc, self.done = total, desc, initial
        self.file = file or sys.stderr
        self.interval, self.enabled, self.clock = interval, enabled, clock
        self.tty = self.enabled and self.file.isatty()
        self.start = clock()
        self.start_done = initial
        self.last_print = None
        self.width = 0
        self.details = ""
        self.printed = ""

    def eta(self) -> float | None:
        """Seconds left at the rate since the start; None before the first step."""
        ran = self.done - self.start_done
        if ran <= 0:
            return None
        return (self.clock() - self.start) / ran * max(0, self.total - self.done)

    def line(self) -> str:
        eta = self.eta()
        parts = (
            [self.desc, f"{self.done}/{self.total}"] if self.desc else [f"{self.done}/{self.total}"]
        )
        parts.append(f"{format_duration(self.clock() - self.start)} elapsed")
        if eta is not None and self.done < self.total:
            parts.append(f"ETA {format_duration(eta)}")
        if self.details:
            parts.append(self.details)
        return "  ".join(parts)

    def update(self, n: int = 1, details: str | None = None, desc: str | None = None) -> None:
        """Advance by n steps (0: only change what the line says)."""
        self.done += n
        if details is not None:
            self.details = details
        if desc is not None:
            self.desc = desc
        now = self.clock()
        if self.tty or self.last_print is None or now - self.last_print >= self.interval:
            self._print()
            self.last_print = now

    def _print(self) -> None:
        if not self.enabled:
            return
        text = self.line()
        self.printed = text
        if self.tty:
            self.width = max(self.width, len(text))
            self.file.write("\r" + text.ljust(self.width))
        else:
            self.file.write(text + "\n")
        self.file.flush()

    def close(self) -> None:
        """The final state, printed once."""
        if self.line() != self.printed:
            self._print()
        if self.enabled and self.tty:
            self.file.write("\n")
            self.file.flush()
