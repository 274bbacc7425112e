"""The Python API: ``scan`` (files to a published run folder) and ``screen`` (a table in a notebook).

Neither changes process-wide state (umask, logging handlers, working folder) or prints anything;
progress goes to the ``poisonguard`` logger, which has no handler unless the caller adds one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from poisonguard.core import copies
from poisonguard.config import Config, load_config, validated
from poisonguard.errors import one_line
from poisonguard.names import QUARANTINE_REASONS, RUN_ID, SCREEN_ROW, is_added_column


@dataclass
class ScanResult:
    """What ``scan`` published: the verdict, the exit code a scheduler should use, counts and paths."""

    run_id: str
    run_dir: str
    verdict: str
    exit_code: int
    counts: dict
    engine: str
    summary: dict = field(repr=False)
    outputs_dir: str = ""  # where the files are: run_dir, or its published attempt on an object store

    @property
    def paths(self) -> dict[str, str]:
        from poisonguard import names

        base = self.outputs_dir or self.run_dir
        return {key: f"{base.rstrip('/')}/{value}" for key, value in (
            ("clean", names.CLEAN), ("quarantine", names.QUARANTINE), ("summary", names.SUMMARY),
            ("report", names.REPORT), ("review", names.REVIEW_CSV), ("provenance", names.RUN_PROVENANCE))}


def _config(config: Config | str | os.PathLike | dict | None, overrides: list[str] | None) -> Config:
    if isinstance(config, Config):
        return config.model_copy(deep=True) if not overrides else load_config(None, overrides, base=config)
    if isinstance(config, dict):
        return load_config(None, overrides, base=validated(config, "dict"))
    return load_config(None if config is None else str(config), overrides)


def scan(inputs, out: str | os.PathLike, config: Config | str | dict | None = None, *, state: str | None = None,
         provenance_log: str | None = None, run_id: str | None = None, overrides: list[str] | None = None,
         beam_args: list[str] | None = None, clock_start: float | None = None) -> ScanResult:
    """Screen Parquet ``inputs`` (paths, folders or globs) and publish the run folder ``out``.

    ``config`` is a Config, a dict of config keys or a YAML path; ``overrides`` are ``key=value``
    strings as on the command line.  ``clock_start`` (a ``time.monotonic()`` value) is when the
    caller's clock for ``timings.total_s`` started; the command line passes its own start.  Raises ``poisonguard.errors.InputError`` for bad input
    (nothing published).
    """
    from poisonguard.errors import InputError
    from poisonguard.orchestrator import run_scan

    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise InputError(f"scan(): out must be the run folder's path, not {out!r}")
    if not isinstance(inputs, (str, os.PathLike)) and not (
            isinstance(inputs, (list, tuple)) and all(isinstance(i, (str, os.PathLike)) for i in inputs)):
        raise InputError(f"scan(): inputs must be a path or a list of paths, not {type(inputs).__name__}")
    cfg = _config(config, overrides)
    if state is not None:
        cfg.state = str(state)
    if provenance_log is not None:
        cfg.provenance_log = str(provenance_log)
    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
    result = run_scan(inputs, str(out), cfg, beam_args, run_id=run_id, started=clock_start)
    s = result.summary
    return ScanResult(s["run_id"], result.run_dir, s["verdict"], s["exit_code"], s["counts"], result.engine, s,
                      result.outputs_dir)


@dataclass
class Findings:
    """Per-row findings of ``screen`` (a pandas DataFrame: id, label, quarantined, reasons, score_*)
    and, per detector and class, the decision that was taken."""

    rows: "object"
    classes: "object"
    summary: dict = field(repr=False)

    @property
    def quarantined(self):
        return self.rows[self.rows["quarantined"]]


def screen(data, y=None, config: Config | str | dict | None = None, *, ids=None,
           overrides: list[str] | None = None) -> Findings:
    """Screen an in-memory dataset: a pyarrow Table or pandas DataFrame with the configured
    id/label/embedding columns, or an embedding matrix ``data`` with labels ``y``.

    Runs the in-memory engine (the same screening core as a scan) and returns flat per-row
    findings; nothing is published and no provenance is written.
    """
    import pyarrow.parquet as pq

    from poisonguard.core.embedding import resolve_embedding
    from poisonguard.core.screening import Screener
    from poisonguard.core.suite import load_suite
    from poisonguard.engines import memory
    from poisonguard.io import ROWS_PER_WORK_ITEM, plan_inputs

    cfg = _config(config, overrides)
    table = _as_table(data, y, ids, cfg)
    table = table.append_column(SCREEN_ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    cols = cfg.columns
    with tempfile.TemporaryDirectory(prefix="poisonguard-screen-") as work, _named_as_given(work):
        path = str(Path(work, "data.parquet"))
        pq.write_table(table, path)
        plan = plan_inputs([path], cfg)
        suite = load_suite(cfg, plan.schema)
        plan, embedding = resolve_embedding(plan, cfg, work)
        parts: list[pa.Table] = []

        def sink(file_index, first_row, clean, held, sample):
            for part, flag in ((clean, False), (held, True)):
                keep = [c for c in part.column_names if c in (cols.id, cols.label, SCREEN_ROW) or is_added_column(c)]
                part = part.select(keep)
                if not flag:
                    part = part.append_column(QUARANTINE_REASONS, pa.array([[]] * part.num_rows, pa.list_(pa.string())))
                parts.append(part.select([c for c in part.column_names if c != RUN_ID]))

        result, fitted = memory.run(Screener(cfg, plan, suite), "screen", sink, ROWS_PER_WORK_ITEM)
    rows = pa.concat_tables(parts, promote_options="default").to_pandas()
    rows["quarantined"] = rows[QUARANTINE_REASONS].map(len) > 0
    rows = rows.sort_values(SCREEN_ROW).drop(columns=SCREEN_ROW).reset_index(drop=True)  # the input's order
    rows = rows.rename(columns={QUARANTINE_REASONS: "reasons"})
    return Findings(rows, _class_table(result.fit), {"counts": result.counts, "detectors": result.fit,
                                                     "copies": copies.summary(result.copies, result.counts),
                                                     "embedding": embedding})


@contextmanager
def _named_as_given(work: str):
    """screen() writes its data to a temporary Parquet file: an input error names what the caller
    gave, not that file, nor the row-order column screen() added."""
    from poisonguard.errors import InputError

    try:
        yield
    except InputError as exc:
        message = str(exc).replace(f"file {Path(work, 'data.parquet')}", "screen() input")
        message = message.replace(f", {SCREEN_ROW}", "").replace(str(work), "<screen() work folder>")
        raise type(exc)(message) from None


def _as_table(data, y, ids, cfg: Config) -> pa.Table:
    import pandas as pd

    cols = cfg.columns
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pd.DataFrame):
        return _arrow("a DataFrame column", lambda: pa.Table.from_pandas(data, preserve_index=False))
    x = np.asarray(data)
    y = None if y is None else np.asarray(y)
    if x.ndim != 2 or y is None or y.ndim != 1 or len(y) != len(x):
        raise ValueError("screen(X, y): X must be a 2-D embedding matrix and y one label per row")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
        raise ValueError(f"screen(X, y): X must hold real numbers, not {x.dtype}")
    x = x.astype(np.float32)
    row_ids = np.arange(len(x)) if ids is None else np.asarray(ids)
    return pa.table({cols.id: _arrow("ids", lambda: pa.array(row_ids)), cols.label: _arrow("y", lambda: pa.array(y)),
                     cols.embedding: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])})


def _arrow(what: str, convert):
    """An Arrow conversion of the caller's values; one that fails (mixed types) is the caller's ValueError."""
    try:
        return convert()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"screen(): {what} holds values of more than one type ({one_line(exc)})") from None


def _class_table(fit: dict):
    import pandas as pd

    rows = [{"detector": name, "class": label, **decision}
            for name, report in fit.items() for label, decision in report["classes"].items()]
    return pd.DataFrame(rows)
