"""An Airflow DAG: screen the training data before every training cycle.

The scan's exit code says what to do: 0 train, 1 wait for review (outputs are published and the
reviewers are notified), 2 the input or config is bad (the task fails).  `--output json` makes the
last stdout line the result, which BashOperator pushes as an XCom; the provenance head goes into it
so that the log can be checked later (`poisonguard verify-log LOG --head HASH`).
"""

from __future__ import annotations

import json

import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator
from airflow.operators.python import BranchPythonOperator, PythonOperator

DATA = "/data/train/{{ ds }}/"
RUNS = "/data/poisonguard/runs"

with DAG(
    dag_id="poisonguard_screen_then_train",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    tags=["poisonguard"],
) as dag:
    # Airflow's run id (scheduled__2026-11-29T00:00:00+00:00) is kept verbatim in summary.json and the log.
    # Exit 1 (over fail_on) must not fail the task: the branch below reads the verdict from the XCom.
    scan = BashOperator(
        task_id="scan",
        bash_command=(
            "poisonguard --log-format json scan " + DATA + " --config /opt/poisonguard/configs/train.yaml "
            "--out " + RUNS + "/{{ ds }} --state /data/poisonguard/state --run-id '{{ run_id }}' "
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
              f"review {result['paths']['report']}")

    notify_reviewers = PythonOperator(task_id="notify_reviewers", python_callable=notify)
    train = BashOperator(task_id="train", bash_command="echo train on " + RUNS + "/{{ ds }}/clean/")

    scan >> branch >> [train, notify_reviewers]
