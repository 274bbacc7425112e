"""One scan: plan, log START, screen into a staging folder with an engine, check, publish, log COMPLETE."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from poisonguard import provenance as prov
from poisonguard import workbench
from poisonguard.canaries import self_test
from poisonguard.config import Config
from poisonguard.core.embedding import resolve_embedding
from poisonguard.core.screening import Screener
from poisonguard.core.suite import load_suite
from poisonguard.errors import InputError, as_reported
from poisonguard.io import ROWS_PER_WORK_ITEM, check_unchanged, plan_discovered
from poisonguard.names import PROXY_MODEL, RUN_PROVENANCE, SUMMARY, WORK
from poisonguard.observe import phase, run_context
from poisonguard.report import render_report_or_stub
from poisonguard.run import facets, history, remote, rundir
from poisonguard.run.summary import build_summary, check_outputs, write_json
from poisonguard.state import StateFolder, drift_section

log = logging.getLogger("poisonguard")


@dataclass
class ScanResult:
    run_id: str
    run_dir: str
    summary: dict
    exit_code: int
    engine: str
    outputs_dir: str  # where the files are: run_dir, or its published attempt on an object store


def run_scan(inputs: list[str], run_dir: str, config: Config, beam_args: list[str] | None = None,
             run_id: str | None = None, started: float | None = None) -> ScanResult:
    run_id = prov.new_run_id() if run_id is None else run_id
    check_run_id(run_id)
    with run_context(run_id), remote.locations(inputs, run_dir, config, run_id) as where:
        return _scan(where, beam_args or [], run_id, started or time.monotonic())


def _scan(where: remote.Locations, beam_args, run_id, started) -> ScanResult:
    inputs, run_dir, config = where.inputs, str(Path(where.run_dir).resolve()), where.config
    rundir.check_run_dir(run_dir)
    log_path = config.provenance_log or rundir.default_log_path(run_dir)
    rundir.check_outside(run_dir, provenance_log=log_path, state=config.state)
    rundir.check_log_path(log_path)
    with rundir.run_dir_lock(run_dir):
        rundir.recover(run_dir)
        with phase("plan"):
            plan = plan_discovered(inputs, config)
            suite, engine = load_suite(config, plan.schema), choose_engine(config, plan.total_rows, beam_args)
        rundir.remove_stale_staging(run_dir)
        log.info("plan: %d file(s), %d rows, dim %s, %s engine", len(plan.files), plan.total_rows, plan.dim, engine)
        state = StateFolder(config.state) if config.state else None
        decisions, ignored = state.backed_decisions(log_path) if state else ({}, 0)
        inputs_meta, run_facets = facets.input_datasets(plan.files, where.public), facets.run_facets(config, suite, where.public)
        start = prov.append(log_path, prov.run_event("START", run_id, inputs=inputs_meta, facets=run_facets))
        try:
            with rundir.staging_folder(run_dir, run_id) as staging:
                plan, embedding = resolve_embedding(plan, config, os.path.join(staging, WORK))
                if config.embedding.source == "proxy":
                    shutil.copyfile(plan.model_path, os.path.join(staging, PROXY_MODEL))
                t0 = time.monotonic()
                spill = os.path.join(staging, WORK, "embeddings") if plan.model_path and config.embedding.spill else None
                screener = Screener(config, plan, suite, decisions, spill, report_sample=True)
                result = run_engine(engine, screener, staging, run_id, beam_args)
                check_unchanged(plan)
                timings = {"plan_s": round(t0 - started, 3), "pipeline_s": round(time.monotonic() - t0, 3)}
                written, outputs_meta = check_outputs(staging, plan, config, result, where.public_outputs)
                tested = self_test(plan, config, ROWS_PER_WORK_ITEM) if config.canaries.enabled else None
                summary = where.public(build_summary(run_id, plan, config, result, written, timings, tested))
                quarantined = history.quarantined_ids(staging, config.columns.id)
                summary.update(engine=engine, embedding=embedding, drift=drift_section(state, result.moments, config),
                               run_to_run=history.run_to_run(state, quarantined, decisions))
                summary["review"]["decisions_ignored"] = ignored
                event = prov.run_event("COMPLETE", run_id, inputs=inputs_meta, outputs=outputs_meta,
                                       facets={**run_facets, "poisonguard_embedding": embedding,
                                               "poisonguard_findings": facets.findings(summary)})
                with prov.chained(log_path, event) as (complete, commit):
                    facets.write_events(os.path.join(staging, RUN_PROVENANCE),
                                        [*prov.events_of_run(log_path, start), complete])
                    head = prov.head_of(complete)
                    summary["provenance"] = {"log": where.public(log_path), "complete_record_sha256": head, "head": head}
                    with phase("report"):
                        table = workbench.build_table(staging, summary)
                        workbench.write_review_csv(staging, table)
                        render_report_or_stub(staging, table, summary, shown_as=where.public_run_dir)
                    timings.update(total_s=round(time.monotonic() - started, 3),  # the publish takes milliseconds
                                   rows_per_s=round(plan.total_rows / max(timings["pipeline_s"], 1e-9), 1))
                    write_json(os.path.join(staging, SUMMARY), summary)
                    with phase("publish"):
                        where.publish(staging, run_dir, run_id, commit)
        except BaseException as exc:
            error = as_reported(exc)
            try:
                prov.append(log_path, prov.fail_event(run_id, inputs_meta, error))
            except (OSError, InputError) as log_error:
                log.warning("could not log FAIL for run %s: %s", run_id, log_error)
            if error is exc:
                raise
            raise error from None
    if state:
        state.save_run_or_warn(run_id, result.moments, quarantined)
    log.info("done in %.1f s; provenance head %s", time.monotonic() - started, head)
    return ScanResult(run_id, where.public_run_dir, summary, summary["exit_code"], engine, where.public_outputs)


def check_run_id(run_id: str) -> None:
    """Any id a scheduler makes (kept verbatim; ``names.safe_name`` makes it file-safe)."""
    if not run_id.strip() or len(run_id) > 256 or not run_id.isprintable():
        raise InputError(f"--run-id must be 1 to 256 printable characters, got {run_id[:300]!r}")


def choose_engine(config: Config, rows: int, beam_args: list[str]) -> str:
    """``auto``: in memory (it streams, and is faster in one process) unless Beam flags or a row cap say Beam."""
    limit = config.memory_engine_max_rows
    small = limit is None or rows <= limit
    return config.engine if config.engine != "auto" else "memory" if small and not beam_args else "beam"


def run_engine(engine: str, screener: Screener, staging: str, run_id: str, beam_args: list[str]):
    from poisonguard.engines.outputs import load_result, write_block

    if engine == "memory":
        from poisonguard.engines import memory

        return memory.run(screener, run_id, partial(write_block, staging), ROWS_PER_WORK_ITEM)[0]
    from poisonguard.engines import beam

    beam.run(screener, staging, run_id, beam_args, ROWS_PER_WORK_ITEM)
    return load_result(staging)
