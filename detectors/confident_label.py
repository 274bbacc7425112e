"""Confident learning (Northcutt, Jiang, Chuang, JAIR 2021, "Confident Learning: Estimating
Uncertainty in Dataset Labels"), on a linear model over the embeddings.

Fit, from the bounded per-class samples:
1. out-of-fold predicted probabilities p(k | x) of a multinomial logistic regression on the
   standardised embeddings (``n_folds`` folds, seeded);
2. per-class self-confidence thresholds  t_j = mean of p(j | x) over the sample rows labelled j;
3. the confident joint: a row labelled y is a label issue when p(y | x) < t_y and some other class
   k reaches its own threshold, p(k | x) >= t_k (the off-diagonal of the confident joint).
A class is suspicious when its out-of-fold issues number at least ``min_rows`` and at most
``max_share`` of it (more, and the labels rather than the rows are in question).

The logistic regression is strongly regularised (``C`` = 0.01, chosen on the development benchmark
families: it flags more of a targeted flip than C = 1 at the same precision), and the model that scores
every row is refitted on the sample *without* its out-of-fold label issues (confident learning's
prune-and-retrain), so it does not learn the flipped rows' labels back.

Score, for every row in the second pass: s(x) = t_y - p(y | x) from the model refitted on the whole
training sample (higher = more suspicious), O(d x classes) per row, against k-NN's O(reference x d).
A row is flagged where s > 0, another class is confident, and its class is suspicious.

The out-of-fold fit, the thresholds and the pruned model are ``detectors.probe``'s linear probe,
which the scan fits once for both label checks.  Where the probe finds the representation weak (its
out-of-fold errors are mostly not confident label issues: classes overlap), no class is flagged
and ``representation_`` says why; on the development families' random-feature embeddings this
detector had flagged 16-57% of the clean rows' class samples as issues.

**Flips that a memorising model has learnt** (``trim_quantile``, 0.25; None turns it off).  A
network trained to near-zero loss on poisoned labels carries a flipped row to its new class's side,
so even out of fold the probe classifies it by that label and the confident joint is empty (signals
and breast cancer under an MLP: F1 0 at AUROC 0.95-0.99).  It is carried only just across: its
self-confidence is low.  So the probe is refitted without each class's least self-confident quarter
(``detectors.probe.trimmed_margins``), and in a class with too few confident issues the margins
p(y | x) - max_k p(k | x) of that trimmed model go through ``separated_minority`` (the sub-population
detectors' test: D >= 4, more in small classes).  A separated low group is flagged only where the
trimmed model assigns at least ``REASSIGNED`` (65%) of it to another class: a model that never
learnt those rows' region puts them elsewhere (Chen et al.'s exclusionary question again); where it
keeps them, the group is a boundary of the class and the decision says so.  Rows are flagged by the
trimmed model's margin in the second pass, in those classes only.  This path runs after the
mass-quarantine guard and is not held back by it: it runs only where the probe finds the
representation strong, flags at most ``max_share`` of a class, and a random flip of a two-class
table flags both classes, which the guard reads as a weak representation (breast cancer / MLP's 20%
random flip: F1 0.81 with the path, 0 if the guard held it back).  Chosen on the development
families (round 25, ``docs/detection-history.md``): mean F1 0.5867 -> 0.6084, label flips meeting
F1 0.8 27 -> 29 of 60 (breast cancer / MLP's 20% random flip 0.00 -> 0.81, iris / MLP's 20% targeted
flip 0.42 -> 0.92, signals / MLP's 0.00 -> 0.59, two seeds of three), no target or clean control lost.  Without the reassignment rule (or at
50%), CNN embeddings' clean classes lost 7-34% of their rows beside a backdoor (patches meeting F1
0.9 14 -> 12 of 36): groups the trimmed model reassigned 57-63%, and flips 58-100%.

A class of fewer than ``calibration.MIN_CLASS_ROWS`` (20) rows is not judged ("fewer than 20 rows",
as the other detectors say): fitted out of fold on four or five of its rows, the regression
under-predicts a rare class, and a long tail of 6-row classes beside five of 300 had 15-35% of its
rows taken as label issues (``tests/test_detection_quality.py``).  Its rows still count as every
other class's neighbours and competitors; a flip out of it into a large class is found there.

Memory is bounded: the model trains on at most ``max_train_rows`` sample rows (20,000: the 2,000 per
class of 10 classes; fewer per class when there are more classes), and with more than
``max_classes`` classes (1,000) confident learning is not run at all (its probabilities cost rows x
classes: 10,000 classes would need 75 GB of out-of-fold probabilities for 1M rows); the summary
counts those classes as untested, and ``knn_label`` still checks their labels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from sklearn.utils.validation import check_is_fitted

from poisonguard.detectors.base import COMMON_BOUNDS, PoisonDetector, codes_in, store_params
from poisonguard.detectors.calibration import (MIN_CLASS_ROWS, NOT_TESTED, ClassDecision, _finite_or_none,
                                               guard_mass_quarantine, separated_minority, too_small)
from poisonguard.detectors.probe import LabelProbe, fit_probe, label_issues, margins
from poisonguard.detectors.stats import ClassState


class ConfidentLabel(PoisonDetector):
    name = "confident_label"

    _parameter_bounds = {**COMMON_BOUNDS, "n_folds": {"ge": 2, "le": 20}, "C": {"gt": 0.0, "le": 1e6},
                         "max_train_rows_per_class": {"ge": 10, "le": 1_000_000},
                         "max_train_rows": {"ge": 100, "le": 10_000_000}, "max_classes": {"ge": 2, "le": 100_000},
                         "trim_quantile": {"gt": 0.0, "lt": 1.0}}

    def __init__(self, *, n_folds: int = 5, C: float = 0.01, max_train_rows_per_class: int = 2000,
                 max_train_rows: int = 20000, max_classes: int = 1000,
                 max_share: float = 0.35, min_separation: float = 4.0, min_rows: int = 1,
                 min_class_z: float | None = 3.0, expected_poison_rate: float | None = None,
                 max_fit_rows_per_class: int = 5000, random_state: int = 0,
                 accept_mass_quarantine: bool = False, trim_quantile: float | None = 0.25):
        store_params(self, locals())

    def fit_states(self, states: dict[object, ClassState], probe: LabelProbe | None = None):
        """``probe``: the scan's shared linear probe (``detectors.probe``), fitted once for both label
        checks with this detector's parameters; fitted here when not given."""
        self._start_fit(states)
        self.decisions_ = {label: too_small(s.n) if s.n < MIN_CLASS_ROWS else NOT_TESTED for label, s in states.items()}
        self.class_models_ = {label: None for label in states}
        self.model_ = self.mass_quarantine_ = self.representation_ = self.trimmed_ = None
        if sum(len(s.sample_x) >= self.n_folds for s in states.values()) > self.max_classes:
            why = f"not run: more than max_classes ({self.max_classes}) classes; knn_label checks the labels"
            self.decisions_ = {label: replace(NOT_TESTED, why=why) for label in states}
            return self
        if probe is None:
            probe = fit_probe(states, **self.probe_params())
        if probe is None:
            return self
        self.representation_ = {**probe.representation, "effect": "withheld" if probe.weak else None}
        labels, counts, issues = probe.labels, probe.counts, probe.issues
        self.mean_, self.scale_, self.thresholds_, self.model_ = probe.mean, probe.scale, probe.thresholds, probe.model
        self.labels_ = labels
        self.index_ = pd.Index(labels, dtype=object)
        starts = np.concatenate([[0], np.cumsum(counts)])
        hits = np.add.reduceat(issues, starts[:-1])
        for j, label in enumerate(labels):
            share = hits[j] / counts[j]
            self.class_models_[label] = {"threshold_self_confidence": float(self.thresholds_[j])}
            if states[label].n < MIN_CLASS_ROWS:
                continue  # too small to judge: its decision was set above
            if probe.weak:
                why = "withheld: " + probe.representation["why"]
                self.decisions_[label] = ClassDecision(False, float("inf"), float("nan"), share, int(counts[j]), why)
            elif hits[j] >= self.min_rows and share <= self.max_share:
                self.decisions_[label] = ClassDecision(True, 0.0, float("nan"), share, int(counts[j]),
                                                       "confident label issues")
            else:
                why = FEW if hits[j] < self.min_rows else "most of the class is in question"
                self.decisions_[label] = ClassDecision(False, float("inf"), float("nan"), share, int(counts[j]), why)
        self.decisions_, self.mass_quarantine_ = guard_mass_quarantine(
            self.decisions_, accept=self.accept_mass_quarantine or self.expected_poison_rate is not None,
            confidence=probe.representation["issue_confidence"], classes=len(probe.labels))
        self.margin_thresholds_ = np.full(len(labels), np.inf)
        if probe.trimmed_margin is not None:
            self._memorised_flips(probe, states, starts)
        self.suspicious_ = np.array([self.decisions_[c].suspicious for c in labels])  # by class code
        self.margin_thresholds_[~self.suspicious_] = np.inf  # e.g. held back by the mass-quarantine guard
        self.issue_classes_ = self.suspicious_ & ~np.isfinite(self.margin_thresholds_)
        self.linear_ = None
        return self

    def _memorised_flips(self, probe: LabelProbe, states: dict, starts: np.ndarray) -> None:
        """Classes with too few confident issues, asked whether the trimmed model's margins
        (``detectors.probe.trimmed_margins``) hold a separated low minority (``separated_minority`` on
        minus the margin: the test and critical values every sub-population detector uses) that the
        trimmed model mostly assigns to another class (at least ``REASSIGNED`` of it)."""
        self.trimmed_ = probe.trimmed
        for j, label in enumerate(probe.labels):
            decision = self.decisions_[label]
            if decision.suspicious or states[label].n < MIN_CLASS_ROWS or not decision.why.startswith(FEW):
                continue
            low = -probe.trimmed_margin[starts[j]:starts[j + 1]]
            found = separated_minority(low, max_share=self.max_share, min_separation=self.min_separation)
            model = self.class_models_[label]
            model["trimmed_margin_separation"] = _finite_or_none(found.separation)
            if not found.suspicious:
                continue
            reassigned = float(np.mean(low[low > found.threshold] > 0))
            model["trimmed_margin_threshold"] = -found.threshold
            model["trimmed_reassigned_share"] = round(reassigned, 4)
            if reassigned >= REASSIGNED:
                self.margin_thresholds_[j] = found.threshold
                self.decisions_[label] = replace(found, why=MEMORISED)
            else:
                self.decisions_[label] = replace(decision, why=f"{FEW}; a separated low-margin minority, but the "
                                                 f"trimmed model assigns only {reassigned:.0%} of it to another "
                                                 f"class (under {REASSIGNED:.0%}): a class boundary, not flips")

    def probe_params(self) -> dict:
        return {"n_folds": self.n_folds, "C": self.C, "max_train_rows_per_class": self.max_train_rows_per_class,
                "max_train_rows": self.max_train_rows, "max_classes": self.max_classes,
                "random_state": self.random_state, "trim_quantile": self.trim_quantile}

    def _issues(self, proba: np.ndarray, y: np.ndarray) -> np.ndarray:
        return label_issues(proba, y, self.thresholds_)

    def _proba(self, X, y, proba_fn=None):
        """(probabilities, class codes, rows with a known class) of X under the refitted model;
        ``proba_fn`` (standardised rows -> probabilities) replaces the model's own, e.g. on a GPU."""
        codes = codes_in(self.index_, y)
        known = codes >= 0
        proba = np.zeros((len(X), len(self.labels_)))
        if known.any():
            X = np.asarray(X)
            z = np.array(X if known.all() else X[known], dtype=np.float64)  # one copy, standardised in place
            z -= self.mean_
            z /= self.scale_
            proba[known] = (proba_fn or self.model_.predict_proba)(z)
        return proba, codes, known

    def score_and_flag(self, X, y, sample_keys=None, proba_fn=None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and flags from one computation of the probabilities."""
        check_is_fitted(self, "decisions_")
        scores, flags = np.full(len(X), np.nan), np.zeros(len(X), dtype=bool)
        if self.model_ is None:
            return scores, flags
        proba, codes, known = self._proba(X, np.asarray(y), proba_fn)
        rows = np.flatnonzero(known)
        scores[rows] = self.thresholds_[codes[rows]] - proba[rows, codes[rows]]
        flags[rows] = self._issues(proba[rows], codes[rows]) & self.issue_classes_[codes[rows]]
        asked = rows[np.isfinite(self.margin_thresholds_[codes[rows]])]
        if len(asked):  # classes found by the trimmed model's margins: its probabilities for their rows only
            z = (np.asarray(X, dtype=np.float64)[asked] - self.mean_) / self.scale_
            low = -margins(self.trimmed_.predict_proba(z), codes[asked])
            flags[asked] = low > self.margin_thresholds_[codes[asked]]
        return scores, flags

    def score_samples(self, X, y, sample_keys=None):
        return self.score_and_flag(X, y, sample_keys)[0]

    def flag(self, X, y, sample_keys=None, scores=None):
        return self.score_and_flag(X, y, sample_keys)[1]


REASSIGNED = 0.65  # of the rows past the split, the share the trimmed model assigns to another class
FEW = "too few confident label issues"
MEMORISED = ("a separated low-margin minority: rows that a linear model fitted without the class's least "
             "self-confident rows barely keeps in it (label flips that a memorising model has learnt)")
