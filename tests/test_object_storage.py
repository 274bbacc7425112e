"""Scans on object storage, against a real S3-compatible server (moto in server mode) that these
tests start on localhost and stop: same results as a local run, the commit protocol, credentials kept out."""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import DIGITS_CONFIG, POISONED, gaussian_table, read_outputs, run_cli, same_rows, write

KEY_ID, SECRET = "AKIAPGTESTKEY0000001", "pg-secret-Zq81xXr0vWm3"


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    import boto3

    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    bucket = "pg-" + request.node.name.replace("_", "-")[-40:].strip("-").lower()
    client.create_bucket(Bucket=bucket)
    client.upload_file(str(POISONED), bucket, "data/train/digits_poisoned.parquet")
    return client, bucket


def _objects(client, bucket, prefix=""):
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def _table(data: bytes):
    return pq.read_table(io.BytesIO(data))


def _scan(bucket, *extra, before=()):
    return run_cli(*before, "scan", f"s3://{bucket}/data/train/", "--config", DIGITS_CONFIG, "--out",
                   f"s3://{bucket}/runs/today", "--state", f"s3://{bucket}/state", *extra)


def test_s3_scan_matches_a_local_scan_and_keeps_credentials_out(s3, tmp):
    client, bucket = s3
    run_id = "scheduled__2026-11-29T00:00:00+00:00"
    code, stdout, stderr = _scan(bucket, "--run-id", run_id, "--output", "json", before=("--log-format", "json"))
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    local_code, _, _ = run_cli("scan", POISONED, "--config", DIGITS_CONFIG, "--out", tmp / "run", "--quiet",
                            "--run-id", run_id)
    assert local_code == 0
    from poisonguard.run.remote import published

    run = published(f"s3://{bucket}/runs/today")
    assert run["run_id"] == run_id and result["paths"]["clean"] == run["files"]["clean/part-00000-000000000000.parquet"].rsplit("/", 1)[0]
    objects = _objects(client, bucket)
    prefix = f"runs/today/{run['attempt']}/"
    local_clean, local_held = read_outputs(tmp / "run")
    remote_clean = _table(objects[prefix + "clean/part-00000-000000000000.parquet"])
    remote_held = _table(objects[prefix + "quarantine/part-00000-000000000000.parquet"])
    assert same_rows(remote_clean, local_clean) and same_rows(remote_held, local_held)
    summary = json.loads(objects[prefix + "summary.json"])
    local_summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["counts"] == local_summary["counts"] and summary["per_class"] == local_summary["per_class"]
    assert summary["run_id"] == run_id  # verbatim
    assert summary["inputs"][0]["path"] == f"s3://{bucket}/data/train/digits_poisoned.parquet"
    assert summary["provenance"]["log"] == f"s3://{bucket}/runs/poisonguard-provenance.jsonl"
    assert summary["parameters"]["state"] == f"s3://{bucket}/state"
    # every file in the manifest is there with the bytes it lists
    import hashlib

    for entry in run["manifest"]:
        assert hashlib.sha256(objects[prefix + entry["path"]]).hexdigest() == entry["sha256"]
    events = [json.loads(line) for line in objects["runs/poisonguard-provenance.jsonl"].splitlines()]
    assert [e["eventType"] for e in events] == ["START", "COMPLETE"]
    assert events[1]["inputs"][0]["namespace"] == f"s3://{bucket}"
    assert events[1]["inputs"][0]["name"] == "data/train/digits_poisoned.parquet"
    assert {o["namespace"] for o in events[1]["outputs"]} == {f"s3://{bucket}"}
    assert all(o["name"].startswith(prefix) for o in events[1]["outputs"])
    assert any(key.startswith("state/runs/") for key in objects)  # the drift baseline went back
    everything = b"".join(objects.values()) + stdout.encode() + stderr.encode()
    assert SECRET.encode() not in everything and KEY_ID.encode() not in everything
    code, out, _ = run_cli("verify-log", f"s3://{bucket}/runs/poisonguard-provenance.jsonl",
                           "--head", result["provenance_head"])
    assert code == 0 and ": OK: " in out


def test_success_is_written_last_and_an_interrupted_publish_leaves_the_previous_run(s3, monkeypatch):
    from poisonguard import storage
    from poisonguard.run.remote import published

    client, bucket = s3
    out = f"s3://{bucket}/runs/today"
    written = []
    real_write, real_upload = storage.write_bytes, storage.upload
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (written.append(uri), real_write(uri, data)))
    monkeypatch.setattr(storage, "upload", lambda local, uri: (written.append(uri), real_upload(local, uri)))
    assert _scan(bucket, "--run-id", "first", "--quiet")[0] == 0
    in_run = [uri for uri in written if uri.startswith(out + "/")]
    assert in_run[-1] == out + "/_SUCCESS" and in_run[-2].endswith("/MANIFEST.json")
    not_state = [uri for uri in written if f"{bucket}/state/" not in uri]
    assert not_state[-1].endswith("runs/poisonguard-provenance.jsonl")  # COMPLETE committed after the publish
    first = published(out)

    def killed_midway(local, uri):  # Ctrl-C (or SIGTERM) after two files of the second run
        if len(killed_midway.calls) == 2:
            raise KeyboardInterrupt
        killed_midway.calls.append(uri)
        real_upload(local, uri)

    killed_midway.calls = []
    monkeypatch.setattr(storage, "upload", killed_midway)
    assert _scan(bucket, "--run-id", "second", "--quiet")[0] == 130
    assert published(out) == first  # readers still see the first run, whole
    for rel, uri in first["files"].items():
        assert storage.read_bytes(uri) is not None, rel
    log = _objects(client, bucket, "runs/poisonguard-provenance.jsonl")["runs/poisonguard-provenance.jsonl"]
    assert [json.loads(line)["eventType"] for line in log.splitlines()] == ["START", "COMPLETE", "START", "FAIL"]

    def log_refused(self):  # the commit fails after _SUCCESS was replaced: the first run comes back
        raise OSError("log store unavailable")

    monkeypatch.setattr(storage, "upload", real_upload)
    from poisonguard.run import remote

    monkeypatch.setattr(remote._Mirror, "push", log_refused)
    code, _, stderr = _scan(bucket, "--run-id", "third", "--quiet")
    assert code != 0 and published(out) == first
    monkeypatch.undo()
    for key, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": client.meta.endpoint_url}.items():
        monkeypatch.setenv(key, value)
    code, _, stderr = _scan(bucket, "--run-id", "fourth", "--quiet")
    assert code == 0, stderr
    assert "could not" not in stderr, stderr
    latest = published(out)
    assert latest["run_id"] == "fourth"
    attempts = {key.split("/")[2] for key in _objects(client, bucket, "runs/today/") if key.count("/") > 2}
    assert attempts == {latest["attempt"]}  # interrupted and replaced attempts are cleaned up


def test_a_reader_is_told_when_success_or_the_manifest_is_not_a_run_pointer(s3):
    import hashlib

    from poisonguard.errors import InputError
    from poisonguard.run.remote import published

    client, bucket = s3
    manifest = b'{"files": [{"path": 3}]}'
    for prefix, success, needle in (
            ("array", b"[1]", "_SUCCESS is not a poisonguard run pointer"),
            ("deep", b"[" * 100_000 + b"]" * 100_000, "_SUCCESS is not a poisonguard run pointer"),
            ("files", json.dumps({"run_id": "r", "attempt": "a", "manifest": "a/MANIFEST.json",
                                  "manifest_sha256": hashlib.sha256(manifest).hexdigest()}).encode(),
             "the manifest's file list is malformed")):
        client.put_object(Bucket=bucket, Key=f"{prefix}/_SUCCESS", Body=success)
        client.put_object(Bucket=bucket, Key=f"{prefix}/a/MANIFEST.json", Body=manifest)
        with pytest.raises(InputError, match=re.escape(needle)):
            published(f"s3://{bucket}/{prefix}")


def test_a_scheme_without_its_package_is_exit_2_naming_the_extra(tmp):
    code, _, stderr = run_cli("scan", "az://container/train.parquet", "--config", DIGITS_CONFIG, "--out", tmp / "run")
    assert code == 2
    assert "pip install 'poisonguard[azure]'" in stderr and "az://container/train.parquet" in stderr
    code, _, stderr = run_cli("scan", POISONED, "--config", DIGITS_CONFIG, "--out", "nosuch://x/run")
    assert code == 2 and "nosuch://x/" in stderr and "nosuch" in stderr.split(": ")[-1]
    assert len(stderr.strip().splitlines()) == 1


def test_credentials_written_into_a_uri_are_not_recorded(s3, tmp):
    client, bucket = s3
    endpoint = client.meta.endpoint_url.split("://", 1)[1]
    source = f"s3://{KEY_ID}:{SECRET}@{bucket}/data/train/digits_poisoned.parquet?endpoint_override={endpoint}&scheme=http"
    code, stdout, stderr = run_cli("scan", source, "--config", DIGITS_CONFIG, "--out", tmp / "run",
                                   "--output", "json")
    assert code == 0, stderr
    recorded = b"".join(p.read_bytes() for p in tmp.rglob("*") if p.is_file()) + (stdout + stderr).encode()
    assert SECRET.encode() not in recorded and endpoint.encode() not in recorded
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["inputs"][0]["path"] == f"s3://{bucket}/data/train/digits_poisoned.parquet"


def test_an_s3_glob_reads_what_matches(s3, tmp):
    client, bucket = s3
    client.upload_file(str(POISONED), bucket, "data/other/skip.txt")
    code, _, stderr = run_cli("scan", f"s3://{bucket}/data/*/digits_*.parquet", "--config", DIGITS_CONFIG,
                              "--out", tmp / "run", "--quiet")
    assert code == 0, stderr
    inputs = json.loads((tmp / "run" / "summary.json").read_text())["inputs"]
    assert [i["path"] for i in inputs] == [f"s3://{bucket}/data/train/digits_poisoned.parquet"]
    code, _, stderr = run_cli("scan", f"s3://{bucket}/data/*/nothing_*.parquet", "--out", tmp / "run2")
    assert code == 2 and "no Parquet file found here" in stderr


def test_review_with_state_and_log_on_s3_feeds_the_next_scan(s3, tmp):
    from conftest import read_review, write_rows

    client, bucket = s3
    state, log = f"s3://{bucket}/pg/state", f"s3://{bucket}/pg/provenance.jsonl"
    args = ("--config", DIGITS_CONFIG, "--state", state, "--provenance-log", log, "--quiet")
    assert run_cli("scan", POISONED, "--out", tmp / "one", *args)[0] == 0
    rows = read_review(tmp / "one" / "review.csv")
    for row in rows[:2]:
        row["decision"] = "release"
    code, stdout, stderr = run_cli("review", tmp / "one", "--decisions", write_rows(tmp / "d.csv", rows[:2]),
                                   "--reviewer", "ana")
    assert code == 0, stderr
    assert state in stdout and log in stdout
    assert any(k.startswith("pg/state/decisions") for k in _objects(client, bucket, "pg/state/"))
    assert run_cli("report", tmp / "one")[0] == 0  # the decisions read from the log on S3
    shown = {r["id"]: r["status"] for r in read_review(tmp / "one" / "review.csv")}
    assert [shown[r["id"]] for r in rows[:2]] == ["released", "released"]
    assert run_cli("scan", POISONED, "--out", tmp / "two", *args)[0] == 0
    clean = read_outputs(tmp / "two")[0]
    released = [i for i, s in zip(clean.column("id").to_pylist(), clean.column("review_status").to_pylist())
                if s == "released"]
    assert sorted(released) == sorted(r["id"] for r in rows[:2])
    assert run_cli("verify-log", log)[0] == 0


def _published_with_log(bucket):
    log = f"s3://{bucket}/pg/provenance.jsonl"
    code, _, stderr = _scan(bucket, "--provenance-log", log, "--quiet")
    assert code == 0, stderr
    return f"s3://{bucket}/runs/today", log


def test_review_and_report_read_a_published_run_where_it_was_published(s3, tmp):
    from conftest import read_review, write_rows

    client, bucket = s3
    run, log = _published_with_log(bucket)
    code, _, stderr = run_cli("report", run)
    assert code == 2 and "--to" in stderr and len(stderr.strip().splitlines()) == 1
    code, stdout, stderr = run_cli("report", run, "--to", tmp / "seen")
    assert code == 0, stderr
    assert stdout.strip() == str(tmp / "seen" / "report.html") and "checked against the COMPLETE record" in \
        (tmp / "seen" / "report.html").read_text()
    rows = read_review(tmp / "seen" / "review.csv")
    assert rows and {r["status"] for r in rows} == {"undecided"}
    hint = f"poisonguard review s3://{bucket}/runs/today --decisions review.csv"  # the command a reviewer runs
    published_page = next(v for k, v in _objects(client, bucket, "runs/today/").items() if k.endswith("/report.html"))
    assert hint in published_page.decode() and hint in (tmp / "seen" / "report.html").read_text()
    for row in rows[:2]:
        row["decision"] = "release"
    rows[2]["decision"] = "confirm"
    before = _objects(client, bucket, "runs/")
    clean_id = _table(next(v for k, v in before.items() if "/clean/" in k)).column("id")[0].as_py()
    wrong = write_rows(tmp / "wrong.csv", [{**rows[0], "id": clean_id}])
    code, _, stderr = run_cli("review", run, "--decisions", wrong, "--reviewer", "ana")
    assert code == 2 and f"id {clean_id!r} is in this run's clean output, not its quarantine" in stderr
    client.upload_file(str(write_rows(tmp / "d.csv", rows[:3])), bucket, "decisions/today.csv")
    code, _, stderr = run_cli("review", run, "--decisions", f"s3://{bucket}/decisions/nosuch.csv", "--reviewer", "ana")
    assert code == 2 and f"file s3://{bucket}/decisions/nosuch.csv: no such file" in stderr
    client.put_object(Bucket=bucket, Key="decisions/empty.csv", Body=b"id,decision\n")
    code, _, stderr = run_cli("review", run, "--decisions", f"s3://{bucket}/decisions/empty.csv", "--reviewer", "ana")
    assert code == 2 and f"file s3://{bucket}/decisions/empty.csv: decisions file has no rows" in stderr
    from poisonguard import storage

    def no_write(*args):
        raise AssertionError(f"a dry run wrote {args[-1]}")

    with pytest.MonkeyPatch.context() as patch:  # not even the same bytes back
        patch.setattr(storage, "write_bytes", no_write)
        patch.setattr(storage, "upload", no_write)
        code, stdout, stderr = run_cli("review", run, "--decisions", f"s3://{bucket}/decisions/today.csv",
                                       "--reviewer", "ana", "--dry-run")
    assert code == 0 and "2 release and 1 confirm decision(s) would be recorded" in stdout, stderr
    code, stdout, stderr = run_cli("review", run, "--decisions", f"s3://{bucket}/decisions/today.csv",
                                   "--reviewer", "ana")
    assert code == 0, stderr
    assert "recorded 2 release and 1 confirm" in stdout
    assert _objects(client, bucket, "runs/") == before  # the published run is read, never rewritten
    code, stdout, stderr = run_cli("report", run, "--to", f"s3://{bucket}/reports/today")
    assert code == 0, stderr
    assert stdout.strip() == f"s3://{bucket}/reports/today/report.html"
    reports = _objects(client, bucket, "reports/today/")
    assert set(reports) == {"reports/today/report.html", "reports/today/review.csv"}
    statuses = {r["id"]: r["status"] for r in csv.DictReader(io.StringIO(reports["reports/today/review.csv"].decode()))}
    assert [statuses[r["id"]] for r in rows[:3]] == ["released", "released", "confirmed"]
    assert sum(s == "undecided" for s in statuses.values()) == len(rows) - 3
    assert run_cli("verify-log", log)[0] == 0


def test_a_published_run_changed_after_its_manifest_is_refused_and_nothing_lands_outside_the_copy(s3, tmp):
    import hashlib

    from conftest import read_review, write_rows

    client, bucket = s3
    run, log = _published_with_log(bucket)
    assert run_cli("report", run, "--to", tmp / "seen")[0] == 0
    rows = read_review(tmp / "seen" / "review.csv")[:1]
    rows[0]["decision"] = "release"
    decisions = write_rows(tmp / "d.csv", rows)
    objects = _objects(client, bucket, "runs/today/")
    part = next(k for k in objects if "/quarantine/" in k and k.endswith(".parquet"))
    client.put_object(Bucket=bucket, Key=part, Body=objects[part][:-8] + b"\0" * 8)
    for command in (("review", run, "--decisions", decisions, "--reviewer", "ana"),
                    ("report", run, "--to", tmp / "again")):
        code, _, stderr = run_cli(*command)
        assert code == 2, stderr
        assert "differs from the run's manifest" in stderr and part.rsplit("/", 1)[1] in stderr
        assert len(stderr.strip().splitlines()) == 1
    assert not (tmp / "again").exists()
    pointer = json.loads(objects["runs/today/_SUCCESS"])
    manifest = json.loads(objects[f"runs/today/{pointer['manifest']}"])

    def republish(files):
        body = json.dumps({**manifest, "files": files}).encode()
        client.put_object(Bucket=bucket, Key=f"runs/today/{pointer['manifest']}", Body=body)
        client.put_object(Bucket=bucket, Key="runs/today/_SUCCESS",
                          Body=json.dumps({**pointer, "manifest_sha256": hashlib.sha256(body).hexdigest()}).encode())

    # a writer who also rewrites the manifest: the COMPLETE record in the log still holds the published hash
    held = _table(objects[part])
    sink = io.BytesIO()
    pq.write_table(held.slice(1), sink)
    client.put_object(Bucket=bucket, Key=part, Body=sink.getvalue())
    rel = part.split("/", 3)[3]
    republish([{**f, "sha256": hashlib.sha256(sink.getvalue()).hexdigest()} if f["path"] == rel else f
               for f in manifest["files"]])
    code, _, stderr = run_cli("review", run, "--decisions", decisions, "--reviewer", "ana")
    assert code == 2 and "changed since the run was published" in stderr
    assert f"file s3://{bucket}/runs/today/{pointer['attempt']}/{rel}:" in stderr and "poisonguard-" not in stderr
    client.put_object(Bucket=bucket, Key=part, Body=objects[part])
    republish([{**manifest["files"][0], "path": "../../escaped.txt"}, *manifest["files"][1:]])
    code, _, stderr = run_cli("review", run, "--decisions", decisions, "--reviewer", "ana")
    assert code == 2 and "the manifest names a file outside the run: '../../escaped.txt'" in stderr
    assert "decisions" not in "".join(_objects(client, bucket, "state/"))  # nothing applied


def test_a_suite_is_inferred_from_trusted_data_on_object_storage_and_written_there(s3, tmp):
    client, bucket = s3
    code, stdout, stderr = run_cli("suite", "infer", f"s3://{bucket}/data/train/", "--out",
                                   f"s3://{bucket}/expectations/train.json", "--config", DIGITS_CONFIG)
    assert code == 0, stderr
    assert stdout.startswith(f"wrote s3://{bucket}/expectations/train.json: ")
    remote = json.loads(_objects(client, bucket, "expectations/")["expectations/train.json"])
    assert run_cli("suite", "infer", POISONED, "--out", tmp / "train.json", "--config", DIGITS_CONFIG)[0] == 0
    local = json.loads((tmp / "train.json").read_text())
    text = json.dumps(remote)
    assert f"s3://{bucket}/data/train/digits_poisoned.parquet (sha256 " in text and "poisonguard-" not in text
    assert json.loads(text.replace(f"s3://{bucket}/data/train/digits_poisoned.parquet", str(POISONED))) == local
    code, _, stderr = run_cli("suite", "infer", f"s3://{bucket}/nothing/", "--out", tmp / "x.json")
    assert code == 2 and f"s3://{bucket}/nothing/" in stderr and not (tmp / "x.json").exists()


def test_a_config_on_object_storage_resolves_its_paths_beside_it(s3, tmp):
    from conftest import ROOT

    client, bucket = s3
    text = (ROOT / "configs" / "digits.yaml").read_text()
    assert "suite: ../expectations/digits_suite.json" in text
    client.put_object(Bucket=bucket, Key="pg/configs/digits.yaml", Body=text.encode())
    client.upload_file(str(ROOT / "expectations" / "digits_suite.json"), bucket, "pg/expectations/digits_suite.json")
    code, _, stderr = run_cli("scan", POISONED, "--config", f"s3://{bucket}/pg/configs/digits.yaml", "--out",
                              tmp / "remote", "--quiet", "--run-id", "r1")
    assert code == 0, stderr
    local_code, _, _ = run_cli("scan", POISONED, "--config", DIGITS_CONFIG, "--out", tmp / "local", "--quiet",
                               "--run-id", "r1")
    assert local_code == 0
    summary = json.loads((tmp / "remote" / "summary.json").read_text())
    assert summary["parameters"]["suite"] == f"s3://{bucket}/pg/expectations/digits_suite.json"
    assert all(same_rows(a, b) for a, b in zip(read_outputs(tmp / "remote"), read_outputs(tmp / "local")))
    for key, body, needle in (("pg/configs/missing.yaml", None, "cannot read config: no such object"),
                              ("pg/configs/big.yaml", b"#" * ((1 << 20) + 1), "larger than 1048576 bytes"),
                              ("pg/configs/latin1.yaml", "seed: 1 # caf\xe9".encode("latin-1"), "not UTF-8 text")):
        if body is not None:
            client.put_object(Bucket=bucket, Key=key, Body=body)
        code, _, stderr = run_cli("scan", POISONED, "--config", f"s3://{bucket}/{key}", "--out", tmp / "x")
        assert code == 2 and needle in stderr and f"s3://{bucket}/{key}" in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1


def test_gcs_retries_are_bounded_unless_the_uri_sets_them():
    """Arrow's GCS client retries an unreachable store for 15 minutes by default: a scan of a gs://
    location with no route to it hung that long.  poisonguard bounds it at 60 s; a URI's own
    retry_limit_seconds stands."""
    import datetime

    from poisonguard.storage import GCS_RETRY_LIMIT_S, filesystem

    def limit(uri):
        fs, path = filesystem(uri)
        assert path == "bucket/x.parquet"
        return fs.__reduce__()[1][0]["retry_time_limit"]

    assert limit("gs://bucket/x.parquet") == datetime.timedelta(seconds=GCS_RETRY_LIMIT_S) == datetime.timedelta(seconds=60)
    assert limit("gs://bucket/x.parquet?retry_limit_seconds=5") == datetime.timedelta(seconds=5)


def test_a_hive_partitioned_prefix_reads_its_folder_keys(s3, tmp):
    client, bucket = s3
    table = gaussian_table(60, 2, 3)
    for label in (0, 1):
        rows = table.filter(pc.equal(table.column("label"), label)).drop_columns(["label"])
        local = write(rows, tmp / "lake" / "day=2026-11-01" / f"label={label}" / "part-0.parquet")
        client.upload_file(str(local), bucket, f"lake/day=2026-11-01/label={label}/part-0")  # no .parquet suffix
    # a Spark job's leftover attempt and a hidden copy: left out below a prefix and a local folder alike
    for key in ("lake/_temporary/label=0/part-0", "lake/day=2026-11-01/.label=1/part-0"):
        client.upload_file(str(local), bucket, key)
        write(rows, tmp / key.replace("part-0", "part-0.parquet"))
    code, _, stderr = run_cli("scan", f"s3://{bucket}/lake/*/*/part-*", "--out", tmp / "run", "--quiet",
                              "--set", "partitioning=hive")
    assert code == 0, stderr
    code, _, stderr = run_cli("scan", tmp / "lake", "--out", tmp / "local_run", "--quiet", "--set", "partitioning=hive")
    assert code == 0, stderr
    (clean, held), (local_clean, local_held) = read_outputs(tmp / "run"), read_outputs(tmp / "local_run")
    assert clean.schema.names[:5] == ["id", "embedding", "note", "weight", "day"] and "label" in clean.schema.names
    for remote_rows, local_rows in ((clean, local_clean), (held, local_held)):
        assert sorted(zip(*(remote_rows.column(c).to_pylist() for c in ("id", "label", "day")))) == \
            sorted(zip(*(local_rows.column(c).to_pylist() for c in ("id", "label", "day"))))
    inputs = json.loads((tmp / "run" / "summary.json").read_text())["inputs"]
    assert [i["path"] for i in inputs] == [f"s3://{bucket}/lake/day=2026-11-01/label={label}/part-0" for label in (0, 1)]
    local_inputs = json.loads((tmp / "local_run" / "summary.json").read_text())["inputs"]
    day = tmp / "lake" / "day=2026-11-01"
    assert [i["path"] for i in local_inputs] == [str(day / f"label={label}" / "part-0.parquet") for label in (0, 1)]


def test_a_local_copy_keeps_only_the_partition_folders_of_an_object_name():
    from pathlib import Path

    from poisonguard.errors import InputError
    from poisonguard.run.remote import _local_below

    assert _local_below("a/../day=1/../../label=2/part-0", "s3://b/x") == Path("day=1/label=2/part-0.parquet")
    assert _local_below("day=1/..", "s3://b/x") == Path("day=1/part.parquet")
    with pytest.raises(InputError, match="cannot be a local file name"):
        _local_below("day=" + "x" * 300 + "/f.parquet", "s3://b/x")


def test_a_path_in_a_config_on_object_storage_resolves_within_its_bucket_and_keeps_the_options():
    from poisonguard.storage import beside

    config = "s3://lake/pg/configs/train.yaml?endpoint_override=127.0.0.1:9000&scheme=http"
    assert beside(config, "../suites/train.json") == \
        "s3://lake/pg/suites/train.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert beside("gs://lake/train.yaml", "../../../etc/x.json") == "gs://lake/etc/x.json"
    assert beside("s3://lake/a/b.yaml", "./state") == "s3://lake/a/state"


def test_one_filesystem_per_bucket_gives_arrows_own_paths(s3, monkeypatch):
    """Building an Arrow filesystem looks the bucket's region up, one round trip to the store; a run
    reads and writes many objects of one bucket, so the filesystem is built once per bucket and
    credentials.  The object paths are those Arrow's own ``from_uri`` gives."""
    import pyarrow.fs as pafs

    from poisonguard import storage

    client, bucket = s3
    uris = [f"s3://{bucket}/data/train/digits_poisoned.parquet", f"s3://{bucket}/a%20b//c%2F", f"s3://{bucket}/",
            f"s3://{KEY_ID}:{SECRET}@{bucket}/x/y/"]
    opened = [storage.filesystem(uri) for uri in uris]
    assert [path for _, path in opened] == [pafs.FileSystem.from_uri(uri)[1] for uri in uris]
    assert opened[0][0] is opened[1][0] is opened[2][0]  # one bucket, one filesystem
    assert opened[3][0] is not opened[0][0]  # credentials of its own
    assert storage.read_bytes(uris[0]) == client.get_object(Bucket=bucket, Key="data/train/digits_poisoned.parquet")["Body"].read()
    assert storage.filesystem(uris[0])[0] is opened[0][0]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")  # new credentials: a new filesystem
    assert storage.filesystem(uris[0])[0] is not opened[0][0]
