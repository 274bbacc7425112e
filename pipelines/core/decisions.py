"""Reviewer decisions applied to a block: confirmed rows held back, released rows let through.

A decision applies to the row with that id *and* that content: the sha256 of the row's input
columns (canonical JSON), so an edited row is scored afresh.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from poisonguard.core.block import RowBlock
from poisonguard.names import REVIEW_CONFIRMED


def content_hashes(table: pa.Table, columns: list[str]) -> list[str]:
    """sha256 of each row's values in ``columns`` (canonical JSON; floats as Python reprs)."""
    rows = table.select(columns).to_pylist()
    return [hashlib.sha256(json.dumps(row, sort_keys=True, default=_json_default, ensure_ascii=False)
                           .encode()).hexdigest() for row in rows]


def _json_default(value):
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def apply_decisions(block: RowBlock, table: pa.Table, decisions: dict, columns: list[str]) -> None:
    """Reviewer decisions for rows whose id *and* content hash match; others are scored afresh."""
    import pandas as pd

    rows = np.flatnonzero(pd.Series(block.ids, dtype=object).isin(decisions.keys()).to_numpy())
    if not len(rows):
        return
    confirmed = np.zeros(len(block), dtype=bool)
    released = np.zeros(len(block), dtype=bool)
    for row, digest in zip(rows, content_hashes(table.take(rows), columns)):
        decision = decisions[block.ids[row]].get(digest)
        if decision == "confirm":
            confirmed[row] = True
        elif decision == "release":
            released[row] = True
    block.add_reason(REVIEW_CONFIRMED, confirmed)
    block.released = released
