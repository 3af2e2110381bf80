"""Progress lines for the scoring loop when no progress bar can be drawn.

The criteria draw a tqdm bar only when stderr is a terminal; under a job scheduler, a
pipe or ``nohup`` scoring would be silent for minutes. :class:`LoggedBatches` is the
calibration batch list that also logs ``"<what>: batch i/n (t s)"`` on the
``fxprune.progress`` logger every ``interval`` seconds while it is iterated (the CLI
shows that logger's INFO lines unless ``--quiet``).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterator, List, Optional

__all__ = ["INTERVAL_S", "LoggedBatches", "logged_batches"]

log = logging.getLogger("fxprune.progress")

INTERVAL_S = 10.0  # seconds between two progress lines


class LoggedBatches(list):
    """A list of batches whose iteration logs a progress line every ``interval`` s.

    A ``list`` subclass so that criteria index, slice and measure it as before."""

    def __init__(self, batches, what: str, interval: Optional[float] = None):
        super().__init__(batches)
        self.what = what
        self.interval = INTERVAL_S if interval is None else interval

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        total = len(self)
        for i, item in enumerate(super().__iter__()):
            yield item
            now = time.monotonic()
            if now - last >= self.interval:
                log.info("%s: batch %d/%d (%.0f s)", self.what, i + 1, total, now - start)
                last = now


def logged_batches(batches: Optional[List], what: str, enabled: bool):
    """``batches`` as :class:`LoggedBatches` when progress is ``enabled`` and stderr is not
    a terminal (where the criteria's progress bars are drawn instead)."""
    if not enabled or batches is None or sys.stderr.isatty():
        return batches
    return LoggedBatches(batches, what)
