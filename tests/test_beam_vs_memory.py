"""The Beam graph (in-process and multi-processing) and the in-memory path make the same decisions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import CLEAN, DIGITS_CONFIG, POISONED, read_outputs, run_cli
from pipelines.config import load_config
from pipelines.inmemory import scan_in_memory


def _beam_decisions(run_dir):
    clean, held = read_outputs(run_dir)
    decided = {}
    for row in clean.select(["id", "score_spectral", "score_activation_clustering"]).to_pylist():
        decided[row["id"]] = ([], row["score_spectral"], row["score_activation_clustering"])
    for row in held.select(["id", "quarantine_reasons", "score_spectral", "score_activation_clustering"]).to_pylist():
        decided[row["id"]] = (row["quarantine_reasons"], row["score_spectral"], row["score_activation_clustering"])
    return decided


def _compare(run_dir, sample):
    beam = _beam_decisions(run_dir)
    memory = scan_in_memory([str(sample)], load_config(str(DIGITS_CONFIG)))
    assert len(beam) == len(memory.ids)
    for i, row_id in enumerate(memory.ids):
        reasons, spectral, ac = beam[row_id]
        assert reasons == memory.reasons[i], row_id
        np.testing.assert_allclose(spectral, memory.scores["spectral"][i], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(ac, memory.scores["activation_clustering"][i], rtol=1e-6, atol=1e-9)
    return memory


@pytest.mark.parametrize("sample", [POISONED, CLEAN], ids=["poisoned", "clean"])
def test_beam_and_in_memory_paths_give_the_same_flags(tmp, sample):
    code, _, _ = run_cli("scan", sample, "--out", tmp / "run", "--config", DIGITS_CONFIG, "--quiet",
                         "--set", "batch_size=500")
    assert code == 0
    memory = _compare(tmp / "run", sample)
    if sample == POISONED:
        assert memory.quarantined.sum() > 0


def test_multi_processing_runner_gives_identical_decisions_and_counts(tmp):
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", "--config", DIGITS_CONFIG, "--quiet",
                              "--set", "batch_size=300", "--direct_running_mode", "multi_processing",
                              "--direct_num_workers", "2")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run")
    assert clean.num_rows + held.num_rows == 1797
    assert len(set(clean.column("id").to_pylist()) | set(held.column("id").to_pylist())) == 1797
    _compare(tmp / "run", POISONED)
