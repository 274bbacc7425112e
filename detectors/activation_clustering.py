"""Activation clustering (Chen et al., 2018, "Detecting Backdoor Attacks on Deep Neural Networks
by Activation Clustering").

For each class: reduce the embeddings to ``n_components`` (10) dimensions with PCA (the top
eigenvectors of the class covariance, from the mergeable moments; FastICA on the class sample
as an option), split the class sample with seeded 2-means, and call the smaller cluster the
suspect.  Chen et al. then judge the split by relative size and silhouette; the silhouette is
O(n^2) (and IBM ART's version has left clusters uninitialised), so this implementation scores
each row by its signed distance along the axis joining the two centroids,

    s(x) = ((z - c_big) . u) / sigma_big,   u = (c_small - c_big) / |c_small - c_big|,

with z the reduced row and sigma_big the spread of the large cluster along u: O(n), defined
for rows outside the sample, and one-dimensional, so the same separated-minority test as the
other detectors decides whether the small cluster is small *and* well separated.  The
centroid silhouette (b - a) / max(a, b) of the small cluster is reported alongside.  2-means
splits natural sub-modes (two ways of writing a digit) at separations up to ~5 on real
embeddings, so this detector's default ``min_separation`` is 5 rather than 4.

Past ``MANY_CLASSES`` classes, classes whose sample has at most ``BATCH_ROWS`` rows are fitted
together (``detectors.batched_kmeans``: the same PCA basis, a batched seeded 2-means in place of
scikit-learn's per-class ``KMeans``, the same model): 10,000 classes of 100 rows took 30-40 s of
per-class overhead.  The partition can differ from scikit-learn's where 2-means has several local
optima (another seeding); ``tests/test_detectors.py`` checks that both paths find the same
planted clusters.
"""

from __future__ import annotations

import numpy as np

from typing import Literal

from poisonguard.detectors.base import COMMON_BOUNDS, PoisonDetector, project, store_params, top_eigh
from poisonguard.detectors.stats import ClassState, padded_samples, stacks


MANY_CLASSES = 64  # more classes than this: small ones are fitted in batches
BATCH_ROWS = 512  # ... those whose sample has at most this many rows


class ActivationClustering(PoisonDetector):
    name = "activation_clustering"

    _parameter_bounds = {**COMMON_BOUNDS, "n_components": {"ge": 1, "le": 512}, "n_init": {"ge": 1, "le": 100},
                         "max_cluster_rows": {"ge": 10, "le": 1_000_000}}

    def __init__(self, *, n_components: int = 10, reduce: Literal["pca", "ica"] = "pca", n_init: int = 3,
                 max_cluster_rows: int = 5000, max_share: float = 0.35, min_separation: float = 5.0,
                 min_rows: int = 3, min_class_z: float | None = 6.0, expected_poison_rate: float | None = None,
                 max_fit_rows_per_class: int = 5000, random_state: int = 0,
                 accept_mass_quarantine: bool = False):
        store_params(self, locals())

    def fit_states(self, states, *, features=None):
        from threadpoolctl import threadpool_limits

        # one limit around every class's k-means: OpenMP threads spin against busy cores and other
        # workers, and entering the limit scans the loaded libraries (3.5 ms: 35 s at 10^4 classes)
        with threadpool_limits(1):
            return super().fit_states(states, features=features)

    def _fit_classes(self, states):
        if self.reduce != "pca" or len(states) <= MANY_CLASSES:
            return super()._fit_classes(states)
        small = {c: s for c, s in states.items() if 4 <= len(s.sample_x) <= BATCH_ROWS and s.n >= 2}
        models = {c: self._fit_class(s) for c, s in states.items() if c not in small}
        rng = np.random.default_rng(self.random_state)
        for stack in stacks(small):
            models.update(zip(stack, self._fit_batch([small[c] for c in stack], rng)))
        return models

    def _fit_batch(self, states: list[ClassState], rng: np.random.Generator) -> list[dict | None]:
        """The models of ``_fit_class`` for many small classes at once (module docstring)."""
        from poisonguard.detectors.batched_kmeans import two_means

        k = min(self.n_components, states[0].dim)
        x, valid, rows = padded_samples(states)
        means = np.stack([s.mean for s in states])
        values, basis = top_eigh(np.stack([s.covariance for s in states]), k)
        keep = values > 1e-12 * np.maximum(values[:, :1], 1e-300)
        basis = basis * keep[:, None, :]  # dropped directions: zero columns
        z = np.where(valid[:, :, None], (x - means[:, None, :]) @ basis, 0.0)
        spread_rows = np.abs(np.where(valid[:, :, None], z - z[:, :1], 0.0)).max(axis=(1, 2))
        centres, labels = two_means(z, valid, self.n_init, rng)
        out = []
        for i, s in enumerate(states):  # each class's model from its own few arrays
            if not keep[i].any() or spread_rows[i] <= 1e-12:
                out.append(None)
                continue
            out.append(self._model(z[i, : rows[i]][:, keep[i]], labels[i, : rows[i]], centres[i][:, keep[i]],
                                   means[i], basis[i][:, keep[i]]))
        return out

    def _fit_class(self, state: ClassState):
        from sklearn.cluster import KMeans

        sample = state.sample_x.astype(np.float64)
        if state.n < 2 or len(sample) < 4:
            return None
        k = min(self.n_components, state.dim)
        if self.reduce == "ica":
            from sklearn.decomposition import FastICA

            ica = FastICA(n_components=min(k, len(sample) - 1), random_state=self.random_state,
                          whiten="unit-variance", max_iter=400)
            ica.fit(sample)
            mean, basis = ica.mean_, ica.components_.T
        else:
            values, basis = top_eigh(state.covariance, k)
            basis = basis[:, values > 1e-12 * max(values[0], 1e-300)]
            mean = state.mean
        if basis.shape[1] == 0:
            return None
        reduced = (sample - mean) @ basis
        if len(np.unique(reduced.round(12), axis=0)) < 2:
            return None
        # the sample is in seeded-hash order, so its first rows are a uniform subsample
        km = KMeans(n_clusters=2, n_init=self.n_init, random_state=self.random_state)
        km.fit(reduced[: self.max_cluster_rows])
        return self._model(reduced, km.predict(reduced), km.cluster_centers_, mean, basis)

    @staticmethod
    def _model(reduced, labels, centres, mean, basis) -> dict | None:
        sizes = np.bincount(labels, minlength=2)
        small = int(np.argmin(sizes)) if sizes[0] != sizes[1] else 1
        c_small, c_big = centres[small], centres[1 - small]
        axis = c_small - c_big
        norm = np.linalg.norm(axis)
        if norm == 0:
            return None
        axis /= norm
        big_rows = reduced[labels != small]
        spread = float(np.std((big_rows - c_big) @ axis)) or 1.0
        a = np.linalg.norm(reduced - c_small, axis=1)
        b = np.linalg.norm(reduced - c_big, axis=1)
        in_small = labels == small
        silhouette = float(np.mean(((b - a) / np.maximum(np.maximum(a, b), 1e-300))[in_small]))
        # s(x) = ((x - mean) B - c_big) . u / sigma is linear in x: one vector and one offset per class
        w = basis @ axis / spread
        return {
            "mean": mean, "basis": basis, "c_big": c_big, "axis": axis, "spread": spread,
            "small_share": float(sizes[small] / sizes.sum()), "silhouette": silhouette,
            "w": w, "b": -float(mean @ w) - float(c_big @ axis) / spread,
        }

    def _score_class(self, model, X):
        return project(X, model["w"], model["b"])
