"""A one-line progress bar for studies: cells done, elapsed time and an estimate of the rest.

On a terminal the bar is redrawn in place every second (a cell can take minutes) and as cells
finish, with each cell's log line printed above it. Off a terminal (a log file, a pipe) or
under CI (``CI`` set) there is no bar: only the log lines, one per cell.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO


def _clock(seconds: float) -> str:
    """``seconds`` as ``m:ss`` or ``h:mm:ss``."""
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def bar_enabled(stream: TextIO) -> bool:
    """Whether to draw a bar on ``stream``: a terminal, and not under CI."""
    return stream.isatty() and not os.environ.get("CI")


class Progress:
    """Progress over cells of unequal cost.

    The estimate of the time left assumes a cell costs in proportion to its weight (its
    parameter count, :func:`ntk_tickets.study.cell_cost`, at the call site) and that cells
    keep finishing at the rate seen so far, which also holds for parallel executors.

    Args:
      weights: the weight of every cell still to compute.
      already_done: cells found finished before this run (shown, not timed).
      stream: where to write (default stderr).
      bar: draw the bar; default :func:`bar_enabled`.
      tick_s: seconds between redraws of the bar while a cell runs (None: only on events).
    """

    def __init__(self, weights: Sequence[float], already_done: int = 0, *,
                 stream: TextIO | None = None, bar: bool | None = None,
                 tick_s: float | None = 1.0):
        self.stream = stream or sys.stderr
        self.bar = bar_enabled(self.stream) if bar is None else bar
        self.total = len(weights) + already_done
        self.done = already_done
        self.weight_left = float(sum(weights))
        self.weight_done = 0.0
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if self.bar and tick_s:
            threading.Thread(target=self._tick, args=(tick_s,), daemon=True).start()

    def _tick(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            self.draw()

    def eta_s(self) -> float | None:
        """Seconds left by the rate so far; None before the first cell finishes."""
        if self.weight_done <= 0:
            return None
        elapsed = time.perf_counter() - self.start
        return elapsed * self.weight_left / self.weight_done

    def line(self, width: int = 24) -> str:
        """The bar's text, e.g. ``[#########-----] 3/5 cells  0:42 elapsed  ETA 1:10``."""
        filled = round(width * self.done / self.total) if self.total else width
        eta = self.eta_s()
        return (f"[{'#' * filled}{'-' * (width - filled)}] {self.done}/{self.total} cells  "
                f"{_clock(time.perf_counter() - self.start)} elapsed  "
                f"ETA {'?' if eta is None else _clock(eta)}")

    def log(self, message: str) -> None:
        """Prints ``message`` on its own line (above the bar when there is one)."""
        with self._lock:
            self.stream.write(("\r\033[K" if self.bar else "") + message + "\n")
        self.draw()

    def draw(self) -> None:
        """Redraws the bar (nothing without one)."""
        with self._lock:
            if self.bar and not self._stop.is_set():
                self.stream.write("\r\033[K" + self.line())
            self.stream.flush()

    def advance(self, weight: float) -> None:
        """Counts one more finished cell of ``weight`` and redraws."""
        self.done += 1
        self.weight_done += weight
        self.weight_left = max(self.weight_left - weight, 0.0)
        self.draw()

    def close(self) -> None:
        """Stops the redraws and ends the bar's line."""
        self.draw()
        self._stop.set()
        with self._lock:
            if self.bar:
                self.stream.write("\n")
            self.stream.flush()
