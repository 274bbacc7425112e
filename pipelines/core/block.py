"""A block of rows ready for screening, and the built-in row checks that make it.

Reasons are kept as one boolean mask per reason over the batch, never a Python object per row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poisonguard.io import decode_array
from poisonguard.names import CANARY_PREFIX, ID_MISSING, ID_RESERVED, LABEL_MISSING, ROW_LOCAL_CHECKS, builtin_reason


@dataclass
class RowBlock:
    """One batch, ready for the detectors: ids, labels, embeddings and per-reason masks."""

    file_index: int
    first_row: int
    ids: np.ndarray  # object array of str (None where null)
    id_hash: np.ndarray  # uint64, duplicates share it
    sample_keys: np.ndarray  # uint64, seeded: which rows enter the bounded class sample
    labels: np.ndarray
    x: np.ndarray  # float32 (n, dim); zeros where the embedding is unusable
    reasons: dict[str, np.ndarray] = field(default_factory=dict)
    released: np.ndarray | None = None  # rows a reviewer released: detector flags do not apply
    model_rows: int = 0  # rows this block ran through an embedding model (model and proxy modes)
    features: np.ndarray | None = None  # float32 feature column, where confident learning reads it (label_view)
    copies: tuple[np.ndarray, np.ndarray] | None = None  # rows with an exact copy, and those whose copies' labels differ

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, reason: str) -> np.ndarray:
        """Rows carrying ``reason`` (all False when no row does)."""
        return self.reasons.get(reason, np.zeros(len(self), dtype=bool))

    @property
    def scorable(self) -> np.ndarray:
        """Rows whose id, label and embedding are usable (the rows detectors fit and score)."""
        bad = np.zeros(len(self), dtype=bool)
        for check in ROW_LOCAL_CHECKS:
            bad |= self.mask(builtin_reason(check))
        return ~bad

    @property
    def quarantined(self) -> np.ndarray:
        out = np.zeros(len(self), dtype=bool)
        for mask in self.reasons.values():
            out |= mask
        return out

    def add_reason(self, reason: str, mask: np.ndarray) -> None:
        if mask.any():
            self.reasons[reason] = self.mask(reason) | mask


def seeded_hash_key(seed: int) -> str:
    return hashlib.sha256(f"poisonguard-sample-{seed}".encode()).hexdigest()[:16]


def hash_strings(values: np.ndarray, key: str = "0123456789123456") -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(values, hash_key=key, categorize=False).astype(np.uint64)


def builtin_block(table: pa.Table, *, file_index: int, first_row: int, id_col: str, label_col: str,
                  emb_col: str, dim: int, max_abs: float, seed: int, embeddings=None,
                  bad_features: np.ndarray | None = None) -> RowBlock:
    """Built-in checks of one batch; ``embeddings`` replaces the embedding column (model/proxy modes)."""
    n = table.num_rows
    id_arr = decode_array(table.column(id_col))
    ids = pc.cast(id_arr, pa.string()).to_numpy(zero_copy_only=False)
    id_null = np.asarray(pc.is_null(id_arr), dtype=bool)
    safe_ids = np.where(id_null, "", ids).astype(object)
    labels_arr = decode_array(table.column(label_col))
    label_null = np.asarray(pc.is_null(labels_arr), dtype=bool)
    labels = _labels_to_numpy(labels_arr, label_null)
    column = table.column(emb_col) if embeddings is None else embeddings
    x, emb_reasons = _embeddings(column, n, dim, max_abs)
    if bad_features is not None:
        emb_reasons["features_invalid"] = bad_features
        emb_reasons["embedding_missing"] = emb_reasons["embedding_missing"] & ~bad_features
    block = RowBlock(
        file_index=file_index, first_row=first_row, ids=ids,
        id_hash=hash_strings(safe_ids), sample_keys=hash_strings(safe_ids, seeded_hash_key(seed)),
        labels=labels, x=x,
    )
    block.add_reason(ID_MISSING, id_null)
    block.add_reason(ID_RESERVED, np.asarray(pc.fill_null(pc.starts_with(pc.cast(id_arr, pa.string()), CANARY_PREFIX),
                                                          False), dtype=bool))
    block.add_reason(LABEL_MISSING, label_null)
    for check, mask in emb_reasons.items():
        block.add_reason(builtin_reason(check), mask)
    return block


def _labels_to_numpy(arr, null_mask: np.ndarray) -> np.ndarray:
    t = arr.type
    if pa.types.is_integer(t):  # uint64 kept as such: past 2**63 an int64 would wrap to another label's spelling
        return pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).astype(np.uint64 if t == pa.uint64() else np.int64)
    if pa.types.is_boolean(t):
        return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool)
    return np.where(null_mask, "", arr.to_numpy(zero_copy_only=False)).astype(object)


def _embeddings(col, n: int, dim: int, max_abs: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    missing = np.asarray(pc.is_null(col), dtype=bool)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    lengths = np.where(missing, -1, np.nan_to_num(lengths.astype(np.float64), nan=-1)).astype(np.int64)
    wrong_dim = ~missing & (lengths != dim)
    ok = ~missing & ~wrong_dim
    x = np.zeros((n, dim), dtype=np.float32)
    not_finite = np.zeros(n, dtype=bool)
    too_big = np.zeros(n, dtype=bool)
    if ok.any():
        flat = (col if ok.all() else col.filter(pa.array(ok))).flatten()
        if not (pa.types.is_float32(flat.type) or pa.types.is_float64(flat.type)):
            flat = pc.cast(flat, pa.float64())
        values = flat.to_numpy(zero_copy_only=False).reshape(-1, dim)  # in the column's own float type
        # each row's largest magnitude, exact in its own type, compared in float64; NaN or inf where a value is
        peak = np.maximum(values.max(axis=1), -values.min(axis=1)).astype(np.float64)
        finite = np.isfinite(peak)
        big = finite & (peak > max_abs)
        rows = np.flatnonzero(ok)
        not_finite[rows[~finite]] = True
        too_big[rows[big]] = True
        good = finite & ~big
        if good.all() and len(rows) == n:
            x = values.astype(np.float32, copy=False)  # read-only where it is the Arrow buffer itself
        else:
            x[rows[good]] = values[good].astype(np.float32)
    return x, {"embedding_missing": missing, "embedding_dim": wrong_dim,
               "embedding_finite": not_finite, "embedding_magnitude": too_big}


