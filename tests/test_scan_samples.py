"""End to end on the real samples: detection quality, contract, determinism, provenance."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonguard import provenance as prov
from conftest import CLEAN, DIGITS_CONFIG, POISONED, TRUTH, read_outputs, run_cli


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "run"
    code, stdout, stderr = run_cli("scan", POISONED, "--out", out, "--config", DIGITS_CONFIG, "--run-id", "run-a")
    return code, stdout, stderr, out


def test_poisoned_sample_quarantines_most_poison_and_few_clean_rows(poisoned_run):
    code, stdout, _, out = poisoned_run
    assert code == 0
    clean, held = read_outputs(out)
    truth = pq.read_table(TRUTH).to_pandas().set_index("id")
    held_ids = set(held.column("id").to_pylist())
    poisoned = set(truth.index[truth.poisoned])
    recall = len(held_ids & poisoned) / len(poisoned)
    false_positive_rate = len(held_ids - poisoned) / (len(truth) - len(poisoned))
    assert recall > 0.75, recall
    assert false_positive_rate < 0.01, false_positive_rate
    assert "rows in 1797" in stdout and "quarantined per reason" in stdout


def test_rows_in_equal_clean_plus_quarantine_and_every_row_once(poisoned_run):
    _, _, _, out = poisoned_run
    clean, held = read_outputs(out)
    source = pq.read_table(POISONED)
    ids = clean.column("id").to_pylist() + held.column("id").to_pylist()
    assert len(ids) == source.num_rows
    assert sorted(ids) == sorted(source.column("id").to_pylist())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["in"] == source.num_rows
    assert summary["counts"]["clean"] + summary["counts"]["quarantined"] == source.num_rows
    assert summary["counts"]["clean"] == clean.num_rows


def test_output_schema_matches_the_contract(poisoned_run):
    _, _, _, out = poisoned_run
    source = pq.read_table(POISONED)
    clean, held = read_outputs(out)
    scores = [pa.field(f"score_{name}", pa.float64())
              for name in ("spectral", "activation_clustering", "spectre", "knn_distance", "knn_label", "confident_label")]
    expected_clean = pa.schema(list(source.schema) + scores + [pa.field("review_status", pa.string())])
    assert clean.schema.equals(expected_clean)
    assert clean.column("review_status").null_count == clean.num_rows  # no review yet
    expected_held = pa.schema(list(expected_clean) + [pa.field("quarantine_reasons", pa.list_(pa.string())),
                                                      pa.field("run_id", pa.string())])
    assert held.schema.equals(expected_held)
    assert set(held.column("run_id").to_pylist()) == {"run-a"}
    assert all(len(r) >= 1 for r in held.column("quarantine_reasons").to_pylist())
    for name in ("_SUCCESS", "summary.json", "provenance.jsonl"):
        assert (out / name).is_file()
    # input columns unchanged, value for value
    by_id = {r["id"]: r for r in source.to_pylist()}
    for row in clean.slice(0, 50).to_pylist() + held.slice(0, 20).to_pylist():
        original = by_id[row["id"]]
        assert all(row[k] == original[k] for k in original)


def test_summary_records_per_class_decisions(poisoned_run):
    _, _, _, out = poisoned_run
    summary = json.loads((out / "summary.json").read_text())
    classes = summary["detectors"]["activation_clustering"]["classes"]
    assert set(classes) == {str(i) for i in range(10)}
    assert classes["0"]["suspicious"] and classes["0"]["threshold"] is not None
    assert not any(classes[str(i)]["suspicious"] for i in range(1, 10))
    assert summary["per_class"]["0"]["quarantined"] > 0
    assert summary["verdict"] == "within_policy"
    assert summary["versions"]["packages"]["apache-beam"]


def test_provenance_events_start_and_complete(poisoned_run):
    _, _, _, out = poisoned_run
    events = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    complete = events[1]
    assert prov.run_id_of(complete) == "run-a" and complete["run"]["runId"] == prov.lineage_run_id("run-a")
    assert complete["inputs"][0]["facets"]["poisonguard_content"]["rows"] == 1797
    assert len(complete["inputs"][0]["facets"]["poisonguard_content"]["sha256"]) == 64
    rows = sum(o["facets"]["poisonguard_content"]["rows"] for o in complete["outputs"])
    assert rows == 1797
    assert complete["run"]["facets"]["poisonguard_config"]["seed"] == 0
    log = out.parent / "poisonguard-provenance.jsonl"
    code, stdout, _ = run_cli("verify-log", log)
    assert code == 0 and "OK" in stdout


def test_clean_sample_is_nearly_untouched(tmp):
    code, _, _ = run_cli("scan", CLEAN, "--out", tmp / "run", "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0
    clean, held = read_outputs(tmp / "run")
    assert held.num_rows / (clean.num_rows + held.num_rows) < 0.01


def test_same_seed_same_decisions(tmp, poisoned_run):
    _, _, _, first = poisoned_run
    code, _, _ = run_cli("scan", POISONED, "--out", tmp / "again", "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0
    _, held_a = read_outputs(first)
    _, held_b = read_outputs(tmp / "again")
    a = held_a.sort_by("id")
    b = held_b.sort_by("id")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    assert a.column("quarantine_reasons").to_pylist() == b.column("quarantine_reasons").to_pylist()
    np.testing.assert_array_equal(a.column("score_spectral").to_numpy(), b.column("score_spectral").to_numpy())


def test_fail_on_exceeded_exits_1_but_publishes(tmp):
    code, stdout, _ = run_cli("scan", POISONED, "--out", tmp / "run", "--config", DIGITS_CONFIG,
                              "--set", "fail_on=0.01")
    assert code == 1
    assert "over fail_on" in stdout
    assert (tmp / "run" / "_SUCCESS").exists()
