"""Built-in row checks and suite expectations quarantine exactly the failing rows, with the right reason."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from conftest import gaussian_table, read_outputs, run_cli, write


def _with_bad_rows(tmp):
    table = gaussian_table(n_per_class=100, classes=3, dim=4, fixed=False)
    rows = table.to_pylist()
    rows[0]["id"] = None
    rows[1]["label"] = None
    rows[2]["embedding"] = None
    rows[3]["embedding"] = [1.0, 2.0]
    rows[4]["embedding"] = [float("nan"), 0.0, 0.0, 0.0]
    rows[5]["embedding"] = [float("inf"), 0.0, 0.0, 0.0]
    rows[6]["embedding"] = [1e30, 0.0, 0.0, 0.0]
    rows[7]["id"] = rows[8]["id"]
    rows[9]["label"] = 7
    rows[10]["embedding"] = [1.0, None, 0.0, 0.0]
    return write(pa.Table.from_pylist(rows, schema=table.schema), tmp / "in" / "bad.parquet"), rows


EXPECTED = {
    0: ["validation:builtin:id_missing"],
    1: ["validation:builtin:label_missing"],
    2: ["validation:builtin:embedding_missing"],
    3: ["validation:builtin:embedding_dim"],
    4: ["validation:builtin:embedding_finite"],
    5: ["validation:builtin:embedding_finite"],
    6: ["validation:builtin:embedding_magnitude"],
    7: ["validation:builtin:id_duplicate"],
    8: ["validation:builtin:id_duplicate"],
    9: ["validation:expect_column_values_to_be_in_set:label"],
    10: ["validation:builtin:embedding_finite"],
}


def test_each_builtin_check_and_suite_expectation_quarantines_exactly_its_rows(tmp):
    path, rows = _with_bad_rows(tmp)
    suite = {"name": "s", "expectations": [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "label", "value_set": [0, 1, 2]}}]}
    (tmp / "suite.json").write_text(json.dumps(suite))
    code, _, err = run_cli("scan", path, "--out", tmp / "run", "--set", f"suite={tmp / 'suite.json'}",
                           "--set", "embedding.dim=4", "--quiet")
    assert code == 0, err
    clean, held = read_outputs(tmp / "run")
    got = {}
    for row in held.to_pylist():
        index = next(i for i, r in enumerate(rows) if r["weight"] == row["weight"])
        got[index] = row["quarantine_reasons"]
    assert {i: r for i, r in got.items() if i in EXPECTED} == EXPECTED
    # nothing else is quarantined by validation; detectors see well separated Gaussian classes
    assert set(got) == set(EXPECTED)
    assert clean.num_rows + held.num_rows == len(rows)
    # rows that could not be scored carry NaN scores
    nan_rows = [r for r in held.to_pylist() if r["quarantine_reasons"][0].startswith("validation:builtin:embedding")]
    assert nan_rows and all(np.isnan(r["score_spectre"]) for r in nan_rows)


def test_dataset_level_expectation_is_reported_not_row_quarantined(tmp):
    path = write(gaussian_table(n_per_class=50, classes=2, dim=3), tmp / "in.parquet")
    suite = {"name": "s", "expectations": [
        {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "weight", "min_value": 5, "max_value": 6}}]}
    (tmp / "suite.json").write_text(json.dumps(suite))
    code, stdout, _ = run_cli("scan", path, "--out", tmp / "run", "--set", f"suite={tmp / 'suite.json'}")
    assert code == 0
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["batch_warnings"] == {"expect_column_mean_to_be_between:weight": 1}
    assert summary["counts"]["quarantined"] == 0
    assert "dataset-level expectation failed" in stdout
