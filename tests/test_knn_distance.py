"""The k-NN distance detector: isolated rows found, natural sub-modes and small classes left alone."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from poisonguard.detectors import DEFAULT_DETECTORS, KnnDistance


def _classes_with_planted_rows(seed, n, classes, d, target, count, centres, heavy, lift=None, radius=None):
    """Gaussian classes (Student-t3 rows where ``heavy``) around centres ``centres`` apart; in
    ``target``, ``count`` rows each moved ``lift`` in its own random direction, or put ``radius``
    times the class's typical radius out from its mean in one: far from every other row, but no group
    in any one direction (a dirty-label backdoor's rows keep their source classes' variation)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n)
    noise = rng.standard_t(3, size=(len(y), d)) if heavy else rng.normal(size=(len(y), d))
    x = noise + centres * rng.normal(size=(classes, d))[y]
    rows = np.flatnonzero(y == target)[:count]
    direction = rng.normal(size=(len(rows), d))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    if radius is None:
        x[rows] += lift * direction
    else:
        x[rows] = x[y == target].mean(axis=0) + radius * np.sqrt(d) * direction
    poison = np.zeros(len(y), dtype=bool)
    poison[rows] = True
    return x.astype(np.float32), y, poison


def isolated(seed=0, n=600, classes=6, d=16, share=0.03, target=2, lift=8.0):
    """``share`` of class ``target`` moved ``lift`` out, each in its own direction."""
    return _classes_with_planted_rows(seed, n, classes, d, target, int(share * n), 12, False, lift=lift)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isolated_rows_are_found(seed):
    x, y, poison = isolated(seed)
    det = KnnDistance().fit(x, y)
    flags = det.flag(x, y)
    assert flags[poison].mean() >= 0.95 and flags[~poison].mean() <= 0.002
    assert det.decisions_[2].suspicious
    assert not any(det.decisions_[c].suspicious for c in (0, 1, 3, 4, 5))


def tail(seed, planted=20, radius=2.0, classes=8, n=600, d=16, heavy=False):
    """In class 3, ``planted`` rows at ``radius`` times the class's typical radius, each in its own
    direction: isolated one by one, too few and too spread for a two-means split (``heavy``: long
    natural tails in every class)."""
    return _classes_with_planted_rows(seed, n, classes, d, 3, planted, 8, heavy, radius=radius)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_excess_of_isolated_rows_is_found_where_no_split_separates_them(seed):
    from poisonguard.detectors.knn_distance import TAIL

    x, y, poison = tail(seed)
    det = KnnDistance().fit(x, y)
    flags = det.flag(x, y)
    decision = det.decisions_[3]
    assert decision.suspicious and decision.why.startswith(TAIL) and decision.separation < 4
    assert flags[poison].all() and not flags[~poison].any()
    assert [c for c, d in det.decisions_.items() if d.suspicious] == [3]
    for clean in (tail(seed, planted=0), tail(seed, planted=0, heavy=True)):  # long natural tails everywhere
        assert not KnnDistance().fit(*clean[:2]).flag(*clean[:2]).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_one_percent_excess_is_found_in_large_classes(seed):
    # the spread the shares are compared with is floored by their sampling error, which shrinks as
    # classes grow: 30 isolated rows in a class of 3,000 stand out, as 6 would not in one of 600
    x, y, poison = tail(seed, planted=30, n=3000)
    det = KnnDistance().fit(x, y)
    flags = det.flag(x, y)
    assert det.decisions_[3].why.startswith("an excess of isolated rows")
    assert flags[poison].mean() >= 0.9 and flags[~poison].mean() <= 0.001
    for clean in (tail(seed, planted=0, n=3000), tail(seed, planted=0, n=3000, heavy=True)):
        assert not KnnDistance().fit(*clean[:2]).flag(*clean[:2]).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_flagged_tail_steps_down_to_where_its_excess_ends(seed):
    # 10% of class 3 at 1.4 to 2.2 times the class's radius: the farthest half past robust z 3.5, the
    # rest among the class's own tail.  The cut at 3.5 found about half (0.50-0.55); the excess over
    # what the other classes' tails hold goes on down to z 2.5, and so does the cut
    from poisonguard.detectors.knn_distance import TAIL

    x, y, poison = _classes_with_planted_rows(seed, 1000, 8, 16, 3, 100, 8, False,
                                              radius=np.linspace(1.4, 2.2, 100)[:, None])
    det = KnnDistance().fit(x, y)
    flags = det.flag(x, y)
    why = det.decisions_[3].why
    assert why.startswith(TAIL) and "flagged from robust z 3.5 " not in why
    assert flags[poison].mean() >= 0.75 and (flags & ~poison).sum() <= 3
    assert [c for c, d in det.decisions_.items() if d.suspicious] == [3]


@pytest.mark.parametrize("duplicated", [0.45, 0.55, 0.7])
def test_a_class_of_exact_copies_has_no_tail_to_flag(duplicated):
    # most of a class's rows copies of 20 rows (repeated images): their distance is 0, the class's
    # median too, and without a guard every distinct row would read as isolated
    x, y, _ = tail(0, planted=0)
    rows = np.flatnonzero(y == 5)
    copies = int(duplicated * len(rows))
    x[rows[:copies]] = x[rows[copies:copies + 20]][np.random.default_rng(0).integers(0, 20, copies)]
    assert not KnnDistance().fit(x, y).flag(x, y).any()


def test_a_clean_class_with_two_natural_modes_is_not_flagged():
    rng = np.random.default_rng(3)
    d, n = 16, 1000
    y = np.repeat(np.arange(5), n)
    x = rng.normal(size=(len(y), d)) + 15 * rng.normal(size=(5, d))[y]
    second = np.flatnonzero(y == 1)[: int(0.3 * n)]  # 30% of class 1 written another way
    x[second] += 8 * rng.normal(size=d) / np.sqrt(d) * 3
    flags = KnnDistance().fit(x.astype(np.float32), y).flag(x.astype(np.float32), y)
    assert not flags.any()


def test_small_classes_are_not_tested_and_say_why():
    x, y, poison = isolated(n=100)
    det = KnnDistance().fit(x, y)
    assert all(d.why.startswith("fewer than 150 sample rows") and not d.suspicious for d in det.decisions_.values())
    assert np.isnan(det.score_samples(x, y)).all() and not det.flag(x, y).any()
    small = KnnDistance(min_class_rows=50).fit(x, y)  # the bound is a parameter
    assert all(not d.why.startswith("fewer than") for d in small.decisions_.values())


def test_only_the_classes_it_can_flag_are_scored_with_the_same_flags():
    x, y, poison = isolated(seed=1)
    det = KnnDistance().fit(x, y)
    every = clone(det).set_params(score_every_row=True).fit(x, y)
    scores, full = det.score_samples(x, y), every.score_samples(x, y)
    assert np.isnan(scores[y != 2]).all() and not np.isnan(full).any()
    assert np.array_equal(scores[y == 2], full[y == 2])
    assert np.array_equal(det.flag(x, y), every.flag(x, y))
    assert [m is None for m in det.class_models_.values()] == [c != 2 for c in det.class_models_]


def test_a_row_is_not_its_own_neighbour():
    """A reference row's score in the score pass is its k-th nearest *other* row: the same as for a
    copy of the row that is not in the reference, scored against the same reference."""
    x, y, _ = isolated(seed=2)
    det = KnnDistance(score_every_row=True, reference_rows=200).fit(x, y)
    model = det.class_models_[0]
    inside = model["reference"][:5]  # rows of the reference (the class's first sample rows)
    outside = np.nextafter(inside, np.inf)  # a hair away: no longer the rows themselves
    k = det.n_neighbors
    centred = model["reference"].astype(np.float64) - model["centre"]
    d = np.sqrt((((inside.astype(np.float64) - model["centre"])[:, None, :] - centred[None]) ** 2).sum(-1))
    assert (np.sort(d, axis=1)[:, 0] == 0).all()
    expected = np.log(np.sort(d, axis=1)[:, k])  # position 0 is the row itself
    np.testing.assert_allclose(det._score_class(model, inside), expected, rtol=1e-9)
    assert (det._score_class(model, outside) < expected).all()  # its k-th neighbour now counts the row


def test_scikit_learn_conventions():
    det = KnnDistance(n_neighbors=7, reference_rows=500)
    assert clone(det).get_params() == det.get_params()
    assert det.set_params(min_class_rows=200).min_class_rows == 200
    with pytest.raises(NotFittedError):
        det.score_samples(np.zeros((2, 3), np.float32), np.zeros(2))
    with pytest.raises(ValueError, match="n_neighbors"):
        KnnDistance(n_neighbors=0).fit(*isolated()[:2])
    assert "knn_distance" in DEFAULT_DETECTORS


def test_the_fit_distance_work_is_bounded_across_many_classes():
    """300 classes of 400 rows would cost 300 x 400 x 400 distances; with a budget of 10^6 pairs every
    class decides on its first 150 sample rows (``min_class_rows``) against a reference of 57."""
    rng = np.random.default_rng(8)
    y = np.repeat(np.arange(300), 400)
    x = (rng.normal(size=(len(y), 8)) + 10 * rng.normal(size=(300, 8))[y]).astype(np.float32)
    det = KnnDistance(max_distance_pairs=1_000_000, score_every_row=True).fit(x, y)
    shrink = np.sqrt(1e6 / (300 * 400 * 400))
    models = det.class_models_.values()
    assert all(len(m["reference"]) == int(400 * shrink) and m["decision_rows"] == 150 for m in models)
    assert all(d.rows_tested == 150 for d in det.decisions_.values())
    assert not det.flag(x, y).any()
    full = KnnDistance(score_every_row=True).fit(x[y < 10], y[y < 10])  # 10 classes: within the default budget
    assert all(len(m["reference"]) == 400 and m["decision_rows"] == 400 for m in full.class_models_.values())
