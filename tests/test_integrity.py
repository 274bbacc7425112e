"""Integrity under attack and faults (issue 12): one test per finding and weakness.

Numbered findings: 1 suite code, 2 input swapped between passes, 3 forged state decisions,
4 quarantine edited before review, 5 exit 2 after publishing, 6 short writes and torn log tails,
7 YAML alias bomb (test_bad_input), 8 invalid UTF-8, 9 planted staging symlink, 10 kill between
the publish's renames.  Then the weaknesses, in the order the issue lists them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CLEAN, DIGITS_CONFIG, POISONED, error_lines, gaussian_table, read_outputs, read_review, run_cli, \
    snapshot, write, write_rows
from poisonguard import provenance as prov

EXE = str(Path(sys.executable).with_name("poisonguard"))


@pytest.fixture
def published(tmp):
    out = tmp / "runs" / "run"
    code, _, stderr = run_cli("scan", POISONED, "--out", out, "--config", DIGITS_CONFIG, "--quiet",
                              "--state", tmp / "state")
    assert code == 0, stderr
    return out, snapshot(out), out.parent / "poisonguard-provenance.jsonl"


def _rejected(args, *needles, code=2):
    got, _, stderr = run_cli(*map(str, args))
    assert got == code, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- 1. a suite cannot run code ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"condition_parser": "pandas", "row_condition": '@pd.io.common.os.system("id > PWNED") == 0'},
    {"condition_parser": "python", "row_condition": '@pd.io.common.os.system("id > PWNED") == 0'},
    {"row_condition": {"type": "pass_through", "pass_through_filter": '@pd.io.common.os.system("id > PWNED")'}},
    {"condition_parser": "great_expectations", "row_condition": 'col("label") > 0'},
    {"min_value": {"$PARAMETER": "__import__('os').system('id > PWNED')"}, "max_value": 9},
])
def test_suite_with_an_evaluated_argument_is_refused_and_runs_nothing(tmp, kwargs, monkeypatch):
    suite = {"name": "evil", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "id"}},
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "label", "min_value": 0,
                                                                  "max_value": 9, **kwargs}}]}
    (tmp / "suite.json").write_text(json.dumps(suite))
    monkeypatch.chdir(tmp)
    line = _rejected(["scan", CLEAN, "--out", tmp / "run", "--set", f"suite={tmp / 'suite.json'}"],
                     "expectation 2 (expect_column_values_to_be_between)", "evaluates")
    assert not (tmp / "PWNED").exists() and not (tmp / "run").exists(), line


# ---- 2. the bytes scored are the bytes hashed --------------------------------------------------------

def test_input_replaced_after_the_fit_pass_is_exit_2_and_publishes_nothing(tmp, monkeypatch):
    """Both engines read through io.read_batches, which checks the open file against the identity
    hashed at plan time (tests/test_core.py); this drives it end to end on the in-memory engine."""
    import poisonguard.core.screening as screening

    table = gaussian_table(300, 4, 8)
    data = write(table, tmp / "data.parquet")
    poisoned = table.to_pydict()
    poisoned["embedding"] = [[v + 40.0 for v in row] for row in poisoned["embedding"]]
    harmful = write(pa.table(poisoned, schema=table.schema), tmp / "harmful.parquet")
    original = screening.fit_detectors

    def swap_then_fit(states, config, *confirmed):
        os.replace(harmful, data)  # same rows and schema, other bytes, between the passes
        return original(states, config, *confirmed)

    monkeypatch.setattr("poisonguard.engines.memory.fit_detectors", swap_then_fit)
    _rejected(["scan", data, "--out", tmp / "run", "--engine", "memory"], "data.parquet", "changed")
    assert not (tmp / "run").exists()
    events = [json.loads(line) for line in (tmp / "poisonguard-provenance.jsonl").read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "FAIL"]


def test_a_file_replaced_after_the_early_hash_is_hashed_again_at_planning(tmp):
    """The CLI hashes inputs on a thread while it imports; the plan keeps that digest only for the
    very file it plans (same identity), so a swap in between is hashed (and scanned) as what it is."""
    import hashlib

    from poisonguard import io as pio
    from poisonguard.config import Config

    table = gaussian_table(300, 4, 8)
    data = write(table, tmp / "data.parquet")
    pio.hash_early([str(data)])
    assert pio.plan_inputs([os.path.realpath(data)], Config()).files[0].sha256 == pio.sha256_file(data)
    pio.hash_early([str(data)])
    pio._EARLY[os.path.realpath(data)].result(timeout=30)  # the early digest is of the old bytes ...
    other = table.to_pydict()
    other["embedding"] = [[v + 40.0 for v in row] for row in other["embedding"]]
    os.replace(write(pa.table(other, schema=table.schema), tmp / "other.parquet"), data)  # ... then a swap
    planned = pio.plan_inputs([os.path.realpath(data)], Config()).files[0].sha256
    assert planned == hashlib.sha256(Path(data).read_bytes()).hexdigest()
    assert not pio._EARLY


# ---- 3 and 4. decisions count only when the log backs them; review checks the published files ----

def test_hand_written_state_decisions_release_nothing(tmp, published):
    out, _, log = published
    held = read_outputs(out)[1]
    from poisonguard.core.decisions import content_hashes

    columns = [c for c in held.column_names if not c.startswith("score_") and c not in ("quarantine_reasons", "run_id")]
    forged = [{"id": i, "content_sha256": h, "decision": "release", "reviewer": "mallory", "note": "", "run_id": "x",
               "time": "2026-01-01T00:00:00Z"}
              for i, h in zip(held.column("id").to_pylist(), content_hashes(held, columns))]
    (tmp / "state" / "decisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forged))
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "runs" / "again", "--config", DIGITS_CONFIG,
                              "--quiet", "--state", tmp / "state")
    assert code == 0, stderr
    summary = json.loads((tmp / "runs" / "again" / "summary.json").read_text())
    assert summary["counts"]["quarantined"] == held.num_rows
    assert summary["review"]["released"] == 0 and summary["review"]["decisions_ignored"] == held.num_rows
    assert "no review record behind them" in stderr


def test_review_refuses_a_quarantine_edited_after_publishing(tmp, published):
    out, _, log = published
    part = sorted((out / "quarantine").glob("*.parquet"))[0]
    table = pq.read_table(part)
    rows = table.to_pydict()
    rows["embedding"][0] = [0.0] * len(rows["embedding"][0])  # make the suspect look harmless
    pq.write_table(pa.table(rows, schema=table.schema), part)
    decisions = tmp / "decisions.csv"
    decisions.write_text(f"id,decision,note\n{rows['id'][0]},release,looks fine\n")
    _rejected(["review", out, "--decisions", decisions, "--reviewer", "ana"], part.name, "changed since the run")
    assert not (tmp / "state" / "decisions.jsonl").exists()
    assert prov.verify(str(log))[0]


# ---- 5. nothing after the publish can fail the run ---------------------------------------------------

def test_a_baseline_that_cannot_be_saved_is_a_warning_after_publishing(tmp, published):
    out, _, log = published
    runs = tmp / "state" / "runs"
    for child in runs.iterdir():
        child.unlink()
    runs.rmdir()
    runs.write_text("not a folder")
    code, _, stderr = run_cli("scan", CLEAN, "--out", out, "--config", DIGITS_CONFIG, "--quiet",
                              "--state", tmp / "state", "--run-id", "second")
    assert code == 0, stderr
    assert "drift baseline not saved" in stderr and not error_lines(stderr)
    assert json.loads((out / "summary.json").read_text())["run_id"] == "second"
    events = [json.loads(line)["eventType"] for line in log.read_text().splitlines()
              if prov.run_id_of(json.loads(line)) == "second"]
    assert events == ["START", "COMPLETE"]


def test_a_failed_complete_record_swaps_the_previous_run_back(tmp, published, monkeypatch):
    out, before, log = published
    real = prov._write_all
    calls = {"n": 0}

    def full_disk_on_complete(fd, size, data):
        if b'"COMPLETE"' in data:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, size, data)

    monkeypatch.setattr(prov, "_write_all", full_disk_on_complete)
    _rejected(["scan", CLEAN, "--out", out, "--config", DIGITS_CONFIG, "--run-id", "nospace"], "No space left")
    assert snapshot(out) == before and calls["n"] == 0
    kinds = [json.loads(line)["eventType"] for line in log.read_text().splitlines()
             if prov.run_id_of(json.loads(line)) == "nospace"]
    assert kinds == ["START", "FAIL"]  # never a COMPLETE for a run that is not published
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]


# ---- 6. short writes and torn tails ------------------------------------------------------------------

def test_a_short_write_is_rolled_back_and_the_log_stays_valid(tmp, monkeypatch):
    path = str(tmp / "log.jsonl")
    prov.append(path, prov.run_event("START", "a"))
    size = os.path.getsize(path)
    real_write = os.write

    def short_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError):
        prov.append(path, prov.run_event("START", "b"))
    monkeypatch.setattr(os, "write", real_write)
    assert os.path.getsize(path) == size and prov.verify(path)[0]
    prov.append(path, prov.run_event("START", "c"))
    assert prov.verify(path)[0]


def test_a_torn_tail_from_a_crash_is_moved_aside_and_scans_go_on(tmp, published):
    out, _, log = published
    with open(log, "ab") as handle:
        handle.write(b'{"eventType": "COMPLETE", "run": {"ru')  # a crash mid-write
    code, stdout, _ = run_cli("verify-log", log)
    assert code == 1 and "torn" in stdout
    code, _, stderr = run_cli("scan", CLEAN, "--out", out, "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0, stderr
    assert "torn record" in stderr
    assert prov.verify(str(log))[0]
    aside = list(log.parent.glob(log.name + ".torn-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b'{"eventType": "COMPLETE"')


# ---- 8. invalid UTF-8 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("column", ["id", "note"])
def test_invalid_utf8_is_exit_2_naming_file_and_column(tmp, column):
    table = gaussian_table(20, 2, 3)
    values = [s.encode() for s in table.column(column).to_pylist()]
    values[5] = b"ok\xff\xfebad"
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    broken = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                              pa.py_buffer(b"".join(values))])
    table = table.set_column(table.schema.get_field_index(column), column, broken)
    data = write(table, tmp / "utf8.parquet")
    _rejected(["scan", data, "--out", tmp / "run"], "utf8.parquet", f"column '{column}'", "not valid UTF-8")


# ---- 9. a planted staging symlink --------------------------------------------------------------------

def test_a_planted_staging_symlink_is_removed_not_followed(tmp, published):
    out, _, _ = published
    target = tmp / "attacker"
    target.mkdir()
    (out.parent / ".run.staging-predictable").symlink_to(target)
    code, _, stderr = run_cli("scan", CLEAN, "--out", out, "--config", DIGITS_CONFIG, "--quiet",
                              "--run-id", "predictable")
    assert code == 0, stderr
    assert not out.is_symlink() and (out / "_SUCCESS").read_text() == "predictable\n"
    assert list(target.iterdir()) == []
    assert not (out.parent / ".run.staging-predictable").exists()


# ---- 10. a kill between the two renames of a publish ------------------------------------------------

def test_a_run_left_aside_by_an_interrupted_publish_is_restored_even_if_the_next_scan_fails(tmp, published):
    out, before, _ = published
    aside = out.parent / ".run.old-killed"
    out.rename(aside)  # what a kill between "RUN_DIR -> old" and "staging -> RUN_DIR" leaves
    _rejected(["scan", tmp / "missing.parquet", "--out", out], "no such file")
    assert snapshot(out) == before and not aside.exists()


def test_publish_swaps_atomically_where_the_filesystem_can(tmp):
    from poisonguard.run.rundir import exchange

    (tmp / "a").mkdir()
    (tmp / "a" / "x").write_text("a")
    (tmp / "b").mkdir()
    (tmp / "b" / "x").write_text("b")
    assert exchange(str(tmp / "a"), str(tmp / "b"))  # Linux renameat2(RENAME_EXCHANGE) on this filesystem
    assert (tmp / "a" / "x").read_text() == "b" and (tmp / "b" / "x").read_text() == "a"


# ---- weaknesses ----------------------------------------------------------------------------------------

def test_misspelled_flags_are_exit_2_with_a_suggestion(tmp):
    _rejected(["scan", CLEAN, "--out", tmp / "run", "--sate", tmp / "s"], "unknown flag --sate", "did you mean --state")
    _rejected(["scan", CLEAN, "--out", tmp / "run", "--provenance_log", tmp / "l"], "did you mean --provenance-log")
    _rejected(["scan", CLEAN, "--out", tmp / "run", "--runner", "NoSuchRunner"], "Unexpected pipeline runner")
    assert not (tmp / "run").exists()


@pytest.mark.parametrize("where", ["provenance-log", "state"])
def test_a_log_or_state_folder_inside_the_run_folder_is_exit_2(tmp, published, where):
    out, before, _ = published
    value = out / "inside.jsonl" if where == "provenance-log" else out / "state"
    _rejected(["scan", CLEAN, "--out", out, f"--{where}", value], "inside --out")
    assert snapshot(out) == before


def test_many_small_classes_are_fitted_in_bulk(tmp):
    rng = np.random.default_rng(0)
    n = 6000
    labels = np.concatenate([np.arange(n - 300) // 1, np.full(300, -1)])  # 5700 one-row classes, one big class
    x = rng.normal(size=(n, 4)).astype(np.float32)
    table = pa.table({"id": [f"r{i}" for i in range(n)], "label": labels,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)})
    code, _, stderr = run_cli("scan", write(table, tmp / "many.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0, stderr
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    spectre = summary["detectors"]["spectre"]
    assert list(spectre["classes"]) == ["-1"]
    assert spectre["untested_classes"] == {"fewer than 20 rows": 5700}
    assert np.isnan(read_outputs(tmp / "run")[0].filter(pa.compute.equal(
        read_outputs(tmp / "run")[0].column("label"), 5)).column("score_spectre").to_numpy()).all()


def test_cross_class_gate_of_thousands_of_classes_matches_the_exact_one_closely():
    from poisonguard.detectors.calibration import leave_one_out_z

    values = np.random.default_rng(1).normal(4, 0.5, size=2500)
    approx = leave_one_out_z(values, 0.25)
    exact = np.array([(v - np.median(np.delete(values, i))) /
                      max(1.4826 * np.median(np.abs(np.delete(values, i) - np.median(np.delete(values, i)))), 0.25)
                      for i, v in enumerate(values[:50])])
    np.testing.assert_allclose(approx[:50], exact, atol=0.01)


def test_math_text_labels_render_literally_in_the_report(tmp):
    table = gaussian_table(60, 3, 4)
    table = table.set_column(1, "label", pa.array(["$\\frac{$", "<script>alert(1)</script>", "=cmd|' /C calc'!A0"][i % 3]
                                                  for i in range(table.num_rows)))
    code, _, stderr = run_cli("scan", write(table, tmp / "t.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0, stderr
    page = (tmp / "run" / "report.html").read_text()
    assert "could not be rendered" not in page and "$\\frac{$" in page and "<script>alert" not in page
    code, stdout, _ = run_cli("report", tmp / "run")
    assert code == 0


def test_formula_ids_are_neutralised_in_review_csv_and_read_back_exactly(tmp):
    table = gaussian_table(150, 4, 6)
    ids = [f"=HYPERLINK(\"x\";{i})" if i % 2 else f"@r{i}" for i in range(table.num_rows)]
    x = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 6).copy()
    x[:4] += 30.0  # four rows of class 0 far away: flagged
    table = table.set_column(0, "id", pa.array(ids)).set_column(
        2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel().astype(np.float32)), 6))
    out = tmp / "runs" / "run"
    code, _, stderr = run_cli("scan", write(table, tmp / "f.parquet"), "--out", out, "--quiet", "--state", tmp / "st")
    assert code == 0, stderr
    rows = read_review(out / "review.csv")
    assert rows and all(not r["id"].startswith(("=", "@", "+", "-")) for r in rows)
    for r in rows:
        r["decision"] = "confirm"
    write_rows(tmp / "d.csv", rows)
    code, stdout, stderr = run_cli("review", out, "--decisions", tmp / "d.csv", "--reviewer", "ana")
    assert code == 0, stderr
    recorded = {json.loads(line)["id"] for line in (tmp / "st" / "decisions.jsonl").read_text().splitlines()}
    assert recorded == set(read_outputs(out)[1].column("id").to_pylist())


def test_verify_log_head_catches_a_cut_tail_and_a_rewrite(tmp):
    path = tmp / "log.jsonl"
    for i in range(4):
        head = prov.head_of(prov.append(str(path), prov.run_event("START", f"r{i}")))
    assert run_cli("verify-log", path, "--head", head)[0] == 0
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    code, stdout, _ = run_cli("verify-log", path, "--head", head)
    assert code == 1 and "no longer holds head" in stdout
    assert run_cli("verify-log", path)[0] == 0  # without the anchor a cut tail looks intact


def test_scans_print_the_head_to_anchor(tmp):
    code, stdout, stderr = run_cli("scan", CLEAN, "--out", tmp / "run", "--config", DIGITS_CONFIG)
    assert code == 0
    head = json.loads((tmp / "run" / "summary.json").read_text())["provenance"]["head"]
    assert f"provenance head {head}" in stdout
    assert prov.verify(str(tmp / "poisonguard-provenance.jsonl"), head=head)[0]


def _big(tmp):
    return write(gaussian_table(n_per_class=60000, classes=4, dim=48, extra=True), tmp / "big.parquet")


def test_sigterm_is_handled_like_ctrl_c(tmp, published):
    out, before, log = published
    proc = subprocess.Popen([EXE, "scan", str(_big(tmp)), "--out", str(out), "--run-id", "termed"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not any(".staging-" in p.name for p in out.parent.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "SIGTERM" in stderr
    kinds = [json.loads(line)["eventType"] for line in log.read_text().splitlines()
             if prov.run_id_of(json.loads(line)) == "termed"]
    assert kinds == ["START", "FAIL"]
    assert snapshot(out) == before and not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_caps_on_dimension_suite_size_and_classes_are_exit_2(tmp):
    wide = pa.table({"id": ["a"], "label": [1], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(100_000, np.float32)), 100_000)})
    _rejected(["scan", write(wide, tmp / "wide.parquet"), "--out", tmp / "run"], "exceed the limit of 16384")
    suite = {"name": "big", "expectations": [{"type": "expect_column_values_to_not_be_null",
                                              "kwargs": {"column": "id"}}] * 1001}
    (tmp / "s.json").write_text(json.dumps(suite))
    _rejected(["scan", CLEAN, "--out", tmp / "run", "--set", f"suite={tmp / 's.json'}"], "at most 1000")
    _rejected(["scan", CLEAN, "--out", tmp / "run", "--set", "max_classes=5"], "10 classes, more than max_classes=5")


def test_a_symlink_loop_reads_each_file_once(tmp):
    data = tmp / "data"
    write(gaussian_table(30, 2, 3), data / "a.parquet")
    (data / "loop").symlink_to(data, target_is_directory=True)
    code, _, stderr = run_cli("scan", str(data / "**" / "*.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0, stderr
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert len(summary["inputs"]) == 1 and summary["counts"]["in"] == 60


@pytest.mark.parametrize("line", ["{not json", "[" * 100_000 + "]" * 100_000])
def test_malformed_state_decisions_are_exit_2(tmp, published, line):
    (tmp / "state" / "decisions.jsonl").write_text(line + "\n")
    _rejected(["scan", CLEAN, "--out", tmp / "x", "--state", tmp / "state"], "decisions.jsonl", "malformed")


def test_nan_literal_in_the_log_is_tampering_not_a_crash(tmp):
    path = tmp / "log.jsonl"
    prov.append(str(path), prov.run_event("START", "a"))
    path.write_bytes(path.read_bytes().replace(b'"facets":{}', b'"facets":{"x":NaN}'))
    code, stdout, _ = run_cli("verify-log", path)
    assert code == 1 and "not valid JSON" in stdout


def test_a_record_nested_past_the_parser_is_tampering_not_a_crash(tmp):
    """A line of 100,000 nested arrays took Python's JSON parser past its recursion limit: exit 3 in
    verify-log and in the next scan, where a log writer must get tampering and bad input."""
    path = tmp / "log.jsonl"
    prov.append(str(path), prov.run_event("START", "a"))
    with path.open("ab") as handle:
        handle.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    code, stdout, _ = run_cli("verify-log", path)
    assert code == 1 and "line 2: not valid JSON" in stdout
    _rejected(["scan", CLEAN, "--out", tmp / "x", "--provenance-log", path], "log.jsonl", "not a poisonguard record")


def test_an_empty_reviewer_is_refused(tmp, published):
    out, _, _ = published
    (tmp / "d.csv").write_text("id,decision\nx,release\n")
    _rejected(["review", out, "--decisions", tmp / "d.csv", "--reviewer", " "], "--reviewer")


def test_a_real_null_string_label_is_its_own_class(tmp):
    table = gaussian_table(40, 2, 3)
    labels = ["<null>" if v == 1 else "a" for v in table.column("label").to_pylist()]
    labels[0] = None
    table = table.set_column(1, "label", pa.array(labels))
    code, _, _ = run_cli("scan", write(table, tmp / "n.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["per_class"]["<null>"]["rows"] == 40 and summary["per_class"]["a"]["rows"] == 39
    assert summary["per_reason"]["validation:builtin:label_missing"] == 1


def test_reusing_a_run_id_does_not_copy_the_earlier_runs_events(tmp):
    for name in ("one", "two"):
        code, _, _ = run_cli("scan", CLEAN, "--out", tmp / name, "--config", DIGITS_CONFIG, "--quiet",
                             "--run-id", "airflow-retry")
        assert code == 0
    events = [json.loads(line) for line in (tmp / "two" / "provenance.jsonl").read_text().splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert prov.chain_of(events[0])["seq"] == 2


def test_dictionary_encoded_id_and_label_columns_are_accepted(tmp):
    table = gaussian_table(50, 3, 4)
    table = table.set_column(0, "id", table.column("id").dictionary_encode())
    table = table.set_column(1, "label", pa.array([f"c{v}" for v in table.column("label").to_pylist()]).dictionary_encode())
    code, _, stderr = run_cli("scan", write(table, tmp / "d.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run")
    assert clean.num_rows + held.num_rows == 150


def test_a_column_categorical_in_some_files_and_plain_in_others_is_read_as_plain_values(tmp):
    """pandas writes a ``category`` column as dictionary-encoded: a folder whose files came from two
    writers holds the same label column both ways.  The scan reads it as plain values in every file,
    on either engine (the work items carry it into Beam's workers), and decides exactly as on the
    plain files; a difference no type holds without loss is refused."""
    table = gaussian_table(60, 3, 4)
    plain = table.set_column(1, "label", pa.array([f"c{v}" for v in table.column("label").to_pylist()]))
    (tmp / "mixed").mkdir()
    (tmp / "plain").mkdir()
    halves = [plain.slice(0, 90), plain.slice(90)]
    write(halves[0].set_column(1, "label", halves[0].column("label").dictionary_encode()), tmp / "mixed" / "a.parquet")
    write(halves[1], tmp / "mixed" / "b.parquet")
    for i, half in enumerate(halves):
        write(half, tmp / "plain" / f"{'ab'[i]}.parquet")
    runs = {"plain": ("plain", "memory"), "mixed": ("mixed", "memory"), "mixed-beam": ("mixed", "beam")}
    for name, (folder, engine) in runs.items():
        code, _, stderr = run_cli("scan", tmp / folder, "--out", tmp / f"run-{name}", "--quiet", "--engine", engine)
        assert code in (0, 1), stderr
    outputs = {name: read_outputs(tmp / f"run-{name}") for name in runs}
    for name in ("mixed", "mixed-beam"):
        for part in (0, 1):
            got, expected = outputs[name][part], outputs["plain"][part]
            assert got.schema.field("label").type == pa.string()
            assert sorted(got.column("id").to_pylist()) == sorted(expected.column("id").to_pylist())
        assert sum(t.num_rows for t in outputs[name]) == 180
    weight = halves[1].schema.get_field_index("weight")
    write(halves[1].set_column(weight, "weight", halves[1].column("weight").cast(pa.string())), tmp / "mixed" / "b.parquet")
    code, _, stderr = run_cli("scan", tmp / "mixed", "--out", tmp / "run-other", "--quiet")
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr
    assert "schema differs" in lines[0] and "b.parquet" in lines[0] and "column 'weight'" in lines[0], lines
    assert not (tmp / "run-other").exists()


def test_columns_typed_with_different_widths_across_files_are_read_as_the_wider_type(tmp):
    """Files written at different times or by different writers type the same column differently: an id
    as int32 here and int64 there, features as float32 lists and float64 fixed-size lists, a count as
    uint16 and int16, a column one writer declared non-null.  Each is read as the narrowest type that
    holds both without loss, in every file and on both engines, and the scan decides exactly as on files
    written alike; an integer beside a float (no type holds both without loss) is refused, naming the file
    and column."""
    table = gaussian_table(60, 3, 4)
    n = table.num_rows
    same = table.set_column(0, "id", pa.array(np.arange(n), pa.int64())) \
        .append_column("count", pa.array(np.arange(n) % 300, pa.int32()))
    same = same.set_column(same.schema.get_field_index("embedding"), "embedding",
                           same.column("embedding").cast(pa.list_(pa.float64())))
    half = n // 2
    narrow = same.slice(half)
    narrow = narrow.set_column(0, "id", narrow.column("id").cast(pa.int32()))
    narrow = narrow.set_column(narrow.schema.get_field_index("count"), "count", narrow.column("count").cast(pa.uint16()))
    narrow = narrow.set_column(narrow.schema.get_field_index("embedding"), "embedding",
                               narrow.column("embedding").cast(pa.list_(pa.float32(), 4)))
    weight = narrow.schema.get_field_index("weight")
    narrow = narrow.cast(narrow.schema.set(weight, narrow.schema.field(weight).with_nullable(False)))
    first = same.slice(0, half)
    first = first.set_column(first.schema.get_field_index("count"), "count", first.column("count").cast(pa.int16()))
    write(first, tmp / "mixed" / "a.parquet")
    write(narrow, tmp / "mixed" / "b.parquet")
    for i, part in enumerate((same.slice(0, half), same.slice(half))):
        write(part, tmp / "alike" / f"{'ab'[i]}.parquet")
    runs = {"alike": ("alike", "memory"), "mixed": ("mixed", "memory"), "mixed-beam": ("mixed", "beam")}
    summaries = {}
    for name, (folder, engine) in runs.items():
        code, _, stderr = run_cli("scan", tmp / folder, "--out", tmp / f"run-{name}", "--quiet", "--engine", engine)
        assert code in (0, 1), stderr
        summaries[name] = json.loads((tmp / f"run-{name}" / "summary.json").read_text())
    expected = read_outputs(tmp / "run-alike")
    for name in ("mixed", "mixed-beam"):
        got = read_outputs(tmp / f"run-{name}")
        for part in (0, 1):
            schema = got[part].schema
            assert schema.field("id").type == pa.int64() and schema.field("count").type == pa.int32()
            assert schema.field("embedding").type == pa.list_(pa.float64()) and schema.field("weight").nullable
            assert sorted(got[part].column("id").to_pylist()) == sorted(expected[part].column("id").to_pylist())
        assert sum(t.num_rows for t in got) == n
        assert sorted(got[0].column("count").to_pylist() + got[1].column("count").to_pylist()) == \
            sorted(same.column("count").to_pylist())
        assert summaries[name]["counts"] == summaries["alike"]["counts"]
    weight = narrow.schema.get_field_index("weight")
    write(narrow.set_column(weight, "weight", pa.array(np.arange(narrow.num_rows), pa.int64())), tmp / "mixed" / "b.parquet")
    code, _, stderr = run_cli("scan", tmp / "mixed", "--out", tmp / "run-refused", "--quiet")
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1 and "column 'weight'" in lines[0] and "b.parquet" in lines[0], stderr
    assert "int64, not double (no type holds both without loss)" in lines[0], lines
    assert not (tmp / "run-refused").exists()


BLOCKED_SCAN = """
import ctypes, os, signal, sys, threading, time
from poisonguard import cli

def announce():
    # only once the main thread sleeps inside the native call: a signal that came while it still ran
    # bytecode would have its Python handler run there, the case every other test covers
    time.sleep(0.2)
    while open(f"/proc/self/task/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[0] != "S":
        time.sleep(0.05)
    print("blocked", flush=True)

def blocked(args, extra):
    # the main thread stuck in a native call that never returns to the interpreter: an object
    # store's retry loop, say (here a libc sleep, with the signals held off this thread)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    threading.Thread(target=announce, daemon=True).start()
    ctypes.CDLL(None).sleep(120)
    return 0

cli._scan = blocked
cli.STOP_GRACE_S = 1.0
sys.exit(cli.main(["scan", "in.parquet", "--out", "run"]))
"""


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_run_blocked_in_a_native_call_still_ends_on_sigterm(tmp, signum, code):
    """The Python handler cannot run while the main thread is inside a native call; the watchdog hears
    the signal through the wakeup fd and ends the run after the grace period, with the exit code a
    signal gives and one line on stderr (a scan of gs:// with no network had ignored SIGTERM for 15
    minutes)."""
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_SCAN], cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "blocked"
    started = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert time.monotonic() - started < 30
    assert "blocked in a native call" in stderr and "nothing published" in stderr


FORKED_CHILD_SIGNALLED = """
import os, signal, sys, time
from poisonguard import cli

def scan_with_a_forked_worker(args, extra):
    pid = os.fork()
    if pid == 0:  # a worker a library forked (the scan's handlers inherited), stopped with SIGTERM
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException:
            pass
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(2.0)  # past the grace period: the scan itself was never signalled
    print("finished", flush=True)
    return 0

cli._scan = scan_with_a_forked_worker
cli.STOP_GRACE_S = 0.5
sys.exit(cli.main(["scan", "in.parquet", "--out", "run"]))
"""


def test_a_signal_to_a_forked_child_is_not_taken_for_one_to_the_scan(tmp):
    """A forked child inherits the signal wakeup fd: without forgetting it at fork, SIGTERM sent to
    the child alone reached the scan's watchdog, which ended the healthy scan."""
    proc = subprocess.run([sys.executable, "-c", FORKED_CHILD_SIGNALLED], cwd=tmp, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr


@pytest.mark.parametrize("a, b, common", [
    (pa.int32(), pa.int64(), pa.int64()), (pa.uint16(), pa.int16(), pa.int32()), (pa.uint64(), pa.int64(), None),
    (pa.float16(), pa.float32(), pa.float32()), (pa.int64(), pa.float64(), None), (pa.string(), pa.int64(), None),
    (pa.dictionary(pa.int8(), pa.string()), pa.large_string(), pa.large_string()),
    (pa.list_(pa.float32(), 4), pa.list_(pa.float32(), 8), None),
    (pa.list_(pa.float32(), 4), pa.large_list(pa.float64()), pa.large_list(pa.float64())),
])
def test_the_common_type_of_two_columns_loses_no_value_or_is_none(a, b, common):
    from poisonguard.io import common_type

    assert common_type(a, b) == common and common_type(b, a) == common
