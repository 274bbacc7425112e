"""Append-only, hash-chained provenance log of OpenLineage-shaped RunEvents.

Each line is one JSON record.  Besides the OpenLineage fields it carries
``poisonguard_seq`` (0, 1, 2, ...), ``poisonguard_prev_sha256`` (the record_sha256 of the line
before, 64 zeros for the first) and ``poisonguard_record_sha256`` (sha256 of the record's
canonical JSON without that field).  An edited byte breaks the record's own hash; a removed,
inserted or reordered record breaks the sequence or the chain; a wholesale rewrite or a cut tail
is caught against a head hash kept elsewhere (``verify(head=...)``).  Appends hold an exclusive
``flock`` so scans and reviews can share one log; a write is looped until complete and rolled
back if it fails, and a torn last line left by a crash is moved aside (and reported) before the
next append.  Records hold ids, hashes, parameters and scores only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import uuid

from poisonguard.errors import InputError
from poisonguard.locking import locked_file

PRODUCER = "https://github.com/poisonguard/poisonguard"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
GENESIS = "0" * 64
CHAIN_FIELDS = ("poisonguard_seq", "poisonguard_prev_sha256", "poisonguard_record_sha256")
log = logging.getLogger("poisonguard")


def new_run_id() -> str:
    return str(uuid.uuid4())


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


STANDARD_FACETS = {"errorMessage": "https://openlineage.io/spec/facets/1-0-1/ErrorMessageRunFacet.json"}


def _facets(facets: dict | None) -> dict:
    """Every facet with the ``_producer`` and ``_schemaURL`` the OpenLineage spec asks of a facet."""
    out = {}
    for name, value in (facets or {}).items():
        schema = STANDARD_FACETS.get(name, f"{PRODUCER}/spec/facets/{name}.json")
        out[name] = {"_producer": PRODUCER, "_schemaURL": schema, **value} if isinstance(value, dict) else value
    return out


def _datasets(datasets) -> list[dict]:
    return [{**d, "facets": _facets(d.get("facets"))} for d in datasets or []]


def run_event(event_type: str, run_id: str, *, job: str = "scan", inputs=None, outputs=None,
              facets: dict | None = None) -> dict:
    return {
        "eventType": event_type,
        "eventTime": now_iso(),
        "producer": PRODUCER,
        "schemaURL": SCHEMA_URL,
        "run": {"runId": run_id, "facets": _facets(facets)},
        "job": {"namespace": "poisonguard", "name": job},
        "inputs": _datasets(inputs),
        "outputs": _datasets(outputs),
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


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(raw: bytes) -> dict:
    """One record; ValueError for anything that is not strict JSON (NaN and Infinity included)."""
    return json.loads(raw, parse_constant=_reject_constant)


# ---- appending -------------------------------------------------------------------------------

def _repair_tail(fd: int, path: str) -> int:
    """Move a torn last line (no newline: a crash mid-write) aside; return the log's size."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return 0
    os.lseek(fd, size - 1, os.SEEK_SET)
    if os.read(fd, 1) == b"\n":
        return size
    chunk = min(size, 1 << 16)
    while True:
        os.lseek(fd, size - chunk, os.SEEK_SET)
        data = os.read(fd, chunk)
        cut = data.rfind(b"\n")
        if cut >= 0 or chunk == size:
            keep = size - chunk + cut + 1
            break
        chunk = min(size, chunk * 4)
    os.lseek(fd, keep, os.SEEK_SET)
    torn = os.read(fd, size - keep)
    aside = f"{path}.torn-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}"
    with open(aside, "wb") as handle:
        handle.write(torn)
    os.ftruncate(fd, keep)
    os.fsync(fd)
    log.warning("provenance log %s ended in a torn record (%d bytes, a crash mid-write); moved it to %s",
                path, len(torn), aside)
    return keep


def _last_record(fd: int, size: int, path: str) -> dict | None:
    if size == 0:
        return None
    chunk = min(size, 1 << 16)
    while True:
        os.lseek(fd, size - chunk, os.SEEK_SET)
        lines = os.read(fd, chunk).rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or chunk == size:
            try:
                record = parse(lines[-1])
                int(record["poisonguard_seq"]), str(record["poisonguard_record_sha256"])
                return record
            except (ValueError, KeyError, TypeError):
                raise InputError("the last record of the provenance log is not a poisonguard record; "
                                 "run poisonguard verify-log on it", path=path) from None
        chunk = min(size, chunk * 4)


def _chain(event: dict, last: dict | None) -> dict:
    record = dict(event)
    record["poisonguard_seq"] = 0 if last is None else int(last["poisonguard_seq"]) + 1
    record["poisonguard_prev_sha256"] = GENESIS if last is None else last["poisonguard_record_sha256"]
    record["poisonguard_record_sha256"] = record_hash(record)
    return record


def _write_all(fd: int, size: int, data: bytes) -> None:
    """Write every byte at the end, or leave the log as it was (a short write on a full disk)."""
    try:
        os.lseek(fd, size, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


def append(path: str, event: dict) -> dict:
    """Chain and append one event under an exclusive lock; returns the record written."""
    with chained(path, event) as (record, commit):
        commit()
    return record


@contextlib.contextmanager
def chained(path: str, event: dict):
    """Chain ``event`` to the log's head and hold the lock: yields (record, commit).

    Nothing is written until ``commit()``; the scan calls it as the last step of its publish, so a
    COMPLETE record exists only for a published run and no other record can slip in between.
    """
    with locked_file(path, append=False) as fd:
        size = _repair_tail(fd, path)
        record = _chain(event, _last_record(fd, size, path))
        yield record, lambda: _write_all(fd, size, canonical(record) + b"\n")


# ---- reading ---------------------------------------------------------------------------------

def records(path: str):
    """Every record of an intact log, in order; InputError naming the first bad record otherwise."""
    ok, message, found = _walk(path)
    if not ok:
        raise InputError(f"provenance log fails verification: {message}", path=path)
    return found


def review_decisions(path: str):
    """(decision, review facet, record) of every decision the verified log's ``review`` records hold,
    oldest first (so a later decision for the same row and content replaces an earlier one)."""
    for record in records(path):
        review = record.get("run", {}).get("facets", {}).get("poisonguard_review")
        if record.get("job", {}).get("name") == "review" and isinstance(review, dict):
            for decision in review.get("decisions", []):
                yield decision, review, record


def events_of_run(path: str, start: dict) -> list[dict]:
    """A scan's events so far: its START record and the later records of the same run id.

    Read backwards from the end of the log (the scan's records are its last ones), so the cost does
    not grow with the log; the whole chain is checked by ``verify``.
    """
    run_id, start_hash = start["run"]["runId"], start["poisonguard_record_sha256"].encode()
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        chunk = 1 << 16
        while True:
            begin = max(0, size - chunk)
            handle.seek(begin)
            lines = handle.read(size - begin).split(b"\n")
            hits = [k for k, line in enumerate(lines) if start_hash in line and (k > 0 or begin == 0)]
            if hits or begin == 0:
                break
            chunk *= 4
    if not hits:
        raise InputError("the provenance log no longer holds this scan's START record", path=path)
    found = [parse(line) for line in lines[hits[-1]:] if line.strip()]
    return [r for r in found if r.get("run", {}).get("runId") == run_id]


def verify(path: str, head: str | None = None) -> tuple[bool, str]:
    """(True, summary) for an intact log; (False, 'record N (line L): why') at the first bad record.

    With ``head`` (a record hash kept elsewhere), the log must still hold that record: a rewritten
    chain or a cut tail no longer does.
    """
    ok, message, found = _walk(path)
    if ok and head is not None and not any(r["poisonguard_record_sha256"] == head for r in found):
        return False, f"the log no longer holds head {head} (rewritten, or records removed from its end)"
    return ok, message


def _walk(path: str) -> tuple[bool, str, list[dict]]:
    prev, expected_seq, found = GENESIS, 0, []
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return True, "0 records (no log yet)", []
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return False, f"line {line_no}: torn last record (no newline)", found
            if not raw.strip():
                return False, f"line {line_no}: empty line", found
            try:
                record = parse(raw)
            except ValueError:
                return False, f"line {line_no}: not valid JSON", found
            if not isinstance(record, dict) or any(f not in record for f in CHAIN_FIELDS):
                return False, f"line {line_no}: not a poisonguard record", found
            seq = record["poisonguard_seq"]
            if record["poisonguard_record_sha256"] != record_hash(record) or canonical(record) + b"\n" != raw:
                return False, f"record {seq} (line {line_no}): content does not match its hash (edited)", found
            if seq != expected_seq:
                return False, (f"record {seq} (line {line_no}): expected record {expected_seq} "
                               "(removed, inserted or reordered)"), found
            if record["poisonguard_prev_sha256"] != prev:
                return False, f"record {seq} (line {line_no}): does not chain to the record before it", found
            found.append(record)
            prev, expected_seq = record["poisonguard_record_sha256"], expected_seq + 1
    return True, f"{expected_seq} records, chain intact, head {prev}", found
