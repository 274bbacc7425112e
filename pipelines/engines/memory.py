"""The in-memory engine: the screening core run over the batches in this process.

The same two passes as the Beam graph, over the same batches (work items of row groups, then
``batch_size`` rows), calling the same ``Screener``; so the same inputs give the same part files.
It runs small scans without Beam's start-up cost, the tests, notebooks (``poisonguard.screen``)
and the benchmarks' reference.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from poisonguard.core.screening import Fitted, Screener, duplicate_hashes, fit_detectors, fit_report, \
    merge_class_states, merge_stats
from poisonguard.engines.outputs import EngineResult
from poisonguard.engines.progress import Progress
from poisonguard.io import read_batches, work_items
from poisonguard.state import class_moments

Sink = Callable[[int, int, pa.Table, pa.Table], None]


def run(screener: Screener, run_id: str, sink: Sink, rows_per_item: int) -> tuple[EngineResult, Fitted]:
    """Fit, then score every batch; ``sink(file_index, first_row, clean, held)`` takes each batch's rows."""
    config, plan = screener.config, screener.plan
    cols = config.columns
    items = work_items(plan, rows_per_item)

    def batches(columns):
        for item in items:
            for first_row, table in read_batches(item, columns, config.batch_size):
                yield item.file_index, first_row, table

    fit_progress = Progress("fit pass", plan.total_rows)
    states, hashes = {}, []
    for file_index, first_row, table in batches([cols.id, cols.label, config.vector_column]):
        part = screener.fit_part(screener.make_block(table, file_index, first_row))
        merge_class_states(states, part.states)
        hashes.append(part.id_hashes)
        fit_progress.add(table.num_rows)
    all_ids = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    fitted = Fitted(fit_detectors(states, config), duplicate_hashes(all_ids))

    counts: dict = {}
    score_progress = Progress("score pass", plan.total_rows)
    for file_index, first_row, table in batches(None):
        block = screener.make_block(table, file_index, first_row)
        warnings = screener.validate(table, block)
        scores = screener.score(block, fitted)
        clean, held, stats = screener.split(table, block, scores, run_id, warnings)
        sink(file_index, first_row, clean, held)
        counts = merge_stats(counts, stats)
        score_progress.add(table.num_rows)
    return EngineResult(counts, fit_report(fitted.detectors), class_moments(states)), fitted
