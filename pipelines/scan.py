"""One scan, end to end: plan, stage, run the Beam graph, check counts, publish, log provenance."""

from __future__ import annotations

import html
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines import __version__
from pipelines import provenance as prov
from pipelines.config import Config
from pipelines.errors import InputError, IntegrityError, PoisonguardError, one_line
from pipelines.io import InputPlan, discover, plan_inputs, sha256_file
from pipelines.locking import locked_file
from pipelines.state import StateFolder, drift

OUTPUT_FOLDERS = ("clean", "quarantine")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ROWS_PER_WORK_ITEM = 262144


@dataclass
class ScanResult:
    run_id: str
    run_dir: str
    summary: dict
    exit_code: int


def log(message: str) -> None:
    print(f"[poisonguard] {message}", file=sys.stderr, flush=True)


def default_log_path(run_dir: str) -> str:
    return str(Path(run_dir).resolve().parent / "poisonguard-provenance.jsonl")


def run_scan(inputs: list[str], run_dir: str, config: Config, beam_args: list[str] | None = None,
             run_id: str | None = None) -> ScanResult:
    started = time.monotonic()
    os.umask(0o027)
    run_id = run_id or prov.new_run_id()
    if not RUN_ID.fullmatch(run_id):
        raise InputError(f"--run-id must match {RUN_ID.pattern} (it names files), got {run_id!r}")
    run_dir = str(Path(run_dir).resolve())
    _check_run_dir(run_dir)
    log_path = config.provenance_log or default_log_path(run_dir)
    with _run_dir_lock(run_dir):
        return _scan_locked(inputs, run_dir, config, beam_args, run_id, log_path, started)


def _scan_locked(inputs, run_dir, config, beam_args, run_id, log_path, started) -> ScanResult:
    _remove_stale_staging(run_dir)

    paths = discover(inputs)
    plan = plan_inputs(paths, config)
    suite = None
    if config.suite:
        from pipelines.validation import check_suite

        suite = check_suite(config.suite, plan.schema)
    log(f"plan: {len(plan.files)} file(s), {plan.total_rows} rows, embedding dim {plan.dim}")
    inputs_meta = [{"namespace": "file", "name": f.path,
                    "facets": {"poisonguard_content": {"sha256": sha256_file(f.path), "rows": f.rows}}}
                   for f in plan.files]
    facets = _run_facets(config, suite)
    prov.append(log_path, prov.run_event("START", run_id, inputs=inputs_meta, facets=facets))

    staging = _make_staging(run_dir, run_id)
    try:
        plan, embedding_info = resolve_embedding(plan, config, os.path.join(staging, "_work"))
        if config.embedding.source == "proxy":
            shutil.copyfile(plan.model_path, os.path.join(staging, "proxy_model.pt"))
        state = StateFolder(config.state) if config.state else None
        decisions = state.decisions() if state else {}
        timings = {"plan_s": round(time.monotonic() - started, 3)}
        t0 = time.monotonic()
        _run_pipeline(plan, config, suite, staging, run_id, beam_args or [], decisions)
        timings["pipeline_s"] = round(time.monotonic() - t0, 3)
        moments = json.loads(Path(staging, "_work", "moments.json").read_text())
        summary = _finish_staging(staging, plan, config, run_id, inputs_meta, timings, started)
        summary["embedding"] = embedding_info
        summary["drift"] = _drift(state, moments, config)
        _write_review_template(staging, plan, config)
        outputs_meta = summary.pop("_outputs_meta")
        complete = prov.run_event("COMPLETE", run_id, inputs=inputs_meta, outputs=outputs_meta,
                                  facets={**facets, "poisonguard_embedding": embedding_info,
                                          "poisonguard_findings": _findings(summary)})
        record = prov.append(log_path, complete)
        with open(os.path.join(staging, "provenance.jsonl"), "w", encoding="utf-8") as handle:
            for event in _events_of_run(log_path, run_id):
                handle.write(json.dumps(event, sort_keys=True) + "\n")
        summary["provenance"] = {"log": log_path, "complete_record_sha256": record["poisonguard_record_sha256"]}
        _write_json(os.path.join(staging, "summary.json"), summary)
        _render_report(staging)
        Path(staging, "_SUCCESS").write_text(run_id + "\n")
        _publish(staging, run_dir, run_id)
        if state:
            state.save_baseline(run_id, moments)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = unwrap_error(exc)
        if isinstance(error, OSError) and error.errno is not None:
            error = InputError(f"cannot write the outputs: {error.strerror}", path=getattr(error, "filename", None))
        prov.append(log_path, prov.run_event(
            "FAIL", run_id, inputs=inputs_meta,
            facets={"errorMessage": {"message": one_line(error) or type(exc).__name__,
                                     "programmingLanguage": "python"}}))
        if error is not exc:
            raise error from None
        raise
    log(f"done in {time.monotonic() - started:.1f} s")
    return ScanResult(run_id, run_dir, summary, summary["exit_code"])


def _drift(state, moments: dict, config: Config) -> dict:
    if state is None:
        return {"previous_run": None, "warnings": [], "note": "no state folder configured"}
    baseline = state.latest_baseline()
    if baseline is None:
        return {"previous_run": None, "warnings": [], "note": "first run with this state folder"}
    previous_run, previous = baseline
    warnings = drift(previous, moments, max_share_ratio=config.drift.max_share_ratio,
                     max_mean_shift=config.drift.max_mean_shift)
    for warning in warnings:
        log(f"drift: class {warning['class']}: {warning['kind']}")
    return {"previous_run": previous_run, "warnings": warnings}


def _write_review_template(staging: str, plan: InputPlan, config: Config) -> None:
    """review.csv: each quarantined row with its reasons and scores, and empty decision/note columns."""
    import csv

    import pyarrow.parquet as pq

    names = [d.name for d in config.detectors]
    cols = config.columns
    with open(os.path.join(staging, "review.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "reasons", *(f"score_{n}" for n in names), "source_file", "decision", "note"])
        for part in sorted(glob.glob(os.path.join(staging, "quarantine", "*.parquet"))):
            match = re.search(r"part-(\d+)-", part)
            source = plan.files[int(match.group(1))].path if match else ""
            table = pq.read_table(part, columns=[cols.id, cols.label, "quarantine_reasons",
                                                 *(f"score_{n}" for n in names)])
            for row in table.to_pylist():
                writer.writerow([row[cols.id], row[cols.label], ";".join(row["quarantine_reasons"]),
                                 *(row[f"score_{n}"] for n in names), source, "", ""])


def _render_report(staging: str) -> None:
    """The report is for people: a plotting failure leaves a short page saying so, not a failed scan."""
    from pipelines.report import render_report

    try:
        render_report(staging)
    except Exception as exc:  # noqa: BLE001
        log(f"warning: report.html could not be rendered fully: {one_line(exc)}")
        Path(staging, "report.html").write_text(
            "<!DOCTYPE html><html><body><h1>poisonguard report</h1><p>The report could not be rendered: "
            f"{html.escape(one_line(exc))}. Run <code>poisonguard report RUN_DIR</code> to retry; "
            "summary.json holds every figure.</p></body></html>", encoding="utf-8")


def resolve_embedding(plan: InputPlan, config: Config, work_dir: str) -> tuple[InputPlan, dict]:
    """Train the proxy or check the user's model; fix the embedding dimension from a dry run."""
    emb = config.embedding
    if emb.source == "column":
        return plan, {"source": "column", "column": config.columns.embedding, "dim": plan.dim}
    info: dict = {"source": emb.source, "features": emb.features, "features_shape": emb.features_shape}
    if emb.source == "proxy":
        from pipelines.proxy import train_proxy

        path = os.path.join(work_dir, "proxy_model.pt")
        log(f"proxy: training on up to {emb.proxy_max_rows} rows for {emb.proxy_epochs} epochs")
        info.update(train_proxy(plan, config, path))
        log(f"proxy: training accuracy {info['train_accuracy']:.4f}")
    else:
        path = os.path.abspath(emb.model)
        if not os.path.isfile(path):
            raise InputError("model file not found", path=emb.model)
    info["model_file_sha256"] = sha256_file(path)
    dim = _probe_dim(path, plan, config)
    if emb.dim is not None and dim != emb.dim:
        raise InputError(f"model output dimension {dim} disagrees with embedding.dim={emb.dim}", path=emb.model or path)
    info["dim"] = dim
    return replace(plan, dim=dim, model_path=path), info


def _probe_dim(path: str, plan: InputPlan, config: Config) -> int:
    import torch

    from pipelines.embed import embedding_fn, load_model

    emb = config.embedding
    model = load_model(path, architecture=emb.architecture, hidden=emb.hidden, in_features=plan.n_features,
                       n_classes=None)
    shape = tuple(emb.features_shape or (plan.n_features,))
    if int(np.prod(shape)) != plan.n_features:
        raise InputError(f"embedding.features_shape {list(shape)} does not hold {plan.n_features} values",
                         column=emb.features)
    try:
        with torch.inference_mode():
            out = embedding_fn(model, emb.layer)(torch.zeros((2, *shape)))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model can fail in many ways on the wrong input
        raise InputError(f"model cannot embed features of shape {list(shape)}: {one_line(exc)[:200]}",
                         path=emb.model or path) from None
    return int(out.reshape(2, -1).shape[1])


def unwrap_error(exc: BaseException) -> BaseException:
    """Beam runners wrap worker exceptions; recover our own InputError where there is one."""
    seen = exc
    while seen is not None:
        if isinstance(seen, PoisonguardError):
            return seen
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"(?:InputError|ConfigError): (.+)", str(exc))
    if match:
        return InputError(match.group(1).splitlines()[0].strip().strip("'\""))
    return exc


def _run_pipeline(plan: InputPlan, config: Config, suite, staging: str, run_id: str, beam_args: list[str],
                  decisions: dict | None = None) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.beam_pipeline import build_scan, use_system_allocator

    use_system_allocator()
    options = PipelineOptions(beam_args)
    log(f"pipeline: runner {options.get_all_options().get('runner') or 'DirectRunner'}, "
        f"detectors {', '.join(d.name for d in config.detectors)}")
    with beam.Pipeline(options=options) as pipeline:
        build_scan(pipeline, plan, config, suite, staging, run_id, ROWS_PER_WORK_ITEM, decisions)


def _finish_staging(staging: str, plan: InputPlan, config: Config, run_id: str, inputs_meta, timings, started) -> dict:
    import pyarrow.parquet as pq

    from pipelines.scoring import output_schemas

    work = os.path.join(staging, "_work")
    for leftover in glob.glob(os.path.join(staging, "*", "*.tmp-*")):
        os.remove(leftover)
    with open(os.path.join(work, "counts.json"), encoding="utf-8") as handle:
        counts = json.load(handle)
    with open(os.path.join(work, "fit.json"), encoding="utf-8") as handle:
        fit = json.load(handle)
    names = [d.name for d in config.detectors]
    schemas = dict(zip(OUTPUT_FOLDERS, output_schemas(plan.schema, names)))
    outputs_meta, written = [], {}
    for folder in OUTPUT_FOLDERS:
        parts = sorted(glob.glob(os.path.join(staging, folder, "*.parquet")))
        if not parts:
            empty = os.path.join(staging, folder, "part-empty.parquet")
            pq.write_table(schemas[folder].empty_table(), empty)
            parts = [empty]
        rows = 0
        for part in parts:
            meta = pq.read_metadata(part)
            if not meta.schema.to_arrow_schema().equals(schemas[folder]):
                raise IntegrityError(f"{folder}/{os.path.basename(part)} does not have the output schema")
            rows += meta.num_rows
            outputs_meta.append({"namespace": "file", "name": f"{folder}/{os.path.basename(part)}",
                                 "facets": {"poisonguard_content": {"sha256": sha256_file(part), "rows": meta.num_rows}}})
        written[folder] = rows
    total = plan.total_rows
    if not (counts.get("rows") == total == written["clean"] + written["quarantine"]
            and counts.get("clean") == written["clean"] and counts.get("quarantined") == written["quarantine"]):
        raise IntegrityError(
            f"row count mismatch: {total} rows in, pipeline counted {counts.get('rows')}, "
            f"wrote {written['clean']} clean + {written['quarantine']} quarantined; nothing published")
    shutil.rmtree(work)
    share = written["quarantine"] / total
    over = share > config.fail_on
    timings["total_s"] = round(time.monotonic() - started, 3)
    timings["rows_per_s"] = round(total / max(timings["pipeline_s"], 1e-9), 1)
    return {
        "run_id": run_id,
        "verdict": "over_fail_on" if over else "within_policy",
        "exit_code": 1 if over else 0,
        "counts": {"in": total, "clean": written["clean"], "quarantined": written["quarantine"],
                   "quarantined_share": share},
        "per_reason": dict(sorted(counts.get("reasons", {}).items())),
        "per_class": dict(sorted(counts.get("classes", {}).items())),
        "batch_warnings": counts.get("batch_warnings", {}),
        "review": counts.get("review", {"released": 0, "confirmed": 0}),
        "detectors": fit,
        "inputs": [{"path": i["name"], **i["facets"]["poisonguard_content"]} for i in inputs_meta],
        "parameters": json.loads(config.model_dump_json()),
        "embedding_dim": plan.dim,
        "timings": timings,
        "versions": versions(),
        "_outputs_meta": outputs_meta,
    }


def _findings(summary: dict) -> dict:
    return {
        "counts": summary["counts"],
        "per_reason": summary["per_reason"],
        "detectors": {name: rep["classes"] for name, rep in summary["detectors"].items()},
        "drift": summary.get("drift"),
        "review": summary.get("review"),
    }


def _run_facets(config: Config, suite) -> dict:
    facets = {
        "poisonguard_code": {"version": __version__, "git_commit": code_commit()},
        "poisonguard_versions": versions(),
        "poisonguard_config": json.loads(config.model_dump_json()),
        "poisonguard_detectors": {d.name: config.detector_params(d) for d in config.detectors},
    }
    if config.suite:
        facets["poisonguard_suite"] = {"path": config.suite, "sha256": sha256_file(config.suite),
                                       "name": (suite or {}).get("name"),
                                       "expectations": len((suite or {}).get("expectations", []))}
    return facets


def _events_of_run(log_path: str, run_id: str) -> list[dict]:
    with open(log_path, encoding="utf-8") as handle:
        return [e for e in map(json.loads, handle) if e.get("run", {}).get("runId") == run_id]


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "poisonguard": __version__}
    for dist in ("apache-beam", "pyarrow", "numpy", "pandas", "scikit-learn", "scipy", "great-expectations", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def code_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _check_run_dir(run_dir: str) -> None:
    path = Path(run_dir)
    if path.exists():
        if not path.is_dir():
            raise InputError("--out exists and is not a folder", path=run_dir)
        if any(path.iterdir()) and not (path / "_SUCCESS").exists():
            raise InputError("--out exists, is not empty and is not a poisonguard run folder; refusing to replace it",
                             path=run_dir)
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise InputError("cannot create the output folder: its parent is not a folder", path=str(parent))
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"cannot create the output's parent folder: {exc.strerror}", path=str(parent)) from None
    if not os.access(parent, os.W_OK):
        raise InputError("output folder's parent is not writable", path=str(parent))


def _run_dir_lock(run_dir: str):
    """One scan per RUN_DIR at a time; a second one waits for the first to finish."""
    path = Path(run_dir)
    return locked_file(path.parent / f".{path.name}.lock", append=False)


def _remove_stale_staging(run_dir: str) -> None:
    """Staging folders of this RUN_DIR found while holding its lock belong to killed scans."""
    path = Path(run_dir)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.staging-*"):
        log(f"removing staging folder of an interrupted scan: {stale}")
        shutil.rmtree(stale, ignore_errors=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _make_staging(run_dir: str, run_id: str) -> str:
    path = Path(run_dir)
    staging = path.parent / f".{path.name}.staging-{run_id}"
    try:
        for folder in (*OUTPUT_FOLDERS, "_work"):
            (staging / folder).mkdir(parents=True)
    except OSError as exc:
        raise InputError(f"cannot create the staging folder: {exc.strerror}", path=str(staging)) from None
    return str(staging)


def _publish(staging: str, run_dir: str, run_id: str) -> None:
    old = None
    if os.path.exists(run_dir):
        old = os.path.join(os.path.dirname(run_dir), f".{os.path.basename(run_dir)}.old-{run_id}")
        os.rename(run_dir, old)
    os.rename(staging, run_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=False, allow_nan=False, default=str)
        handle.write("\n")
