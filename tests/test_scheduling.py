"""What a scheduler needs: configs that work from any folder, JSON results and logs, honest timings,
a reason on exit 1, no lock files left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import DIGITS_CONFIG, POISONED, gaussian_table, read_review, run_cli, write, write_rows

EXE = str(Path(sys.executable).with_name("poisonguard"))


def test_the_console_script_runs_a_repo_config_from_a_fresh_temporary_folder(tmp):
    assert Path(EXE).exists(), "console script not installed"
    out = subprocess.run([EXE, "scan", str(POISONED), "--config", str(DIGITS_CONFIG), "--out", "run"],
                         cwd=tmp, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rows in 1797" in out.stdout and "Traceback" not in out.stderr
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["parameters"]["suite"] == str(DIGITS_CONFIG.parent.parent / "expectations" / "digits_suite.json")


def test_json_logs_name_every_phase_and_total_s_matches_the_wall_clock(tmp):
    started = time.monotonic()
    code, stdout, stderr = run_cli("--log-format", "json", "scan", POISONED, "--out", tmp / "run",
                                   "--config", DIGITS_CONFIG, "--quiet", "--run-id", "logged")
    wall = time.monotonic() - started
    assert code == 0
    records = [json.loads(line) for line in stderr.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "run_id", "phase", "msg"} <= set(r) for r in records)
    assert all(r["run_id"] == "logged" for r in records)
    for name in ("plan", "fit", "score", "report", "publish"):
        assert [r["msg"] for r in records if r["phase"] == name][:1] == [f"{name}: start"]
        assert any(r["msg"].startswith(f"{name}: done in ") for r in records if r["phase"] == name)
    total = json.loads((tmp / "run" / "summary.json").read_text())["timings"]["total_s"]
    assert abs(wall - total) < 1.0


def test_output_json_is_the_last_stdout_line_and_quiet_exit_1_says_why(tmp):
    code, stdout, stderr = run_cli("scan", POISONED, "--out", tmp / "run", "--config", DIGITS_CONFIG,
                                   "--quiet", "--output", "json", "--set", "fail_on=0.01")
    assert code == 1
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["exit_code"] == 1 and result["verdict"] == "over_fail_on"
    assert result["counts"]["in"] == 1797 and Path(result["paths"]["report"]).is_file()
    share = result["counts"]["quarantined"] / result["counts"]["in"]
    assert share > 0.01 and result["reason"] == f"over fail_on: {100 * share:.2f}% > 1.00%"
    assert f"poisonguard: over fail_on: {100 * share:.2f}% > 1.00%" in stderr.splitlines()
    code, stdout, _ = run_cli("scan", tmp / "missing.parquet", "--out", tmp / "x", "--output", "json")
    assert code == 2 and json.loads(stdout.strip().splitlines()[-1])["exit_code"] == 2


def test_concurrent_scans_of_one_run_folder_serialise_and_leave_no_lock_file(tmp):
    data = write(gaussian_table(200, 3, 4), tmp / "d.parquet")
    codes = []

    def scan(i):
        codes.append(subprocess.run([EXE, "scan", str(data), "--out", str(tmp / "runs" / "run"), "--quiet",
                                     "--run-id", f"r{i}"], capture_output=True).returncode)

    threads = [threading.Thread(target=scan, args=(i,)) for i in range(2)]  # each ~3 s of imports
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0]
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == ["poisonguard-provenance.jsonl", "run"]
    from poisonguard import provenance as prov

    ok, message = prov.verify(str(tmp / "runs" / "poisonguard-provenance.jsonl"))
    assert ok and "4 records" in message  # START and COMPLETE per scan, none torn


def test_the_scheduling_examples_parse():
    import ast

    import yaml

    examples = Path(__file__).resolve().parents[1] / "examples"
    ast.parse((examples / "poisonguard_dag.py").read_text())
    assert subprocess.run(["bash", "-n", str(examples / "cron-scan.sh")]).returncode == 0
    job = yaml.safe_load((examples / "cronjob.yaml").read_text())
    assert job["kind"] == "CronJob" and "poisonguard" in job["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"][0]["args"][0]


def test_events_name_datasets_absolutely_and_every_facet_says_who_made_it(tmp):
    import os

    from poisonguard import provenance as prov

    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "runs" / "run", "--config", DIGITS_CONFIG, "--quiet")
    assert code == 0, stderr
    start, complete = [json.loads(line) for line in (tmp / "runs" / "run" / "provenance.jsonl").read_text().splitlines()]
    datasets = complete["inputs"] + complete["outputs"]
    assert all(os.path.isabs(d["name"]) for d in datasets) and all(Path(d["name"]).is_file() for d in datasets)
    assert any(Path(d["name"]).parent == tmp / "runs" / "run" / "quarantine" for d in complete["outputs"])
    for facets in [start["run"]["facets"], complete["run"]["facets"], *(d["facets"] for d in datasets)]:
        assert facets and all(f["_producer"] == prov.PRODUCER and f["_schemaURL"].startswith("https://")
                              for f in facets.values())


def test_a_moved_run_folder_still_verifies_for_review(tmp):
    code, _, _ = run_cli("scan", POISONED, "--out", tmp / "runs" / "run", "--config", DIGITS_CONFIG, "--quiet",
                         "--state", tmp / "state")
    assert code == 0
    (tmp / "runs" / "run").rename(tmp / "runs" / "archived")
    rows = read_review(tmp / "runs" / "archived" / "review.csv")
    rows[0]["decision"] = "confirm"
    code, stdout, stderr = run_cli("review", tmp / "runs" / "archived", "--decisions",
                                   write_rows(tmp / "d.csv", rows[:1]), "--reviewer", "ana")
    assert code == 0 and "1 confirm" in stdout, stderr
