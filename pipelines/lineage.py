"""Provenance records, once written to the log, also sent with the OpenLineage client's transports.

Configured as the client configures itself: ``OPENLINEAGE_URL`` (and ``OPENLINEAGE_API_KEY``),
``OPENLINEAGE_CONFIG`` (an ``openlineage.yml``) or ``OPENLINEAGE__TRANSPORT__*`` variables;
``OPENLINEAGE_DISABLED=true`` turns it off.  With none of them set nothing is sent and the client is
never imported.  The log is the record of truth: a lineage server that is down costs a warning,
never a scan.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger("poisonguard")


def configured() -> bool:
    if os.environ.get("OPENLINEAGE_DISABLED", "").lower() in ("1", "true", "yes"):
        return False
    return any(key == "OPENLINEAGE_URL" or key == "OPENLINEAGE_CONFIG" or key.startswith("OPENLINEAGE__TRANSPORT")
               for key in os.environ)


@functools.lru_cache(maxsize=4)
def _client(settings: tuple):
    from openlineage.client import OpenLineageClient

    return OpenLineageClient()


def emit(record: dict) -> None:
    """Send one log record (START, COMPLETE, FAIL or a review) as a RunEvent, if a transport is set."""
    if not configured():
        return
    from poisonguard.provenance import as_lineage_event

    settings = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("OPENLINEAGE")))
    try:
        _client(settings).emit(as_lineage_event(record))
    except Exception as exc:  # noqa: BLE001 - any transport failure is a warning, never a failed scan
        log.warning("could not send the %s event to the OpenLineage transport: %s: %s",
                    record.get("eventType"), type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
