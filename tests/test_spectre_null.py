"""SPECTRE's critical value on small classes comes from its own null: clean classes of 71-100 rows
(the size of wine's classes) are not flagged, where the generic small-class term would flag them."""

from __future__ import annotations

import numpy as np

from poisonguard.detectors import Spectre
from poisonguard.detectors.calibration import SMALL_SAMPLE, separated_minority


def _clean_class(n: int, seed: int) -> np.ndarray:
    """Rectified Gaussian rows with a decaying spectrum: a ReLU layer's view of one clean class."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(32, 32)) * (0.8 ** np.arange(32))[None, :]
    return np.maximum(rng.normal(size=(n, 32)) @ mixing.T + 0.3, 0).astype(np.float32)


def _separations(n: int, reps: int) -> np.ndarray:
    out = []
    for seed in range(reps):
        x = _clean_class(n, seed)
        detector = Spectre(min_class_z=None).fit(x, np.zeros(n, int))
        scores = np.sqrt(np.maximum(detector._score_class(detector.class_models_[0], x), 0))
        out.append((separated_minority(scores, min_separation=0.0).separation, detector.decisions_[0].suspicious))
    return np.array(out)


def test_small_clean_classes_stay_below_spectres_critical_value():
    for n in (71, 100):
        found = _separations(n, reps=120)
        separation, flagged = found[:, 0], found[:, 1].astype(bool)
        generic = np.mean(separation >= max(5.0, 2.95 + SMALL_SAMPLE / n))
        assert flagged.mean() <= 0.01, (n, flagged.mean())
        assert generic >= 0.05, (n, generic)  # the generic term would flag these clean classes


def test_a_planted_cluster_in_a_small_class_is_still_found():
    x = _clean_class(100, seed=7)
    x[:8] = x[:8] + 6.0 * np.abs(np.random.default_rng(8).normal(size=32)).astype(np.float32)
    detector = Spectre(min_class_z=None).fit(x, np.zeros(100, int))
    flags = detector.flag(x, np.zeros(100, int))
    assert flags[:8].all() and flags[8:].sum() <= 1
