"""An Airflow DAG: screen the training data before every training cycle.

The scan's exit code says what to do: 0 train, 1 wait for review (outputs are published and the
reviewers are notified), 2 the input or config is bad (the task fails).  `--output json` makes the
last stdout line the result, which BashOperator pushes as an XCom; the provenance head goes into it
so that the log can be checked later (`poisonguard verify-log LOG --head HASH`).
"""

from __future__ import annotations

import json
import os

import pendulum

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.operators.bash import BashOperator
    from airflow.operators.python import BranchPythonOperator, PythonOperator

# Where things are; `make airflow-check` points them at the repository's sample.  URIs work too
# (s3://lake/train/{{ ds }}/ and s3://lake/poisonguard/runs).
POISONGUARD = os.environ.get("POISONGUARD_BIN", "poisonguard")
DATA = os.environ.get("POISONGUARD_DATA", "/data/train/{{ ds }}/")
CONFIG = os.environ.get("POISONGUARD_CONFIG", "/opt/poisonguard/configs/train.yaml")
RUNS = os.environ.get("POISONGUARD_RUNS", "/data/poisonguard/runs")
STATE = os.environ.get("POISONGUARD_STATE", "/data/poisonguard/state")

with DAG(
    dag_id="poisonguard_screen_then_train",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # one writer per run folder and log (object storage has no locks)
    tags=["poisonguard"],
) as dag:
    # Airflow's run id (scheduled__2026-11-29T00:00:00+00:00) is kept verbatim in summary.json and the log.
    # Exit 1 (over fail_on) must not fail the task: the branch below reads the verdict from the XCom.
    scan = BashOperator(
        task_id="scan",
        bash_command=(
            POISONGUARD + " --log-format json scan " + DATA + " --config " + CONFIG + " "
            "--out " + RUNS + "/{{ ds }} --state " + STATE + " --run-id '{{ run_id }}' "
            "--quiet --output json; code=$?; [ $code -le 1 ] || exit $code"
        ),
        do_xcom_push=True,
    )

    def choose(ti) -> str:
        result = json.loads(ti.xcom_pull(task_ids="scan"))
        return "train" if result["exit_code"] == 0 else "notify_reviewers"

    branch = BranchPythonOperator(task_id="within_policy", python_callable=choose)

    def notify(ti) -> None:
        result = json.loads(ti.xcom_pull(task_ids="scan"))
        print(f"poisonguard held back {result['counts']['quarantined']} rows ({result['reason']}); "
              f"review {result['paths']['report']}, then record the decisions with: {POISONGUARD} review "
              f"{result['paths']['run_dir']} --decisions REVIEW_CSV --reviewer NAME")

    notify_reviewers = PythonOperator(task_id="notify_reviewers", python_callable=notify)
    def train_on_clean(ti) -> None:  # stands in for the training job: it reads only the clean rows
        print(f"train on {json.loads(ti.xcom_pull(task_ids='scan'))['paths']['clean']}")

    train = PythonOperator(task_id="train", python_callable=train_on_clean)

    scan >> branch >> [train, notify_reviewers]
