"""Both engines (in memory, and Beam in-process and multi-processing) make the same decisions,
with reviewers' decisions from a state folder applied, row by row."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CLEAN, DIGITS_CONFIG, POISONED, read_outputs, read_review, run_cli, write_rows

SCORES = ["score_spectral", "score_activation_clustering", "score_spectre", "score_knn_label"]


def _decisions(run_dir):
    clean, held = read_outputs(run_dir)
    decided = {}
    for table, held_back in ((clean, False), (held, True)):
        cols = ["id", *SCORES] + (["quarantine_reasons"] if held_back else [])
        for row in table.select(cols).to_pylist():
            decided[row["id"]] = (row.get("quarantine_reasons", []), [row[s] for s in SCORES])
    return decided


def _review(tmp, run_dir, state):
    """Release the first three quarantined rows and confirm the next two."""
    rows = read_review(run_dir / "review.csv")
    for row, decision in zip(rows, ["release"] * 3 + ["confirm"] * 2):
        row["decision"] = decision
    path = write_rows(tmp / "decisions.csv", rows)
    code, _, stderr = run_cli("review", run_dir, "--decisions", path, "--reviewer", "ana", "--state", state)
    assert code == 0, stderr


@pytest.mark.parametrize("sample", [POISONED, CLEAN], ids=["poisoned", "clean"])
def test_engines_give_the_same_flags_scores_and_reasons_with_review_decisions(tmp, sample):
    state = tmp / "state"
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "first", "--config", DIGITS_CONFIG, "--quiet",
                              "--state", state, "--engine", "memory")
    assert code == 0, stderr
    _review(tmp, tmp / "first", state)
    results = {}
    for engine in ("memory", "beam"):
        code, _, stderr = run_cli("scan", sample, "--out", tmp / engine, "--config", DIGITS_CONFIG, "--quiet",
                                  "--state", state, "--engine", engine, "--set", "batch_size=500")
        assert code == 0, stderr
        results[engine] = _decisions(tmp / engine)
    memory, beam = results["memory"], results["beam"]
    assert memory.keys() == beam.keys() and len(memory) == 1797
    for row_id, (reasons, scores) in memory.items():
        assert beam[row_id][0] == reasons, row_id
        np.testing.assert_allclose(beam[row_id][1], scores, rtol=1e-6, atol=1e-9, err_msg=str(row_id))
    if sample == POISONED:
        confirmed = [r for r, (reasons, _) in memory.items() if "review:confirmed" in reasons]
        assert len(confirmed) == 2
        assert sum(1 for reasons, _ in memory.values() if reasons) > 0
        # Beam's parts kept the report's clean-sample candidates too: re-rendering from the clean rows
        # gives the page the scan wrote
        page = (tmp / "beam" / "report.html").read_text()
        code, _, stderr = run_cli("report", tmp / "beam")
        assert code == 0, stderr
        assert (tmp / "beam" / "report.html").read_text() == page and "class-section" in page


def test_multi_processing_runner_gives_identical_decisions_and_counts(tmp):
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "memory", "--config", DIGITS_CONFIG, "--quiet",
                              "--set", "batch_size=300", "--engine", "memory")
    assert code == 0, stderr
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "mp", "--config", DIGITS_CONFIG, "--quiet",
                              "--set", "batch_size=300", "--direct_running_mode", "multi_processing",
                              "--direct_num_workers", "2")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "mp")
    assert clean.num_rows + held.num_rows == 1797
    mp, memory = _decisions(tmp / "mp"), _decisions(tmp / "memory")
    assert mp.keys() == memory.keys()
    assert all(mp[k][0] == memory[k][0] for k in memory)


@pytest.mark.parametrize("runner", [
    # Beam's portable runner framework (the path Flink and Spark take): an embedded job service, the
    # SDK harness reached over gRPC (LOOPBACK)
    ["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "LOOPBACK"],
    # Beam's DaskRunner on a local dask.distributed cluster it starts (worker processes)
    ["--runner", "DaskRunner"],
], ids=["portable-loopback", "dask"])
def test_distributed_runners_give_identical_decisions(tmp, runner):
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "memory", "--config", DIGITS_CONFIG, "--quiet",
                              "--engine", "memory")
    assert code == 0, stderr
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "portable", "--config", DIGITS_CONFIG, "--quiet",
                              *runner)
    assert code == 0, stderr
    portable, memory = _decisions(tmp / "portable"), _decisions(tmp / "memory")
    assert portable.keys() == memory.keys() and len(portable) == 1797
    for row_id, (reasons, scores) in memory.items():
        assert portable[row_id][0] == reasons, row_id
        np.testing.assert_allclose(portable[row_id][1], scores, rtol=1e-6, atol=1e-9)
