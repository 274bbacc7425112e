"""The reviewer's table: every quarantined row, its status and its scores against the thresholds.

Built from the run folder and the provenance log (so ``poisonguard report`` after a ``review``
shows the new decisions), as compact JSON that the report's script pages, sorts and filters in the
browser.  review.csv is written in the same order (most suspicious first).
"""

from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pyarrow as pa

from poisonguard.names import DECISION_STATUS, QUARANTINE, QUARANTINE_REASONS, REPORT, REVIEW_CSV, REVIEW_STATUS, is_added_column, \
    input_labels, part_source, score_column


# OWASP CSV injection: a cell a spreadsheet would read as a formula gets a leading quote.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def csv_cell(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_value(cell: str) -> str:
    """The value ``csv_cell`` wrote."""
    return cell[1:] if cell.startswith("'") else cell


def logged_decisions(log_path: str | None) -> dict[tuple[str, str], dict]:
    """(id, content sha256) -> the latest logged decision with its reviewer, time and note."""
    from poisonguard import provenance as prov

    if not log_path or not os.path.exists(log_path):
        return {}
    return {(d["id"], d["content_sha256"]): {
        "status": DECISION_STATUS[d["decision"]], "reviewer": review.get("reviewer", ""),
        "time": review.get("time", record.get("eventTime", "")), "note": d.get("note", "")}
        for d, review, record in prov.review_decisions(log_path)}


def state_decisions(state_dir: str | None) -> dict[tuple[str, str], dict]:
    """The same, from the state folder's records (for display beside statuses the scan authenticated)."""
    from poisonguard.state import StateFolder

    if not state_dir:
        return {}
    return {(d["id"], d["content_sha256"]): {
        "status": DECISION_STATUS[d["decision"]], "reviewer": d.get("reviewer", ""), "time": d.get("time", ""),
        "note": d.get("note", "")} for d in StateFolder(state_dir).records()}


def row_statuses(run_dir: str, summary: dict, held: pa.Table, from_log: str | None) -> list[dict]:
    """Per quarantined row (in ``held``'s order): undecided, confirmed or released, by whom and when.

    In a scan, the statuses are the ``review_status`` column (decisions the log backs) and the
    details come from the state folder; ``from_log`` (``poisonguard report`` after a review: a local
    copy of the log it checked the run against) gives the latest decisions instead.
    """
    from poisonguard.core.decisions import content_hashes

    id_col = summary["parameters"]["columns"]["id"]
    ids = [str(i) for i in held.column(id_col).to_pylist()] if held.num_rows else []
    at_scan = held.column(REVIEW_STATUS).to_pylist() if REVIEW_STATUS in held.column_names else [None] * len(ids)
    out = [{"status": s or "undecided", "reviewer": "", "time": "", "note": ""} for s in at_scan]
    if from_log:
        logged = logged_decisions(from_log)
    else:
        logged = state_decisions(summary["parameters"].get("state"))
        decided = {i for i, s in zip(ids, at_scan) if s}
        logged = {k: v for k, v in logged.items() if k[0] in decided}
    decided_ids = {i for i, _ in logged}
    rows = [k for k, i in enumerate(ids) if i in decided_ids]
    if rows:
        import pyarrow.dataset as pads

        full = pads.dataset(os.path.join(run_dir, QUARANTINE), format="parquet").to_table()
        positions = {}
        for k, i in enumerate(str(v) for v in full.column(id_col).to_pylist()):
            positions.setdefault(i, []).append(k)
        columns = [c for c in full.column_names if not is_added_column(c)]
        wanted = sorted({p for k in rows for p in positions.get(ids[k], [])})
        digests = dict(zip(wanted, content_hashes(full.take(wanted), columns)))
        for k in rows:
            for p in positions.get(ids[k], []):
                hit = logged.get((ids[k], digests[p]))
                if hit and (from_log or hit["status"] == out[k]["status"]):
                    out[k] = hit
    return out


def _sig(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(f"{value:.4g}")


def build_table(run_dir: str, summary: dict, from_log: str | None = None) -> dict:
    """The quarantine as the reviewer sees it: rows most suspicious first, as lists
    [id, label, reasons (indices), status, reviewer, time, note, source, (score, threshold, ratio) per detector]."""
    import pyarrow.dataset as pads

    params = summary["parameters"]
    cols, detectors = params["columns"], [d["name"] for d in params["detectors"]]
    sources = input_labels([i["path"] for i in summary["inputs"]])
    parts = sorted(glob.glob(os.path.join(run_dir, QUARANTINE, "*.parquet")))
    wanted = [cols["id"], cols["label"], QUARANTINE_REASONS, REVIEW_STATUS, *(score_column(d) for d in detectors)]
    tables = []
    for part in parts:
        t = pads.dataset(part, format="parquet").to_table(columns=wanted)
        index = part_source(os.path.basename(part))
        source = sources[index] if index is not None and index < len(sources) else ""
        tables.append(t.append_column("_source", pa.array([source] * t.num_rows, pa.string())))
    held = pa.concat_tables(tables) if tables else None
    if held is None or not held.num_rows:
        return {"rows": [], "reasons": [], "detectors": detectors, "classes": [], "json": "{}"}
    labels = [str(v) for v in held.column(cols["label"]).to_pylist()]
    reasons = held.column(QUARANTINE_REASONS).to_pylist()
    vocabulary = sorted({r for rs in reasons for r in rs})
    index = {r: i for i, r in enumerate(vocabulary)}
    statuses = row_statuses(run_dir, summary, held, from_log)
    per_detector = []
    for name in detectors:
        scores = np.asarray(held.column(score_column(name)).to_numpy(zero_copy_only=False), dtype=float)
        classes = summary["detectors"].get(name, {}).get("classes", {})
        thresholds = np.array([classes.get(c, {}).get("threshold") if classes.get(c, {}).get("suspicious") else np.nan
                               for c in labels], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(thresholds > 0, scores / thresholds, np.nan)
        per_detector.append((scores, thresholds, ratio))
    rank = np.nanmax(np.column_stack([r for _, _, r in per_detector] + [np.zeros(held.num_rows)]), axis=1)
    order = np.lexsort((-np.array([len(r) for r in reasons]), -rank))
    ids, sources_col = held.column(cols["id"]).to_pylist(), held.column("_source").to_pylist()
    rows = []
    for k in order.tolist():
        s = statuses[k]
        row = [str(ids[k]), labels[k], [index[r] for r in reasons[k]], s["status"], s["reviewer"], s["time"][:19],
               s["note"], sources_col[k]]
        for scores, thresholds, ratio in per_detector:
            row += [_sig(scores[k]), _sig(thresholds[k]), _sig(ratio[k])]
        rows.append(row)
    text = json.dumps({"rows": rows, "reasons": vocabulary, "detectors": detectors}, separators=(",", ":"),
                      allow_nan=False).replace("<", "\\u003c")  # nothing in it can close or comment the script
    return {"rows": rows, "reasons": vocabulary, "detectors": detectors, "classes": sorted(set(labels)), "json": text}


def write_review_csv(run_dir: str, table: dict) -> None:
    """review.csv in the report's order: rounded scores and thresholds, the row's link in the report,
    and earlier decisions pre-filled (cells a spreadsheet would evaluate are neutralised)."""
    from urllib.parse import quote

    detectors = table["detectors"]
    header = ["id", "label", "reasons", "status"]
    for d in detectors:
        header += [score_column(d), f"threshold_{d}"]
    header += ["source_file", "report_link", "decision", "note"]
    prefill = {status: decision for decision, status in DECISION_STATUS.items()}
    with open(os.path.join(run_dir, REVIEW_CSV), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in table["rows"]:
            cells = [csv_cell(row[0]), csv_cell(row[1]), csv_cell(";".join(table["reasons"][i] for i in row[2])), row[3]]
            for d in range(len(detectors)):
                cells += [row[8 + 3 * d], row[9 + 3 * d]]
            cells += [csv_cell(row[7]), f"{REPORT}#row-{quote(row[0], safe='')}", prefill.get(row[3], ""),
                      csv_cell(row[6])]
            writer.writerow(cells)
