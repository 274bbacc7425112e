"""The benchmark's ranking metric: the AUROC columns must read the scores, not the row order."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import families  # noqa: E402


def _rows_stored_by_class():
    """Two classes stored one after the other (as iris and wine are); the last 5 rows of class 1
    relabelled 0, so in class 0 they sit after every clean row."""
    y = np.repeat([0, 1], 50)
    truth = np.zeros(100, bool)
    truth[95:] = True
    y[truth] = 0
    return y, truth


@pytest.mark.parametrize("order", ["stored", "reversed"])
def test_a_class_a_detector_left_unscored_ranks_at_chance_whatever_the_row_order(order):
    y, truth = _rows_stored_by_class()
    if order == "reversed":
        y, truth = y[::-1].copy(), truth[::-1].copy()
    found = pd.DataFrame({"score_unscored": np.full(len(y), np.nan),
                          "score_perfect": np.where(truth, 2.0, np.linspace(0.0, 1.0, len(y)))})
    aurocs = families._aurocs(found, y, truth)
    assert aurocs["unscored"] == pytest.approx(0.5)
    assert aurocs["perfect"] == pytest.approx(1.0)


def test_tied_scores_share_their_rank():
    y, truth = _rows_stored_by_class()
    shares = np.where(truth, 0.8, 0.0)  # a k-NN share: the poisoned rows tied with two clean rows
    shares[[0, 1]] = 0.8
    auroc = families._aurocs(pd.DataFrame({"score_share": shares}), y, truth)["share"]
    n_clean = int(np.sum((y == 0) & ~truth))
    assert auroc == pytest.approx(1 - 0.5 * 2 / n_clean)  # each poisoned row ties with 2 clean rows
    ranks = families.within_class_rank(shares, y)
    assert len(set(ranks[(y == 0) & (shares == 0.8)].round(12))) == 1


def test_a_partial_rerun_replaces_its_rows_by_key_and_adds_none():
    rows = [{"key": ["iris", "mlp", "patch", 0.05, s], "f1": 0.1} for s in range(2)]
    rows.append({"key": ["digits", "mlp", "patch", 0.05, 0], "f1": 0.5})
    merged = families.merge_by_key(rows, [{"key": ["iris", "mlp", "patch", 0.05, 1], "f1": 0.9}])
    assert [r["f1"] for r in merged] == [0.1, 0.9, 0.5]
    with pytest.raises(SystemExit, match="not in the committed rows"):
        families.merge_by_key(rows, [{"key": ["wine", "mlp", "patch", 0.05, 0], "f1": 0.9}])
