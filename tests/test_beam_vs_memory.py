"""Both engines (in memory, and Beam in-process and multi-processing) make the same decisions,
with reviewers' decisions from a state folder applied, row by row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import CLEAN, DIGITS_CONFIG, POISONED, read_outputs, read_review, run_cli, scan_page, write, write_rows

SCORES = ["score_spectral", "score_activation_clustering", "score_spectre", "score_knn_distance", "score_knn_label",
          "score_confident_label"]


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
        assert scan_page((tmp / "beam" / "report.html").read_text()) == page and "class-section" in page


def _with_malformed_rows(tmp):
    """The poisoned sample and rows the suite or the embedding check must quarantine: a null, an empty
    and a repeated id, a label outside the set, a null label, NaN and inf in an embedding (a null
    fixed-size embedding does not survive pyarrow's own Parquet round trip; the property tests in
    test_conservation give null embeddings as variable-size lists)."""
    import math

    import pyarrow.parquet as pq

    table = pq.read_table(POISONED)
    first = table.slice(0, 1).to_pylist()[0]
    bad = [{**first, "id": None}, {**first, "id": ""}, {**first}, {**first, "id": "bad-label", "label": 42},
           {**first, "id": "null-label", "label": None},
           {**first, "id": "nan", "embedding": [math.nan] + first["embedding"][1:]},
           {**first, "id": "inf", "embedding": [math.inf] + first["embedding"][1:]}]
    table = pa.concat_tables([table, pa.Table.from_pylist(bad, schema=table.schema)])
    return write(table, tmp / "in.parquet"), table


def _rows(table, names):
    """The rows as sorted tuples of the input's columns, NaN made comparable."""
    def cell(v):
        if isinstance(v, list):
            return tuple(cell(x) for x in v)
        return "NaN" if isinstance(v, float) and v != v else v
    return sorted((tuple(cell(r[n]) for n in names) for r in table.select(names).to_pylist()), key=repr)


def test_multi_processing_runner_gives_identical_decisions_and_conserves_every_row(tmp):
    # one worker-process start (~8 s) checks both: decisions as in memory, and every row, malformed
    # ones included, landing once with its columns unchanged
    path, table = _with_malformed_rows(tmp)
    code, _, stderr = run_cli("scan", path, "--out", tmp / "memory", "--config", DIGITS_CONFIG, "--quiet",
                              "--set", "batch_size=300", "--set", "fail_on=1.0", "--engine", "memory")
    assert code == 0, stderr
    code, _, stderr = run_cli("scan", path, "--out", tmp / "mp", "--config", DIGITS_CONFIG, "--quiet",
                              "--set", "batch_size=300", "--set", "fail_on=1.0",
                              "--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "mp")
    assert clean.num_rows + held.num_rows == table.num_rows == 1804
    names = table.column_names
    assert _rows(pa.concat_tables([clean.select(names), held.select(names)]), names) == _rows(table, names)
    reasons = {r["id"]: r["quarantine_reasons"] for r in held.select(["id", "quarantine_reasons"]).to_pylist()}
    for row_id in ("bad-label", "null-label", "nan", "inf", None, ""):
        assert reasons.get(row_id), row_id
    mp, memory = _decisions(tmp / "mp"), _decisions(tmp / "memory")
    assert mp.keys() == memory.keys()
    assert all(mp[k][0] == memory[k][0] for k in memory)


def test_beam_flags_are_known_by_the_names_users_type(tmp):
    from poisonguard.cli import _check_beam_args

    # the README's Dataflow command (--extra_package is stored as extra_packages), a Dask cluster's
    # address (stored as ``address``, and known only once Beam's Dask runner is imported)
    _check_beam_args(["--runner", "DataflowRunner", "--project", "P", "--region", "R", "--temp_location",
                      "gs://b/tmp", "--extra_package", "dist/p.whl", "--experiment", "use_runner_v2"])
    _check_beam_args(["--runner", "DaskRunner", "--dask_client_address", "tcp://127.0.0.1:8786"])
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", "--config", DIGITS_CONFIG, "--quiet",
                              "--runner", "DaskRunner", "--dask_client_addres", "tcp://127.0.0.1:1")
    assert code == 2 and "unknown flag --dask_client_addres" in stderr and "did you mean --dask_client_address" in stderr
    assert not (tmp / "run").exists()


@pytest.mark.parametrize("runner", [
    # Beam's portable runner framework (the path Flink and Spark take): an embedded job service, the
    # SDK harness reached over gRPC (LOOPBACK)
    ["--runner", "PortableRunner", "--job_endpoint", "embed", "--environment_type", "LOOPBACK"],
    # Beam's DaskRunner on a dask.distributed cluster, reached by --dask_client_address as a scheduled
    # job reaches its cluster (started here in this process, its workers threads: worker processes
    # cost ~10 s of imports, and the multi-processing test above covers running in other processes)
    ["--runner", "DaskRunner", "--dask_client_address"],
], ids=["portable-loopback", "dask"])
def test_distributed_runners_give_identical_decisions(tmp, runner):
    if runner[-1] == "--dask_client_address":
        from distributed import LocalCluster

        with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
            _compare_with_memory(tmp, [*runner, cluster.scheduler_address])
    else:
        _compare_with_memory(tmp, runner)


def _compare_with_memory(tmp, runner):
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
