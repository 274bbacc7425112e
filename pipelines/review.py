"""`poisonguard review`: record reviewers' decisions on a run's quarantine, in the state folder and the log."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from poisonguard import provenance as prov
from poisonguard.core.decisions import content_hashes
from poisonguard.errors import InputError
from poisonguard.io import sha256_file
from poisonguard.names import QUARANTINE, is_added_column
from poisonguard.state import DECISIONS, StateFolder
from poisonguard.workbench import csv_value


def read_decisions(path: str) -> list[dict]:
    if not Path(path).is_file():
        raise InputError("no such decisions file", path=path)
    try:
        if path.endswith(".parquet"):
            rows = pq.read_table(path).to_pylist()
        else:
            with open(path, newline="", encoding="utf-8-sig") as handle:  # a spreadsheet's BOM is dropped
                rows = [{key: csv_value(value or "") for key, value in row.items() if key is not None}
                        for row in csv.DictReader(handle)]
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start}): save the decisions as UTF-8 CSV", path=path) from None
    except csv.Error as exc:
        raise InputError(f"not a readable CSV file: {exc}", path=path) from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {str(exc).splitlines()[0][:200]}", path=path) from None
    if not rows:
        raise InputError("decisions file has no rows", path=path)
    for column in ("id", "decision"):
        if column not in rows[0]:
            raise InputError("decisions file lacks a column", path=path, column=column)
    return [r for r in rows if str(r.get("decision") or "").strip()]


def check_published(run: Path, run_id: str, log_path: str, outcome: str = "nothing applied") -> None:
    """The run's quarantine files must be the ones its COMPLETE record hashed when it was published."""
    complete = [r for r in prov.records(log_path)
                if r.get("eventType") == "COMPLETE" and r.get("job", {}).get("name") == "scan"
                and prov.run_id_of(r) == run_id]
    if not complete:
        raise InputError(f"the provenance log holds no COMPLETE record for run {run_id}", path=log_path)
    recorded = {Path(o["name"]).name: o["facets"]["poisonguard_content"]["sha256"]
                for o in complete[-1].get("outputs", []) if Path(o["name"]).parent.name == QUARANTINE}
    present = {p.name: p for p in sorted((run / QUARANTINE).glob("*.parquet"))}
    if set(present) != set(recorded):
        raise InputError("the run's quarantine files are not the ones it published", path=str(run / QUARANTINE))
    for name, path in present.items():
        if sha256_file(str(path)) != recorded[name]:
            raise InputError("changed since the run was published (its hash differs from the COMPLETE record); "
                             f"{outcome}", path=str(path))


def _clean_ids(run: Path, id_col: str, clean_ids) -> set[str]:
    from poisonguard.run.remote import clean_parts, column_of

    return clean_ids(id_col) if clean_ids is not None else column_of(str(run), clean_parts(str(run)), id_col)


def apply_review(run_dir: str, decisions_path: str, reviewer: str, state_dir: str, log_path: str,
                 clean_ids=None, dry_run: bool = False) -> dict:
    """Validate every decision first; apply none unless all are valid.  ``clean_ids(column)``: the ids
    of the run's clean output (default: read from RUN_DIR/clean), asked only where a decision names a
    row that is not in the quarantine.  ``dry_run``: every check, and the counts that would be
    recorded, but nothing written to the log or the state folder."""
    from poisonguard.run.summary import read_summary

    run = Path(run_dir)
    if not reviewer.strip():
        raise InputError("--reviewer must name the reviewer")
    summary = read_summary(run_dir)
    check_published(run, summary["run_id"], log_path)
    rows = read_decisions(decisions_path)
    if not rows:
        raise InputError("no decision filled in (the decision column is empty)", path=decisions_path)
    id_col = summary["parameters"]["columns"]["id"]
    held = pads.dataset(str(run / QUARANTINE), format="parquet").to_table()
    held_ids = held.column(id_col).cast(pa.string()).to_pylist()
    positions: dict[str, list[int]] = {}
    for i, row_id in enumerate(held_ids):
        positions.setdefault(row_id, []).append(i)
    problems, missing, seen = [], [], set()
    for number, row in enumerate(rows, start=2):
        row_id, decision = str(row["id"]), str(row["decision"]).strip().lower()
        if decision not in DECISIONS:
            problems.append((number, f"row {number}: decision {row['decision']!r} is not release or confirm"))
        if row_id in seen:
            problems.append((number, f"row {number}: id {row_id!r} has more than one decision"))
        seen.add(row_id)
        if row_id not in positions:
            missing.append((number, row_id))
    if problems or missing:
        in_clean = _clean_ids(run, id_col, clean_ids) if missing else set()
        problems += [(number, f"row {number}: id {row_id!r} " + ("is in this run's clean output, not its quarantine"
                                                                  if row_id in in_clean else "is not in this run"))
                     for number, row_id in missing]
        problems = [message for _, message in sorted(problems, key=lambda p: p[0])]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"decisions rejected, nothing applied: {'; '.join(problems[:3])}{more}", path=decisions_path)
    input_columns = [c for c in held.column_names if not is_added_column(c)]
    state = StateFolder(state_dir)
    current, _ = state.backed_decisions(log_path)
    records, when = [], prov.now_iso()
    for row in rows:
        rows_held = positions[str(row["id"])]
        taken = held.take(rows_held)
        for digest, published in zip(content_hashes(taken, input_columns), content_hashes(taken, held.column_names)):
            decision = str(row["decision"]).strip().lower()
            if current.get(str(row["id"]), {}).get(digest) == decision:
                continue  # already decided so: re-applying a file adds nothing
            records.append({"id": str(row["id"]), "content_sha256": digest, "row_sha256": published,
                            "decision": decision, "reviewer": reviewer, "note": str(row.get("note") or ""),
                            "run_id": summary["run_id"], "time": when})
    counts = {d: sum(r["decision"] == d for r in records) for d in DECISIONS}
    if records and not dry_run:
        prov.append(log_path, prov.run_event("COMPLETE", prov.new_run_id(), job="review", facets={
            "poisonguard_review": {"scan_run_id": summary["run_id"], "reviewer": reviewer, "time": when,
                                   "counts": counts, "decisions": [
                                       {k: r[k] for k in ("id", "content_sha256", "row_sha256", "decision", "note")}
                                       for r in records]}}))
        state.append_decisions(records)
    decided = {r["id"] for r in records} | {i for i in held_ids if i in current}
    counts["unchanged"] = sum(len(positions[str(r["id"])]) for r in rows) - len(records)
    counts["undecided"] = sum(1 for i in set(held_ids) if i not in decided)
    return counts
