"""Run to run: what changed in the quarantine since the previous scan with the same state folder.

Each scan with a state folder keeps the ids it quarantined (``STATE/runs/RUN.quarantine.parquet``);
the next scan compares: rows newly quarantined, rows resolved (released by a review, or now clean or
gone), rows still awaiting a decision.
"""

from __future__ import annotations

import glob
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard.names import QUARANTINE

log = logging.getLogger("poisonguard")
LISTED = 1000  # ids listed per group in summary.json and the report; the counts are always complete


def quarantined_ids(run_dir: str, id_col: str) -> list[str]:
    parts = sorted(glob.glob(os.path.join(run_dir, QUARANTINE, "*.parquet")))
    return [str(i) for p in parts for i in pq.read_table(p, columns=[id_col]).column(id_col).to_pylist()]


def run_to_run(state, current: list[str], decisions: dict) -> dict:
    """Counts (and the first ids) of rows newly quarantined, resolved and awaiting a decision."""
    previous_run = state.latest_run() if state is not None else None
    if previous_run is None or not os.path.exists(state.quarantine_path(previous_run)):
        return {"previous_run": previous_run, "note": "no earlier quarantine in the state folder"}
    try:
        before = set(map(str, pq.read_table(state.quarantine_path(previous_run), columns=["id"]).column("id").to_pylist()))
    except (pa.ArrowException, OSError, KeyError) as exc:  # advisory, as drift: reported, the scan goes on
        log.warning("run to run: the state folder's previous quarantine is damaged: %s", exc)
        return {"previous_run": previous_run,
                "note": f"the previous quarantine in the state folder is damaged, not compared: {str(exc)[:200]}"}
    now = set(current)
    released = {i for i, by_content in decisions.items() if "release" in by_content.values()}
    groups = {
        "newly_quarantined": sorted(now - before),
        "resolved_released": sorted((before - now) & released),
        "resolved_gone_or_clean": sorted((before - now) - released),
        "still_undecided": sorted(i for i in before & now if i not in decisions),
    }
    return {"previous_run": previous_run, "counts": {k: len(v) for k, v in groups.items()},
            "ids": {k: v[:LISTED] for k, v in groups.items()}}
