"""What a run tells its operator: phases with their durations, and the context every log line carries.

``phase(name)`` logs the start and end (with its duration) of plan, fit, score, report and publish;
``run_context(run_id)`` and the current phase go into every record (``--log-format json`` prints them
as one JSON object per line: ts, level, run_id, phase, msg).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import time

log = logging.getLogger("poisonguard")
_RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("poisonguard_run_id", default=None)
_PHASE: contextvars.ContextVar[str | None] = contextvars.ContextVar("poisonguard_phase", default=None)


@contextlib.contextmanager
def run_context(run_id: str):
    token = _RUN_ID.set(run_id)
    try:
        yield
    finally:
        _RUN_ID.reset(token)


@contextlib.contextmanager
def phase(name: str):
    token = _PHASE.set(name)
    started = time.monotonic()
    log.info("%s: start", name)
    try:
        yield
        log.info("%s: done in %.2f s", name, time.monotonic() - started)
    finally:
        _PHASE.reset(token)


class Context(logging.Filter):
    """Adds run_id and phase to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id, record.phase = _RUN_ID.get(), _PHASE.get()
        return True


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds")
        return json.dumps({"ts": ts.replace("+00:00", "Z"), "level": record.levelname,
                           "run_id": getattr(record, "run_id", None), "phase": getattr(record, "phase", None),
                           "logger": record.name, "msg": record.getMessage()}, ensure_ascii=False)
