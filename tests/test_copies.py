"""Exact copies: counted on both engines alike, reported, and checked between the two passes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from conftest import embedding_array, read_outputs, run_cli, write
from poisonguard.core.copies import CopyGroups, content_hashes, labelled_hashes


def test_equal_rows_and_only_equal_rows_share_a_content_hash():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7)).astype(np.float32)
    x[10] = x[3]
    x[11] = np.where(x[3] == 0, 0, x[3])
    x[12, 0], x[13, 0] = 0.0, -0.0
    x[13, 1:] = x[12, 1:]
    nudged = x[3].copy()
    nudged[6] = np.nextafter(nudged[6], np.float32(np.inf))
    h = content_hashes(np.vstack([x, nudged]))
    assert h[10] == h[3] == h[11] and h[12] == h[13] and h[500] != h[3]
    assert len(np.unique(h)) == 500 - 2 - 1 + 1
    same = labelled_hashes(h[[3, 10]], np.array(["a", "a"]))
    differ = labelled_hashes(h[[3, 10]], np.array(["a", "b"]))
    assert same[0] == same[1] and differ[0] != differ[1]


def test_groups_found_per_bucket_are_the_groups_of_the_whole():
    rng = np.random.default_rng(1)
    content = rng.integers(0, 40, size=300).astype(np.uint64)  # many groups
    pairs = np.column_stack([content, labelled_hashes(content, rng.integers(0, 2, size=300))])
    whole = CopyGroups.of_pairs(pairs)
    parts = CopyGroups.union([CopyGroups.of_pairs(pairs[pairs[:, 0] % 4 == b]) for b in range(4)])
    assert np.array_equal(whole.hashes, parts.hashes) and np.array_equal(whole.sizes, parts.sizes)
    assert np.array_equal(whole.conflicting, parts.conflicting)
    values, counts = np.unique(content, return_counts=True)
    assert whole.report()["rows"] == counts[counts >= 2].sum() and whole.report()["largest"] == counts.max()


def _with_copies(tmp):
    """Five classes; 15 copies of one row moved off class 1 (a repeated poisoned row), and a row of
    class 2 copied under label 3."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1500, 8)) + np.repeat(np.arange(5), 300)[:, None] * 10
    y = np.repeat(np.arange(5), 300)
    x[300:315] = x[300] + 3.0
    x[900], y[900] = x[600], 3
    table = pa.table({"id": [f"r{i}" for i in range(1500)], "label": y, "embedding": embedding_array(x)})
    return write(table, tmp / "copies.parquet")


def test_copies_are_counted_alike_on_both_engines_and_reported(tmp):
    data = _with_copies(tmp)
    found = {}
    for engine in ("memory", "beam"):
        code, stdout, stderr = run_cli("scan", data, "--out", tmp / engine, "--engine", engine)
        assert code == 0, stderr
        found[engine] = json.loads((tmp / engine / "summary.json").read_text())["copies"]
        assert "exact copies: 17 rows in 2 group(s)" in stdout
        assert 'id="copies"' in (tmp / engine / "report.html").read_text()
    assert found["memory"] == found["beam"]
    copies = found["memory"]
    assert {k: copies[k] for k in ("groups", "rows", "largest", "conflicting_label_groups", "conflicting_label_rows")} \
        == {"groups": 2, "rows": 17, "largest": 15, "conflicting_label_groups": 1, "conflicting_label_rows": 2}
    held = set(read_outputs(tmp / "memory")[1].column("id").to_pylist())
    copied = {f"r{i}" for i in range(300, 315)} | {"r600", "r900"}
    assert copies["quarantined"] == len(held & copied)
    assert copies["conflicting_label_quarantined"] == len(held & {"r600", "r900"})


def test_a_score_pass_that_sees_other_copies_than_the_fit_fails_the_run(tmp, monkeypatch):
    from poisonguard.core import screening

    data = _with_copies(tmp)
    monkeypatch.setattr(screening, "mark_copies", lambda block, copies: None)  # pass 2 counts no copy
    code, _, stderr = run_cli("scan", data, "--out", tmp / "run")
    assert code == 3 and "exact copy" in stderr and "nothing published" in stderr
    assert not (tmp / "run" / "summary.json").exists()
