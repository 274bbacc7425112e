"""Append-only, hash-chained provenance log of OpenLineage-shaped RunEvents.

Each line is one JSON record.  Besides the OpenLineage fields it carries
``poisonguard_seq`` (0, 1, 2, ...), ``poisonguard_prev_sha256`` (the record_sha256 of the line
before, 64 zeros for the first) and ``poisonguard_record_sha256`` (sha256 of the record's
canonical JSON without that field).  An edited byte breaks the record's own hash; a removed,
inserted or reordered record breaks the sequence or the chain.  Appends hold an exclusive
``flock`` so two scans can share one log.  Records hold ids, hashes, parameters and scores only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid

from poisonguard.locking import locked_file

PRODUCER = "https://github.com/poisonguard/poisonguard"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
GENESIS = "0" * 64
CHAIN_FIELDS = ("poisonguard_seq", "poisonguard_prev_sha256", "poisonguard_record_sha256")


def new_run_id() -> str:
    return str(uuid.uuid4())


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_event(event_type: str, run_id: str, *, job: str = "scan", inputs=None, outputs=None,
              facets: dict | None = None) -> dict:
    return {
        "eventType": event_type,
        "eventTime": now_iso(),
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
        "run": {"runId": run_id, "facets": facets or {}},
        "job": {"namespace": "poisonguard", "name": job},
        "inputs": inputs or [],
        "outputs": outputs or [],
    }


def fail_event(run_id: str, inputs: list, error: BaseException) -> dict:
    from poisonguard.errors import one_line

    return run_event("FAIL", run_id, inputs=inputs, facets={"errorMessage": {
        "message": one_line(error) or type(error).__name__, "programmingLanguage": "python"}})


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "poisonguard_record_sha256"}
    return hashlib.sha256(canonical(body)).hexdigest()


def _last_record(fd: int) -> dict | None:
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return None
    chunk = min(size, 1 << 16)
    while True:
        os.lseek(fd, size - chunk, os.SEEK_SET)
        data = os.read(fd, chunk)
        lines = data.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or chunk == size:
            return json.loads(lines[-1])
        chunk = min(size, chunk * 4)


def append(path: str, event: dict) -> dict:
    """Chain and append one event under an exclusive lock; returns the record written."""
    with locked_file(path) as fd:
        last = _last_record(fd)
        record = dict(event)
        record["poisonguard_seq"] = 0 if last is None else int(last["poisonguard_seq"]) + 1
        record["poisonguard_prev_sha256"] = GENESIS if last is None else last["poisonguard_record_sha256"]
        record["poisonguard_record_sha256"] = record_hash(record)
        os.write(fd, canonical(record) + b"\n")
        os.fsync(fd)
    return record


def verify(path: str) -> tuple[bool, str]:
    """(True, summary) for an intact log; (False, 'record N (line L): why') at the first bad record."""
    prev, expected_seq = GENESIS, 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                return False, f"line {line_no}: empty line"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                return False, f"line {line_no}: not valid JSON"
            if not isinstance(record, dict) or any(f not in record for f in CHAIN_FIELDS):
                return False, f"line {line_no}: not a poisonguard record"
            seq = record["poisonguard_seq"]
            if record["poisonguard_record_sha256"] != record_hash(record) or canonical(record) + b"\n" != raw:
                return False, f"record {seq} (line {line_no}): content does not match its hash (edited)"
            if seq != expected_seq:
                return False, f"record {seq} (line {line_no}): expected record {expected_seq} (removed, inserted or reordered)"
            if record["poisonguard_prev_sha256"] != prev:
                return False, f"record {seq} (line {line_no}): does not chain to the record before it"
            prev, expected_seq = record["poisonguard_record_sha256"], expected_seq + 1
    return True, f"{expected_seq} records, chain intact, head {prev}"
