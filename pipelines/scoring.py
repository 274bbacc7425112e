"""Per-batch logic shared by the Beam pipeline and the in-memory path: fit, score, decide, split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from detectors import ClassState, PoisonDetector, make_detector
from pipelines.config import Config
from pipelines.validation import BUILTIN, DUPLICATE_ID, ID_MISSING, REVIEW_CONFIRMED, RowBlock

DETECTOR_REASON = "detector:"


def class_states(block: RowBlock, capacity: int) -> list[tuple[object, ClassState]]:
    """Per-class mergeable state of one batch's scorable rows."""
    from detectors.base import _rows_by_label

    ok = np.flatnonzero(block.scorable)
    labels = block.labels[ok]
    return [
        (label, ClassState.from_block(block.x[ok[rows]], block.sample_keys[ok[rows]], capacity))
        for label, rows in _rows_by_label(labels)
    ]


def fit_detectors(states: dict[object, ClassState], config: Config) -> dict[str, PoisonDetector]:
    ordered = dict(sorted(states.items(), key=lambda kv: (str(type(kv[0])), kv[0])))
    return {
        det.name: make_detector(det.name, **config.detector_params(det)).fit_states(ordered)
        for det in config.detectors
    }


def duplicate_hashes(hashes: np.ndarray) -> np.ndarray:
    values, counts = np.unique(hashes, return_counts=True)
    return values[counts > 1]


def score_block(block: RowBlock, fitted: dict[str, PoisonDetector], dup_hashes: np.ndarray) -> dict[str, np.ndarray]:
    """Score every scorable row with each detector; add duplicate-id and detector reasons."""
    scores: dict[str, np.ndarray] = {}
    ok = np.flatnonzero(block.scorable)
    if len(dup_hashes):
        block.add_reason(DUPLICATE_ID, np.isin(block.id_hash, dup_hashes) & ~block.mask(ID_MISSING))
    for name, detector in fitted.items():
        column = np.full(len(block), np.nan)
        flags = np.zeros(len(block), dtype=bool)
        if len(ok):
            x, y = block.x[ok], block.labels[ok]
            if name == "knn_label":
                s = detector.score_samples(x, y, sample_keys=block.sample_keys[ok])
            else:
                s = detector.score_samples(x, y)
            column[ok] = s
            flags[ok] = detector.flag(x, y, scores=s)
        scores[name] = column
        if block.released is not None:
            flags &= ~block.released
        block.add_reason(DETECTOR_REASON + name, flags)
    return scores


def reason_order(reasons) -> list[str]:
    def rank(reason: str):
        if reason.startswith(BUILTIN):
            return (0, reason)
        if reason.startswith("validation:"):
            return (1, reason)
        if reason.startswith(DETECTOR_REASON):
            return (2, reason)
        return (3, reason)

    return sorted(reasons, key=rank)


def row_reasons(block: RowBlock, rows: np.ndarray) -> list[list[str]]:
    """The ordered reason list of each selected row (a boolean mask over the block)."""
    names = reason_order(block.reasons)
    if not names:
        return [[] for _ in range(int(rows.sum()))]
    matrix = np.column_stack([block.reasons[r] for r in names])[rows]
    return [[names[j] for j in np.flatnonzero(row)] for row in matrix]


def split_tables(table: pa.Table, block: RowBlock, scores: dict[str, np.ndarray], detector_names: list[str],
                 run_id: str) -> tuple[pa.Table, pa.Table]:
    """Every input column unchanged, plus score_<detector>; quarantine adds reasons and run_id."""
    for name in detector_names:
        table = table.append_column(pa.field(f"score_{name}", pa.float64()), pa.array(scores[name], pa.float64()))
    quarantined = block.quarantined
    clean = table.filter(pa.array(~quarantined))
    held = table.filter(pa.array(quarantined))
    reasons = row_reasons(block, quarantined)
    held = held.append_column(pa.field("quarantine_reasons", pa.list_(pa.string())),
                              pa.array(reasons, pa.list_(pa.string())))
    held = held.append_column(pa.field("run_id", pa.string()), pa.array([run_id] * held.num_rows, pa.string()))
    return clean, held


def output_schemas(schema: pa.Schema, detector_names: list[str]) -> tuple[pa.Schema, pa.Schema]:
    clean = schema
    for name in detector_names:
        clean = clean.append(pa.field(f"score_{name}", pa.float64()))
    held = clean.append(pa.field("quarantine_reasons", pa.list_(pa.string()))).append(pa.field("run_id", pa.string()))
    return clean, held


def block_stats(block: RowBlock, warnings: list[str] | None = None) -> dict:
    quarantined = block.quarantined
    labels = np.where(block.mask(BUILTIN + "label_missing"),
                      "<null>", block.labels.astype(str))
    classes: dict[str, dict[str, int]] = {}
    for label, n_in, n_q in _count_by(labels, quarantined):
        classes[label] = {"rows": n_in, "clean": n_in - n_q, "quarantined": n_q}
    return {
        "rows": len(block),
        "clean": int((~quarantined).sum()),
        "quarantined": int(quarantined.sum()),
        "reasons": {reason: int(mask.sum()) for reason, mask in block.reasons.items() if mask.any()},
        "classes": classes,
        "batch_warnings": dict(Counter(warnings or [])),
        "review": {
            "released": int(0 if block.released is None else (block.released & ~quarantined).sum()),
            "confirmed": int(block.mask(REVIEW_CONFIRMED).sum()),
        },
    }


def _count_by(labels: np.ndarray, quarantined: np.ndarray):
    uniques, inverse = np.unique(labels, return_inverse=True)
    rows = np.bincount(inverse, minlength=len(uniques))
    held = np.bincount(inverse, weights=quarantined, minlength=len(uniques)).astype(int)
    for label, n_in, n_q in zip(uniques.tolist(), rows.tolist(), held.tolist()):
        yield label, n_in, n_q


def merge_stats(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict):
            out[key] = merge_stats(out.get(key, {}), value)
        else:
            out[key] = out.get(key, 0) + value
    return out
