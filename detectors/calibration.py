"""Per-class decisions without an oracle: is there a separated minority, and where is its edge?

Every detector reduces a class to one suspicion score per row (higher = more suspicious).
``separated_minority`` then asks whether the upper tail of that score forms a sub-population
of its own:

1. An exact one-dimensional 2-means (Otsu's split) over the sorted scores, restricted to
   splits whose upper group holds between ``min_rows`` rows and ``max_share`` of the class.
2. Ashman's bimodality separation of the two groups,
   D = |m_hi - m_lo| / sqrt((s_hi^2 + s_lo^2) / 2).
   The optimal split of one Gaussian has D ~= 2.7 whatever the split share (the restricted
   search never beats ~2.9 on Gaussian, uniform or half-normal data of any size; see
   ``tests/test_calibration.py``), so ``min_separation`` (default 4) is a test whose false-alarm
   rate on a unimodal class is ~0, while a poisoned cluster a few standard deviations away
   gives D of 5 to 50.  Small classes need more: the null's upper tail comes from a handful of
   extreme rows, and its 99.9% quantile on half-normal scores (the worst case of the score
   transforms used here) is close to 2.95 + 130 / n, so the critical value is
   max(min_separation, 2.95 + 130 / n): 5.55 at n = 50, 4.25 at 100, the configured floor from
   n ~ 125 on.
3. The threshold is the middle of the gap between the two groups; in a class that does not
   pass the test it is +inf, so nothing in that class is flagged.
4. A best split pinned at the ``max_share`` limit says the upper group wants to be larger than
   any minority an attack plants (a second way of writing a class, 40% of it): not flagged.  On
   the development families no poisoned split reached the limit (the largest held 12.5% of its
   class) while 10 of the 18 clean class splits that passed the other tests were pinned there.

``expected_poison_rate`` replaces the test by the rule of Tran et al. (2018): in every class,
flag the 1.5 * epsilon * n highest scores.  It is kept as a mode for comparison with the papers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class ClassDecision:
    suspicious: bool
    threshold: float
    separation: float
    minority_share: float
    rows_tested: int
    why: str
    class_z: float = float("nan")
    spread_ratio: float = float("nan")  # tr(cov) of the flagged group over the rest's (detectors.base)
    past_submode: float = float("nan")  # D of the best split once a natural sub-mode is set aside (detectors.base)
    split_threshold: float = float("nan")  # the best split's threshold, flagged or not (poisonguard.core.exclusion)

    @property
    def gate_separation(self) -> float:
        """The separation the cross-class gate compares: past a natural sub-mode where one was set aside."""
        return self.past_submode if np.isfinite(self.past_submode) else self.separation

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("threshold", "separation", "minority_share", "class_z", "spread_ratio", "past_submode",
                    "split_threshold"):
            out[key] = _finite_or_none(out[key])
        return out


SMALL_SAMPLE = 130.0  # the null's 99.9% quantile on half-normal scores: 2.95 + 130 / n (module docstring)
NOT_TESTED = ClassDecision(False, float("inf"), float("nan"), 0.0, 0, "not tested")
MIN_CLASS_ROWS = 20  # below this no split can be told from noise; such classes are skipped in bulk
EXACT_GATE_CLASSES = 2000


def too_small(n: int) -> ClassDecision:
    return ClassDecision(False, float("inf"), float("nan"), 0.0, n, f"fewer than {MIN_CLASS_ROWS} rows")


def separated_minority(
    scores: np.ndarray,
    *,
    max_share: float = 0.35,
    min_separation: float = 4.0,
    min_rows: int = 3,
    min_class_rows: int = MIN_CLASS_ROWS,
    candidate_separation: float | None = None,
    small_sample: float = SMALL_SAMPLE,
) -> ClassDecision:
    """The best split's decision.  With ``candidate_separation`` (below ``min_separation``), a split
    that reaches only that is returned as a *candidate*: not suspicious, but with its finite
    threshold, for a caller that has more evidence to weigh (``detectors.base.diffuse_minority``).
    ``small_sample``: the c of the small-class critical value 2.95 + c / n (a detector whose own
    null is heavier on small classes passes a larger c)."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    values = values[np.isfinite(values)]
    n = len(values)
    if n < min_class_rows:
        return ClassDecision(False, float("inf"), float("nan"), 0.0, n, f"fewer than {min_class_rows} rows")
    spread = values[-1] - values[0]
    if not spread > 1e-12 * max(1.0, abs(values[-1])):
        return ClassDecision(False, float("inf"), 0.0, 0.0, n, "constant scores")
    # upper group = values[i:], lower = values[:i]; i ranges so the upper group is a minority
    lo_i = max(int(np.ceil(n * (1.0 - max_share))), 1)
    hi_i = n - min_rows
    if lo_i > hi_i:
        return ClassDecision(False, float("inf"), float("nan"), 0.0, n, "class too small to split")
    centred = values - values.mean()
    csum = np.concatenate([[0.0], np.cumsum(centred)])
    csq = np.concatenate([[0.0], np.cumsum(centred * centred)])
    i = np.arange(lo_i, hi_i + 1)
    n_lo, n_hi = i, n - i
    sum_lo, sum_hi = csum[i], csum[n] - csum[i]
    sq_lo, sq_hi = csq[i], csq[n] - csq[i]
    within = (sq_lo - sum_lo**2 / n_lo) + (sq_hi - sum_hi**2 / n_hi)
    best = int(np.argmin(within))
    k = int(i[best])
    lower, upper = values[:k], values[k:]
    pooled = np.sqrt((lower.var() + upper.var()) / 2.0)
    gap = upper.mean() - lower.mean()
    separation = float(gap / pooled) if pooled > 0 else float("inf")
    share = len(upper) / n
    threshold = float((values[k - 1] + values[k]) / 2.0)
    if best == 0 and lo_i > 1 and separation >= 2.95 + small_sample / n:
        return ClassDecision(False, float("inf"), separation, share, n, PINNED)
    if separation >= max(min_separation, 2.95 + small_sample / n):
        return ClassDecision(True, threshold, separation, share, n, "separated minority", split_threshold=threshold)
    if candidate_separation is not None and separation >= max(candidate_separation, 2.95 + small_sample / n):
        return ClassDecision(False, threshold, separation, share, n, CANDIDATE, split_threshold=threshold)
    return ClassDecision(False, float("inf"), separation, share, n, NOT_SEPARATED, split_threshold=threshold)


CANDIDATE = "candidate: separated less than min_separation"
NOT_SEPARATED = "no separated minority"
PINNED = ("a sub-population larger than max_share of the class (the best split is pinned at that limit): "
          "a natural sub-mode, not an attack's minority")


def gate_by_other_classes(decisions: dict, *, min_class_z: float, min_classes: int = 5,
                          min_spread: float = 0.25) -> dict:
    """Keep a class suspicious only if its separation is an outlier among the classes.

    Natural sub-modes (two ways of writing a digit) give separations of 4-5 in real embeddings;
    what sets a poisoned class apart is that it stands out from the *other* classes of the
    same dataset.  For each class, z = (D_c - median_{k != c} D_k) / max(1.4826 MAD_{k != c}, min_spread);
    the class stays suspicious when z >= min_class_z.  A class whose best split was a natural
    sub-mode enters with the D of its rest, the sub-mode set aside (``ClassDecision.gate_separation``).
    With fewer than ``min_classes`` tested classes there is no usable reference and only the
    absolute test applies.
    """
    tested = [c for c, d in decisions.items() if np.isfinite(d.gate_separation)]
    if len(tested) < min_classes:
        return decisions
    values = np.array([decisions[c].gate_separation for c in tested])
    z = leave_one_out_z(values, min_spread)
    out = dict(decisions)
    for label, zc in zip(tested, z.tolist()):
        decision = decisions[label]
        if decision.suspicious and zc < min_class_z and not decision.why.startswith(DIFFUSE):
            out[label] = replace(decision, suspicious=False, threshold=float("inf"), class_z=zc,
                                 why=f"separated minority, but not an outlier among classes (z={zc:.1f})")
        else:
            out[label] = replace(decision, class_z=zc)
    return out


DIFFUSE = "a diffuse separated minority"


def others_median(values: np.ndarray) -> np.ndarray:
    """Each value's others' median: exact up to ``EXACT_GATE_CLASSES`` values, beyond that the median
    of all (as ``leave_one_out_z``)."""
    if len(values) > EXACT_GATE_CLASSES:
        return np.full(len(values), float(np.median(values)))
    return np.nanmedian(np.where(np.eye(len(values), dtype=bool), np.nan, values[None, :]), axis=1)


def leave_one_out_z(values: np.ndarray, min_spread: float | np.ndarray) -> np.ndarray:
    """Robust z of each value against the others' median and MAD (floored at ``min_spread``, one
    floor or one per value).  Exact up to ``EXACT_GATE_CLASSES`` classes; beyond, every class is
    compared with the median and MAD of all (one value moves a median of thousands by at most one
    order statistic), in O(C log C)."""
    if len(values) > EXACT_GATE_CLASSES:
        median = float(np.median(values))
        spread = np.maximum(1.4826 * float(np.median(np.abs(values - median))), min_spread)
        return (values - median) / spread
    others = np.where(np.eye(len(values), dtype=bool), np.nan, values[None, :])
    median = np.nanmedian(others, axis=1)
    spread = np.maximum(1.4826 * np.nanmedian(np.abs(others - median[:, None]), axis=1), min_spread)
    return (values - median) / spread


def top_fraction(scores: np.ndarray, expected_poison_rate: float) -> ClassDecision:
    """The papers' rule: flag the 1.5 * epsilon highest-scoring rows of every class."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = len(values)
    n_flag = int(np.floor(1.5 * expected_poison_rate * n))
    if n == 0 or n_flag == 0:
        return ClassDecision(False, float("inf"), float("nan"), 0.0, n, "1.5*epsilon*n < 1")
    n_flag = min(n_flag, n)
    ordered = np.sort(values)
    threshold = float(np.nextafter(ordered[n - n_flag], -np.inf))
    return ClassDecision(True, threshold, float("nan"), n_flag / n, n, "top 1.5*epsilon rule")


def _finite_or_none(value):
    value = float(value)
    return value if np.isfinite(value) else None


MASS_CLASS_SHARE = 0.05  # a detector flagging at least this share of a class ...
MASS_CLASSES = 0.5  # ... in more than this share of the tested classes reads its representation, not poison


HELD_BACK = "held back"  # how the guard's verdict on a class it withdrew begins

CRISP_CONFIDENCE = 0.7  # chosen on the development families (benchmarks/families.py): random flips of 5-20%


MASS_MIN_CLASSES = 2  # tested classes the guard needs: with two, "more than half" is both


def crisp_confidence(classes: int | None) -> float:
    """The issue confidence at or above which label issues read as label noise, with ``classes``
    labels in the probe (None: unknown).  ``CRISP_CONFIDENCE`` was chosen on development families of
    three to ten classes, where a weak representation spreads a doubted row's probability over
    several classes (0.31-0.58).  With two classes every row the probe misclassifies has a
    probability of the other class above 1/2, so a probe that can hardly tell the classes apart still
    reads 0.6-0.8: there the bar is ``CRISP_CONFIDENCE``'s margin over chance at ten classes carried to
    two, 1/2 + (0.7 - 1/10) / (1 - 1/10) x 1/2 = 0.83 (development breast cancer's flips, wherever
    confident learning names more than a trace of the class: 0.85-0.96).  The same margin at three classes (0.78) would withdraw most of iris's real
    random flips (0.55-0.78), so it applies to two classes only."""
    if classes != 2:
        return CRISP_CONFIDENCE
    margin = (CRISP_CONFIDENCE - 0.1) / 0.9
    return 0.5 + margin * 0.5


NOISE_MAX_EXCESS = 0.1  # chosen on the development families (calibration.confusion_excess)
NOISE_CLASSES = 50  # the classes with the most label-inconsistent rows the confusion is read on
NOISE_DRAWS = 200
NOISE_DRAW_CELLS = 4_000_000  # draws x classes x labels at most (fewer draws, not less memory, for many labels)
NOISE_MIN_ROOM = 5.0  # rows noise would put off each class's most named other class, summed: less tells nothing


def confusion_excess(own: np.ndarray, other: np.ndarray, prior: np.ndarray, seed: int = 0) -> float | None:
    """How much more a class's label-inconsistent rows name one other class than random label noise
    would make them: 0 for noise, towards 1 where every class's rows name one other class.

    ``own``, ``other``: class codes (positions in ``prior``) of each label-inconsistent row and of the
    other label its neighbourhood names; ``prior``: the classes' shares of the data.  Random label
    noise moves rows of every class into every other in proportion to their sizes, so a class c's
    inconsistent rows name class t with probability p(t | c) = prior_t / (1 - prior_c); a weak
    representation confuses particular pairs (a class with its look-alikes).  Per class, the share
    of its rows on their most named other class, m_c, is set against E[m_c] under p(. | c) for the
    same number of rows (``NOISE_DRAWS`` seeded multinomial draws, fewer with thousands of labels), and
    pooled:

        excess = sum_c n_c (m_c - E[m_c]) / sum_c n_c (1 - E[m_c])

    over the ``NOISE_CLASSES`` classes with the most rows (at least two each).  None where it cannot
    tell: fewer than three classes (with two, every row names the one other), or a denominator under
    ``NOISE_MIN_ROOM`` rows (a few rows over three classes name one other class by chance: iris's
    random flips read -0.6 to 1.0 without it)."""
    prior = np.asarray(prior, dtype=np.float64)
    own, other = np.asarray(own, dtype=np.int64), np.asarray(other, dtype=np.int64)
    classes = len(prior)
    if classes < 3 or len(own) == 0:
        return None
    n = np.bincount(own, minlength=classes)
    ranked = np.argsort(-n, kind="stable")[:NOISE_CLASSES]
    ranked = ranked[n[ranked] >= 2]
    if len(ranked) == 0:
        return None
    position = np.full(classes, -1)
    position[ranked] = np.arange(len(ranked))
    rows = position[own] >= 0
    pairs, pair_counts = np.unique(position[own[rows]] * classes + other[rows], return_counts=True)
    most = np.zeros(len(ranked), dtype=np.int64)
    np.maximum.at(most, pairs // classes, pair_counts)  # (classes x classes counts would not fit 10^4 classes)
    p = np.tile(prior, (len(ranked), 1))
    p[np.arange(len(ranked)), ranked] = 0.0
    p /= p.sum(axis=1, keepdims=True)
    draws = int(np.clip(NOISE_DRAW_CELLS // (len(ranked) * classes), 20, NOISE_DRAWS))
    sampled = np.random.default_rng(seed).multinomial(n[ranked], p, size=(draws, len(ranked)))
    expected = sampled.max(axis=2).mean(axis=0) / n[ranked]
    observed = most / n[ranked]
    room = float(np.sum(n[ranked] * (1.0 - expected)))
    if room < NOISE_MIN_ROOM:
        return None
    return float(np.sum(n[ranked] * (observed - expected)) / room)


def guard_mass_quarantine(decisions: dict, *, accept: bool, confidence: float | None = None,
                          classes: int | None = None,
                          excess: float | Callable[[], float | None] | None = None) -> tuple[dict, dict]:
    """Hold back a detector that would flag a large share of most classes: (decisions, evidence).

    A poisoning attack targets one or a few classes (a backdoor's target, a flipped class); a
    detector flagging at least ``MASS_CLASS_SHARE`` of the rows in more than ``MASS_CLASSES`` of the
    tested classes (at least ``MASS_MIN_CLASSES``: in a binary task, both) is reading a weak
    representation (an under-fitted proxy, labels its neighbourhoods cannot support), not poison.
    Its flags are withdrawn and it is reported as unreliable, with the evidence, unless ``accept``.  A
    real flip of even 20% of one class does not trigger it, nor does a backdoor in one of two classes.
    The guard first needed three tested classes; a clean real binary table (RAND's health insurance
    experiment, 20,190 rows, ``benchmarks/real_tables.py``) then lost 27% of its rows (21% in proxy
    mode) to confident learning reading a probe that could hardly tell its two classes apart (out of
    fold 0.72 on a balanced sample, issue confidence 0.75) and to SPECTRE's splits of both classes.

    Random label noise does flag a share of every class.  What tells it from a weak representation
    is how sure the evidence is: ``confidence`` (the linear probe's median probability of another
    class over its label issues, under the model refitted without them: ``detectors.probe``) of at
    least ``crisp_confidence(classes)`` (``classes``: the probe's label count) says the rows belong to
    another class, not that the representation cannot tell classes apart; then nothing is held back.
    On the development families random flips of 5-20% give 0.78-0.93, weak representations 0.31-0.58.

    A probe that cannot read the representation (random features) leaves even real noise unsure.
    ``excess`` (a number, or a callable read only where it can decide; ``confusion_excess``: how
    much more a class's label-inconsistent rows name one other class than random label noise makes
    them) of at most ``NOISE_MAX_EXCESS`` says the same thing from the neighbourhoods: the rows of
    every class name every other class in proportion to its size, as noise moves them, where a weak
    representation confuses look-alikes.  Chosen on the development families: where this guard's
    condition held, random flips of 5-20% read -0.01 to 0.05 with six or ten classes (iris's three
    classes and about 30 such rows: 0.07-0.28, held where the probe is unsure); no clean control
    read under 0.14 (0.14-1.0 on random features, the MLP and the CNN), and the clean real tables
    whose k-NN check the guard holds back (``benchmarks/real_tables.py``: fair's raw features,
    seattle weather in proxy mode) 0.57 and 0.67.
    """
    tested = [d for d in decisions.values() if d.rows_tested >= MIN_CLASS_ROWS]
    heavy = [d for d in tested if d.suspicious and d.minority_share >= MASS_CLASS_SHARE]
    systemic = len(tested) >= MASS_MIN_CLASSES and len(heavy) > MASS_CLASSES * len(tested)
    share = float(np.mean([d.minority_share for d in heavy])) if heavy else 0.0
    crisp = confidence is not None and confidence >= crisp_confidence(classes)
    if callable(excess):  # read only where it can decide
        excess = excess() if systemic and not crisp and not accept else None
    spread = excess is not None and excess <= NOISE_MAX_EXCESS
    crisp = crisp or spread
    evidence = {"classes_flagging_5pct": len(heavy), "classes_tested": len(tested), "mean_share_flagged": share,
                "unreliable": systemic and not crisp, "accepted": accept,
                "median_other_class_confidence": None if confidence is None else round(float(confidence), 4),
                "crisp_confidence": None if confidence is None else round(crisp_confidence(classes), 4),
                "confusion_excess": None if excess is None else round(float(excess), 4),
                "noise_max_excess": None if excess is None else NOISE_MAX_EXCESS,
                "spread_as_noise": bool(systemic and spread)}
    if not systemic or accept or crisp:
        return decisions, evidence
    why = (f"{HELD_BACK}: this detector would flag {share:.0%} of the rows in {len(heavy)} of {len(tested)} classes, "
           "more than any plausible attack (a weak representation, not poison); --accept-mass-quarantine applies it")
    return {c: replace(d, suspicious=False, threshold=float("inf"), why=why) if d.suspicious else d
            for c, d in decisions.items()}, evidence
