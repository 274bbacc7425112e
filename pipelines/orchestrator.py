"""One scan: plan, log START, screen into a staging folder with an engine, check, publish, log COMPLETE."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from poisonguard import provenance as prov
from poisonguard.config import Config
from poisonguard.core.embedding import resolve_embedding
from poisonguard.core.screening import Screener
from poisonguard.core.suite import load_suite
from poisonguard.errors import InputError, as_reported
from poisonguard.io import ROWS_PER_WORK_ITEM, check_unchanged, discover, plan_inputs
from poisonguard.names import PROXY_MODEL, RUN_PROVENANCE, SUMMARY, WORK
from poisonguard.report import render_report_or_stub
from poisonguard.run import facets, rundir
from poisonguard.run.summary import build_summary, check_outputs, write_json, write_review_template
from poisonguard.state import StateFolder, drift_section

log = logging.getLogger("poisonguard")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class ScanResult:
    run_id: str
    run_dir: str
    summary: dict
    exit_code: int
    engine: str


def run_scan(inputs: list[str], run_dir: str, config: Config, beam_args: list[str] | None = None,
             run_id: str | None = None) -> ScanResult:
    started, run_id, beam_args = time.monotonic(), run_id or prov.new_run_id(), beam_args or []
    if not RUN_ID.fullmatch(run_id):
        raise InputError(f"--run-id must match {RUN_ID.pattern} (it names files), got {run_id!r}")
    run_dir = str(Path(run_dir).resolve())
    rundir.check_run_dir(run_dir)
    log_path = config.provenance_log or rundir.default_log_path(run_dir)
    with rundir.run_dir_lock(run_dir):
        rundir.remove_stale_staging(run_dir)
        plan = plan_inputs(discover(inputs), config)
        suite, engine = load_suite(config, plan.schema), choose_engine(config, plan.total_rows, beam_args)
        log.info("plan: %d file(s), %d rows, dim %s, %s engine", len(plan.files), plan.total_rows, plan.dim, engine)
        inputs_meta, run_facets = facets.input_datasets(plan.files), facets.run_facets(config, suite)
        prov.append(log_path, prov.run_event("START", run_id, inputs=inputs_meta, facets=run_facets))
        state = StateFolder(config.state) if config.state else None
        try:
            with rundir.staging_folder(run_dir, run_id) as staging:
                plan, embedding = resolve_embedding(plan, config, os.path.join(staging, WORK))
                if config.embedding.source == "proxy":
                    shutil.copyfile(plan.model_path, os.path.join(staging, PROXY_MODEL))
                t0 = time.monotonic()
                screener = Screener(config, plan, suite, state.decisions() if state else {})
                result = run_engine(engine, screener, staging, run_id, beam_args)
                check_unchanged(plan)
                timings = {"plan_s": round(t0 - started, 3), "pipeline_s": round(time.monotonic() - t0, 3)}
                written, outputs_meta = check_outputs(staging, plan, config, result)
                summary = build_summary(run_id, plan, config, result, written, timings)
                summary.update(engine=engine, embedding=embedding, drift=drift_section(state, result.moments, config))
                write_review_template(staging, plan, config)
                complete = prov.append(log_path, prov.run_event(
                    "COMPLETE", run_id, inputs=inputs_meta, outputs=outputs_meta,
                    facets={**run_facets, "poisonguard_embedding": embedding,
                            "poisonguard_findings": facets.findings(summary)}))
                facets.write_events(os.path.join(staging, RUN_PROVENANCE), facets.events_of_run(log_path, run_id))
                summary["provenance"] = {"log": log_path, "complete_record_sha256": complete["poisonguard_record_sha256"]}
                timings.update(total_s=round(time.monotonic() - started, 3),
                               rows_per_s=round(plan.total_rows / max(timings["pipeline_s"], 1e-9), 1))
                write_json(os.path.join(staging, SUMMARY), summary)
                render_report_or_stub(staging)
                rundir.publish(staging, run_dir, run_id)
        except BaseException as exc:
            error = as_reported(exc)
            prov.append(log_path, prov.fail_event(run_id, inputs_meta, error))
            if error is exc:
                raise
            raise error from None
    if state:
        state.save_baseline_or_warn(run_id, result.moments)
    log.info("done in %.1f s", time.monotonic() - started)
    return ScanResult(run_id, run_dir, summary, summary["exit_code"], engine)


def choose_engine(config: Config, rows: int, beam_args: list[str]) -> str:
    """``auto``: in memory for runs up to ``memory_engine_max_rows`` with no Beam flags, else Beam."""
    if config.engine != "auto":
        return config.engine
    return "memory" if rows <= config.memory_engine_max_rows and not beam_args else "beam"


def run_engine(engine: str, screener: Screener, staging: str, run_id: str, beam_args: list[str]):
    from poisonguard.engines.outputs import load_result, write_block

    if engine == "memory":
        from poisonguard.engines import memory

        def sink(file_index, first_row, clean, held):
            write_block(staging, file_index, first_row, clean, held)

        return memory.run(screener, run_id, sink, ROWS_PER_WORK_ITEM)[0]
    from poisonguard.engines import beam

    beam.run(screener, staging, run_id, beam_args, ROWS_PER_WORK_ITEM)
    return load_result(staging)
