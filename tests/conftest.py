from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"
POISONED = SAMPLES / "digits_poisoned.parquet"
CLEAN = SAMPLES / "digits_clean.parquet"
TRUTH = SAMPLES / "digits_poisoned_truth.parquet"
DIGITS_CONFIG = ROOT / "configs" / "digits.yaml"

os.environ["GX_ANALYTICS_ENABLED"] = "false"
sys.path.insert(0, str(ROOT))


def embedding_array(x: np.ndarray, fixed: bool = True) -> pa.Array:
    x = np.asarray(x, dtype=np.float32)
    if fixed:
        return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.array([list(map(float, row)) for row in x], pa.list_(pa.float32()))


def gaussian_table(n_per_class=300, classes=4, dim=8, seed=0, fixed=True, extra=True) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_per_class * classes, dim)) + np.repeat(np.arange(classes), n_per_class)[:, None] * 6.0
    labels = np.repeat(np.arange(classes), n_per_class)
    cols = {
        "id": pa.array([f"row-{i:06d}" for i in range(len(x))]),
        "label": pa.array(labels, pa.int64()),
        "embedding": embedding_array(x, fixed),
    }
    if extra:
        cols["note"] = pa.array([f"n{i % 7}" for i in range(len(x))])
        cols["weight"] = pa.array(rng.random(len(x)))
    return pa.table(cols)


def write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_outputs(run_dir: Path) -> tuple[pa.Table, pa.Table]:
    return (pads.dataset(str(run_dir / "clean"), format="parquet").to_table(),
            pads.dataset(str(run_dir / "quarantine"), format="parquet").to_table())


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Equal tables, a NaN equal to a NaN in the same place (``Table.equals`` holds NaN != NaN; the
    k-NN label check leaves rows it cannot flag unscored, NaN)."""
    import pyarrow.compute as pc

    if not a.schema.equals(b.schema) or a.num_rows != b.num_rows:
        return False
    for name in a.column_names:
        x, y = a[name], b[name]
        if pa.types.is_floating(x.type):
            if not pc.fill_null(pc.is_nan(x), False).equals(pc.fill_null(pc.is_nan(y), False)):
                return False
            x, y = (pc.if_else(pc.is_nan(c), pa.scalar(None, c.type), c) for c in (x, y))
        if not x.equals(y):
            return False
    return True


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process, capturing stdout/stderr (much faster than a subprocess)."""
    import contextlib
    import io

    from poisonguard.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def read_review(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> Path:
    """A decisions CSV, as a reviewer saves review.csv after filling it in."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def scan_page(rerendered: str) -> str:
    """A re-rendered report.html as the scan wrote it: without the line saying its quarantine files
    were checked against the log (only ``poisonguard report`` checks; the scan wrote them)."""
    import re

    checked = '<div class="muted" id="integrity">quarantine files checked against the COMPLETE record in '
    assert checked in rerendered
    return re.sub(r'<div class="muted" id="integrity">[^<]*</div>', "", rerendered)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("poisonguard: error:")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
