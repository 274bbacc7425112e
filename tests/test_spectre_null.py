"""SPECTRE's critical value on small classes comes from its own null: clean classes of 71-100 rows
(the size of wine's classes) are not flagged, where the generic small-class term would flag them;
and its second test, in all directions, finds what the top directions drop without flagging a
sub-mode that every class has."""

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


def _classes(n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([_clean_class(n, seed * 100 + c) + 3.0 * c for c in range(count)])
    return x, np.repeat(np.arange(count), n)


def test_a_cluster_in_a_low_variance_direction_is_found_in_all_directions():
    x, y = _classes(400, 6, seed=3)
    x = x.astype(np.float64)
    first = y == 0
    values, vectors = np.linalg.eigh(np.cov(x[first], rowvar=False))
    truth = np.zeros(len(x), bool)
    truth[:12] = True  # 3% of class 0, offset along its least varying direction
    x[truth] += 12.0 * np.sqrt(values[0]) * vectors[:, 0]
    x = x.astype(np.float32)
    top_only = Spectre(all_directions=False).fit(x, y)
    both = Spectre().fit(x, y)
    assert not top_only.flag(x, y)[truth].any()  # the top 95% of the variance does not hold the offset
    flags = both.flag(x, y)
    assert flags[truth].all() and flags[~truth].sum() <= 1
    assert "all directions" in both.decisions_[0].why
    assert not any(d.suspicious for c, d in both.decisions_.items() if c != 0)


def test_a_low_variance_sub_mode_that_every_class_has_is_not_flagged():
    """The second test answers to the cross-class gate, the diffuse path included: a tight group
    in a low-variance direction is what natural data has in every class (a second way of drawing
    it), and what sets poison apart is that it stands out among the classes."""
    x, y = _classes(400, 6, seed=5)
    x = x.astype(np.float64)
    for c in range(6):
        rows = np.flatnonzero(y == c)
        values, vectors = np.linalg.eigh(np.cov(x[rows], rowvar=False))
        x[rows[:16]] += 12.0 * np.sqrt(values[0]) * vectors[:, 0]
    x = x.astype(np.float32)
    ungated = Spectre(min_class_z=None, explained_variance=1.0).fit(x, y)
    assert sum(d.suspicious for d in ungated.decisions_.values()) >= 4  # the sub-modes do separate
    assert not any(d.suspicious for d in Spectre().fit(x, y).decisions_.values())
