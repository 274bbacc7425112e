"""Seeded 2-means on many small groups at once (activation clustering past ``MANY_CLASSES`` classes).

With 10,000 classes of 100 rows, fitting scikit-learn's ``KMeans`` once per class cost 30-40 s of
Python overhead for a few milliseconds of arithmetic each.  Here the groups are padded into one
(groups, rows, dims) array and every step runs on all of them: k-means++ seeding (the first centre
uniform, the second from two candidates drawn in proportion to the squared distance, keeping the one
with the lower potential, as scikit-learn's greedy k-means++ does), Lloyd iterations until no group's
assignment changes, ``n_init`` seedings, the lowest inertia kept per group.
"""

from __future__ import annotations

import numpy as np

MAX_ITER = 300
CANDIDATES = 2  # scikit-learn's greedy k-means++ draws 2 + int(log(k)) candidates: 2 for k = 2


def two_means(z: np.ndarray, valid: np.ndarray, n_init: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``z``: (groups, rows, dims) padded rows, ``valid``: (groups, rows) which are real (each group's
    first rows).  Returns the
    centres (groups, 2, dims) and each row's cluster (groups, rows; 0 on padding)."""
    best_centres, best_labels, best_inertia = None, None, None
    for _ in range(n_init):
        centres = _seed(z, valid, rng)
        centres, labels, inertia = _lloyd(z, valid, centres)
        if best_inertia is None:
            best_centres, best_labels, best_inertia = centres, labels, inertia
            continue
        better = inertia < best_inertia
        best_centres = np.where(better[:, None, None], centres, best_centres)
        best_labels = np.where(better[:, None], labels, best_labels)
        best_inertia = np.where(better, inertia, best_inertia)
    return best_centres, best_labels


def _sq_dist(z: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return ((z - centre[:, None, :]) ** 2).sum(axis=2)


def _draw(weights: np.ndarray, u: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per group, the row drawn in proportion to ``weights`` (groups, rows) by uniforms ``u`` (groups,),
    among its first ``rows`` (the real ones)."""
    cumulative = np.cumsum(weights, axis=1)
    target = u * cumulative[:, -1]
    return np.minimum((cumulative <= target[:, None]).sum(axis=1), rows - 1)


def _seed(z: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    groups, rows = np.arange(len(z)), valid.sum(axis=1)
    first = z[groups, _draw(valid.astype(np.float64), rng.random(len(z)), rows)]
    d0 = np.where(valid, _sq_dist(z, first), 0.0)
    best, best_potential = None, None
    for _ in range(CANDIDATES):
        candidate = z[groups, _draw(d0, rng.random(len(z)), rows)]
        potential = np.where(valid, np.minimum(d0, _sq_dist(z, candidate)), 0.0).sum(axis=1)
        if best is None:
            best, best_potential = candidate, potential
        else:
            better = potential < best_potential
            best = np.where(better[:, None], candidate, best)
            best_potential = np.where(better, potential, best_potential)
    return np.stack([first, best], axis=1)


def _lloyd(z: np.ndarray, valid: np.ndarray, centres: np.ndarray):
    labels = np.zeros(valid.shape, dtype=np.int8)
    for _ in range(MAX_ITER):
        # nearer centre: |z - c1|^2 < |z - c0|^2  <=>  z . (c1 - c0) > (|c1|^2 - |c0|^2) / 2
        gap = np.einsum("grk,gk->gr", z, centres[:, 1] - centres[:, 0])
        new = ((gap > ((centres[:, 1] ** 2).sum(axis=1) - (centres[:, 0] ** 2).sum(axis=1))[:, None] / 2)
               & valid).astype(np.int8)
        weights = np.stack([valid & (new == 0), new == 1], axis=1).astype(np.float64)  # (groups, 2, rows)
        counts = weights.sum(axis=2)
        sums = np.einsum("gkr,grd->gkd", weights, z)
        centres = np.where(counts[:, :, None] > 0, sums / np.maximum(counts, 1)[:, :, None], centres)
        if np.array_equal(new, labels):
            break
        labels = new
    d0, d1 = _sq_dist(z, centres[:, 0]), _sq_dist(z, centres[:, 1])
    labels = ((d1 < d0) & valid).astype(np.int8)
    inertia = np.where(valid, np.minimum(d0, d1), 0.0).sum(axis=1)
    return centres, labels, inertia
