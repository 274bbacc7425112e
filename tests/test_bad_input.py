"""Bad input: exit 2, one line naming file/column/problem, no traceback, nothing published."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import CLEAN, DIGITS_CONFIG, error_lines, gaussian_table, read_outputs, run_cli, snapshot, write


@pytest.fixture
def previous_run(tmp):
    """A published run that every failing scan must leave byte-for-byte as it was."""
    out = tmp / "run"
    code, _, _ = run_cli("scan", write(gaussian_table(60, 2, 3), tmp / "ok.parquet"), "--out", out, "--quiet")
    assert code == 0
    return out, snapshot(out)


def assert_rejected(tmp, previous_run, args, *needles):
    out, before = previous_run
    code, stdout, stderr = run_cli("scan", *args, "--out", out)
    assert code == 2, (code, stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]
    return lines[0]


def test_missing_path(tmp, previous_run):
    assert_rejected(tmp, previous_run, [tmp / "nope.parquet"], "nope.parquet", "no such file")


def test_zero_byte_file(tmp, previous_run):
    (tmp / "empty.parquet").write_bytes(b"")
    assert_rejected(tmp, previous_run, [tmp / "empty.parquet"], "empty.parquet", "0 bytes")


def test_csv_renamed_parquet(tmp, previous_run):
    (tmp / "data.parquet").write_text("id,label\n1,2\n")
    assert_rejected(tmp, previous_run, [tmp / "data.parquet"], "data.parquet", "not a readable Parquet file")


def test_truncated_parquet(tmp, previous_run):
    data = write(gaussian_table(60, 2, 3), tmp / "full.parquet").read_bytes()
    (tmp / "cut.parquet").write_bytes(data[: len(data) // 2])
    assert_rejected(tmp, previous_run, [tmp / "cut.parquet"], "cut.parquet")


@pytest.mark.parametrize("engine", [["--engine", "memory"], ["--engine", "beam"],
                                    ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]],
                         ids=["memory", "beam", "beam-multi-processing"])
def test_corrupt_data_pages_with_valid_footer(tmp, previous_run, engine):
    path = tmp / "corrupt.parquet"
    pq.write_table(gaussian_table(2000, 2, 16), path, compression="snappy")
    data = bytearray(path.read_bytes())
    start = 64
    data[start:start + 4000] = bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8))
    path.write_bytes(bytes(data))
    assert_rejected(tmp, previous_run, [path, *engine], "corrupt.parquet", "cannot read Parquet data")


def test_empty_dataset(tmp, previous_run):
    write(gaussian_table(10, 1, 3).slice(0, 0), tmp / "zero.parquet")
    assert_rejected(tmp, previous_run, [tmp / "zero.parquet"], "zero.parquet", "0 rows")


def test_empty_folder_and_unmatched_glob(tmp, previous_run):
    (tmp / "nothing").mkdir()
    assert_rejected(tmp, previous_run, [tmp / "nothing"], "no *.parquet")
    assert_rejected(tmp, previous_run, [str(tmp / "nothing" / "*.parquet")], "no file matches")


@pytest.mark.parametrize("column,role", [("id", "id"), ("label", "label"), ("embedding", "embedding")])
def test_missing_column(tmp, previous_run, column, role):
    table = gaussian_table(30, 2, 3)
    write(table.drop_columns([column]), tmp / "missing.parquet")
    assert_rejected(tmp, previous_run, [tmp / "missing.parquet"], "missing.parquet", f"'{column}'", f"missing {role} column")


def test_a_path_that_is_not_utf8_is_exit_2(tmp, previous_run):
    import os
    import shutil

    folder = os.fsencode(tmp / "data") + b"/day=\xff"  # a folder name a data supplier chose, not UTF-8
    os.makedirs(folder)
    shutil.copy(write(gaussian_table(30, 2, 3), tmp / "ok.parquet"), folder + b"/part-0.parquet")
    assert_rejected(tmp, previous_run, [tmp / "data"], "day=", "path is not valid UTF-8")


def test_a_label_kept_in_hive_folder_names_is_named_as_such(tmp, previous_run):
    table = gaussian_table(30, 2, 3)
    for label in (0, 1):
        (tmp / "data" / f"label={label}").mkdir(parents=True)
        rows = table.filter(pc.equal(table.column("label"), label)).drop_columns(["label"])
        write(rows, tmp / "data" / f"label={label}" / "part-0.parquet")
    assert_rejected(tmp, previous_run, [tmp / "data"], "'label'", "missing label column",
                    "set partitioning: hive")


@pytest.mark.parametrize("column,array,problem", [
    ("embedding", pa.array(["1,2,3"] * 60), "embedding column must be a list of numbers"),
    ("label", pa.array(np.linspace(0, 1, 60)), "label column must be integer, string or boolean"),
    ("id", pa.array(np.linspace(0, 1, 60)), "id column must be integer or string"),
])
def test_wrong_column_types(tmp, previous_run, column, array, problem):
    table = gaussian_table(30, 2, 3)
    table = table.set_column(table.schema.get_field_index(column), column, array)
    write(table, tmp / "types.parquet")
    assert_rejected(tmp, previous_run, [tmp / "types.parquet"], "types.parquet", problem)


@pytest.mark.parametrize("vectors", [pa.array([[]] * 60, pa.list_(pa.float32())),
                                     pa.array([[]] * 60, pa.large_list(pa.float64()))])
def test_empty_vectors_are_exit_2(tmp, previous_run, vectors):
    table = gaussian_table(30, 2, 3)
    write(table.set_column(table.schema.get_field_index("embedding"), "embedding", vectors), tmp / "empty.parquet")
    assert_rejected(tmp, previous_run, [tmp / "empty.parquet"], "empty.parquet", "'embedding'",
                    "vectors are empty (width 0)")


def test_empty_vectors_among_sized_ones_are_quarantined_rows(tmp):
    """The width is the most common non-zero length, so a majority of empty lists in the first rows
    quarantines those rows (``embedding_dim``) rather than every other row."""
    table = gaussian_table(30, 2, 3)
    x = table.column("embedding").to_pylist()
    vectors = pa.array([[] if i % 3 else v for i, v in enumerate(x)], pa.list_(pa.float32()))
    write(table.set_column(table.schema.get_field_index("embedding"), "embedding", vectors), tmp / "some.parquet")
    code, _, stderr = run_cli("scan", tmp / "some.parquet", "--out", tmp / "run", "--quiet", "--set", "fail_on=1.0")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run")
    assert clean.num_rows == 20 and held.num_rows == 40
    assert all(r == ["validation:builtin:embedding_dim"] for r in held.column("quarantine_reasons").to_pylist())


@pytest.mark.parametrize("twice", ["label", "note"])
def test_a_column_name_given_twice_is_exit_2(tmp, previous_run, twice):
    table = gaussian_table(30, 2, 3)
    table = pa.Table.from_arrays([*table.columns, table.column(twice)], names=[*table.column_names, twice])
    write(table, tmp / "twice.parquet")
    assert_rejected(tmp, previous_run, [tmp / "twice.parquet"], "twice.parquet", f"'{twice}'",
                    "column name appears 2 times")


def test_a_folder_or_pattern_leaves_out_names_starting_with_a_dot_or_underscore(tmp):
    """Spark's _temporary attempts, Dask's _metadata, hidden copies: read as Spark and pyarrow read a
    folder; a file named directly is read."""
    table = gaussian_table(30, 2, 3)
    write(table, tmp / "data" / "part-0.parquet")
    for hidden in ("_temporary/0/part-0.parquet", ".part-0.parquet", "_c.parquet",
                   "label=1/.ipynb_checkpoints/x.parquet"):
        write(table, tmp / "data" / hidden)
    for name, target in (("folder", tmp / "data"), ("pattern", f"{tmp / 'data'}/**/*.parquet"),
                         ("named", tmp / "data" / "_c.parquet")):
        code, _, stderr = run_cli("scan", target, "--out", tmp / name)
        assert code == 0, stderr
        summary = json.loads((tmp / name / "summary.json").read_text())
        assert summary["counts"]["in"] == 60 and summary["counts"]["quarantined"] == 0
        read = "_c.parquet" if name == "named" else "part-0.parquet"
        assert [i["path"] for i in summary["inputs"]] == [str(tmp / "data" / read)]
        assert stderr.count("left out 4 of 5 files under a name starting with '.' or '_'") == (name == "folder")
    write(table, tmp / "only" / "_SUCCESS.parquet")
    code, _, stderr = run_cli("scan", tmp / "only", "--out", tmp / "none")
    assert code == 2 and "folder holds no *.parquet file (names starting with '.' or '_' are left out)" in stderr


def test_files_with_different_schemas(tmp, previous_run):
    write(gaussian_table(30, 2, 3), tmp / "in" / "a.parquet")
    write(gaussian_table(30, 2, 3).drop_columns(["note"]), tmp / "in" / "b.parquet")
    assert_rejected(tmp, previous_run, [tmp / "in"], "b.parquet", "schema differs", "missing note")


def test_reserved_output_column_name(tmp, previous_run):
    table = gaussian_table(30, 2, 3).append_column("score_spectral", pa.array(np.zeros(60)))
    write(table, tmp / "reserved.parquet")
    assert_rejected(tmp, previous_run, [tmp / "reserved.parquet"], "'score_spectral'", "reserved")


def test_declared_dim_disagrees_with_fixed_size(tmp, previous_run):
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", "embedding.dim=5"], "fixed size 3")


def test_config_unknown_key_and_wrong_type(tmp, previous_run):
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    (tmp / "c.yaml").write_text("colums: {id: id}\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "c.yaml"], "colums", "Extra inputs")
    (tmp / "c.yaml").write_text("fail_on: lots\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "c.yaml"], "fail_on")
    (tmp / "c.yaml").write_text("detectors: [{name: magic}]\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "c.yaml"], "unknown detector 'magic'")
    (tmp / "c.yaml").write_text("detectors: [{name: spectral, params: {nope: 1}}]\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "c.yaml"],
                    "detectors[0].params.nope", "Extra inputs")
    (tmp / "c.yaml").write_text("a: [unclosed\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "c.yaml"], "not valid YAML")


@pytest.mark.parametrize("params, needle", [
    ("{min_separation: x}", "detectors[1].params.min_separation: Input should be a valid number"),
    ("{min_separation: -1}", "detectors[1].params.min_separation: Input should be greater than 0"),
    ("{n_components: 2.5}", "detectors[1].params.n_components: Input should be a valid integer"),
    ("{reduce: tsne}", "detectors[1].params.reduce"),
    ("{n_init: true}", "detectors[1].params.n_init"),
    ("{min_separation: .inf}", "detectors[1].params: Value error, min_separation must be a finite number"),
    ("{min_class_z: .nan}", "detectors[1].params: Value error, min_class_z must be a finite number"),
])
def test_bad_detector_parameter_is_exit_2_naming_the_field(tmp, previous_run, params, needle):
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    (tmp / "c.yaml").write_text(f"detectors: [{{name: spectral}}, {{name: activation_clustering, params: {params}}}]\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "c.yaml"], needle)


@pytest.mark.parametrize("setting, needle", [
    ("drift.max_share_ratio=.inf", "drift.max_share_ratio: Input should be a finite number"),
    ("columns.id=label", "columns.id and columns.label name the same column 'label'"),
    ("columns.embedding=id", "columns.id and columns.embedding name the same column 'id'"),
])
def test_a_non_finite_setting_or_one_column_in_two_roles_is_exit_2(tmp, previous_run, setting, needle):
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", setting], needle)


def test_empty_detector_list_negative_seed_and_alias_bomb_are_exit_2(tmp, previous_run):
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", "detectors=[]"], "detectors", "at least 1")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", "seed=-1"], "seed", "greater than or equal to 0")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(12))
    (tmp / "bomb.yaml").write_text(bomb)
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "bomb.yaml"], "YAML aliases")
    set_bomb = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(12)) + "]"
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", f"detectors={set_bomb}"],
                    "--set detectors: 108 YAML aliases; at most 100 are allowed")
    # nesting past any config's need: refused before the parser (quadratic in depth: 50 s at 20,000) or its
    # recursion limit (an internal error) is reached
    (tmp / "deep.yaml").write_text("detectors: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "deep.yaml"], "deep.yaml",
                    "nested more than 64 deep")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", "detectors=" + "[" * 20_000 + "]" * 20_000],
                    "--set detectors: nested more than 64 deep")


def test_yaml_config_is_loaded_safely(tmp, previous_run):
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    (tmp / "evil.yaml").write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "evil.yaml"], "not valid YAML")
    assert not (tmp / "pwned").exists()
    (tmp / "latin1.yaml").write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--config", tmp / "latin1.yaml"], "latin1.yaml",
                    "not UTF-8 text")


def test_suite_not_json_or_naming_a_missing_column(tmp, previous_run):
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    (tmp / "s.json").write_text("{not json")
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", f"suite={tmp / 's.json'}"], "s.json", "not valid JSON")
    (tmp / "s.json").write_text(json.dumps({"name": "s", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "ghost"}}]}))
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", f"suite={tmp / 's.json'}"], "'ghost'", "lacks")
    (tmp / "s.json").write_text(json.dumps({"name": "s", "expectations": [
        {"type": "expect_the_moon", "kwargs": {"column": "label"}}]}))
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", f"suite={tmp / 's.json'}"], "invalid expectation suite")


def test_suite_kwargs_that_are_not_an_object_and_vector_bounds_of_the_wrong_width_are_exit_2(tmp, previous_run):
    """(The first ended in an internal error; the second checked no row: bounds apply to vectors of
    their own length only.)"""
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    (tmp / "s.json").write_text(json.dumps({"name": "s", "expectations": [
        {"type": "expect_column_to_exist", "kwargs": [1]}]}))
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", f"suite={tmp / 's.json'}"], "kwargs must be a dict")
    (tmp / "s.json").write_text(json.dumps({"name": "s", "expectations": [], "meta": {"poisonguard": {"vectors": [
        {"type": "expect_vector_values_to_be_between", "column": "embedding", "min_value": [0, 0],
         "max_value": [1, 1]}]}}}))
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", f"suite={tmp / 's.json'}"],
                    "2 bounds for vectors of 3 values")


@pytest.mark.parametrize("engine", ["memory", "beam"])
def test_an_expectation_that_cannot_run_is_exit_2_not_a_silent_pass(tmp, previous_run, engine):
    """An invalid regular expression: GX catches the error per metric and reports the expectation
    unsuccessful with no failing rows, so it had checked nothing and every row passed."""
    write(gaussian_table(30, 2, 3), tmp / "d.parquet")
    (tmp / "s.json").write_text(json.dumps({"name": "s", "expectations": [
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "label", "regex": "("}}]}))
    assert_rejected(tmp, previous_run, [tmp / "d.parquet", "--set", f"suite={tmp / 's.json'}", "--engine", engine],
                    "s.json", "'label'", "failed to run", "regular expression")


@pytest.mark.parametrize("shape,needle", [("[3,5,5]", "holds 75 values, but the rows have 64"),
                                           ("[-1,8,8]", "each at least 1")])
def test_a_features_shape_that_does_not_fit_the_rows_is_exit_2(tmp, previous_run, shape, needle):
    """(Each once reached the proxy network's reshape: a RuntimeError, exit 3.)"""
    rng = np.random.default_rng(0)
    table = pa.table({"id": np.arange(60), "label": np.arange(60) % 2,
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(60 * 64, dtype=np.float32)), 64)})
    write(table, tmp / "f.parquet")
    assert_rejected(tmp, previous_run, [tmp / "f.parquet", "--set", "embedding.source=proxy",
                                        "--set", "embedding.features=features", "--set",
                                        f"embedding.features_shape={shape}"], needle)


def test_out_that_is_not_a_run_folder_is_never_replaced(tmp):
    precious = tmp / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, stderr = run_cli("scan", CLEAN, "--out", precious, "--config", DIGITS_CONFIG)
    assert code == 2 and "refusing to replace" in error_lines(stderr)[0]
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_output_folder_that_cannot_be_created(tmp):
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    code, _, stderr = run_cli("scan", CLEAN, "--out", blocker / "run", "--config", DIGITS_CONFIG)
    assert code == 2, stderr
    assert "cannot create" in error_lines(stderr)[0] and "Traceback" not in stderr
    assert blocker.read_text() == "not a folder"


def test_unicode_and_very_long_ids_round_trip(tmp):
    table = gaussian_table(40, 2, 3)
    ids = [f"zürich-東京-🙂-{i}" + ("x" * 5000 if i % 10 == 0 else "") for i in range(table.num_rows)]
    table = table.set_column(0, "id", pa.array(ids))
    code, _, _ = run_cli("scan", write(table, tmp / "u.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0
    clean, held = read_outputs(tmp / "run")
    assert sorted(clean.column("id").to_pylist() + held.column("id").to_pylist()) == sorted(ids)
