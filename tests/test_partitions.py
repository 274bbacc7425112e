"""Hive-partitioned inputs (``partitioning: hive``): folder keys read as columns, on both engines,
in ``suite infer`` and from object storage; anything ambiguous is exit 2."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import embedding_array, error_lines, gaussian_table, read_outputs, read_review, run_cli, write
from poisonguard.config import Config
from poisonguard.errors import InputError
from poisonguard.io import folders_below, plan_discovered


def lake(root, table, day_of=lambda label: "2026-11-01"):
    """``table`` written as root/day=.../label=<label>/part-0.parquet, without its label column."""
    for label in pc.unique(table.column("label")).to_pylist():
        rows = table.filter(pc.equal(table.column("label"), label)).drop_columns(["label"])
        write(rows, root / f"day={day_of(label)}" / f"label={label}" / "part-0.parquet")
    return root


def ids(table: pa.Table) -> list[str]:
    return sorted(table.column("id").to_pylist())


@pytest.mark.parametrize("engine", ["memory", "beam"])
def test_a_partitioned_lake_scans_as_the_table_it_was_cut_from(tmp, engine):
    table = gaussian_table(150, 3, 6)
    x = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 6).copy()
    x[[0, 200]] = 1e7  # two rows past embedding.max_abs_value: quarantined whatever the detectors say
    table = table.set_column(2, "embedding", embedding_array(x))
    flat = write(table, tmp / "flat.parquet")
    code, _, stderr = run_cli("scan", flat, "--out", tmp / "flat_run", "--quiet")
    assert code == 0, stderr
    code, _, stderr = run_cli("scan", lake(tmp / "lake", table), "--out", tmp / "run", "--quiet",
                              "--set", "partitioning=hive", "--set", f"engine={engine}")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run")
    flat_clean, flat_held = read_outputs(tmp / "flat_run")
    assert clean.schema.field("label").type == pa.int64() and clean.schema.field("day").type == pa.string()
    assert set(clean.column("day").to_pylist()) == {"2026-11-01"}
    assert ids(clean) == ids(flat_clean) and ids(held) == ids(flat_held)
    by_id = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    assert all(by_id[i] == label for i, label in zip(clean.column("id").to_pylist(), clean.column("label").to_pylist()))
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["counts"]["in"] == table.num_rows and summary["parameters"]["partitioning"] == "hive"
    # review.csv and the report name each row's file below the lake, not "part-0.parquet" for all
    sources = {row["source_file"] for row in read_review(tmp / "run" / "review.csv")}
    assert held.num_rows >= 2 and sources == {"label=0/part-0.parquet", "label=1/part-0.parquet"}  # below day=...
    assert '"label=0/part-0.parquet"' in (tmp / "run" / "report.html").read_text()  # the quarantine table's data


def test_keys_are_read_below_the_input_only_and_typed_without_losing_text(tmp):
    table = gaussian_table(20, 2, 3, extra=False)
    root = tmp / "run=7" / "data"  # a key=value folder above the input is not a partition key
    for shard, zone in ((0, "007"), (1, "01%2F02"), (2, "__HIVE_DEFAULT_PARTITION__")):
        write(table.slice(shard * 10, 10), root / f"shard={shard}" / f"zone={zone}" / "f.parquet")
    plan = plan_discovered([str(root)], Config(partitioning="hive"))
    assert plan.schema.names[-2:] == ["shard", "zone"] and "run" not in plan.schema.names
    assert plan.schema.field("shard").type == pa.int64()
    assert plan.schema.field("zone").type == pa.string()  # 007 stays text: not every value is a canonical integer
    values = sorted((dict((f.name, v) for f, v in file.partition)["zone"] or "") for file in plan.files)
    assert values == ["", "007", "01/02"]
    pattern = str(tmp / "run=7" / "data" / "shard=*" / "*" / "*.parquet")
    assert folders_below([pattern])[plan.files[0].path].startswith("shard=")
    assert plan_discovered([pattern], Config(partitioning="hive")).schema.equals(plan.schema)
    assert "shard" not in plan_discovered([str(root)], Config()).schema.names  # partitioning: none reads no keys


@pytest.mark.parametrize("layout,needle", [
    (("a=1/f.parquet", "b=1/f.parquet"), "differ from"),
    (("a=1/f.parquet", "f.parquet"), "differ from"),
    (("a=1/a=2/f.parquet",), "appears twice"),
    (("note=x/f.parquet",), "a column in the files and a partition key"),
    (("=x/f.parquet",), "no key before '='"),
    (("a=%ff/f.parquet",), "not valid UTF-8"),
])
def test_ambiguous_partition_folders_are_exit_2_naming_the_file(tmp, layout, needle):
    for index, path in enumerate(layout):
        write(gaussian_table(30, 2, 3).slice(index * 20, 20), tmp / "lake" / path)
    code, _, stderr = run_cli("scan", tmp / "lake", "--out", tmp / "run", "--set", "partitioning=hive")
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1 and needle in lines[0] and ".parquet" in lines[0], stderr
    assert not (tmp / "run").exists() and "Traceback" not in stderr


def test_suite_infer_reads_the_partition_keys(tmp):
    table = gaussian_table(40, 2, 3)
    root = lake(tmp / "lake", table, day_of=lambda label: f"2026-11-0{label + 1}")
    suite_path = tmp / "suite.json"
    code, _, stderr = run_cli("suite", "infer", root, "--out", suite_path, "--set", "partitioning=hive")
    assert code == 0, stderr
    suite = json.loads(suite_path.read_text())
    sets = {e["kwargs"]["column"]: e["kwargs"]["value_set"] for e in suite["expectations"]
            if e["type"] == "expect_column_values_to_be_in_set"}
    assert sorted(sets["day"]) == ["2026-11-01", "2026-11-02"] and sorted(sets["label"]) == [0, 1]
    code, _, stderr = run_cli("scan", root, "--out", tmp / "run", "--quiet", "--set", "partitioning=hive",
                              "--set", f"suite={suite_path}")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run")
    assert clean.num_rows + held.num_rows == table.num_rows
    assert not any(r.startswith("validation:") for reasons in held.column("quarantine_reasons").to_pylist()
                   for r in reasons)


def test_without_partitioning_a_label_in_folder_names_says_how_to_read_it(tmp):
    code, _, stderr = run_cli("scan", lake(tmp / "lake", gaussian_table(30, 2, 3)), "--out", tmp / "run")
    assert code == 2 and "set partitioning: hive" in error_lines(stderr)[0]


def test_plan_refuses_keys_that_differ_between_inputs(tmp):
    table = gaussian_table(20, 2, 3, extra=False)
    write(table, tmp / "one" / "k=1" / "f.parquet")
    write(table, tmp / "two" / "j=1" / "f.parquet")
    with pytest.raises(InputError, match="differ from"):
        plan_discovered([str(tmp / "one"), str(tmp / "two")], Config(partitioning="hive"))
