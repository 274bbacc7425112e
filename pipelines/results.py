"""What a scan reports: per-detector fit report, summary.json and the console summary."""

from __future__ import annotations

import numpy as np


def fit_report(fitted: dict) -> dict:
    """Per detector: parameters and, per class, the statistic, decision, threshold and extras."""
    report = {}
    for name, detector in fitted.items():
        classes = detector.class_report()
        for label, model in getattr(detector, "class_models_", {}).items():
            if isinstance(model, dict):
                extras = {k: float(v) for k, v in model.items() if np.isscalar(v) and not isinstance(v, str)}
                classes[str(label)].update(extras)
        report[name] = {"params": _jsonable(detector.get_params()), "classes": classes}
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def console_summary(summary: dict, run_dir: str) -> str:
    counts = summary["counts"]
    lines = [
        f"poisonguard scan {summary['run_id']}: "
        f"{'within policy' if summary['verdict'] == 'within_policy' else 'over fail_on: training should wait'}",
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
    for warning in summary.get("batch_warnings", {}):
        lines.append(f"  dataset-level expectation failed: {warning}")
    lines.append(f"  outputs: {run_dir}/{{clean,quarantine}}/*.parquet, summary.json, provenance.jsonl")
    return "\n".join(lines)
