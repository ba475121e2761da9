"""One progress line every few seconds for a long phase, so that no phase runs silent:

    generating base answers: 64/400 answers, 00:41 elapsed, ETA 03:35

printed (flushed) at most every PRINT_EVERY_S seconds, and once more when the phase ends.
"""
from __future__ import annotations

import time

PRINT_EVERY_S = 5.0  # often enough to show life, rarely enough not to flood a log


def format_duration(seconds: float) -> str:
    """73 -> '01:13'; 3723 -> '1:02:03'."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts done items out of `total`; `enabled=False` (ranks other than 0) prints nothing."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool = True, every_s: float = PRINT_EVERY_S):
        self.label, self.total, self.unit, self.enabled, self.every_s = label, total, unit, enabled, every_s
        self.done = 0
        self.start = self.last_print = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done >= self.total or now - self.last_print >= self.every_s:
            self.last_print = now
            self._print(now)

    def _print(self, now: float) -> None:
        if not self.enabled:
            return
        elapsed = now - self.start
        line = f"{self.label}: {self.done}/{self.total} {self.unit}, {format_duration(elapsed)} elapsed"
        if 0 < self.done < self.total:  # the rate so far, applied to what is left
            line += f", ETA {format_duration(elapsed / self.done * (self.total - self.done))}"
        print(line, flush=True)


__all__ = ["Progress", "format_duration", "PRINT_EVERY_S"]
