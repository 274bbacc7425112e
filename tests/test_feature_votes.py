"""The feature column's vote on the k-NN label check (detectors.feature_votes): in a proxy's table a row is
label-inconsistent only where its neighbours in the features, which never saw a label, agree."""

from __future__ import annotations

import numpy as np

from poisonguard.config import Config
from poisonguard.core.screening import FEATURE_VIEW, fit_detectors, view_rows
from poisonguard.detectors import KnnLabel, states_by_class
from poisonguard.detectors.feature_votes import FeatureVotes


def _data():
    """Three classes of 300, far apart in both views.  60 rows labelled 1 sit inside class 0 in the
    embedding (a proxy pulled them there); in the features, the first 30 sit inside class 0 too (flipped
    rows: their label is wrong) and the last 30 inside class 1 (their label is right: the embedding's
    neighbourhood misleads)."""
    rng = np.random.default_rng(0)
    n, m = 300, 60
    centres_e, centres_f = np.eye(3, 8) * 30.0, np.eye(3, 4) * 8.0
    y = np.r_[np.repeat([0, 1, 2], n), np.ones(m, int)]
    emb = centres_e[np.r_[np.repeat([0, 1, 2], n), np.zeros(m, int)]] + rng.normal(size=(3 * n + m, 8))
    where_f = np.r_[np.repeat([0, 1, 2], n), np.zeros(m // 2, int), np.ones(m // 2, int)]
    feats = centres_f[where_f] + rng.normal(size=(3 * n + m, 4))
    keys = np.arange(len(y), dtype=np.uint64) * np.uint64(11400714819323198485) + np.uint64(3)
    flipped = np.zeros(len(y), bool)
    flipped[3 * n:3 * n + m // 2] = True
    misled = np.zeros(len(y), bool)
    misled[3 * n + m // 2:] = True
    return emb.astype(np.float32), feats.astype(np.float32), y, keys, flipped, misled


def test_the_vote_keeps_flipped_rows_and_drops_rows_whose_features_agree_with_their_label():
    emb, feats, y, keys, flipped, misled = _data()
    states = states_by_class(emb, y, keys, 5000)
    features = states_by_class(feats, y, keys, 5000)
    # three balanced classes: the default min_excess_over_prior (0.3) would need 7 of 10 neighbours on
    # one label, and one misled row has 6; the vote is what this test is about
    alone = KnnLabel(min_excess_over_prior=0.0).fit_states(states)
    both = KnnLabel(min_excess_over_prior=0.0).fit_states(states, features=features)
    assert alone.flag(emb, y, keys)[flipped | misled].all()
    joint = np.hstack([emb, feats])
    flags = both.flag(joint, y, keys)
    assert flags[flipped].all() and not flags[misled].any() and not flags[~(flipped | misled)].any()
    scores = both.score_samples(joint, y, keys)
    assert (scores[misled] < 0.5).all()
    assert np.array_equal(scores[flipped], alone.score_samples(emb, y, keys)[flipped])  # kept where the vote agrees
    # the embedding alone (no feature columns in X) scores as before
    assert np.array_equal(both.flag(emb, y, keys), alone.flag(emb, y, keys))


def test_votes_leave_a_row_out_of_its_own_neighbourhood_and_skip_rows_without_features():
    emb, feats, y, keys, flipped, misled = _data()
    states, features = states_by_class(emb, y, keys, 5000), states_by_class(feats, y, keys, 5000)
    votes = FeatureVotes.fit(states, features, 10000, 10)
    v = votes.votes(feats, y, keys)
    assert (v[flipped] >= 0.5).all() and (v[misled] <= 0.3).all()
    assert np.median(v[~(flipped | misled)]) == 0.0  # not counting itself, a clean row's neighbours agree
    gone = feats.copy()
    gone[:5] = np.nan
    assert np.isnan(votes.votes(gone, y, keys)[:5]).all()
    assert np.array_equal(votes.corroborate(np.ones(len(y)), gone, y, keys)[:5], np.ones(5))


def test_the_core_gives_the_k_nn_label_check_both_views():
    emb, feats, y, keys, flipped, misled = _data()
    config = Config.model_validate({"detectors": [{"name": "knn_label"}]})
    states = {**states_by_class(emb, y, keys, 5000),
              **{(FEATURE_VIEW, c): s for c, s in states_by_class(feats, y, keys, 5000).items()}}
    knn = fit_detectors(states, config)["knn_label"]
    assert knn.feature_votes_ is not None
    flags = knn.flag(view_rows("knn_label", emb, feats), y, keys)
    assert flags[flipped].all() and not flags[misled].any()
    assert view_rows("spectral", emb, feats) is emb
