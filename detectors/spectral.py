"""Spectral signatures (Tran, Li, Madry, NeurIPS 2018, "Spectral Signatures in Backdoor Attacks").

For each class c with mean mu_c and covariance Sigma_c, let v_c be the top eigenvector of
Sigma_c.  The score of a row x of class c is its squared projection after centring,

    s(x) = ((x - mu_c) . v_c)^2.

A poisoned sub-population of share eps at distance Delta from the clean mean adds
eps (1 - eps) Delta^2 to the variance along Delta, so once that exceeds the clean spectrum v_c
points at the poison and the poisoned rows get the largest scores.  Centring matters: without it
(IBM ART's implementation) the projection measures distance from the origin and ranks
label-flipped rows as the least suspicious.  mu_c and Sigma_c come from the mergeable moments,
so fitting never needs the rows; the decision (``detectors.calibration``) runs on
|projection| = sqrt(s) of the bounded class sample.
"""

from __future__ import annotations

import numpy as np

from poisonguard.detectors.base import PoisonDetector, project, store_params, top_eigh
from poisonguard.detectors.stats import ClassState


class SpectralSignatures(PoisonDetector):
    name = "spectral"

    def __init__(self, *, max_share: float = 0.35, min_separation: float = 5.0, min_rows: int = 3,
                 min_class_z: float | None = 6.0, expected_poison_rate: float | None = None,
                 max_fit_rows_per_class: int = 5000, random_state: int = 0,
                 accept_mass_quarantine: bool = False):
        store_params(self, locals())

    def _fit_class(self, state: ClassState):
        if state.n < 2:
            return None
        values, vectors = top_eigh(state.covariance, 1)
        if values[0] <= 0:
            return None
        direction = vectors[:, 0]
        return {"mean": state.mean, "direction": direction, "top_eigenvalue": float(values[0]),
                "w": direction, "b": -float(state.mean @ direction)}

    def _score_class(self, model, X):
        return self._from_linear(project(X, model["w"], model["b"]))

    @staticmethod
    def _from_linear(projection):
        return projection * projection

    @staticmethod
    def _test_transform(scores):
        return np.sqrt(scores)

    @staticmethod
    def _untransform(threshold):
        return threshold * threshold
