"""The report's clean sample from the score pass's candidates (core/report_sample.py): the same rows
as reading every clean row, from a fraction of them."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from poisonguard.core import report_sample
from poisonguard.detectors.calibration import ClassDecision
from poisonguard.engines.outputs import write_block
from poisonguard.names import CLEAN, QUARANTINE, REPORT_SAMPLE, WORK
from poisonguard.report import _clean_sample

PER_CLASS = 50
COLUMNS = ["id", "label", "x"]


def _flagged(*labels):
    yes, no = ClassDecision(True, 1.0, 5.0, 0.05, 100, "separated minority"), ClassDecision(False, np.inf, 1.0, 0, 100, "")
    return {"spectral": {c: (yes if c in labels else no) for c in range(3)}}


def _blocks(rng, n_blocks=8, rows=1500, held_share=0.0):
    for b in range(n_blocks):
        ids = [f"row-{b}-{i}" for i in range(rows)]
        labels = rng.integers(0, 3, rows)
        table = pa.table({"id": ids, "label": labels, "x": rng.normal(size=rows)})
        held = rng.random(rows) < held_share
        yield b * rows, table.filter(pa.array(~held)), table.filter(pa.array(held))


def _write(tmp, rng, bounds, **kw):
    for first_row, clean, held in _blocks(rng, **kw):
        sample = report_sample.candidates(clean, bounds, "label", "id", seed=3)
        write_block(str(tmp), 0, first_row, clean, held, sample)
    return str(tmp / CLEAN), str(tmp / WORK / REPORT_SAMPLE)


def _rows(table):
    return sorted(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))


def _counts(folder):
    import pyarrow.dataset as ds

    return ds.dataset(folder).count_rows() if os.path.isdir(folder) else 0


def test_candidates_hold_the_sample_of_every_flagged_class_and_only_those(tmp):
    for folder in (CLEAN, QUARANTINE):
        os.makedirs(tmp / folder)
    bounds = report_sample.plan(_flagged(1, 2), {0: 4000, 1: 4000, 2: 4000}, PER_CLASS, max_classes=20)
    clean, kept = _write(tmp, np.random.default_rng(0), bounds)
    clean_rows = {str(c): 4000 for c in range(3)}
    full = _clean_sample(clean, COLUMNS, "label", "id", PER_CLASS, 3, ["1", "2"], clean_rows)
    fast = _clean_sample(clean, COLUMNS, "label", "id", PER_CLASS, 3, ["1", "2"], clean_rows, kept)
    assert _rows(fast) == _rows(full) and fast.num_rows == 2 * PER_CLASS
    assert set(fast.column("label").to_pylist()) == {1, 2}
    # about OVERSAMPLE x PER_CLASS candidates per flagged class, none of class 0: a fraction of the clean rows
    assert _counts(kept) < 3 * 2 * report_sample.OVERSAMPLE * PER_CLASS < _counts(clean) / 10


def test_the_report_reads_every_clean_row_where_the_candidates_fall_short(tmp):
    """Nine tenths of every class quarantined: the candidates cannot hold PER_CLASS clean rows of a
    class, and the sample comes from the clean rows themselves (the same rows as a full read)."""
    for folder in (CLEAN, QUARANTINE):
        os.makedirs(tmp / folder)
    bounds = report_sample.plan(_flagged(1), {0: 4000, 1: 4000, 2: 4000}, PER_CLASS, max_classes=20)
    clean, kept = _write(tmp, np.random.default_rng(1), bounds, held_share=0.9)
    import pyarrow.dataset as ds

    clean_rows = {"1": ds.dataset(clean).to_table(filter=ds.field("label") == 1).num_rows}
    short = report_sample.bottom_per_class(*_keyed(kept), "label", PER_CLASS)
    assert short.num_rows < PER_CLASS
    full = _clean_sample(clean, COLUMNS, "label", "id", PER_CLASS, 3, ["1"], clean_rows)
    fast = _clean_sample(clean, COLUMNS, "label", "id", PER_CLASS, 3, ["1"], clean_rows, kept)
    assert _rows(fast) == _rows(full) and fast.num_rows == PER_CLASS


def _keyed(folder):
    import pyarrow.dataset as ds

    table = ds.dataset(folder).to_table()
    return table, report_sample.keys_of(table, "id", 3)


def test_too_many_flagged_classes_keep_no_candidates():
    decisions = {"spectral": {c: ClassDecision(True, 1.0, 5.0, 0.05, 100, "") for c in range(100)}}
    assert report_sample.plan(decisions, {c: 100 for c in range(100)}, PER_CLASS, max_classes=20) is None
    assert report_sample.plan(decisions, {c: 100 for c in range(100)}, PER_CLASS, max_classes=25) is not None


def test_candidates_read_a_categorical_label_column():
    """A dictionary-encoded label column (pandas' categorical, as Parquet keeps it): the flagged
    classes' candidates are found by value; this once raised ArrowTypeError (exit 3) in a scan."""
    rng = np.random.default_rng(1)
    labels = pa.array([str(v) for v in rng.integers(0, 3, 600)]).dictionary_encode()
    clean = pa.table({"id": [f"r{i}" for i in range(600)], "label": labels, "x": rng.normal(size=600)})
    bounds = {"1": 2**64 - 1, "2": 2**64 - 1}  # every row of classes 1 and 2
    got = report_sample.candidates(clean, bounds, "label", "id", seed=3)
    plain = clean.column("label").cast(pa.string()).to_pylist()
    assert sorted(got.column("id").to_pylist()) == sorted(f"r{i}" for i, v in enumerate(plain) if v in ("1", "2"))
