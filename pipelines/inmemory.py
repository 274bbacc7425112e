"""The scan without Beam, on data that fits in memory: same functions, same decisions.

Used by tests (the Beam graph must agree with it) and by benchmarks as the plain numpy floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detectors import merge_states
from pipelines.config import Config
from pipelines.io import discover, plan_inputs
from pipelines.scoring import class_states, duplicate_hashes, fit_detectors, row_reasons, score_block
from pipelines.validation import ID_MISSING, SuiteRunner, check_suite


@dataclass
class InMemoryResult:
    ids: list
    quarantined: np.ndarray
    reasons: list[list[str]]
    scores: dict[str, np.ndarray]
    fitted: dict


def scan_in_memory(inputs: list[str], config: Config) -> InMemoryResult:
    import tempfile

    from pipelines.beam_pipeline import make_block, make_embedder
    from pipelines.scan import resolve_embedding

    paths = discover(inputs)
    plan = plan_inputs(paths, config)
    suite = check_suite(config.suite, plan.schema) if config.suite else None
    tables = [pq.read_table(f.path) for f in plan.files]
    with tempfile.TemporaryDirectory() as work:
        plan, _ = resolve_embedding(plan, config, work)
        embedder = make_embedder(plan, config)
        blocks = [make_block(t, f.index, 0, config, plan.dim, embedder) for f, t in zip(plan.files, tables)]
    per_class: dict = {}
    for block in blocks:
        for label, state in class_states(block, config.max_fit_rows_per_class):
            per_class.setdefault(label, []).append(state)
    fitted = fit_detectors({label: merge_states(states) for label, states in per_class.items()}, config)
    id_hashes = np.concatenate([b.id_hash[~b.mask(ID_MISSING)] for b in blocks])
    dups = duplicate_hashes(id_hashes)
    runner = SuiteRunner(suite, config.suite or "suite") if suite else None
    ids, quarantined, reasons = [], [], []
    scores: dict[str, list] = {name: [] for name in fitted}
    for block, table in zip(blocks, tables):
        if runner is not None:
            masks, _ = runner.failures(table)
            for reason, mask in masks.items():
                block.add_reason(reason, mask)
        block_scores = score_block(block, fitted, dups)
        ids.extend(pa.array(block.ids).to_pylist())
        quarantined.append(block.quarantined)
        reasons.extend(row_reasons(block, np.ones(len(block), dtype=bool)))
        for name, values in block_scores.items():
            scores[name].append(values)
    return InMemoryResult(ids, np.concatenate(quarantined), reasons,
                          {k: np.concatenate(v) for k, v in scores.items()}, fitted)
