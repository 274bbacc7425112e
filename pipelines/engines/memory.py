"""The in-memory engine: the screening core run over the batches in this process.

The same two passes as the Beam graph, calling the same ``Screener``: the score pass over the same
batches (work items of row groups, then ``batch_size`` rows), so the same inputs give the same part
files; in column mode the fit pass reads larger batches (its class states merge the same whatever
the batching).  It runs every scan that names no Beam runner, the tests, notebooks
(``poisonguard.screen``) and the benchmarks' floor.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from poisonguard.core.copies import CopyGroups
from poisonguard.core.screening import Fitted, Screener, duplicate_hashes, fit_detectors, fit_report, \
    merge_class_states, merge_stats, split_views
from poisonguard.core.threads import blas_threads
from poisonguard.engines.outputs import EngineResult
from poisonguard.engines.overlap import Writer, read_ahead
from poisonguard.engines.progress import Progress
from poisonguard.io import read_batches, work_items
from poisonguard.observe import phase
from poisonguard.state import class_moments

Sink = Callable[[int, int, pa.Table, pa.Table, pa.Table | None], None]


# the fit pass reads three columns: bigger batches, fewer per-class merges (at 10,000 classes, one merge
# per class per batch); 32,768 rows of a 128-d embedding, more rows of a narrower one
FIT_BATCH_VALUES = 32768 * 128
SINK_QUEUE = 1  # scored batches waiting for the sink: one more batch in memory


def _batches(screener: Screener, columns: list[str] | None, rows_per_item: int, batch_size: int | None = None):
    def batches():
        for item in work_items(screener.plan, rows_per_item):
            for first_row, table in read_batches(item, columns, batch_size or screener.config.batch_size):
                yield item.file_index, first_row, table

    return read_ahead(batches())


def fit_pass(screener: Screener, rows_per_item: int):
    """Pass 1: per-class mergeable states, the hashes of every non-null id, and the groups of exact
    copies among the scorable rows."""
    cols, config = screener.config.columns, screener.config
    progress = Progress("fit pass", screener.plan.total_rows)
    states, hashes, pairs = {}, [], []
    # (model and proxy mode keep pass 1's batches: their spilled embeddings are keyed by them)
    width = screener.plan.dim if config.embedding.source == "column" else screener.plan.n_features
    fit_rows = config.batch_size if screener.spill_dir else max(config.batch_size, FIT_BATCH_VALUES // max(width or 128, 1))
    for file_index, first_row, table in _batches(screener, [cols.id, cols.label, config.vector_column], rows_per_item,
                                                 fit_rows):
        part = screener.fit_part(screener.make_block(table, file_index, first_row))
        merge_class_states(states, part.states)
        hashes.append(part.id_hashes)
        pairs.append(part.copy_pairs)
        progress.add(table.num_rows)
    copies = CopyGroups.of_pairs(np.concatenate(pairs)) if pairs else CopyGroups()
    return states, (np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)), copies


def run(screener: Screener, run_id: str, sink: Sink, rows_per_item: int) -> tuple[EngineResult, Fitted]:
    """Fit, then score every batch; ``sink(file_index, first_row, clean, held, sample)`` takes each batch's
    rows (``sample``: the report's clean-sample candidates among them, where the screener keeps them),
    in order, on a thread of its own."""
    with blas_threads(screener.config.blas_threads):
        return _run(screener, run_id, sink, rows_per_item)


def _run(screener: Screener, run_id: str, sink: Sink, rows_per_item: int) -> tuple[EngineResult, Fitted]:
    config, plan = screener.config, screener.plan
    with phase("fit"):
        states, hashes, copies = fit_pass(screener, rows_per_item)
        classes = split_views(states)[0]
        fitted = Fitted(fit_detectors(states, config, plan.confirmed_groups), duplicate_hashes(hashes),
                        {c: s.n for c, s in classes.items()}, copies)
        bounds = screener.report_bounds(fitted)

    counts: dict = {}
    score_progress = Progress("score pass", plan.total_rows)
    with phase("score"), Writer(sink, SINK_QUEUE) as write:
        for file_index, first_row, table in _batches(screener, None, rows_per_item):
            block = screener.make_block(table, file_index, first_row, stage="score")
            warnings = screener.validate(table, block)
            scores = screener.score(block, fitted)
            clean, held, stats = screener.split(table, block, scores, run_id, warnings)
            write(file_index, first_row, clean, held, screener.report_candidates(clean, bounds))
            counts = merge_stats(counts, stats)
            score_progress.add(table.num_rows)
    return EngineResult(counts, fit_report(fitted.detectors), class_moments(classes), copies.report()), fitted
