"""The screening core without Beam: blocks, built-in checks, scoring, decisions, splitting, statistics,
the in-memory engine, config loading, drift and review.csv cells."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pytest

from conftest import DIGITS_CONFIG, ROOT, embedding_array, gaussian_table, write
from poisonguard.config import Config, load_config
from poisonguard.core.block import builtin_block
from poisonguard.core.decisions import apply_decisions, content_hashes
from poisonguard.core.screening import Screener, block_stats, merge_stats, output_schemas, score_block, \
    split_tables
from poisonguard.engines import memory
from poisonguard.errors import ConfigError, InputError
from poisonguard.io import plan_inputs, read_batches, work_items
from poisonguard.names import QUARANTINE_REASONS, score_column
from poisonguard.workbench import csv_cell, csv_value
from poisonguard.state import drift


def _block(table, dim=8):
    return builtin_block(table, file_index=0, first_row=0, id_col="id", label_col="label", emb_col="embedding",
                         dim=dim, max_abs=1e6, seed=0)


def test_builtin_checks_mark_each_bad_row_with_its_reason():
    x = np.zeros((6, 2), np.float32)
    x[3, 0], x[4, 1] = np.nan, 1e9
    emb = pa.array([list(r) for r in x[:5]] + [[1.0, 2.0, 3.0]], pa.list_(pa.float32()))
    table = pa.table({"id": pa.array(["a", None, "c", "d", "e", "f"]), "label": pa.array([1, 1, None, 1, 1, 1]),
                      "embedding": emb})
    block = _block(table, dim=2)
    reasons = {r: np.flatnonzero(m).tolist() for r, m in block.reasons.items()}
    assert reasons == {"validation:builtin:id_missing": [1], "validation:builtin:label_missing": [2],
                       "validation:builtin:embedding_finite": [3], "validation:builtin:embedding_magnitude": [4],
                       "validation:builtin:embedding_dim": [5]}
    assert block.scorable.tolist() == [True, False, False, False, False, False]


@pytest.mark.parametrize("value_type", [pa.float64(), pa.float32(), pa.int64()])
def test_embedding_checks_read_each_value_type_exactly(value_type):
    """The magnitude bound is exact in the column's own type (1e6 passes, the next value above it
    does not; a float64 past float32's range is too big, not infinite), and good rows come out as
    float32 whatever the column's type."""
    above = {pa.float64(): np.nextafter(1e6, 2e6), pa.float32(): float(np.nextafter(np.float32(1e6), np.float32(2e6))),
             pa.int64(): 1_000_001}[value_type]
    rows = [[1, 2], [1e6, -1e6], [above, 0], [-above, 0], [3, 4]]
    if value_type != pa.int64():
        rows += [[float("nan"), 0], [float("inf"), 0]] + ([[1e40, 0]] if value_type == pa.float64() else [])
    table = pa.table({"id": pa.array([f"r{i}" for i in range(len(rows))]), "label": pa.array([0] * len(rows)),
                      "embedding": pa.array(rows, pa.list_(value_type))})
    block = _block(table, dim=2)
    reasons = {r: np.flatnonzero(m).tolist() for r, m in block.reasons.items()}
    assert reasons.get("validation:builtin:embedding_magnitude") == [2, 3] + ([7] if value_type == pa.float64() else [])
    assert reasons.get("validation:builtin:embedding_finite", []) == ([5, 6] if value_type != pa.int64() else [])
    assert block.x.dtype == np.float32
    assert block.x[[0, 1, 4]].tolist() == [[1, 2], [1e6, -1e6], [3, 4]]


def _planted_config_and_table(n=400, classes=5, dim=8, share=0.04):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n * classes, dim)).astype(np.float32) + np.repeat(np.arange(classes), n)[:, None] * 8
    y = np.repeat(np.arange(classes), n)
    poison = np.zeros(len(y), bool)
    poison[np.flatnonzero(y == 2)[: int(share * n)]] = True
    x[poison] += 12 / np.sqrt(dim)
    table = pa.table({"id": pa.array([f"r{i}" for i in range(len(y))]), "label": pa.array(y),
                      "embedding": embedding_array(x)})
    return table, poison


def test_memory_engine_quarantines_a_planted_cluster_and_nothing_else(tmp):
    table, poison = _planted_config_and_table()
    path = write(table, tmp / "d.parquet")
    config = Config(detectors=[{"name": "spectral"}, {"name": "spectre"}], batch_size=300)
    plan = plan_inputs([str(path)], config)
    held_ids, clean_rows = [], 0

    def sink(file_index, first_row, clean, held, sample):
        nonlocal clean_rows
        clean_rows += clean.num_rows
        held_ids.extend(held.column("id").to_pylist())

    result, fitted = memory.run(Screener(config, plan), "r", sink, 262144)
    flagged = np.isin([f"r{i}" for i in range(len(poison))], held_ids)
    assert flagged[poison].mean() >= 0.95 and flagged[~poison].mean() <= 0.002
    assert result.counts["rows"] == len(poison) == clean_rows + len(held_ids)
    assert result.fit["spectre"]["classes"]["2"]["suspicious"]
    assert set(result.moments) == {"0", "1", "2", "3", "4"}


def test_uint64_labels_past_int64_keep_their_spelling_and_their_decisions(tmp):
    """A uint64 label of 2**63 or more is its own class under its own name (an int64 would have
    spelt 2**64 - 1 as -1 and lost its class in the report); the scan decides as for labels 0..4 (the
    labels are read in the core's block, which both engines share)."""
    import json

    from conftest import read_outputs, run_cli

    table, poison = _planted_config_and_table()
    big = np.array([2**64 - 1, 5, 2**63, 2**63 + 1, 7], dtype=np.uint64)
    relabelled = table.set_column(1, "label", pa.array(big[table.column("label").to_numpy()]))
    args = ["--quiet", "--set", "detectors=[{name: spectral}, {name: spectre}]", "--set", "fail_on=1.0"]
    held = {}
    for name, data, engine in (("int", table, "memory"), ("uint", relabelled, "memory")):
        code, _, stderr = run_cli("scan", write(data, tmp / f"{name}.parquet"), "--out", tmp / name,
                                  "--engine", engine, *args)
        assert code == 0, stderr
        held[name] = set(read_outputs(tmp / name)[1].column("id").to_pylist())
        summary = json.loads((tmp / name / "summary.json").read_text())
        assert set(summary["per_class"]) == ({"0", "1", "2", "3", "4"} if name == "int" else {str(v) for v in big})
    assert held["int"] == held["uint"] and np.isin([f"r{i}" for i in np.flatnonzero(poison)],
                                                                    list(held["uint"])).mean() >= 0.95
    assert f"class {2**63}" in (tmp / "uint" / "report.html").read_text()


def test_score_block_adds_duplicate_and_detector_reasons_and_spares_released_rows(tmp):
    table, poison = _planted_config_and_table()
    table = table.set_column(0, "id", pa.array(["dup" if i in (0, 1) else f"r{i}" for i in range(table.num_rows)]))
    config = Config(detectors=[{"name": "spectral"}])
    plan = plan_inputs([str(write(table, tmp / "d.parquet"))], config)
    screener = Screener(config, plan)
    block = screener.make_block(table, 0, 0)
    from poisonguard.core.screening import Fitted, duplicate_hashes, fit_detectors

    part = screener.fit_part(block)
    fitted = Fitted(fit_detectors(dict(part.states), config), duplicate_hashes(part.id_hashes))
    released = np.zeros(table.num_rows, bool)
    released[np.flatnonzero(poison)[:3]] = True
    block.released = released
    scores = score_block(block, fitted.detectors, fitted.duplicate_ids)
    assert block.mask("validation:builtin:id_duplicate").tolist()[:3] == [True, True, False]
    flagged = block.mask("detector:spectral")
    assert not flagged[released].any() and flagged[poison & ~released].all()
    clean, held = split_tables(table, block, scores, ["spectral"], "run-1")
    schemas = output_schemas(table.schema, ["spectral"])
    assert clean.schema.equals(schemas[0]) and held.schema.equals(schemas[1])
    assert clean.num_rows + held.num_rows == table.num_rows
    assert held.column(QUARANTINE_REASONS)[0].as_py() == ["validation:builtin:id_duplicate"]
    assert np.isfinite(clean.column(score_column("spectral")).to_numpy()).all()


def test_review_decisions_match_id_and_content():
    table = pa.table({"id": ["a", "b", "c"], "label": [0, 0, 0],
                      "embedding": embedding_array(np.ones((3, 2)))})
    block = _block(table, dim=2)
    digests = content_hashes(table, table.column_names)
    decisions = {"a": {digests[0]: "confirm"}, "b": {digests[1]: "release"}, "c": {"0" * 64: "release"}}
    apply_decisions(block, table, decisions, table.column_names)
    assert block.mask("review:confirmed").tolist() == [True, False, False]
    assert block.released.tolist() == [False, True, False]


def test_block_statistics_merge_in_any_order():
    table, _ = _planted_config_and_table(n=50)
    stats = [block_stats(_block(table.slice(i, 50))) for i in range(0, table.num_rows, 50)]
    forward, backward = {}, {}
    for s in stats:
        forward = merge_stats(forward, s)
    for s in reversed(stats):
        backward = merge_stats(backward, s)
    assert forward == backward and forward["rows"] == table.num_rows


def test_a_file_replaced_between_the_passes_is_refused(tmp):
    path = write(gaussian_table(50, 2, 4), tmp / "d.parquet")
    config = Config()
    plan = plan_inputs([str(path)], config)
    items = work_items(plan, 1000)
    assert sum(t.num_rows for _, t in read_batches(items[0], None, 64)) == 100
    time.sleep(0.01)
    replacement = write(gaussian_table(50, 2, 4, seed=9), tmp / "other.parquet")
    os.replace(replacement, path)
    with pytest.raises(InputError, match="changed after it was hashed"):
        list(read_batches(items[0], None, 64))


def test_config_paths_resolve_against_the_config_file_and_overrides_apply(tmp):
    config = load_config(str(DIGITS_CONFIG), ["fail_on=0.05", "report.top_suspects=3", "suite=x.json"])
    assert config.fail_on == 0.05 and config.report.top_suspects == 3 and config.suite == "x.json"
    assert load_config(str(DIGITS_CONFIG)).suite == str(ROOT / "expectations" / "digits_suite.json")
    (tmp / "c.yaml").write_text("state: st\nprovenance_log: /abs/log.jsonl\nsuite: s3://b/suite.json\n")
    config = load_config(str(tmp / "c.yaml"))
    assert (config.state, config.provenance_log, config.suite) == (str(tmp / "st"), "/abs/log.jsonl",
                                                                    "s3://b/suite.json")
    with pytest.raises(ConfigError, match="detectors\\[0\\].params.alpha"):
        load_config(None, ["detectors=[{name: spectre, params: {alpha: 0}}]"])


def test_drift_reports_share_and_mean_shifts():
    before = {"0": {"n": 100, "share": 0.5, "mean": [0.0, 0.0], "trace": 1.0},
              "1": {"n": 100, "share": 0.5, "mean": [5.0, 5.0], "trace": 1.0}}
    after = {"0": {"n": 100, "share": 0.2, "mean": [0.0, 0.0], "trace": 1.0},
             "1": {"n": 400, "share": 0.8, "mean": [6.0, 5.0], "trace": 1.0}}
    kinds = {(w["class"], w["kind"]) for w in drift(before, after, max_share_ratio=2.0, max_mean_shift=0.5)}
    assert kinds == {("0", "share"), ("1", "mean")}


@pytest.mark.parametrize("value", ["=HYPERLINK(\"x\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "'quoted", "plain", ""])
def test_csv_cells_are_neutralised_and_read_back_exactly(value):
    cell = csv_cell(value)
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")) and csv_value(cell) == value


def test_auto_engine_runs_in_memory_unless_beam_is_asked_for():
    """Both engines stream the input; in one process the in-memory one is the faster, so ``auto``
    picks it at any size unless a Beam flag names a runner or its options (or a cap is set)."""
    from poisonguard.orchestrator import choose_engine

    assert choose_engine(Config(), 3_000_000, []) == "memory"
    assert choose_engine(Config(), 1_000, ["--runner=PortableRunner"]) == "beam"
    capped = Config(memory_engine_max_rows=100_000)
    assert choose_engine(capped, 100_000, []) == "memory" and choose_engine(capped, 100_001, []) == "beam"
    assert choose_engine(Config(engine="beam"), 10, []) == "beam"


def test_sample_merges_keep_the_bottom_k_whatever_the_order():
    """Merging class samples drops rows that cannot enter a full sample before sorting; the result
    is still the k smallest keys of the union, whichever way the blocks were merged."""
    from poisonguard.detectors.stats import ClassState

    rng = np.random.default_rng(3)
    x = rng.normal(size=(5000, 4)).astype(np.float32)
    keys = rng.integers(0, 2**63, size=5000, dtype=np.uint64)
    parts = [ClassState.from_block(x[i:i + 700], keys[i:i + 700], 300) for i in range(0, 5000, 700)]
    forward = parts[0]
    for part in parts[1:]:
        forward = forward.merge(part)
    backward = parts[-1]
    for part in parts[-2::-1]:
        backward = part.merge(backward)
    expected = np.sort(keys)[:300]
    assert np.array_equal(forward.sample_keys, expected) and np.array_equal(backward.sample_keys, expected)
    assert np.array_equal(forward.sample_x, backward.sample_x)
    assert np.allclose(forward.mean, x.mean(axis=0), atol=1e-5)


def test_parts_skip_dictionaries_on_float_columns(tmp):
    """Embeddings, features and scores rarely repeat: writing them without trying a dictionary first
    is what keeps the write cheap; ids and labels keep theirs."""
    import pyarrow.parquet as pq

    from poisonguard.engines.outputs import write_block

    table = pa.table({"id": ["a", "b", "c"], "label": [1, 1, 2], "embedding": embedding_array(np.eye(3)),
                      "score_spectral": [0.1, 0.2, 0.3]})
    os.makedirs(tmp / "clean")
    os.makedirs(tmp / "quarantine")
    write_block(str(tmp), 0, 0, table, table.slice(0, 0))
    (part,) = list((tmp / "clean").iterdir())
    meta = pq.ParquetFile(part).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    dictionary = {name for name, enc in encodings.items() if any("DICTIONARY" in e for e in enc)}
    assert dictionary == {"id", "label"}
    assert pq.read_table(part).equals(table)


def test_block_states_are_the_per_class_states_built_in_one_sort():
    """states_of_block (one sort for all classes) gives what ClassState.from_block gives class by
    class: counts, means, scatter past the capacity, and the same bottom-k sample, ties included."""
    from poisonguard.detectors.stats import ClassState, states_of_block

    rng = np.random.default_rng(3)
    n, capacity = 3000, 50
    codes = rng.integers(0, 40, size=n)
    codes[codes == 7] = 8  # a class with no rows in this block
    codes[:200] = 0  # one class past the capacity
    keys = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    keys[10:14] = keys[9]  # equal keys within class 0: broken by the row
    x = rng.normal(size=(n, 6)).astype(np.float32)
    states = states_of_block(x, codes, 40, keys, capacity)
    for c in range(40):
        expected = ClassState.from_block(x[codes == c], keys[codes == c], capacity)
        got = states[c]
        assert got.n == expected.n
        assert np.array_equal(got.sample_keys, expected.sample_keys)
        assert np.array_equal(got.sample_x, expected.sample_x)
        if expected.n:
            assert np.allclose(got.mean, expected.mean, rtol=0, atol=1e-12)
            assert (got.m2 is None) == (expected.m2 is None)
            assert got.m2 is None or np.allclose(got.m2, expected.m2, rtol=1e-12, atol=1e-9)
    assert states[7].n == 0 and states[0].m2 is not None


def test_torch_scoring_gives_the_numpy_scores_and_flags():
    """The score pass's torch kernels (what scoring_device: cuda runs), here on the CPU device:
    every detector's scores match numpy's and the flags are the same rows."""
    from poisonguard.core.screening import fit_detectors
    from poisonguard.core.torch_scoring import TorchScorer
    from poisonguard.detectors.stats import default_keys, states_by_class

    rng = np.random.default_rng(5)
    centres = rng.normal(scale=5.0, size=(6, 12))
    y = np.repeat(np.arange(6), 400)
    x = (centres[y] + rng.normal(size=(len(y), 12))).astype(np.float32)
    x[:20] += 9.0  # a planted cluster in class 0
    y[400:420] = 3  # label flips
    keys = default_keys(len(y), 0)
    fitted = fit_detectors(states_by_class(x, y, keys, 5000), Config())
    scorer = TorchScorer("cpu")
    for name, detector in fitted.items():
        scores, flags = scorer.score_and_flag(detector, x, y, keys)
        expected = detector.score_samples(x, y, keys)
        np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12, err_msg=name)
        assert np.array_equal(flags, detector.flag(x, y, keys, scores=expected)), name
    flagged = sum(int(detector.flag(x, y, keys).sum()) for detector in fitted.values())
    assert flagged >= 20  # the comparison covers flagged rows, not only clean ones


def test_scoring_on_cuda_without_a_gpu_is_a_config_error():
    import torch

    from poisonguard.core.torch_scoring import resolve_device
    from poisonguard.errors import ConfigError

    assert resolve_device("cpu") is None
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda" and resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") is None
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_a_score_histogram_says_when_a_class_was_not_scored():
    from poisonguard import plots

    unscored = plots.histogram(np.full(50, np.nan), np.zeros(0), None, "knn_label")
    scored = plots.histogram(np.linspace(0, 1, 50), np.zeros(0), None, "knn_label")
    assert "not scored in this class" in unscored and "not scored" not in scored and "<rect" in scored
