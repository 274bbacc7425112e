"""Provenance as standard lineage: events the openlineage-python client accepts, sent to an HTTP
endpoint when OPENLINEAGE_URL is set, with the hash chain still verifiable."""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import CLEAN, DIGITS_CONFIG, POISONED, run_cli
from poisonguard import provenance as prov


@pytest.fixture
def lineage_server():
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            received.append((self.path, json.loads(body)))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


def _facets_all_have_producer_and_schema(event: dict) -> bool:
    facets = list(event["run"]["facets"].values())
    for dataset in event.get("inputs", []) + event.get("outputs", []):
        facets += list(dataset.get("facets", {}).values())
    return all(f["_producer"] == prov.PRODUCER and f["_schemaURL"].startswith("https://") for f in facets)


def test_events_are_openlineage_run_events_and_reach_an_http_endpoint(tmp, lineage_server, monkeypatch):
    from openlineage.client.serde import Serde

    url, received = lineage_server
    monkeypatch.setenv("OPENLINEAGE_URL", url)
    run_id = "scheduled__2026-11-29T00:00:00+00:00"
    code, _, stderr = run_cli("scan", POISONED, "--config", DIGITS_CONFIG, "--out", tmp / "run", "--quiet",
                              "--run-id", run_id)
    assert code == 0 and "could not send" not in stderr, stderr
    log = [json.loads(line) for line in (tmp / "poisonguard-provenance.jsonl").read_text().splitlines()]
    assert [e["eventType"] for _, e in received] == ["START", "COMPLETE"]
    assert all(path == "/api/v1/lineage" for path, _ in received)
    for (_, sent), record in zip(received, log):  # the log's record, chain facet included, and what the
        added = set(sent["run"]["facets"]) - set(record["run"]["facets"])  # client adds of its own (tags)
        assert all("OpenLineage/OpenLineage" in sent["run"]["facets"].pop(k)["_producer"] for k in added)
        assert sent == record
    for event in log:
        assert Serde.to_dict(prov.as_lineage_event(event)) == event  # the client's types accept it whole
        assert uuid.UUID(event["run"]["runId"]) and prov.run_id_of(event) == run_id
        assert event["schemaURL"].startswith("https://openlineage.io/spec/")
        assert _facets_all_have_producer_and_schema(event)
        assert all(d["namespace"] == "file" and d["name"].startswith("/") for d in event["inputs"] + event["outputs"])
    assert log[0]["run"]["runId"] == log[1]["run"]["runId"]
    code, stdout, _ = run_cli("verify-log", tmp / "poisonguard-provenance.jsonl")
    assert code == 0 and "2 records, chain intact" in stdout

    received.clear()  # a run that fails sends its FAIL
    code, _, _ = run_cli("scan", tmp / "missing.parquet", "--config", DIGITS_CONFIG, "--out", tmp / "run2")
    assert code == 2 and received == []  # bad input is refused before START: nothing to send
    bad = tmp / "bad.parquet"
    bad.write_bytes(CLEAN.read_bytes()[:-200])
    code, _, _ = run_cli("scan", bad, "--config", DIGITS_CONFIG, "--out", tmp / "run2")
    assert code == 2 and [e["eventType"] for _, e in received] in ([], ["START", "FAIL"])


def test_a_lineage_server_that_is_down_costs_a_warning_not_the_scan(tmp, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "http")  # the client's own settings, no retries
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__RETRY__TOTAL", "0")
    code, _, stderr = run_cli("scan", CLEAN, "--config", DIGITS_CONFIG, "--out", tmp / "run", "--quiet")
    assert code == 0
    assert "could not send the START event" in stderr and "could not send the COMPLETE event" in stderr
    assert run_cli("verify-log", tmp / "poisonguard-provenance.jsonl")[0] == 0


def test_a_log_record_edited_after_conversion_still_fails_verification(tmp):
    path = tmp / "log.jsonl"
    prov.append(str(path), prov.run_event("START", "a"))
    prov.append(str(path), prov.run_event("COMPLETE", "a"))
    lines = path.read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[1])
    edited["run"]["facets"]["poisonguard_run"]["run_id"] = "b"
    path.write_bytes(lines[0] + prov.canonical(edited) + b"\n")
    code, stdout, _ = run_cli("verify-log", path)
    assert code == 1 and "edited" in stdout
    lines.reverse()  # swapped records
    path.write_bytes(b"".join(lines))
    assert run_cli("verify-log", path)[0] == 1
