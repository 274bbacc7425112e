"""The report's clean sample, gathered while the score pass writes its parts.

The report plots, for each class with findings, at most ``per_class`` of its clean rows: those with
the smallest seeded hash of their id (the same rows whatever the order of the part files).  Finding
them afterwards means reading every clean row, embeddings included: the report's cost would grow
with the rows scanned.  So the score pass keeps the *candidates*: in each class some detector
flagged, the clean rows whose key is below a bound set from the class's row count, about
``OVERSAMPLE`` x ``per_class`` rows per class.  Hashes are uniform, so if at least ``per_class``
candidates of a class are clean, the ``per_class`` smallest keys of the class are all among them;
the report checks that against the summary's clean counts and reads every clean row where it does
not hold.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poisonguard.core.block import hash_strings, seeded_hash_key
from poisonguard.io import decode_array

OVERSAMPLE = 3  # candidates per class over per_class: short only where two thirds of a class are quarantined
MAX_CLASSES_FACTOR = 4  # more flagged classes than this x report.max_classes: no candidates, the report reads all


def plan(decisions: dict[str, dict], class_rows: dict, per_class: int, max_classes: int) -> dict | None:
    """Per flagged class, the key bound below which its clean rows are kept (None: keep none, the report
    reads every clean row).  ``decisions``: per detector, its ``decisions_``."""
    flagged = {label for classes in decisions.values() for label, d in classes.items() if d.suspicious}
    if len(flagged) > MAX_CLASSES_FACTOR * max_classes:
        return None
    return {label: key_bound(class_rows.get(label, 0), per_class) for label in flagged}


def key_bound(rows: int, per_class: int) -> int:
    """The largest key kept (inclusive, a uint64): about OVERSAMPLE x per_class of ``rows`` rows."""
    share = OVERSAMPLE * per_class / max(rows, 1)
    return 2**64 - 1 if share >= 1 else max(int(share * 2**64) - 1, 0)


def keys_of(table: pa.Table, id_col: str, seed: int) -> np.ndarray:
    ids = np.asarray(table.column(id_col).cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    return hash_strings(ids, seeded_hash_key(seed))


def candidates(clean: pa.Table, bounds: dict | None, label_col: str, id_col: str, seed: int) -> pa.Table | None:
    """The block's clean rows of flagged classes whose key is under their class's bound."""
    if not bounds or not clean.num_rows:
        return None
    import pandas as pd

    labels = decode_array(clean.column(label_col))  # (a categorical label column: its values)
    try:
        wanted = pa.array(list(bounds), type=labels.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return None  # (labels the column's type cannot hold: the report reads the clean rows instead)
    mask = pc.fill_null(pc.is_in(labels, value_set=wanted), False)
    rows = clean.filter(mask)
    if not rows.num_rows:
        return None
    keys = keys_of(rows, id_col, seed)
    index = pd.Index(list(bounds), dtype=object)
    codes = index.get_indexer(np.asarray(labels.filter(mask).to_numpy(zero_copy_only=False), dtype=object))
    limits = np.array([bounds[label] for label in index], dtype=np.uint64)[codes]
    keep = keys <= limits
    return rows.filter(pa.array(keep)) if keep.any() else None


def bottom_per_class(table: pa.Table, keys: np.ndarray, label_col: str, per_class: int) -> pa.Table:
    """The ``per_class`` rows of each class with the smallest keys, in their table order."""
    import pandas as pd

    if not table.num_rows:
        return table
    labels = pd.factorize(pd.Series(table.column(label_col).to_numpy(zero_copy_only=False)), use_na_sentinel=False)[0]
    order = np.lexsort((keys, labels))
    ranked = labels[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return table.take(np.sort(order[rank < per_class]))
