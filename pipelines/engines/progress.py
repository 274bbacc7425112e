"""Progress of a pass: rows (or other units) done of the total, with an ETA, logged at most every
``every_s`` seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("poisonguard")


class Progress:
    def __init__(self, stage: str, total: int, every_s: float = 10.0, unit: str = "rows"):
        self.stage, self.total, self.every_s, self.unit = stage, total, every_s, unit
        self.rows, self.start = 0, time.monotonic()
        self.last = self.start

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.rows / max(now - self.start, 1e-9)
            log.info("%s: %d of %d %s, %.0f s, ETA %.0f s", self.stage, self.rows, self.total, self.unit,
                     now - self.start, max(self.total - self.rows, 0) / max(rate, 1e-9))
