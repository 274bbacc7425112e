"""Faults and hostile inputs: kill -9, Ctrl-C, full disk, path tricks, permissions, no raw values in logs."""

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
import pyarrow.parquet as pq
import pytest

from conftest import CLEAN, DIGITS_CONFIG, POISONED, error_lines, gaussian_table, read_outputs, run_cli, snapshot, write
from poisonguard import provenance as prov

EXE = str(Path(sys.executable).with_name("poisonguard"))


def _big_input(tmp: Path) -> Path:
    return write(gaussian_table(n_per_class=60000, classes=4, dim=48, extra=True), tmp / "big.parquet")


def _start(args, tmp):
    return subprocess.Popen([EXE, "scan", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=tmp)


def _wait_for_staging(parent: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(".staging-" in p.name for p in parent.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("scan never created its staging folder")


@pytest.fixture
def published(tmp):
    out = tmp / "runs" / "run"
    code, _, _ = run_cli("scan", CLEAN, "--out", out, "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0
    return out, snapshot(out)


def test_kill_9_mid_run_leaves_previous_run_and_log_intact_and_a_rerun_completes(tmp, published):
    out, before = published
    log = out.parent / "poisonguard-provenance.jsonl"
    proc = _start([_big_input(tmp), "--out", out, "--set", "batch_size=4096"], tmp)
    _wait_for_staging(out.parent, proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert snapshot(out) == before
    assert prov.verify(str(log))[0]
    code, _, stderr = run_cli("scan", POISONED, "--out", out, "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0, stderr
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]
    clean, held = read_outputs(out)
    assert clean.num_rows + held.num_rows == 1797
    assert prov.verify(str(log))[0]


def test_ctrl_c_writes_a_fail_event_and_publishes_nothing(tmp, published):
    out, before = published
    log = out.parent / "poisonguard-provenance.jsonl"
    proc = _start([_big_input(tmp), "--out", out, "--set", "batch_size=4096", "--run-id", "interrupted"], tmp)
    _wait_for_staging(out.parent, proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [e["eventType"] for e in events if prov.run_id_of(e) == "interrupted"]
    assert mine == ["START", "FAIL"]
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]
    assert prov.verify(str(log))[0]


def test_full_disk_exits_2_without_partial_output(tmp, published, monkeypatch):
    import poisonguard.engines.outputs as bp

    out, before = published

    class FullDisk:
        def __getattr__(self, name):
            return getattr(pq, name)

        @staticmethod
        def write_table(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(bp, "pq", FullDisk())
    code, _, stderr = run_cli("scan", POISONED, "--out", out, "--config", DIGITS_CONFIG)
    assert code == 2, stderr
    assert "No space left on device" in error_lines(stderr)[0]
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


@pytest.mark.parametrize("run_id", ["../../evil", "scheduled__2026-11-29T00:00:00+00:00", "a/b\\c d:é"])
def test_any_scheduler_run_id_round_trips_and_names_no_path(tmp, run_id):
    out = tmp / "runs" / "run"
    code, _, stderr = run_cli("scan", CLEAN, "--out", out, "--config", DIGITS_CONFIG, "--quiet", "--state",
                              tmp / "state", "--run-id", run_id)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run_id
    events = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [prov.run_id_of(e) for e in events] == [run_id, run_id]
    assert sorted(p.name for p in tmp.iterdir()) == ["runs", "state"]  # nothing written outside
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == ["poisonguard-provenance.jsonl", "run"]  # no lock file


@pytest.mark.parametrize("run_id", ["", " ", "x" * 257, "tab\there", "new\nline"])
def test_empty_overlong_or_control_character_run_ids_are_exit_2(tmp, run_id):
    code, _, stderr = run_cli("scan", CLEAN, "--out", tmp / "run", "--config", DIGITS_CONFIG, "--run-id", run_id)
    assert code == 2 and "--run-id must be" in error_lines(stderr)[0]


def test_outputs_have_no_world_permissions(tmp):
    code, _, _ = run_cli("scan", CLEAN, "--out", tmp / "run", "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0
    paths = [p for p in (tmp / "run").rglob("*")] + [tmp / "run", tmp / "poisonguard-provenance.jsonl"]
    for path in paths:
        assert path.stat().st_mode & 0o007 == 0, (path, oct(path.stat().st_mode))


def test_summary_and_provenance_hold_no_raw_feature_values(tmp):
    code, _, _ = run_cli("scan", POISONED, "--out", tmp / "run", "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0
    table = pq.read_table(POISONED)
    raw = np.concatenate([np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).ravel()])
    raw = np.unique(raw[np.abs(raw) > 1e-3].astype(np.float64))

    def numbers(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from numbers(v)
        elif isinstance(value, list):
            for v in value:
                yield from numbers(v)
        elif isinstance(value, float):
            yield value

    texts = [(tmp / "run" / "summary.json").read_text(), *(tmp / "poisonguard-provenance.jsonl").read_text().splitlines()]
    found = np.array([v for text in texts for v in numbers(json.loads(text))])
    found = found[np.isfinite(found) & (np.abs(found) > 1e-3)]
    idx = np.clip(np.searchsorted(raw, found), 1, len(raw) - 1)
    nearest = np.minimum(np.abs(raw[idx] - found), np.abs(raw[idx - 1] - found))
    assert not np.any(nearest <= 1e-7 * np.abs(found)), found[nearest <= 1e-7 * np.abs(found)]
    assert "digit-00000" not in (tmp / "poisonguard-provenance.jsonl").read_text()


@pytest.mark.parametrize("case", ["one_class", "tiny_classes"])
def test_degenerate_datasets_scan_without_flagging_everything(tmp, case):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    if case == "one_class":
        table = gaussian_table(n_per_class=400, classes=1, dim=6)
    else:
        x = np.vstack([rng.normal(size=(300, 6)), rng.normal(size=(1, 6)) + 30, np.tile(rng.normal(size=(1, 6)), (25, 1)),
                       rng.normal(size=(4, 6)) - 30])
        labels = np.concatenate([np.zeros(300), [1], np.full(25, 2), np.full(4, 3)]).astype(np.int64)
        from conftest import embedding_array
        table = pa.table({"id": [f"r{i}" for i in range(len(x))], "label": labels, "embedding": embedding_array(x)})
    code, _, stderr = run_cli("scan", write(table, tmp / "d.parquet"), "--out", tmp / "run", "--quiet",
                              "--set", "detectors=[{name: spectral}, {name: activation_clustering}, {name: spectre}, {name: knn_label}]")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run")
    assert clean.num_rows + held.num_rows == table.num_rows
    assert held.num_rows / table.num_rows < 0.05
