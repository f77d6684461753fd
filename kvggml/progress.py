"""A one-line progress bar on stderr for long runs (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, width: int = 24, stream=sys.stderr):
        self.total, self.width, self.stream = total, width, stream
        self.count = 0
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        """Announce the step about to run."""
        filled = self.width * self.count // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r[{bar}] {self.count}/{self.total} {elapsed:6.1f}s  {label:<28.28}")
        self.stream.flush()
        self.count += 1

    def done(self) -> None:
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r[{'#' * self.width}] {self.total}/{self.total} {elapsed:6.1f}s  done{' ' * 26}\n")
        self.stream.flush()
