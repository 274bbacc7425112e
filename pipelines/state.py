"""The state folder that lives across scans: reviewer decisions and per-class drift baselines.

    STATE/decisions.jsonl   append-only: id, content_sha256, decision, reviewer, note, run_id, time
    STATE/runs/RUN_ID.json  per-class row counts, shares, embedding means and covariance traces
    STATE/latest            the run id of the last scan that wrote a baseline

Decisions are keyed by row id and content hash (``poisonguard.core.decisions``).  Class means
live here, never in summary.json or the provenance log.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from poisonguard import provenance as prov
from poisonguard.errors import InputError
from poisonguard.locking import locked_file
from poisonguard.names import safe_name

DECISIONS = ("release", "confirm")
log = logging.getLogger("poisonguard")


class StateFolder:
    def __init__(self, path: str):
        self.path = Path(path)

    # ---- decisions -------------------------------------------------------------------------
    def append_decisions(self, records: list[dict]) -> None:
        with locked_file(self.path / "decisions.jsonl") as fd:
            os.write(fd, b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records))
            os.fsync(fd)

    def records(self) -> list[dict]:
        """The decision records of decisions.jsonl, oldest first, each checked (exit 2 when malformed)."""
        path = self.path / "decisions.jsonl"
        if not path.exists():
            return []
        out = []
        try:
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    record = json.loads(line)
                    if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                            and isinstance(record.get("content_sha256"), str) and record.get("decision") in DECISIONS):
                        raise ValueError(f"line {number} is not a decision record")
                    out.append(record)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InputError(f"state folder's decisions are malformed: {str(exc).splitlines()[0][:200]}",
                             path=str(path)) from None
        return out

    def decisions(self) -> dict[str, dict[str, str]]:
        """id -> {content_sha256 -> latest decision}, as the state folder says (not yet authenticated)."""
        out: dict[str, dict[str, str]] = {}
        for record in self.records():
            out.setdefault(record["id"], {})[record["content_sha256"]] = record["decision"]
        return out

    def backed_decisions(self, log_path: str) -> tuple[dict[str, dict[str, str]], int]:
        """The decisions that count: those whose id, content hash and decision are the latest that a
        ``review`` record in the (verified) provenance log holds; and how many were ignored."""
        claimed = self.decisions()
        if not claimed:
            return {}, 0
        logged = {(d["id"], d["content_sha256"]): d["decision"] for d, _, _ in prov.review_decisions(log_path)}
        backed: dict[str, dict[str, str]] = {}
        ignored = 0
        for row_id, by_content in claimed.items():
            for digest, decision in by_content.items():
                if logged.get((row_id, digest)) == decision:
                    backed.setdefault(row_id, {})[digest] = decision
                else:
                    ignored += 1
        if ignored:
            log.warning("%d decision(s) in %s have no review record behind them in %s; ignored",
                        ignored, self.path, log_path)
        return backed, ignored

    # ---- drift ------------------------------------------------------------------------------
    def save_run(self, run_id: str, moments: dict, quarantined: list[str]) -> None:
        """The run's drift baseline and quarantined ids; then it becomes the latest run."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        runs = self.path / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        (runs / f"{safe_name(run_id)}.json").write_text(json.dumps(moments))
        pq.write_table(pa.table({"id": pa.array(quarantined, pa.string())}), self.quarantine_path(run_id))
        (self.path / "latest").write_text(run_id + "\n")

    def save_run_or_warn(self, run_id: str, moments: dict, quarantined: list[str]) -> None:
        """After a publish: a baseline that cannot be saved is a warning, never a failed run."""
        try:
            self.save_run(run_id, moments, quarantined)
        except OSError as exc:
            log.warning("drift baseline not saved in %s: %s", self.path, exc.strerror or exc)

    def quarantine_path(self, run_id: str) -> str:
        return str(self.path / "runs" / f"{safe_name(run_id)}.quarantine.parquet")

    def latest_run(self) -> str | None:
        latest = self.path / "latest"
        if not latest.is_file():
            return None
        return latest.read_bytes().decode("utf-8", "replace").strip() or None  # (a damaged name finds no run)

    def latest_baseline(self) -> tuple[str, dict] | None:
        """(run id, per-class moments) of the latest run; ValueError where its baseline file is damaged."""
        run_id = self.latest_run()
        path = self.path / "runs" / f"{safe_name(run_id)}.json" if run_id else None
        if path is None or not path.exists():
            return None
        try:
            moments = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: not JSON ({str(exc).splitlines()[0][:120]})") from None
        if not (isinstance(moments, dict) and all(
                isinstance(m, dict) and isinstance(m.get("share"), (int, float)) and isinstance(m.get("mean"), list)
                and all(isinstance(v, (int, float)) for v in m["mean"]) and isinstance(m.get("trace"), (int, float)) for m in moments.values())):
            raise ValueError(f"{path}: not a per-class baseline (share, mean, trace per class)")
        return run_id, moments


def class_moments(states: dict) -> dict:
    """Per class: rows, share, mean and covariance trace (what drift compares), from mergeable states."""
    total = sum(s.n for s in states.values()) or 1
    return {str(label): {"n": int(s.n), "share": s.n / total, "mean": s.mean.tolist(),
                         "trace": float(np.trace(s.covariance))} for label, s in states.items()}


def drift(previous: dict, current: dict, *, max_share_ratio: float, max_mean_shift: float) -> list[dict]:
    """Class-share and embedding-mean shifts beyond the configured limits (no raw values)."""
    warnings = []
    for label in sorted(set(previous) | set(current)):
        old, new = previous.get(label), current.get(label)
        if old is None or new is None:
            warnings.append({"class": label, "kind": "class_appeared" if old is None else "class_vanished",
                             "previous_share": old and old["share"], "share": new and new["share"]})
            continue
        ratio = new["share"] / max(old["share"], 1e-12)
        if ratio >= max_share_ratio or ratio <= 1 / max_share_ratio:
            warnings.append({"class": label, "kind": "share", "previous_share": old["share"],
                             "share": new["share"], "ratio": ratio, "limit": max_share_ratio})
        if len(old["mean"]) == len(new["mean"]):
            scale = np.sqrt(max(old["trace"], 1e-12))
            shift = float(np.linalg.norm(np.asarray(new["mean"]) - np.asarray(old["mean"])) / scale)
            if shift >= max_mean_shift:
                warnings.append({"class": label, "kind": "mean", "shift": shift, "limit": max_mean_shift})
    return warnings


def drift_section(state: StateFolder | None, moments: dict, config) -> dict:
    """summary.json's drift section: warnings against the state folder's latest baseline."""
    if state is None:
        return {"previous_run": None, "warnings": [], "note": "no state folder configured"}
    try:
        baseline = state.latest_baseline()
    except ValueError as exc:  # drift is advisory: a damaged baseline is reported, the scan goes on
        log.warning("drift: the state folder's baseline is damaged, no drift compared: %s", exc)
        return {"previous_run": state.latest_run(), "warnings": [],
                "note": f"the baseline is damaged, no drift compared: {exc}"}
    if baseline is None:
        return {"previous_run": None, "warnings": [], "note": "first run with this state folder"}
    previous_run, previous = baseline
    warnings = drift(previous, moments, max_share_ratio=config.drift.max_share_ratio,
                     max_mean_shift=config.drift.max_mean_shift)
    for warning in warnings:
        log.warning("drift: class %s: %s", warning["class"], warning["kind"])
    return {"previous_run": previous_run, "warnings": warnings}
