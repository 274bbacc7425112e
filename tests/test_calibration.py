"""The separated-minority test: its statistic under unimodal nulls, and on real minorities."""

from __future__ import annotations

import numpy as np
import pytest

from poisonguard.detectors.calibration import gate_by_other_classes, separated_minority


@pytest.mark.parametrize("n", [50, 500, 20000])
@pytest.mark.parametrize("dist", ["normal", "uniform", "halfnormal", "t5"])
def test_unimodal_scores_are_never_called_separated(n, dist):
    rng = np.random.default_rng(n)
    for _ in range(20):
        values = {"normal": rng.normal(size=n), "uniform": rng.uniform(size=n),
                  "halfnormal": np.abs(rng.normal(size=n)), "t5": rng.standard_t(5, size=n)}[dist]
        decision = separated_minority(values)
        assert not decision.suspicious


def test_separated_minority_is_found_with_a_threshold_in_the_gap():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=950), rng.normal(loc=9, size=50)])
    decision = separated_minority(values)
    assert decision.suspicious and decision.separation > 6
    assert 3 < decision.threshold < 7
    assert abs(decision.minority_share - 0.05) < 0.01


def test_tiny_or_constant_classes_are_not_tested():
    assert separated_minority(np.arange(5.0)).why.startswith("fewer than")
    assert separated_minority(np.ones(100)).why == "constant scores"


def test_gate_keeps_only_classes_that_stand_out_among_classes():
    """Most classes show a natural sub-mode (D ~ 5); only the class far beyond them stays suspicious."""
    rng = np.random.default_rng(1)
    decisions = {}
    for c in range(8):
        loc = 16 if c == 0 else 5.5 + 0.3 * c
        values = np.concatenate([rng.normal(size=400), rng.normal(loc=loc, size=40)])
        decisions[c] = separated_minority(values)
    assert all(d.suspicious for d in decisions.values())
    gated = gate_by_other_classes(decisions, min_class_z=3.0)
    assert gated[0].suspicious and gated[0].class_z > 3.0
    assert not any(gated[c].suspicious for c in range(1, 8))
    assert "not an outlier among classes" in gated[1].why


def test_gate_needs_enough_classes_for_a_reference():
    rng = np.random.default_rng(2)
    decisions = {c: separated_minority(np.concatenate([rng.normal(size=300), rng.normal(loc=8, size=20)]))
                 for c in range(3)}
    assert gate_by_other_classes(decisions, min_class_z=3.0) == decisions


def test_a_split_pinned_at_the_share_limit_is_a_sub_mode_not_a_minority():
    """Two well-separated groups of 60% and 40%: the best split wants the whole 40% group, more than
    max_share (35%) allows, so it is pinned at the limit and not flagged; the same gap with a 10%
    group is."""
    from poisonguard.detectors.calibration import PINNED

    rng = np.random.default_rng(0)
    large = np.r_[rng.normal(size=600), 10 + rng.normal(size=400)]
    decision = separated_minority(large, max_share=0.35, min_separation=4.0)
    assert not decision.suspicious and decision.why == PINNED and decision.threshold == np.inf
    assert decision.separation >= 4.0 and abs(decision.minority_share - 0.35) < 0.01
    small = np.r_[rng.normal(size=900), 10 + rng.normal(size=100)]
    assert separated_minority(small, max_share=0.35, min_separation=4.0).suspicious


def test_a_candidate_split_keeps_its_threshold_but_is_not_flagged():
    from poisonguard.detectors.calibration import CANDIDATE

    rng = np.random.default_rng(1)
    scores = np.r_[rng.normal(size=950), 5.0 + rng.normal(size=50)]  # D about 4.6
    plain = separated_minority(scores, max_share=0.35, min_separation=5.0)
    candidate = separated_minority(scores, max_share=0.35, min_separation=5.0, candidate_separation=3.5)
    assert not plain.suspicious and plain.threshold == np.inf
    assert 3.5 <= candidate.separation < 5.0 and candidate.why == CANDIDATE and not candidate.suspicious
    assert np.isfinite(candidate.threshold) and 1.0 < candidate.threshold < 4.0


def test_a_gated_split_with_the_diffuse_shape_still_counts():
    from dataclasses import replace

    from poisonguard.detectors.base import diffuse_despite_gate
    from poisonguard.detectors.calibration import DIFFUSE, ClassDecision

    before = ClassDecision(True, 3.0, 5.7, 0.05, 900, "separated minority", spread_ratio=2.5)
    after = replace(before, suspicious=False, threshold=float("inf"), class_z=4.3,
                    why="separated minority, but not an outlier among classes (z=4.3)")
    kept = diffuse_despite_gate(before, after)
    assert kept.suspicious and kept.threshold == 3.0 and kept.why.startswith(DIFFUSE) and kept.class_z == 4.3
    for shape in ({"spread_ratio": 0.9}, {"spread_ratio": 7.0}, {"minority_share": 0.2}, {"minority_share": 0.004}):
        assert diffuse_despite_gate(replace(before, **shape), after) is after  # a class-like, scattered, large or tiny group
    assert diffuse_despite_gate(before, before) is before  # not gated: unchanged


def test_the_diffuse_path_is_withheld_where_it_fires_in_three_or_more_classes():
    from poisonguard.detectors.base import withhold_systemic_diffuse
    from poisonguard.detectors.calibration import DIFFUSE, ClassDecision

    def diffuse(share):
        return ClassDecision(True, 1.5, 3.8, share, 500, f"{DIFFUSE} (spread 2.10 times the rest of its class)")

    separated = ClassDecision(True, 2.0, 9.0, 0.05, 500, "separated minority")
    clean = ClassDecision(False, float("inf"), 2.1, 0.2, 500, "no separated minority")
    two = {"a": diffuse(0.04), "b": diffuse(0.06), "c": separated, "d": clean}
    assert withhold_systemic_diffuse(two) == two  # a backdoor's target, or two: kept
    three = {**two, "e": diffuse(0.05)}
    out = withhold_systemic_diffuse(three)
    for label in ("a", "b", "e"):
        assert not out[label].suspicious and out[label].threshold == float("inf")
        assert out[label].why.startswith("not flagged: a diffuse separated minority") and "in 3 classes" in out[label].why
        assert out[label].minority_share == three[label].minority_share  # the evidence stays readable
    assert out["c"] == separated and out["d"] == clean  # a separated minority is not the diffuse path's


def test_a_detector_applies_the_systemic_diffuse_rule_to_its_own_decisions(monkeypatch):
    """Wired into every sub-population detector's fit: with the bound lowered to the number of
    classes where the diffuse path fired (8 Gaussian classes, 5% random flips: activation clustering
    finds a diffuse group in one of them here), those decisions are withdrawn with the rule's reason."""
    import poisonguard.detectors.base as base
    from poisonguard.detectors import ActivationClustering

    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(8), 500)
    x = (rng.normal(scale=4.0, size=(8, 16))[y_true] + rng.normal(size=(4000, 16))).astype(np.float32)
    y = y_true.copy()
    flip = rng.random(len(y)) < 0.05
    y[flip] = (y[flip] + rng.integers(1, 8, flip.sum())) % 8
    found = ActivationClustering().fit(x, y).decisions_
    diffuse = [c for c, d in found.items() if d.suspicious and d.why.startswith("a diffuse")]
    assert diffuse
    monkeypatch.setattr(base, "DIFFUSE_SYSTEMIC_CLASSES", len(diffuse))
    withheld = ActivationClustering().fit(x, y).decisions_
    for label in diffuse:
        assert not withheld[label].suspicious and f"in {len(diffuse)} classes" in withheld[label].why
    assert {c: d.to_dict() for c, d in withheld.items() if c not in diffuse} == \
        {c: d.to_dict() for c, d in found.items() if c not in diffuse}  # the other classes' decisions as they were
