"""What a feature vector is: an image, a sequence or a table row, so the proxy can fit it.

A declared ``features_shape`` decides ([C, H, W] an image, [C, L] a sequence, [L] read as below).
Otherwise the order of the values is tested on the training sample.  In a table the columns'
order carries no meaning, so neighbouring columns are no more alike than columns picked at random;
in a signal or a flattened image neighbours are alike, wherever the pattern sits in the row.  So
each row (columns standardised) is read as a series u, and its autocorrelation at lag k,
a_k = sum_j u_j u_{j+k} / sum_j u_j^2, is compared with the same row's under fixed random
permutations of the columns (the order-free baseline, averaged over 16).  With |a_k| averaged
over rows:

* an image [1, s, s] when the length is a square s*s (s >= 4), |a_s| (the pixel below) is at
  least ``MIN_ORDER_RATIO`` times the baseline, and the row ends break the order: the lag-1
  products u_j u_{j+1} (averaged over rows) are at most ``MAX_WRAP`` as strong where j ends an
  image row (its neighbour starts the next row, far away) as elsewhere.  A sequence has no such
  seams, even one whose period happens to be s;
* else a sequence [1, L] when |a_1| is at least ``MIN_ORDER_RATIO`` times the baseline;
* else a table.

The ratio is 1.6: on the development sources tables give 0.8-1.25 (the baseline is about
1/sqrt(L), high for short rows) and ordered data 2.2-3.8.  The seam ratio is 0.6: images 0.03-0.4
(digits, the shapes source, patches of scikit-learn's sample photographs), sequences 0.9-1.3.
The evidence is recorded with the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_ORDER_RATIO = 1.6
MAX_WRAP = 0.6
SHUFFLES = 16
MIN_SEQUENCE = 16
SAMPLE_ROWS = 5000


@dataclass(frozen=True)
class Layout:
    kind: str  # "image", "sequence" or "table"
    shape: list[int]  # the per-row tensor shape a network reads: [C, H, W], [C, L] or [L]
    why: str
    evidence: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "why": self.why, **self.evidence}


def check_declared_shape(declared: list[int] | None, n_features: int, column: str | None) -> None:
    """A declared ``features_shape`` must hold the rows' values, every one (InputError otherwise)."""
    if declared and math.prod(declared) != n_features:
        from poisonguard.errors import InputError

        raise InputError(f"embedding.features_shape {list(declared)} holds {math.prod(declared)} values, but the rows "
                         f"have {n_features}", column=column)


def infer_layout(x: np.ndarray, declared: list[int] | None, column: str | None = None) -> Layout:
    n_features = x.shape[1]
    check_declared_shape(declared, n_features, column)
    if declared and len(declared) == 3:
        return Layout("image", list(declared), "declared features_shape [C, H, W]")
    if declared and len(declared) == 2:
        return Layout("sequence", list(declared), "declared features_shape [C, L]")
    if n_features < MIN_SEQUENCE:
        return Layout("table", [n_features], f"{n_features} values: too few for a sequence")
    z = _standardised(x[:: max(1, len(x) // SAMPLE_ROWS)])  # spread over the sample, whatever its order
    rng = np.random.default_rng(0)  # a fixed baseline: the layout is a property of the data, not of the seed
    baseline = float(np.mean([_autocorrelation(z[:, rng.permutation(n_features)], 1) for _ in range(SHUFFLES)]))
    lag1 = _autocorrelation(z, 1)
    evidence = {"abs_autocorr_lag1": round(lag1, 4), "abs_autocorr_shuffled": round(baseline, 4)}
    side = math.isqrt(n_features)
    if side >= 4 and side * side == n_features:
        below, seams = _autocorrelation(z, side), _seam_ratio(z, side)
        evidence.update({f"abs_autocorr_lag{side}": round(below, 4), "row_seam_ratio": round(seams, 4)})
        if below >= MIN_ORDER_RATIO * baseline and seams <= MAX_WRAP:
            return Layout("image", [1, side, side], f"values {side} apart are alike and every {side}th "
                          f"neighbour pair is not: a {side}x{side} image", evidence)
    if lag1 >= MIN_ORDER_RATIO * baseline:
        return Layout("sequence", [1, n_features], "ordered values: neighbours are alike", evidence)
    return Layout("table", [n_features], "neighbouring values are no more alike than shuffled ones", evidence)


def _standardised(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64)
    z -= z.mean(axis=0)
    sd = z.std(axis=0)
    z[:, sd > 1e-9] /= sd[sd > 1e-9]
    z[:, sd <= 1e-9] = 0.0  # constant columns (an image's empty border) say nothing about order
    return z


def _rows_as_series(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row centred, and its energy sum_j u_j^2 (1 where a row is constant)."""
    u = z - z.mean(axis=1, keepdims=True)
    energy = np.einsum("ij,ij->i", u, u)
    return u, np.where(energy > 0, energy, 1.0)


def _autocorrelation(z: np.ndarray, lag: int) -> float:
    u, energy = _rows_as_series(z)
    return float(np.mean(np.abs(np.einsum("ij,ij->i", u[:, :-lag], u[:, lag:]) / energy)))


def _seam_ratio(z: np.ndarray, side: int) -> float:
    """Mean |lag-1 product| across image-row ends over the same within rows."""
    u, energy = _rows_as_series(z)
    products = np.abs(np.mean(u[:, :-1] * u[:, 1:] / energy[:, None], axis=0))
    seam = np.arange(z.shape[1] - 1) % side == side - 1
    within = float(products[~seam].mean())
    return float(products[seam].mean()) / within if within > 0 else float("inf")
