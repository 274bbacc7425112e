"""`poisonguard suite infer`: a suite inferred from trusted data passes that data and quarantines a
corrupted copy's bad rows, each with its validation:<expectation>:<column> reason."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CLEAN, gaussian_table, read_outputs, run_cli, write


@pytest.fixture(scope="module")
def inferred(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    code, stdout, stderr = run_cli("suite", "infer", CLEAN, "--out", root / "expectations" / "digits.json")
    assert code == 0, stderr
    assert "inferred from 1797 trusted rows" in stdout
    return root, root / "expectations" / "digits.json"


def _reasons(run_dir) -> dict[str, list[str]]:
    held = read_outputs(run_dir)[1]
    return dict(zip(held.column("id").to_pylist(), held.column("quarantine_reasons").to_pylist()))


def test_the_suite_loads_in_gx_unchanged_and_says_what_each_expectation_came_from(inferred):
    from poisonguard.core.suite import build_gx_suite

    _, path = inferred
    suite = json.loads(path.read_text())
    gx_suite = build_gx_suite(suite)
    assert len(gx_suite.expectations) == len(suite["expectations"]) >= 10
    assert all("inferred_from" in e["meta"] and e["meta"]["note"] for e in suite["expectations"])
    kinds = {(e["type"], e["kwargs"]["column"]) for e in suite["expectations"]}
    assert {("expect_column_values_to_be_in_set", "label"), ("expect_column_values_to_match_regex", "id"),
            ("expect_column_values_to_not_be_null", "embedding"), ("expect_column_values_to_be_of_type", "label"),
            ("expect_column_value_lengths_to_be_between", "id")} <= kinds
    vectors = {(v["type"], v["column"]) for v in suite["meta"]["poisonguard"]["vectors"]}
    assert vectors == {(t, c) for t in ("expect_vector_length_to_equal", "expect_vector_values_to_be_between")
                       for c in ("pixels", "embedding")}


def test_the_trusted_data_passes_and_a_corrupted_copy_is_quarantined_with_each_reason(inferred):
    root, path = inferred
    code, _, stderr = run_cli("scan", CLEAN, "--out", root / "clean-run", "--set", f"suite={path}", "--quiet")
    assert code == 0, stderr
    assert not any(r.startswith("validation:") for rs in _reasons(root / "clean-run").values() for r in rs)

    table = pq.read_table(CLEAN)
    rows = table.to_pylist()
    rows[10]["pixels"] = [99.0] * 64  # out of range
    rows[11]["label"] = 42  # unknown label
    rows[12]["embedding"] = rows[12]["embedding"][:31]  # wrong dimension
    rows[13]["id"] = "not an id"  # irregular id
    schema = table.schema.set(table.schema.get_field_index("embedding"), pa.field("embedding", pa.list_(pa.float32())))
    corrupted = write(pa.Table.from_pylist(rows, schema=schema), root / "corrupted.parquet")
    code, _, stderr = run_cli("scan", corrupted, "--out", root / "bad-run", "--set", f"suite={path}", "--quiet",
                              "--set", "embedding.dim=32")
    assert code == 0, stderr
    reasons = _reasons(root / "bad-run")
    assert "validation:expect_vector_values_to_be_between:pixels" in reasons[rows[10]["id"]]
    assert "validation:expect_column_values_to_be_in_set:label" in reasons[rows[11]["id"]]
    assert "validation:expect_vector_length_to_equal:embedding" in reasons[rows[12]["id"]]
    assert "validation:expect_column_values_to_match_regex:id" in reasons["not an id"]
    suite_hits = {i for i, rs in reasons.items() if any(r.startswith("validation:expect_") for r in rs)}
    assert suite_hits == {rows[10]["id"], rows[11]["id"], rows[12]["id"], "not an id"}


def test_numeric_ranges_follow_the_strictness(tmp):
    table = gaussian_table(300, 3, 4)
    trusted = write(table, tmp / "trusted.parquet")
    ranges = {}
    for level in ("loose", "normal", "strict"):
        code, _, stderr = run_cli("suite", "infer", trusted, "--out", tmp / f"{level}.json", "--strictness", level)
        assert code == 0, stderr
        suite = json.loads((tmp / f"{level}.json").read_text())
        (weight,) = [e for e in suite["expectations"] if e["type"] == "expect_column_values_to_be_between"
                     and e["kwargs"]["column"] == "weight"]
        ranges[level] = (weight["kwargs"]["min_value"], weight["kwargs"]["max_value"])
    values = np.asarray(table.column("weight"))
    assert ranges["loose"][0] <= ranges["normal"][0] <= values.min() and ranges["normal"][1] >= values.max()
    assert ranges["strict"][0] >= ranges["normal"][0] and ranges["strict"][1] <= ranges["normal"][1]
    bad = table.to_pydict()
    bad["weight"][0] = 50.0
    corrupted = write(pa.table(bad, schema=table.schema), tmp / "bad.parquet")
    code, _, _ = run_cli("scan", corrupted, "--out", tmp / "run", "--set", f"suite={tmp / 'normal.json'}", "--quiet")
    assert code == 0
    assert "validation:expect_column_values_to_be_between:weight" in _reasons(tmp / "run")["row-000000"]


def test_non_finite_and_half_float_columns_give_a_strict_json_suite_the_trusted_data_passes(tmp):
    """NaN is a null to GX (pandas), so a column of NaNs gets no not-null expectation; a column with
    +-inf gets no value set or range (strict JSON cannot hold them); half floats have no Arrow unique
    kernel (the inference once failed on them with exit 3).  The suite is strict JSON and the trusted
    data passes it."""
    table = gaussian_table(60, 3, 4)
    n = table.num_rows
    table = table.append_column("nan_only", pa.array(np.full(n, np.nan)))
    table = table.append_column("with_inf", pa.array(np.where(np.arange(n) % 9 == 0, np.inf, 1.0)))
    table = table.append_column("half", pa.array(np.linspace(0, 4, n).astype(np.float16)))
    trusted = write(table, tmp / "trusted.parquet")
    code, _, stderr = run_cli("suite", "infer", trusted, "--out", tmp / "suite.json")
    assert code == 0, stderr

    def no_constants(name):
        raise AssertionError(f"{name} in the suite")

    suite = json.loads((tmp / "suite.json").read_text(), parse_constant=no_constants)
    kinds = {(e["type"], e["kwargs"]["column"]) for e in suite["expectations"]}
    assert ("expect_column_values_to_not_be_null", "nan_only") not in kinds
    assert not {k for k in kinds if k[1] == "with_inf" and k[0].endswith(("_in_set", "_between"))}
    assert ("expect_column_values_to_be_between", "half") in kinds
    code, _, stderr = run_cli("scan", trusted, "--out", tmp / "run", "--set", f"suite={tmp / 'suite.json'}", "--quiet")
    assert code == 0, stderr
    assert read_outputs(tmp / "run")[1].num_rows == 0


@pytest.mark.parametrize("strictness", ["loose", "normal"])
def test_bounds_hold_trusted_integers_past_float_precision_and_constant_vector_dimensions(tmp, strictness):
    """Integers past 2**53 (float64 rounds 2**60 + 1 to 2**60) and uint64 past 2**63 keep their
    extremes inside the range; a constant dimension 1/3 keeps its rows inside bounds written to six
    decimals (rounded outward).  Every one had quarantined trusted rows."""
    table = gaussian_table(60, 3, 4, extra=False)
    n = table.num_rows
    x = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(n, 4).copy()
    x[:, 1] = np.float32(1 / 3)
    table = table.set_column(2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4))
    table = table.append_column("big", pa.array(2**60 + 1 + 2 * (np.arange(n) % 20), pa.int64()))
    table = table.append_column("huge", pa.array(np.uint64(2**63) + np.arange(n, dtype=np.uint64) * np.uint64(7)))
    trusted = write(table, tmp / "trusted.parquet")
    code, _, stderr = run_cli("suite", "infer", trusted, "--out", tmp / "suite.json", "--strictness", strictness)
    assert code == 0, stderr
    suite = json.loads((tmp / "suite.json").read_text())
    ranges = {e["kwargs"]["column"]: e["kwargs"] for e in suite["expectations"]
              if e["type"] == "expect_column_values_to_be_between"}
    assert ranges["big"]["min_value"] <= 2**60 + 1 and ranges["big"]["max_value"] >= 2**60 + 39
    vector = next(v for v in suite["meta"]["poisonguard"]["vectors"]
                  if v["type"] == "expect_vector_values_to_be_between")
    assert vector["min_value"][1] <= np.float32(1 / 3) <= vector["max_value"][1]
    code, _, stderr = run_cli("scan", trusted, "--out", tmp / "run", "--set", f"suite={tmp / 'suite.json'}", "--quiet")
    assert code == 0, stderr
    assert read_outputs(tmp / "run")[1].num_rows == 0


def test_an_out_path_that_cannot_be_written_is_exit_2(tmp):
    trusted = write(gaussian_table(30, 2, 3), tmp / "trusted.parquet")
    (tmp / "folder.json").mkdir()
    code, _, stderr = run_cli("suite", "infer", trusted, "--out", tmp / "folder.json")
    assert code == 2 and "cannot write the suite" in stderr and "Traceback" not in stderr
