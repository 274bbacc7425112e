#!/usr/bin/env bash
# `make airflow-check`: run the example DAG with `airflow dags test` (Airflow in its own venv,
# .airflow-venv) on the repository's poisoned sample, and check what each task did.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export AIRFLOW_HOME="$work/airflow" AIRFLOW__CORE__DAGS_FOLDER="$PWD/examples" AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False AIRFLOW__LOGGING__LOGGING_LEVEL=WARNING GX_ANALYTICS_ENABLED=false
export POISONGUARD_BIN="$PWD/.venv/bin/poisonguard" POISONGUARD_DATA="$PWD/data/samples/digits_poisoned.parquet"
export POISONGUARD_CONFIG="$PWD/configs/digits.yaml" POISONGUARD_RUNS="$work/runs" POISONGUARD_STATE="$work/state"
airflow=.airflow-venv/bin/airflow
"$airflow" db migrate > "$work/migrate.log" 2>&1 || { tail -20 "$work/migrate.log"; exit 1; }
"$airflow" dags test poisonguard_screen_then_train 2026-11-29 > "$work/dags-test.log" 2>&1 || { tail -40 "$work/dags-test.log"; exit 1; }
grep -q "train on $work/runs/2026-11-29/clean" "$work/dags-test.log" || { echo "the train task did not run on the clean rows"; tail -40 "$work/dags-test.log"; exit 1; }
python3 - "$work/runs/2026-11-29/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
assert summary["run_id"].startswith("manual__") or summary["run_id"].startswith("scheduled__"), summary["run_id"]
assert summary["counts"]["in"] == 1797, summary["counts"]
print(f"airflow dags test: scan ran as run id {summary['run_id']!r}, {summary['counts']['quarantined']} rows held back, train ran on clean/")
PY
