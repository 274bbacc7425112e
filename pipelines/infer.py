"""``poisonguard suite infer``: a Great Expectations 1.x suite inferred from trusted data.

Row-level expectations a reviewer can read and edit, each with a ``meta`` note saying what it was
inferred from: column presence and types, non-null where the data has no nulls, value sets for the
label and other low-cardinality columns, numeric ranges from robust quantiles widened by a stated
margin, string lengths and regular patterns.  Vector columns (embeddings, features) get their
length and per-dimension bounds as poisonguard expectations in the suite's ``meta.poisonguard``
(GX cannot express them on list columns); GX loads the suite unchanged and poisonguard enforces both.

Strictness sets the quantiles and the margin:

| strictness | quantiles | margin (of the quantile range) | bounds always hold the trusted data |
|---|---|---|---|
| loose | 0 / 1 | 0.5 | yes |
| normal | 0.001 / 0.999 | 0.25 | yes |
| strict | 0.01 / 0.99 | 0.1 | no: the trusted data's own extremes may fail |
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poisonguard.config import Config
from poisonguard.io import decode_array, decoded, plan_discovered, read_batches, work_items

STRICTNESS = {"loose": (0.0, 1.0, 0.5), "normal": (0.001, 0.999, 0.25), "strict": (0.01, 0.99, 0.1)}
SAMPLE = 200_000  # values kept per column for quantiles (a seeded uniform sample)
MAX_SET = 50  # at most this many distinct values make a value set
MAX_PATTERNS = 1


@dataclass
class _Column:
    kind: str  # number, bool, string, vector, other
    nulls: int = 0
    rows: int = 0
    sample: list = field(default_factory=list)
    values: set | None = field(default_factory=set)
    lo: float = np.inf
    hi: float = -np.inf
    exact: list | None = None  # an integer column's [min, max] as Python ints (float64 rounds past 2**53)
    lengths: list = field(default_factory=lambda: [np.inf, -np.inf])
    patterns: set | None = field(default_factory=set)
    dims: dict = field(default_factory=dict)
    infinite: bool = False  # a number column whose trusted values include +-inf: no value set or range


def _kind(t: pa.DataType) -> str:
    t = decoded(t)
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and \
            (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return "vector"
    return "other"


def shape_of(text: str) -> str:
    """A regular expression for a string's shape: letters, digits, others literal, runs counted."""
    out, prev, run = [], None, 0
    for ch in text + "\0":
        cls = r"[A-Za-z]" if ch.isalpha() and ch.isascii() else r"\d" if ch.isdigit() and ch.isascii() else re.escape(ch)
        if cls == prev:
            run += 1
            continue
        if prev is not None:
            out.append(prev if run == 1 else f"{prev}{{{run}}}")
        prev, run = cls, 1
    return "^" + "".join(out) + "$"


def _observe(col: _Column, arr: pa.ChunkedArray, rng: np.random.Generator) -> None:
    arr = decode_array(arr)
    col.rows += len(arr)
    col.nulls += arr.null_count
    present = arr.drop_null()
    if col.kind == "number" and pa.types.is_floating(present.type):
        # GX reads a NaN as a null (pandas); a value set or range cannot hold +-inf in strict JSON
        # (and Arrow has no unique kernel for half floats): sets and ranges come from the finite values
        v = present.to_numpy(zero_copy_only=False).astype(np.float64)
        col.nulls += int(np.isnan(v).sum())
        col.infinite = col.infinite or bool(np.isinf(v).any())
        present = pa.array(v[np.isfinite(v)])
    if col.kind in ("number", "bool", "string") and col.values is not None:
        col.values |= set(pc.unique(present).to_pylist())
        if len(col.values) > MAX_SET:
            col.values = None
    if col.kind == "number" and len(present) and pa.types.is_integer(present.type):
        low, high = pc.min_max(present).values()
        col.exact = [low.as_py(), high.as_py()] if col.exact is None else \
            [min(col.exact[0], low.as_py()), max(col.exact[1], high.as_py())]
    if col.kind == "number" and len(present):
        values = present.to_numpy(zero_copy_only=False).astype(np.float64)
        col.lo, col.hi = min(col.lo, values.min()), max(col.hi, values.max())
        col.sample.extend(rng.choice(values, min(len(values), SAMPLE // 10), replace=False).tolist())
    elif col.kind == "string" and len(present):
        lengths = pc.utf8_length(present).to_numpy(zero_copy_only=False)
        col.lengths = [min(col.lengths[0], lengths.min()), max(col.lengths[1], lengths.max())]
        if col.patterns is not None:
            for text in present.unique().to_pylist()[:1000]:
                col.patterns.add(shape_of(text))
                if len(col.patterns) > MAX_PATTERNS:
                    col.patterns = None
                    break
    elif col.kind == "vector" and len(present):
        lengths = pc.list_value_length(present).to_numpy(zero_copy_only=False)
        for length in np.unique(lengths):
            col.dims[int(length)] = col.dims.get(int(length), 0) + int((lengths == length).sum())
        width = max(col.dims, key=col.dims.get)
        rows = present.filter(pa.array(lengths == width)) if isinstance(present, pa.Array) else \
            pa.chunked_array(present.chunks).combine_chunks().filter(pa.array(lengths == width))
        values = pc.cast(rows.flatten(), pa.float64()).to_numpy(zero_copy_only=False).reshape(-1, width)
        values = values[np.isfinite(values).all(axis=1)]  # (the scan rejects non-finite vectors itself)
        if not len(values):
            return
        keep = rng.choice(len(values), min(len(values), 5000), replace=False)
        col.sample.append(values[keep])


def _rounded(value: float, outward: int) -> float:
    """``value`` to 6 decimals, rounded away from the data (down for a minimum, up for a maximum), so
    that a bound which holds the trusted extremes still does (a constant 0.3333333 had become 0.333333)."""
    out = round(float(value), 6)
    return out if (out - value) * outward >= 0 else round(out + outward * 1e-6, 6)


def _bounds(values: np.ndarray, strictness: str, axis=None):
    q_lo, q_hi, margin = STRICTNESS[strictness]
    lo, hi = np.quantile(values, q_lo, axis=axis), np.quantile(values, q_hi, axis=axis)
    spread = hi - lo
    lo, hi = lo - margin * spread, hi + margin * spread
    if strictness != "strict":
        lo, hi = np.minimum(lo, values.min(axis=axis)), np.maximum(hi, values.max(axis=axis))
    return lo, hi


NAMED_FILES = 3  # trusted files an expectation's meta names; a lake of thousands is summarised by one digest


def infer_suite(inputs: list[str], config: Config, *, name: str, strictness: str = "normal", seed: int = 0,
                names: dict[str, str] | None = None) -> dict:
    """``names``: what to call each input file in the meta notes (a local copy -> its URI)."""
    plan = plan_discovered(inputs, config)
    names = names or {}

    def named(path: str) -> str:  # the copies are named by their real paths (run.remote.local_inputs)
        return names.get(os.path.realpath(path), path)

    rng = np.random.default_rng(seed)
    columns = {f.name: _Column(_kind(f.type)) for f in plan.schema}
    for item in work_items(plan, 1 << 30):
        for _, table in read_batches(item, None, config.batch_size):
            for name_, col in columns.items():
                _observe(col, table.column(name_), rng)
    n, files = plan.total_rows, ", ".join(f"{named(f.path)} (sha256 {f.sha256[:12]})" for f in plan.files[:NAMED_FILES])
    if len(plan.files) > NAMED_FILES:
        every = hashlib.sha256("".join(f"{named(f.path)}\0{f.sha256}\n" for f in plan.files).encode()).hexdigest()
        files += f" and {len(plan.files) - NAMED_FILES} more files (sha256 of every path and digest: {every[:12]})"
    source = f"{n} trusted rows of {files}"
    q_lo, q_hi, margin = STRICTNESS[strictness]
    exps, vectors = [], []

    def add(kind: str, column: str, note: str, **kwargs):
        exps.append({"type": kind, "kwargs": {"column": column, **kwargs},
                     "meta": {"inferred_from": source, "note": note, "strictness": strictness}})

    dtypes = plan.schema.empty_table().to_pandas().dtypes  # the types GX sees, as pandas converts each batch
    for column, col in columns.items():
        add("expect_column_to_exist", column, "the column is present in every trusted file")
        if col.kind in ("number", "bool", "string"):
            add("expect_column_values_to_be_of_type", column, f"the trusted files' Arrow type "
                f"{plan.schema.field(column).type}, as pandas holds it", type_=str(dtypes[column]))
        if col.nulls == 0:
            add("expect_column_values_to_not_be_null", column, f"no nulls in {col.rows} trusted rows")
        categorical = col.values is not None and (column == config.columns.label or len(col.values) * 20 <= col.rows)
        if col.infinite:
            pass
        elif col.kind in ("number", "bool", "string") and categorical and column != config.columns.id:
            values = sorted(col.values, key=lambda v: (str(type(v)), v))
            add("expect_column_values_to_be_in_set", column,
                f"the {len(values)} distinct values seen in the trusted data", value_set=values)
        elif col.kind == "number" and col.sample:
            lo, hi = _bounds(np.asarray(col.sample), strictness)
            trusted = f"trusted min {col.lo:.6g}, max {col.hi:.6g}"
            if col.exact is not None:  # integer bounds, exact where they must hold the trusted extremes
                lo, hi = int(np.floor(lo)), int(np.ceil(hi))
                if strictness != "strict":
                    lo, hi = min(lo, col.exact[0]), max(hi, col.exact[1])
                trusted = f"trusted min {col.exact[0]}, max {col.exact[1]}"
                if hi > np.iinfo(np.int64).max:  # GX reads uint64 past 2**63 against integer bounds wrongly;
                    lo, hi = float(np.nextafter(lo, -np.inf)), float(np.nextafter(hi, np.inf))  # floats, outward
            else:
                lo, hi = float(lo), float(hi)
            add("expect_column_values_to_be_between", column,
                f"quantiles {q_lo}..{q_hi} of the trusted values widened by {margin} of their range "
                f"({trusted})", min_value=lo, max_value=hi)
        if col.kind == "string" and np.isfinite(col.lengths[0]):
            lo, hi = int(col.lengths[0]), int(col.lengths[1])
            slack = int(np.ceil(margin * (hi - lo)))
            add("expect_column_value_lengths_to_be_between", column,
                f"trusted lengths {lo}..{hi}, widened by {slack}", min_value=max(0, lo - slack), max_value=hi + slack)
            if col.patterns and len(col.patterns) == 1:
                add("expect_column_values_to_match_regex", column, "every trusted value has this shape",
                    regex=next(iter(col.patterns)))
        if col.kind == "vector" and col.dims and col.sample:
            width = max(col.dims, key=col.dims.get)
            sample = np.vstack(col.sample)
            lo, hi = _bounds(sample, strictness, axis=0)
            note = {"inferred_from": source, "strictness": strictness}
            vectors.append({"type": "expect_vector_length_to_equal", "column": column, "value": width,
                            "meta": {**note, "note": f"{col.dims[width]} of {col.rows - col.nulls} vectors have "
                                                     f"{width} values"}})
            vectors.append({"type": "expect_vector_values_to_be_between", "column": column,
                            "min_value": [_rounded(v, -1) for v in lo], "max_value": [_rounded(v, 1) for v in hi],
                            "meta": {**note, "note": f"per dimension: quantiles {q_lo}..{q_hi} of a sample of "
                                                     f"{len(sample)} trusted vectors widened by {margin} of their range"}})
    return {"name": name, "expectations": exps,
            "meta": {"poisonguard": {"vectors": vectors, "inferred_from": source, "strictness": strictness}}}


def write_suite(suite: dict, path: str) -> None:
    from pathlib import Path

    from poisonguard import storage
    from poisonguard.errors import InputError

    text = json.dumps(suite, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if storage.is_remote(path):
        storage.write_bytes(path, text.encode("utf-8"))
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write the suite: {exc.strerror}", path=path) from None
