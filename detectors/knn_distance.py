"""k-NN distance within the class (Ramaswamy, Rastogi, Shim, SIGMOD 2000, "Efficient Algorithms for
Mining Outliers from Large Data Sets"), read per class as the other cluster detectors are.

A row's score is the logarithm of its distance to its k-th nearest row *of its own class*
(Euclidean, in the embedding; k = ``n_neighbors``):

    s(x) = log || x - r_(k)(x) ||,   r_(k)(x) the k-th nearest row of R_y(x) other than x itself,

where R_c is a reference of ``reference_rows`` rows of class c: the first rows of the class's
bounded sample, a uniform subsample since the sample is ordered by a seeded hash.  A reference row
identical to x (x itself, or an exact copy) is not its own neighbour.

Why it adds to SPECTRE and spectral signatures: a dirty-label backdoor stamps its trigger on rows of
*other* classes and relabels them, and in the poisoned model's representation those rows keep much
of their source classes' variation.  They sit in the target class's sparse periphery, each far from
the others and from the clean rows, but not all in one direction: a mean-and-covariance score
(SPECTRE's whitened distance, a top eigenvector) ranks them among the class's own tail, while their
local density is what sets them apart.  On the development benchmark families (seed 0), the k-NN
distance ranked the backdoors' rows at a median within-class AUROC of 0.991 on the sources whose
classes it scores (1.000 on digits and signals under the MLP and CNN; 0.983 counting iris, whose
50-row classes it does not score), where SPECTRE's best split did not separate them (signals / CNN, 3% of
the target class: SPECTRE D = 4.3 at 12% of the class and AUROC 0.97; here the 24 poisoned rows are
the 24 most isolated, at 2-4 times the class's median distance).

**The decision** is ``detectors.calibration.separated_minority`` on s(x) of the class sample, with
the cross-class gate (``min_class_z``), the natural-sub-mode rule and the mass-quarantine guard of
every cluster detector, and two differences:

* no diffuse-minority path (``detectors.base.diffuse_minority``): that path accepts a less separated
  split whose group is wider than the rest of its class, and the most isolated rows of any class are
  wider than the rest by construction;
* classes of fewer than ``min_class_rows`` (150) rows are not tested, and the small-class critical
  value is that of SPECTRE, max(``min_separation``, 2.95 + 400 / n).  On simulated clean classes
  (32-d Gaussian, rectified-Gaussian and Student-t3 rows with a decaying spectrum, 150 per size) the
  best split of s(x) reached at most 3.3 (Gaussian, rectified) at 150 rows; the heavy-tailed t3
  classes reached 5.2 (99.7% quantile) at 150 rows and 4.1 at 300, 2.6 at 1,000: the critical value
  is 5.6 at 150 rows and 4.3 at 300.  On the development families' 50-row iris classes a version
  without the bound (and without the diffuse path) lost F1 on six iris attacks (up to 0.05) and a
  target (iris / random's 10% blend 0.71 -> 0.68), and gained iris / MLP's 20% targeted flip (0.42 ->
  0.71): mean F1 0.4751 against 0.4742 with the bound, one target fewer.  Defaults are chosen by
  targets met, then mean F1, and the simulated null says the bound is needed.

**A second test: an excess of isolated rows** (``_test_tails``).  Where a class's distances have a
long tail, the best split of s(x) takes a third of the class, the poison and the tail together, at a
separation under the critical value (a 5% patch in 12x12 glyphs on random features: D = 2.1 at 35%
of the class, while the 160 poisoned rows are its most isolated).  So each class also counts its
decision rows past a robust z of ``TAIL_Z`` (3.5) of its own distances, z = (s - median) / (1.4826
MAD), and a class whose share of them is an outlier among the classes' shares (robust z >= 3 against
the others' median and MAD; at least 5 such rows, at least 5 tested classes) is flagged from that
cut.  The MAD is floored at two binomial standard errors of the classes' median share (at least
0.2%) in the class's decision rows, the share's own sampling noise: 0.30 points for a class of 900
rows, 0.16 for one of 3,200, so that a 1% excess counts in a large class as a 3% one does in a
small one.  Robust z makes the share comparable across classes
and families: on the development clean controls every class of 150 rows or more had 0-1.2% of its
rows past the cut (the held-out ones 0-1.2% too).  Chosen
on the development families by targets met, then mean F1: with the test, mean F1 0.4742 -> 0.5233,
patches >= 3% meeting F1 0.9 7 -> 12 of 36, blends 4 -> 7 of 24, every clean control's flagged share
unchanged (digits / MLP 3% patch 0.31 -> 0.90, digits / random 3% 0.00 -> 0.91, signals / CNN 5% blend
0.26 -> 0.78; lost: digits / CNN's targeted flips 0.98 -> 0.95 and 0.88 -> 0.84, modes / MLP 3% patch
0.87 -> 0.81).  A cut at z = 3 met fewer targets (patches 8, ~1% patches 2 of 12; mean F1 0.5320) and
took signals / CNN's clean control from 0.05% to 0.12% of rows; a class z of 5 met 11 and 6 (mean F1
0.5130).  Those figures are with a fixed floor of half a point; the floor by sampling error then took
~1% patches meeting F1 0.5 from 1 to 3 of 12 and mean F1 0.5233 -> 0.5341, the other target counts
unchanged (digits / random 1% patch 0.00 -> 0.62, signals / CNN 1% 0.37 -> 0.54; lost: signals / MLP
3% 0.98 -> 0.92, digits / CNN 5% blend 0.81 -> 0.75), signals / MLP's clean control 0.00% -> 0.04%.

**How far down a flagged tail reaches** (``_step_down``).  The cut at z 3.5 finds a class, not all of
its poison: the larger a backdoor, the more of its rows sit among the class's own tail (digits / MLP,
10% patch: poisoned rows at 2.4 times the class's median distance, 35 of 89 past the cut, recall
0.39 at precision 1.0).  So a flagged class's cut moves to the lowest of z = 3.25, 3.0, ... 2.0 where
the rows it adds beyond the 3.5 cut are at least half in excess of what the other classes' median
shares at that z expect of a class of this size, after two Poisson standard errors of that
expectation.  The shares the class was flagged on, and the classes not flagged, are untouched.
Chosen on the development families by targets met, then mean F1: mean F1 0.5341 -> 0.5413, patches
>= 3% meeting F1 0.9 12 -> 13 of 36, blends 7 -> 8 of 24, every clean control's flagged share
identical (digits / random 10% patch 0.55 -> 0.94, digits / MLP 5% and 10% 0.85 / 0.82 -> 0.93 / 0.91,
signals / CNN 10% blend 0.58 -> 0.75; lost: digits / CNN 5% patch 0.69 -> 0.63, where a clean class's
heavier tail is read as excess).  Judging each step only on the rows it adds, and stopping at the
first that fails, met no more targets (half in excess after one standard error: mean F1 0.5399; 0.6,
0.7 and 0.8 with none: 0.5400, 0.5393 with a patch target lost, 0.5375 with three lost).
Held out (reported, not chosen on): mean F1 0.7152 -> 0.7215, patches >= 3% 29 -> 32 of 45, blends
16 -> 17 of 30, clean controls identical (shapes / random 3-10% patch 0.64-0.86 -> 0.92-0.96).

**Cost.** The nearest reference rows are found from float32 distances (one BLAS product per block of
rows, centred on the class) and their exact float64 distances taken from the differences; the fit's
work, decision rows x reference rows summed over the classes, is bounded by ``max_distance_pairs``
(``fit_states``).  Where a class is not suspicious its reference is dropped after the fit and its
rows are not scored (NaN) unless ``score_every_row``: the score pass costs a distance search only for
the classes that can be flagged, and the fitted detector stays small.  At 1M x 128 in 10 classes the
scan took 26.1 s against 23.1 s without the detector (``benchmarks/results/scale.md``).

Chosen on the development families (``benchmarks/families.py``): with it, the default detectors'
development mean F1 went from 0.4648 to 0.4742 (signals / CNN 5% patch 0.35 -> 0.97, signals / MLP 3%
0.66 -> 0.99) with the clean controls unchanged; the held-out figures are reported in
``benchmarks/results/families.md`` (mean F1 0.6413 -> 0.6655).
"""

from __future__ import annotations

import numpy as np

from poisonguard.detectors.base import COMMON_BOUNDS, PoisonDetector, store_params
from poisonguard.detectors.calibration import HELD_BACK, ClassDecision, guard_mass_quarantine, leave_one_out_z, \
    others_median
from poisonguard.detectors.stats import ClassState

BLOCK_ROWS = 1024  # rows per distance block: BLOCK_ROWS x reference_rows float32 at a time
CANDIDATE_MARGIN = 6  # float32 candidates beyond the k + 1 nearest whose exact distances are taken
TAIL_Z = 3.5  # robust z within the class past which a row is in the class's isolated tail ...
TAIL_CLASS_Z = 3.0  # ... and the class's tail share must stand this far above the other classes' (robust z)
TAIL_SE = 2.0  # the other classes' spread of tail shares, floored at 2 binomial standard errors ...
TAIL_P0 = 0.002  # ... of the classes' median share (at least 0.2%) in this class's decision rows
TAIL_MIN_ROWS = 5  # decision rows a class's tail needs
TAIL_MIN_CLASSES = 5  # classes with a tail share the comparison needs (as the cross-class gate)
TAIL_STEPS = (3.25, 3.0, 2.75, 2.5, 2.25, 2.0)  # lower cuts a flagged class's tail may take the lowest of ...
TAIL_STEP_PRECISION = 0.5  # ... where the rows it adds are at least this share in excess of the other classes' ...
TAIL_STEP_SE = 2.0  # ... after this many Poisson standard errors of that expectation
TAIL = "an excess of isolated rows"


class KnnDistance(PoisonDetector):
    name = "knn_distance"
    _diffuse = False  # the most isolated rows are wider than the rest of any class (module docstring)
    _small_sample = 400.0  # its null on small classes (module docstring), as SPECTRE's

    _parameter_bounds = {**COMMON_BOUNDS, "n_neighbors": {"ge": 1, "le": 1000},
                         "reference_rows": {"ge": 20, "le": 1_000_000}, "min_class_rows": {"ge": 20},
                         "max_distance_pairs": {"ge": 1_000_000}}

    def __init__(self, *, n_neighbors: int = 10, reference_rows: int = 2000, min_class_rows: int = 150,
                 max_share: float = 0.35, min_separation: float = 4.0, min_rows: int = 3,
                 min_class_z: float | None = 6.0, expected_poison_rate: float | None = None,
                 max_fit_rows_per_class: int = 5000, random_state: int = 0,
                 accept_mass_quarantine: bool = False, score_every_row: bool = False,
                 max_distance_pairs: int = 100_000_000):
        store_params(self, locals())

    def fit_states(self, states, *, features=None):
        """The fit's distance work, sum over classes of decision rows x reference rows, is bounded by
        ``max_distance_pairs`` (1e8: 10 classes of 5,000 decision rows and 2,000 reference rows,
        about 2 s): past it both shrink by one factor in every class (to no fewer than
        ``min_class_rows`` decision rows), so 1,000 classes cost what 10 do, not 100 times more."""
        sizes = np.array([len(s.sample_x) for s in states.values()
                          if len(s.sample_x) >= self.min_class_rows or self.expected_poison_rate is not None], float)
        pairs = float(np.sum(sizes * np.minimum(sizes, self.reference_rows)))
        self._shrink = min(1.0, float(np.sqrt(self.max_distance_pairs / pairs))) if pairs > 0 else 1.0
        try:
            super().fit_states(states, features=features)
        finally:
            del self._shrink
        if self.expected_poison_rate is None:
            self._test_tails()
        # only a class that can be flagged keeps its model: the others' rows are not searched (NaN)
        if not self.score_every_row:
            self.class_models_ = {c: m if self._threshold_of(self.decisions_[c]) < np.inf else None
                                  for c, m in self.class_models_.items()}
        return self

    def _note_decision_scores(self, model, scores: np.ndarray) -> None:
        median = float(np.median(scores))
        spread = 1.4826 * float(np.median(np.abs(scores - median)))
        if not spread > 0:  # most rows exact copies (distance 0): no scale to call a row isolated on
            return
        cuts = median + spread * np.array((TAIL_Z,) + TAIL_STEPS)
        counts = (scores[:, None] > cuts).sum(axis=0)
        model["tail"] = {"decision_rows": len(scores), "cuts": cuts, "counts": counts}

    def _test_tails(self) -> None:
        """The second way a class is found suspicious: more of its rows isolated than the other
        classes have.  A dirty-label backdoor's rows are each isolated, not a group, and where the
        class's own tail is long the best split of s(x) takes a third of the class (the poison and
        the tail together, D under ``min_separation``).  So each class's rows past ``TAIL_Z`` robust
        z of its own distances (median + 3.5 x 1.4826 MAD) are counted, and a class whose share of
        them is an outlier among the classes' (robust z >= ``TAIL_CLASS_Z`` against the others'
        median and MAD, the MAD floored at ``TAIL_SE`` binomial standard errors of the median share,
        at least ``TAIL_P0``, in the class's decision rows) with ``TAIL_MIN_ROWS`` such rows is
        flagged there; with fewer than ``TAIL_MIN_CLASSES`` tested classes there is no
        comparison and no such test.  A class whose distances have no spread (most of its rows
        exact copies of each other) or whose "tail" would hold more than ``max_share`` of it has no
        tail to read: a duplicated class's few distinct rows are not isolated rows.  The
        mass-quarantine guard reads the result."""
        tails = {c: m["tail"] for c, m in self.class_models_.items()
                 if m is not None and "tail" in m and self.decisions_[c].rows_tested > 0}
        if len(tails) < TAIL_MIN_CLASSES:
            return
        labels = list(tails)
        rows = np.array([tails[c]["decision_rows"] for c in labels])[:, None]
        counts = np.stack([tails[c]["counts"] for c in labels])  # per class, rows past each cut (TAIL_Z first)
        at_cuts = counts / rows
        shares = at_cuts[:, 0]
        p = max(float(np.median(shares)), TAIL_P0)
        floor = TAIL_SE * np.sqrt(p * (1 - p) / rows[:, 0])
        z = leave_one_out_z(shares, floor)
        decisions = dict(self.decisions_)
        flagged = [i for i, (label, zc) in enumerate(zip(labels, z.tolist()))
                   if not (decisions[label].suspicious or zc < TAIL_CLASS_Z or counts[i, 0] < TAIL_MIN_ROWS
                           or shares[i] > self.max_share or decisions[label].why.startswith(HELD_BACK))]
        if flagged:  # what every cut expects of each class, from the others' shares there
            expected = rows * np.stack([others_median(column) for column in at_cuts.T], axis=1)
        for i in flagged:
            label, zc, share = labels[i], float(z[i]), float(shares[i])
            tail, decision = tails[label], decisions[label]
            cut, step = _step_down(tail, expected[i])
            why = (f"{TAIL}: {counts[i, 0]} of {tail['decision_rows']} decision rows ({share:.1%}) past "
                   f"robust z {TAIL_Z} of the class's k-NN distances, an outlier among the classes' shares "
                   f"(z = {zc:.1f} >= {TAIL_CLASS_Z}); {step}; the best split: {decision.why}")
            decisions[label] = ClassDecision(True, cut, decision.separation, share,
                                             decision.rows_tested, why, class_z=decision.class_z,
                                             past_submode=decision.past_submode)
        self.decisions_, self.mass_quarantine_ = guard_mass_quarantine(decisions, accept=self.accept_mass_quarantine)

    def _fit_class(self, state: ClassState):
        rows = len(state.sample_x)
        if rows <= self.n_neighbors + 1 or (rows < self.min_class_rows and self.expected_poison_rate is None):
            return None
        shrink = getattr(self, "_shrink", 1.0)
        size = max(self.n_neighbors + 2, int(min(self.reference_rows, rows) * shrink))
        reference = np.array(state.sample_x[:size])  # a copy: the model does not keep the whole sample alive
        return {"centre": reference.mean(axis=0, dtype=np.float64), "reference": reference,
                "decision_rows": min(rows, max(self.min_class_rows, int(rows * shrink)))}

    def _decide(self, model, state: ClassState, past_submode: bool = True, own: ClassState | None = None):
        if model is None and state.n > 0 and self.expected_poison_rate is None:
            return None, ClassDecision(False, float("inf"), float("nan"), 0.0, 0,
                                       f"fewer than {self.min_class_rows} sample rows: too few for the tail of "
                                       "a k-NN distance")
        if model is not None and model["decision_rows"] < len(state.sample_x):  # the fit's budget (fit_states)
            rows = model["decision_rows"]
            state = ClassState(dim=state.dim, capacity=state.capacity, n=state.n, mean=state.mean, m2=state.m2,
                               sample_keys=state.sample_keys[:rows], sample_x=state.sample_x[:rows])
        return super()._decide(model, state, past_submode, own)

    def _score_class(self, model, X):
        """Candidates from float32 distances (one BLAS product a block, rows centred on the class so
        the expansion |x - r|^2 = |x|^2 + |r|^2 - 2 x.r keeps its precision), then the exact float64 distances of
        the ``n_neighbors + CANDIDATE_MARGIN`` nearest candidates, from their differences: a row's
        distance to itself (or to an exact copy) is exactly 0 there, and the k-th distance does not depend on float32
        rounding unless two candidates tie within it at the edge of the margin."""
        reference = np.asarray(model["reference"], dtype=np.float64) - model["centre"]
        near = reference.astype(np.float32)
        half_squares = 0.5 * np.einsum("ij,ij->i", near, near)
        k = min(self.n_neighbors, len(reference) - 1)
        m = min(k + CANDIDATE_MARGIN, len(reference))
        out = np.empty(len(X), dtype=np.float64)
        for start in range(0, len(X), BLOCK_ROWS):
            x = np.asarray(X[start:start + BLOCK_ROWS], dtype=np.float64) - model["centre"]
            order = x.astype(np.float32) @ near.T  # |r|^2 / 2 - x.r orders the reference as |x - r|^2 does
            np.subtract(half_squares, order, out=order)
            candidates = np.argpartition(order, m - 1, axis=1)[:, :m] if m < len(reference) else \
                np.broadcast_to(np.arange(m), (len(x), m))
            exact = np.sort(((reference[candidates] - x[:, None, :]) ** 2).sum(axis=2), axis=1)
            itself = exact[:, 0] == 0.0
            kth = np.where(itself, exact[:, k], exact[:, k - 1])
            out[start:start + len(x)] = 0.5 * np.log(np.maximum(kth, 1e-300))
        return out


def _step_down(tail: dict, expected: np.ndarray) -> tuple[float, str]:
    """Where a flagged class's excess reaches below robust z ``TAIL_Z``: the lowest of ``TAIL_STEPS``
    where the rows a lower cut adds beyond ``TAIL_Z``'s are at least ``TAIL_STEP_PRECISION`` in excess
    of what the other classes' median shares expect of a class of this size (``expected``, per cut),
    after ``TAIL_STEP_SE`` Poisson standard errors of that expectation."""
    added, more = tail["counts"][1:] - tail["counts"][0], expected[1:] - expected[0]
    excess = added - more - TAIL_STEP_SE * np.sqrt(np.maximum(more, 1.0))
    taken = np.flatnonzero((added > 0) & (excess >= TAIL_STEP_PRECISION * added))
    j = 1 + int(taken.max()) if len(taken) else 0
    z = ((TAIL_Z,) + TAIL_STEPS)[j]
    return float(tail["cuts"][j]), (f"flagged from robust z {z} ({int(tail['counts'][j])} decision rows, "
                                     f"{expected[j]:.1f} expected of a class of its size)")
