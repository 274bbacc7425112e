"""Row validation: vectorised built-in checks and the user's Great Expectations 1.x suite.

Reasons are kept as one boolean mask per reason over the batch, never a Python object per row.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import ConfigError, InputError, one_line

BUILTIN = "validation:builtin:"
ROW_LOCAL_CHECKS = ("id_missing", "label_missing", "features_invalid", "embedding_missing", "embedding_dim",
                    "embedding_finite", "embedding_magnitude")
DUPLICATE_ID = BUILTIN + "id_duplicate"
ID_MISSING = BUILTIN + "id_missing"


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
            bad |= self.mask(BUILTIN + check)
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


REVIEW_CONFIRMED = "review:confirmed"


def apply_decisions(block: RowBlock, table: pa.Table, decisions: dict, columns: list[str]) -> None:
    """Reviewer decisions for rows whose id *and* content hash match; others are scored afresh."""
    import pandas as pd

    from pipelines.state import content_hashes

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
    id_arr = table.column(id_col)
    ids = pc.cast(id_arr, pa.string()).to_numpy(zero_copy_only=False)
    id_null = np.asarray(pc.is_null(id_arr), dtype=bool)
    safe_ids = np.where(id_null, "", ids).astype(object)
    labels_arr = table.column(label_col)
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
    block.add_reason(BUILTIN + "label_missing", label_null)
    for check, mask in emb_reasons.items():
        block.add_reason(BUILTIN + check, mask)
    return block


def _labels_to_numpy(arr, null_mask: np.ndarray) -> np.ndarray:
    t = arr.type
    if pa.types.is_integer(t):
        return pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).astype(np.int64)
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
        values = pc.cast(col.filter(pa.array(ok)).flatten(), pa.float64()).to_numpy(zero_copy_only=False)
        values = values.reshape(-1, dim)
        finite = np.isfinite(values).all(axis=1)
        big = np.zeros(len(values), dtype=bool)
        big[finite] = (np.abs(values[finite]) > max_abs).any(axis=1)
        rows = np.flatnonzero(ok)
        not_finite[rows[~finite]] = True
        too_big[rows[big]] = True
        good = finite & ~big
        x[rows[good]] = values[good].astype(np.float32)
    return x, {"embedding_missing": missing, "embedding_dim": wrong_dim,
               "embedding_finite": not_finite, "embedding_magnitude": too_big}


# ---- Great Expectations ------------------------------------------------------------------

def load_suite_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read expectation suite: {exc.strerror}", path=path) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"expectation suite is not valid JSON: {exc.msg} at line {exc.lineno}", path=path) from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ConfigError("expectation suite must be a JSON object with an 'expectations' list", path=path)
    return data


def suite_columns(suite: dict) -> list[str]:
    cols: list[str] = []
    for exp in suite["expectations"]:
        kwargs = exp.get("kwargs", {}) if isinstance(exp, dict) else {}
        for key in ("column", "column_A", "column_B"):
            if isinstance(kwargs.get(key), str):
                cols.append(kwargs[key])
        if isinstance(kwargs.get("column_list"), list):
            cols.extend(c for c in kwargs["column_list"] if isinstance(c, str))
    return list(dict.fromkeys(cols))


def check_suite(path: str, schema: pa.Schema) -> dict:
    """Load and check a suite on the driver: JSON, known expectation types, columns that exist."""
    suite = load_suite_json(path)
    for col in suite_columns(suite):
        if col not in schema.names:
            raise InputError(f"expectation suite {path} names a column the data lacks", column=col)
    build_gx_suite(suite, path)
    return suite


def build_gx_suite(suite: dict, path: str = "suite"):
    quiet_gx()
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    # GX logs and drops an expectation it cannot build; a screening tool must refuse instead.
    for number, exp in enumerate(suite["expectations"], start=1):
        try:
            if not isinstance(exp, dict) or not isinstance(exp.get("type"), str):
                raise ValueError("each expectation needs a 'type'")
            ExpectationConfiguration(type=exp["type"], kwargs=exp.get("kwargs", {})).to_domain_obj()
        except Exception as exc:  # noqa: BLE001 - GX raises many types for a bad expectation
            name = exp.get("type") if isinstance(exp, dict) else exp
            raise ConfigError(f"invalid expectation suite: expectation {number} ({name}): {one_line(exc)}",
                              path=path) from None
    try:
        return gx.ExpectationSuite(**suite)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"invalid expectation suite: {one_line(exc)}", path=path) from None


def quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import logging

    logging.getLogger("great_expectations").setLevel(logging.ERROR)


class SuiteRunner:
    """Runs a GX suite on pandas batches; built once per worker (DoFn.setup), GX imported lazily."""

    def __init__(self, suite: dict, path: str = "suite"):
        self.suite_dict = suite
        self.path = path
        self.columns = suite_columns(suite)
        self._batch_definition = None
        self._suite = None

    def _setup(self):
        quiet_gx()
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        asset = context.data_sources.add_pandas("poisonguard").add_dataframe_asset("batch")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole")
        self._suite = build_gx_suite(self.suite_dict, self.path)

    def failures(self, table: pa.Table) -> tuple[dict[str, np.ndarray], list[str]]:
        """Per row-level expectation a mask of failing rows; batch-level failures as messages."""
        if not self.suite_dict["expectations"]:
            return {}, []
        if self._batch_definition is None:
            self._setup()
        frame = table.select(self.columns).to_pandas() if self.columns else table.slice(0, 0).to_pandas()
        frame.index = np.arange(len(frame))
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(self._suite, result_format={"result_format": "COMPLETE"})
        masks: dict[str, np.ndarray] = {}
        messages: list[str] = []
        for res in result.results:
            conf = res.expectation_config
            column = conf.kwargs.get("column") or "table"
            if res.exception_info and res.exception_info.get("raised_exception"):
                raise InputError(f"expectation {conf.type} failed to run: "
                                 f"{one_line(res.exception_info.get('exception_message'))}", column=column)
            if res.success:
                continue
            index = res.result.get("unexpected_index_list")
            if index is None:
                messages.append(f"{conf.type}:{column}")
                continue
            mask = np.zeros(len(frame), dtype=bool)
            mask[np.asarray(index, dtype=np.int64)] = True
            reason = f"validation:{conf.type}:{column}"
            masks[reason] = masks.get(reason, np.zeros(len(frame), bool)) | mask
        return masks, messages
