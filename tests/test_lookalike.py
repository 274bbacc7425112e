"""A separated group that the sub-mode rule would pass is held where the feature column says its
rows are another class's (detectors.lookalike): the targeted label flip a memorising proxy hides."""

from __future__ import annotations

import numpy as np
import pytest

from poisonguard.detectors import SpectralSignatures, Spectre, states_by_class
from poisonguard.detectors.lookalike import lookalike


def _classes(group_in_features_at):
    """Embedding: three far-apart classes; class 0 holds a 50-row group (1/6 of it) 8 apart from the rest
    and as spread: a natural sub-mode to the embedding.  Features: the group's rows at
    ``group_in_features_at`` ("class1": drawn like class 1's rows; "apart": a sub-mode of class 0's own)."""
    rng = np.random.default_rng(0)
    n, g, d, f = 300, 50, 8, 4
    emb = [rng.normal(size=(n, d)) for _ in range(3)]
    emb[1][:, 1] += 40.0
    emb[2][:, 2] += 40.0
    emb[0][:g, 0] += 8.0
    feats = [rng.normal(size=(n, f)) for _ in range(3)]
    feats[1][:, 1] += 6.0
    feats[2][:, 2] += 6.0
    if group_in_features_at == "class1":
        feats[0][:g] = rng.normal(size=(g, f)) + np.array([0.0, 6.0, 0.0, 0.0])
    else:
        feats[0][:g, 3] += 8.0
    y = np.repeat([0, 1, 2], n)
    keys = np.arange(3 * n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(7)
    emb_states = states_by_class(np.concatenate(emb).astype(np.float32), y, keys, 5000)
    feat_states = states_by_class(np.concatenate(feats).astype(np.float32), y, keys, 5000)
    group_keys = keys[:g]
    return emb_states, feat_states, group_keys


@pytest.mark.parametrize("cls", [SpectralSignatures, Spectre])
def test_a_group_whose_features_are_another_classs_is_not_a_natural_submode(cls):
    emb, feats, _ = _classes("class1")
    alone = cls(random_state=0).fit_states(emb)
    assert not alone.decisions_[0].suspicious and alone.decisions_[0].why.startswith("a natural sub-mode")
    told = cls(random_state=0).fit_states(emb, features=feats)
    assert told.decisions_[0].suspicious
    assert "look like class 1's" in told.decisions_[0].why
    assert not told.decisions_[1].suspicious and not told.decisions_[2].suspicious


@pytest.mark.parametrize("cls", [SpectralSignatures, Spectre])
def test_a_submode_that_is_a_submode_in_the_features_too_stays_unflagged(cls):
    emb, feats, _ = _classes("apart")
    told = cls(random_state=0).fit_states(emb, features=feats)
    assert not told.decisions_[0].suspicious and told.decisions_[0].why.startswith("a natural sub-mode")


def test_the_ratios_read_exchangeable_near_one_and_apart_far_above():
    emb, feats, group = _classes("class1")
    label, r_other, r_own = lookalike(feats[0], group, feats)
    assert label == 1 and 0.7 <= r_other <= 1.5 and r_own >= 2.5  # (in standardised features)
    emb, feats, group = _classes("apart")
    assert lookalike(feats[0], group, feats) is None


def test_a_column_in_large_units_does_not_drown_the_others():
    """Features as a user's table holds them (one column in units a thousand times the rest): the
    ratios are those of the standardised features."""
    from poisonguard.detectors import states_by_class as by_class

    emb, feats, group = _classes("class1")
    scaled = {}
    for label, state in feats.items():
        x = np.asarray(state.sample_x, dtype=np.float64).copy()
        x[:, 0] *= 1000.0
        scaled.update(by_class(x.astype(np.float32), np.full(len(x), label), state.sample_keys, 5000))
    plain, large = lookalike(feats[0], group, feats), lookalike(scaled[0], group, scaled)
    assert large is not None and large[0] == plain[0] == 1
    assert np.allclose(large[1:], plain[1:], rtol=0.05)


def test_the_core_hands_the_feature_columns_states_to_the_cluster_detectors():
    """The engines' fit (core.screening.fit_detectors): feature-column states, keyed as a proxy's table
    makes them, reach the cluster detectors; without them the group passes as a natural sub-mode."""
    from poisonguard.config import Config
    from poisonguard.core.screening import FEATURE_VIEW, fit_detectors

    emb, feats, _ = _classes("class1")
    config = Config.model_validate({"detectors": [{"name": "spectral"}, {"name": "spectre"}]})
    told = fit_detectors({**emb, **{(FEATURE_VIEW, c): s for c, s in feats.items()}}, config)
    alone = fit_detectors(emb, config)
    for name in ("spectral", "spectre"):
        assert told[name].decisions_[0].suspicious and "look like class 1's" in told[name].decisions_[0].why
        assert not alone[name].decisions_[0].suspicious


def test_a_group_between_its_own_class_and_another_is_not_a_lookalike(monkeypatch):
    """A group whose features sit nearer another class than the rest of its own, but not inside it
    (as a clean table's unchosen alternatives of one mode sit by the chosen ones: r_own about twice
    r_other) is not another class's rows: LOOKALIKE_APART is the middle of the development gap (2.5),
    not its natural side (2.0).  Drawn inside the other class it is (test above: about 3 times)."""
    from poisonguard.detectors.lookalike import LOOKALIKE_APART

    rng = np.random.default_rng(0)
    n, g = 300, 50
    feats = [rng.normal(size=(n, 4)) for _ in range(3)]
    feats[1][:, 1] += 6.0
    feats[2][:, 2] += 6.0
    feats[0][:g] = rng.normal(size=(g, 4)) + np.array([0.0, 4.5, 0.0, 0.0])  # three quarters of the way to class 1
    y = np.repeat([0, 1, 2], n)
    keys = np.arange(3 * n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(7)
    states = states_by_class(np.concatenate(feats).astype(np.float32), y, keys, 5000)
    assert lookalike(states[0], keys[:g], states) is None
    monkeypatch.setattr("poisonguard.detectors.lookalike.LOOKALIKE_APART", 0.0)  # the ratios themselves
    label, r_other, r_own = lookalike(states[0], keys[:g], states)
    assert label == 1 and r_other <= 1.5 and 2.0 <= r_own / r_other < LOOKALIKE_APART
