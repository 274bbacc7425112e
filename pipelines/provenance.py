"""Append-only, hash-chained provenance log of OpenLineage RunEvents.

Events are built with the ``openlineage-python`` client (so ``runId`` is a UUID, every facet has
``_producer`` and ``_schemaURL``) and may also go to the client's transports (:mod:`lineage`).
Each line is one JSON record; its run facet ``poisonguard_chain`` holds ``seq`` (0, 1, 2, ...),
``prev_sha256`` (the record_sha256 of the line before, 64 zeros for the first) and
``record_sha256`` (sha256 of the record's canonical JSON without that field).  An edited byte breaks
the record's own hash; a removed, inserted or reordered record breaks the sequence or the chain; a
wholesale rewrite or a cut tail is caught against a head hash kept elsewhere (``verify(head=...)``).
The scheduler's run id, verbatim, is the run facet ``poisonguard_run``.  Appends hold an exclusive
``flock`` so scans and reviews can share one log; a write is looped until complete and rolled back
if it fails, and a torn last line left by a crash is moved aside (and reported) before the next
append.  Records hold ids, hashes, parameters and scores only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import keyword
import logging
import os
import uuid

from poisonguard import lineage
from poisonguard.errors import InputError
from poisonguard.locking import locked_file

PRODUCER = "https://github.com/poisonguard/poisonguard"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
GENESIS = "0" * 64
CHAIN, RUN = "poisonguard_chain", "poisonguard_run"
LEGACY_CHAIN_FIELDS = ("poisonguard_seq", "poisonguard_prev_sha256", "poisonguard_record_sha256")
RUN_NAMESPACE = uuid.UUID("6f1c0a2e-5b7d-4c1e-9a55-2d3b1e0f7c42")  # scheduler run id -> lineage runId
log = logging.getLogger("poisonguard")


def new_run_id() -> str:
    return str(uuid.uuid4())


def lineage_run_id(run_id: str) -> str:
    """The OpenLineage ``runId`` (a UUID) of a poisonguard run id: itself when it is a UUID, else a
    UUID derived from it, so every event of one run id shares it (a retry reusing its id too)."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return str(uuid.uuid5(RUN_NAMESPACE, run_id))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _facet(base, name: str, value: dict):
    """One of our facets as the client builds custom facets: ``_producer`` and a ``_schemaURL``."""
    bad = [key for key in value if not key.isidentifier() or keyword.iskeyword(key)]
    if bad:
        raise ValueError(f"facet {name} has keys that are not identifiers: {bad}")
    return _facet_class(base, name)(producer=PRODUCER).with_additional_properties(**value)


@functools.lru_cache(maxsize=256)
def _facet_class(base, name: str):
    """One class per facet name (a scan's hundreds of output parts share two)."""
    schema = f"{PRODUCER}/spec/facets/{name}.json"
    return type(name, (base,), {"_get_schema": staticmethod(lambda: schema)})


def _run_facets(facets: dict):
    from openlineage.client.facet_v2 import RunFacet, error_message_run

    out = {}
    for name, value in facets.items():
        if name == "errorMessage":
            out[name] = error_message_run.ErrorMessageRunFacet(producer=PRODUCER, **value)
        else:
            out[name] = _facet(RunFacet, name, value)
    return out


def _datasets(cls, datasets):
    from openlineage.client.facet_v2 import DatasetFacet

    return [cls(namespace=d["namespace"], name=d["name"],
                facets={k: _facet(DatasetFacet, k, v) for k, v in (d.get("facets") or {}).items()})
            for d in datasets or []]


def lineage_event(event_type: str, run_id: str, *, job: str = "scan", inputs=None, outputs=None,
                  facets: dict | None = None, event_time: str | None = None):
    """The client's typed ``RunEvent`` (its validators check the UUID, the time and the type)."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState

    return RunEvent(eventType=RunState(event_type), eventTime=event_time or now_iso(), producer=PRODUCER,
                    run=Run(runId=lineage_run_id(run_id),
                            facets=_run_facets({RUN: {"run_id": run_id}, **(facets or {})})),
                    job=Job(namespace="poisonguard", name=job),
                    inputs=_datasets(InputDataset, inputs), outputs=_datasets(OutputDataset, outputs))


def run_event(event_type: str, run_id: str, **kwargs) -> dict:
    """A RunEvent as the dict the log holds (the client's own serialisation: no null fields)."""
    from openlineage.client.serde import Serde

    return Serde.to_dict(lineage_event(event_type, run_id, **kwargs))


def as_lineage_event(record: dict):
    """A log record back as the client's typed RunEvent, chain facet included: ValueError,
    TypeError or KeyError if it is not one.  ``Serde.to_dict`` of it gives the record back."""
    run = record["run"]
    facets = _bare(run.get("facets", {}))
    run_id = facets.pop(RUN)["run_id"]
    if lineage_run_id(run_id) != run["runId"]:
        raise ValueError("runId does not belong to the poisonguard run id")
    datasets = lambda key: [{**d, "facets": _bare(d.get("facets", {}))} for d in record.get(key, [])]
    return lineage_event(record["eventType"], run_id, job=record["job"]["name"], inputs=datasets("inputs"),
                         outputs=datasets("outputs"), facets=facets, event_time=record["eventTime"])


def _bare(facets: dict) -> dict:
    """Facets without the ``_producer`` / ``_schemaURL`` the client stamps on again."""
    return {name: {k: v for k, v in value.items() if k not in ("_producer", "_schemaURL")}
            for name, value in facets.items()}


def fail_event(run_id: str, inputs: list, error: BaseException) -> dict:
    from poisonguard.errors import one_line

    return run_event("FAIL", run_id, inputs=inputs, facets={"errorMessage": {
        "message": one_line(error) or type(error).__name__, "programmingLanguage": "python"}})


def run_id_of(record: dict) -> str | None:
    """The poisonguard (scheduler) run id a record belongs to."""
    return ((record.get("run") or {}).get("facets") or {}).get(RUN, {}).get("run_id")


def chain_of(record: dict) -> dict:
    """``{"seq", "prev_sha256", "record_sha256"}`` of a record (KeyError/TypeError if it has none).
    Records written before the chain became a facet carry it as top-level fields."""
    facet = ((record.get("run") or {}).get("facets") or {}).get(CHAIN)
    if facet is not None:
        return {"seq": facet["seq"], "prev_sha256": facet["prev_sha256"], "record_sha256": facet["record_sha256"]}
    seq, prev, sha = (record[f] for f in LEGACY_CHAIN_FIELDS)
    return {"seq": seq, "prev_sha256": prev, "record_sha256": sha}


def head_of(record: dict) -> str:
    return chain_of(record)["record_sha256"]


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def record_hash(record: dict) -> str:
    """sha256 of the record's canonical JSON without its own ``record_sha256``."""
    body = {k: v for k, v in record.items() if k != "poisonguard_record_sha256"}
    facets = (body.get("run") or {}).get("facets") or {}
    if isinstance(facets.get(CHAIN), dict):
        chain = {k: v for k, v in facets[CHAIN].items() if k != "record_sha256"}
        body = {**body, "run": {**body["run"], "facets": {**facets, CHAIN: chain}}}
    return hashlib.sha256(canonical(body)).hexdigest()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse(raw: bytes) -> dict:
    """One record; ValueError for anything that is not strict JSON (NaN and Infinity included) or is
    nested past what the parser can follow."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


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
                int(chain_of(record)["seq"]), str(head_of(record))
                return record
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError("the last record of the provenance log is not a poisonguard record; "
                                 "run poisonguard verify-log on it", path=path) from None
        chunk = min(size, chunk * 4)


def _chain(event: dict, last: dict | None) -> dict:
    chain = {"_producer": PRODUCER, "_schemaURL": f"{PRODUCER}/spec/facets/{CHAIN}.json",
             "seq": 0 if last is None else int(chain_of(last)["seq"]) + 1,
             "prev_sha256": GENESIS if last is None else head_of(last)}
    record = {**event, "run": {**event["run"], "facets": {**event["run"].get("facets", {}), CHAIN: chain}}}
    chain["record_sha256"] = record_hash(record)
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

        def commit():
            _write_all(fd, size, canonical(record) + b"\n")
            lineage.emit(record)

        yield record, commit


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
    run_id, start_hash = start["run"]["runId"], head_of(start).encode()
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
    if ok and head is not None and not any(head_of(r) == head for r in found):
        return False, f"the log no longer holds head {head} (rewritten, or records removed from its end)"
    return ok, message


def _walk(path: str) -> tuple[bool, str, list[dict]]:
    prev, expected_seq, found = GENESIS, 0, []
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return True, "0 records (no log yet)", []
    except OSError as exc:  # a folder, or no permission: the caller's path to fix
        raise InputError(f"cannot read the provenance log: {exc.strerror}", path=path) from None
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
            try:
                chain = chain_of(record)
            except (KeyError, TypeError, AttributeError):
                return False, f"line {line_no}: not a poisonguard record", found
            seq = chain["seq"]
            if chain["record_sha256"] != record_hash(record) or canonical(record) + b"\n" != raw:
                return False, f"record {seq} (line {line_no}): content does not match its hash (edited)", found
            if seq != expected_seq:
                return False, (f"record {seq} (line {line_no}): expected record {expected_seq} "
                               "(removed, inserted or reordered)"), found
            if chain["prev_sha256"] != prev:
                return False, f"record {seq} (line {line_no}): does not chain to the record before it", found
            found.append(record)
            prev, expected_seq = chain["record_sha256"], expected_seq + 1
    return True, f"{expected_seq} records, chain intact, head {prev}", found
