"""What a scan reports: the output checks, summary.json and the console summary."""

from __future__ import annotations

import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard.canaries import beside_quarantined
from poisonguard.config import Config
from poisonguard.core import copies
from poisonguard.core.screening import output_schemas
from poisonguard.engines.outputs import EngineResult
from poisonguard.errors import InputError, IntegrityError
from poisonguard.io import InputPlan, sha256_file
from poisonguard.names import CLEAN, EMPTY_PART, OUTPUT_FOLDERS, QUARANTINE, SUCCESS, SUMMARY
from poisonguard.run.facets import dataset, versions


def check_outputs(staging: str, plan: InputPlan, config: Config, result: EngineResult,
                  run_dir: str) -> tuple[dict, list[dict]]:
    """Rows in = clean + quarantined, by the engine's counts and by the Parquet footers; schemas as promised.
    The output datasets are named by the absolute paths they are published at (``run_dir``)."""
    names = [d.name for d in config.detectors]
    schemas = dict(zip(OUTPUT_FOLDERS, output_schemas(plan.schema, names)))
    outputs, written = [], {}
    parts_of = {folder: _parts(staging, folder, schemas[folder]) for folder in OUTPUT_FOLDERS}
    every = [part for parts in parts_of.values() for part in parts]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = dict(zip(every, pool.map(sha256_file, every)))
    for folder, parts in parts_of.items():
        rows = 0
        for part in parts:
            meta = pq.read_metadata(part)
            if not meta.schema.to_arrow_schema().equals(schemas[folder]):
                raise IntegrityError(f"{folder}/{os.path.basename(part)} does not have the output schema")
            rows += meta.num_rows
            location = f"{run_dir.rstrip('/')}/{folder}/{os.path.basename(part)}"
            outputs.append(dataset(location, poisonguard_content={"sha256": digests[part], "rows": meta.num_rows}))
        written[folder] = rows
    counts, total = result.counts, plan.total_rows
    n_clean, n_held = written[CLEAN], written[QUARANTINE]
    if not (counts.get("rows") == total == n_clean + n_held
            and counts.get("clean") == n_clean and counts.get("quarantined") == n_held):
        raise IntegrityError(f"row count mismatch: {total} rows in, pipeline counted {counts.get('rows')}, "
                             f"wrote {n_clean} clean + {n_held} quarantined; nothing published")
    seen, fitted = counts.get("copies", {}).get("rows", 0), result.copies.get("rows", 0)
    if seen != fitted:  # both passes score the bytes that were hashed
        raise IntegrityError(f"the score pass found {seen} rows with an exact copy, the fit pass {fitted}; "
                             "nothing published")
    return written, outputs


def _parts(staging: str, folder: str, schema: pa.Schema) -> list[str]:
    for leftover in glob.glob(os.path.join(staging, folder, "*.tmp-*")):
        os.remove(leftover)
    parts = sorted(glob.glob(os.path.join(staging, folder, "*.parquet")))
    if not parts:
        empty = os.path.join(staging, folder, EMPTY_PART)
        pq.write_table(schema.empty_table(), empty)
        parts = [empty]
    return parts


def build_summary(run_id: str, plan: InputPlan, config: Config, result: EngineResult, written: dict,
                  timings: dict, canaries: dict | None = None) -> dict:
    counts, total = result.counts, plan.total_rows
    share = written[QUARANTINE] / total
    over = share > config.fail_on
    weak = canaries is not None and not canaries["passed"]
    per_class = dict(sorted(counts.get("classes", {}).items()))
    canaries = beside_quarantined(canaries, per_class)
    return {
        "run_id": run_id,
        "verdict": "over_fail_on" if over else "canary_recall_below_min" if weak else "within_policy",
        "exit_code": 1 if over or weak else 0,
        "canaries": canaries,
        "counts": {"in": total, "clean": written[CLEAN], "quarantined": written[QUARANTINE],
                   "quarantined_share": share},
        "per_reason": dict(sorted(counts.get("reasons", {}).items())),
        "per_class": per_class,
        "copies": copies.summary(result.copies, counts),
        "batch_warnings": counts.get("batch_warnings", {}),
        "review": counts.get("review", {"released": 0, "confirmed": 0}),
        "detectors": result.fit,
        "inputs": [{"path": f.path, "sha256": f.sha256, "rows": f.rows} for f in plan.files],
        "parameters": json.loads(config.model_dump_json()),
        "embedding_dim": plan.dim,
        "model_rows_in_score_pass": counts.get("model_rows_in_score_pass", 0),
        "timings": timings,
        "versions": versions(),
    }


def write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=False, allow_nan=False, default=str)
        handle.write("\n")


VERDICTS = {"within_policy": "within policy", "over_fail_on": "over fail_on: training should wait",
            "canary_recall_below_min": "canary recall below canaries.min_recall: training should wait"}


def canary_kind(canaries: dict) -> str:
    """The canary self-test's mode and trigger as the console and the report name them: "proxy mode,
    patch and blend triggers", "proxy mode, blend trigger", "embedding mode"."""
    trigger = canaries.get("trigger")
    suffix = {None: "", "both": ", patch and blend triggers"}.get(trigger, f", {trigger} trigger")
    return f"{canaries['mode']} mode{suffix}"


def proxy_line(info: dict) -> str:
    """What proxy was trained and how well it fits, in one line ('' outside proxy mode)."""
    if info.get("source") != "proxy" or "architecture" not in info:
        return ""
    layout, held = info.get("layout") or {}, info.get("held_out_accuracy")
    fit = f"training accuracy {info['train_accuracy']:.3f}" + (f", held-out {held:.3f}" if held is not None else "")
    state = f"converged ({info['stopped']})" if info.get("converged") else "not converged: stopped at proxy_epochs"
    kept = f", weights of epoch {info['kept_epoch']} kept" if info.get("stop_rule") == "held_out" else ""
    from poisonguard.core.exclusion import line

    excluded = line(info.get("exclusion"))
    return (f"proxy: {info['architecture']} for {layout.get('kind', 'features')} data ({layout.get('why', '')}); "
            f"{fit}; {info['epochs']} epochs by the {info.get('stop_rule', 'train_loss')} rule, {state}{kept}"
            + (f"; {excluded}" if excluded else ""))


def console_summary(summary: dict, run_dir: str) -> str:
    counts = summary["counts"]
    lines = [
        f"poisonguard scan {summary['run_id']}: "
        f"{VERDICTS.get(summary['verdict'], summary['verdict'])}",
        f"  rows in {counts['in']}, clean {counts['clean']}, quarantined {counts['quarantined']} "
        f"({100 * counts['quarantined_share']:.2f}%, fail_on {100 * summary['parameters']['fail_on']:.2f}%)",
    ]
    if summary["per_reason"]:
        lines.append("  quarantined per reason:")
        lines += [f"    {reason}: {n}" for reason, n in sorted(summary["per_reason"].items(), key=lambda kv: -kv[1])]
    flagged = {c: v for c, v in summary["per_class"].items() if v["quarantined"]}
    lines.append("  per class (rows / quarantined):")
    lines += [f"    {c}: {v['rows']} / {v['quarantined']}" for c, v in sorted(summary["per_class"].items())]
    if not flagged:
        lines.append("    (no class has quarantined rows)")
    copied = copies.line(summary.get("copies"))
    if copied:
        lines.append(f"  {copied}")
    proxy = proxy_line(summary.get("embedding") or {})
    if proxy:
        lines.append(f"  {proxy}")
    for name, report in summary["detectors"].items():
        representation = report.get("representation") or {}
        if representation.get("weak"):
            lines.append(f"  {name}: {representation['effect']}: {representation['why']}")
        elif representation.get("linear_probe_weak"):
            lines.append(f"  {name}: {representation['why']}")
        guard = report.get("mass_quarantine") or {}
        if guard.get("unreliable"):
            unsure = (f" (its label issues are unsure: median other-class probability "
                      f"{guard['median_other_class_confidence']:.2f}, under the {guard['crisp_confidence']:.2f} that "
                      "says label noise)") if guard.get("crisp_confidence") is not None else ""
            if guard.get("confusion_excess") is not None:
                unsure += (f" (they name look-alike classes: confusion excess {guard['confusion_excess']:.2f}, over "
                           f"the {guard['noise_max_excess']:.2f} random label noise stays under)")
            lines.append(f"  {name}: unreliable here: it would flag {guard['mean_share_flagged']:.0%} of the rows in "
                         f"{guard['classes_flagging_5pct']} of {guard['classes_tested']} classes{unsure}; "
                         + ("applied (--accept-mass-quarantine)" if guard["accepted"] else "its flags are held back"))
        elif guard.get("spread_as_noise"):
            lines.append(f"  {name}: flags {guard['mean_share_flagged']:.0%} of the rows in {guard['classes_flagging_5pct']} "
                         f"of {guard['classes_tested']} classes, spread over the other classes as random label noise "
                         f"spreads them (confusion excess {guard['confusion_excess']:.2f}, at most "
                         f"{guard['noise_max_excess']:.2f}): label noise, kept")
    if summary.get("canaries"):
        c = summary["canaries"]
        held = f"; up to {c['held_back_rows']} rows already flagged left out of a trial" if c.get("held_back_rows") else ""
        found = f"{c['caught']} of {c['planted']} caught (recall {c['recall']:.2f})" if c["recall"] is not None else c["why"]
        if c.get("by_trigger"):
            found = "; ".join(f"{kind} {v['caught']} of {v['planted']} caught (recall {v['recall']:.2f})"
                              for kind, v in c["by_trigger"].items()) + "; the lower recall counts"
        lines.append(f"  canaries ({canary_kind(c)}): {found}{held}")
        lines += [f"    {v['finding']}" for v in c["per_class"].values()]
    for warning in summary.get("batch_warnings", {}):
        lines.append(f"  dataset-level expectation failed: {warning}")
    lines.append(f"  outputs: {run_dir}/{{clean,quarantine}}/*.parquet, summary.json, provenance.jsonl")
    if summary.get("provenance"):
        lines.append(f"  provenance head {summary['provenance']['head']} (keep it to check the log: "
                     "poisonguard verify-log LOG --head HASH)")
    return "\n".join(lines)


SUMMARY_FIELDS = {"run_id": str, "parameters": dict, "counts": dict, "per_class": dict, "detectors": dict,
                  "inputs": list}  # what `review` and `report` read from a published run's summary


def read_summary(run_dir: str) -> dict:
    """A completed run's summary.json, checked for the fields the review and report commands read: a
    run folder edited or damaged since its scan is bad input (exit 2), not an internal error."""
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(run_dir, SUCCESS)):
        raise InputError("not a completed poisonguard run folder", path=run_dir)
    try:
        with open(path, encoding="utf-8") as handle:
            summary = json.load(handle)
    except (ValueError, OSError, RecursionError) as exc:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise InputError(f"the run's summary.json is unreadable: {str(exc).splitlines()[0][:200]}", path=path) from None
    if not isinstance(summary, dict):
        raise InputError("the run's summary.json is not a JSON object", path=path)
    for key, kind in SUMMARY_FIELDS.items():
        if not isinstance(summary.get(key), kind):
            raise InputError(f"the run's summary.json lacks {key!r} (or it is not a {kind.__name__})", path=path)
    if not isinstance(summary["parameters"].get("columns"), dict) or \
            not isinstance(summary["parameters"]["columns"].get("id"), str):
        raise InputError("the run's summary.json lacks parameters.columns.id", path=path)
    return summary
