"""SPECTRE's per-class fit (``detectors.spectre``) for many small classes at once.

The same steps as ``Spectre._fit_class``, each on a stack of classes: the eigendecomposition of every
class covariance, then, for the classes that keep the same number k of directions, the robust mean
and covariance (median/MAD start, concentration steps on padded rows, the chi^2_k consistency cut),
the whitening and the QUantum Entropy map.  10,000 classes of 100 rows spent 15-18 s in the
per-class fits' Python overhead.  A class's rows are padded to the group's longest sample and
masked: padding never enters a median, a mean or a kept set.
"""

from __future__ import annotations

import numpy as np


def fit_many(states: list, view: float, max_components: int, keep: float, max_iter: int, alpha: float,
             pad: int | None) -> list[dict | None]:
    """The models of ``Spectre._fit_class`` for ``states`` (each with at least 10 sample rows)."""
    from poisonguard.detectors.base import top_eigh

    dim = states[0].dim
    values, vectors = top_eigh(np.stack([np.asarray(s.covariance, dtype=np.float64) for s in states]), dim)
    total = values.sum(axis=1)
    rows = np.array([len(s.sample_x) for s in states])
    k = (np.cumsum(values, axis=1) / np.maximum(total, 1e-300)[:, None] < view).sum(axis=1) + 1 if view < 1.0 \
        else np.full(len(states), dim)
    k = np.maximum(1, np.minimum.reduce([k, np.full(len(k), max_components), rows // 5,
                                         (values > 1e-9 * values[:, :1]).sum(axis=1)]))
    out: list[dict | None] = [None] * len(states)
    for width in np.unique(k[total > 0]):  # one stack per number of kept directions
        group = np.flatnonzero((k == width) & (total > 0))
        models = _fit_group([states[i] for i in group], vectors[group][:, :, :width], int(width), keep, max_iter,
                            alpha, pad)
        for i, model in zip(group, models):
            out[i] = model
    return out


def _fit_group(states, basis, k, keep, max_iter, alpha, pad):
    from scipy.stats import chi2

    from poisonguard.detectors.stats import padded_samples

    sample, valid, rows = padded_samples(states)
    means = np.stack([s.mean for s in states])
    x = (sample - means[:, None, :]) @ basis  # (batched matmul: BLAS, where einsum would loop)
    x = np.where(valid[:, :, None], x, 0.0)
    h = np.maximum(k + 1, np.ceil(keep * rows).astype(int))
    padded = np.where(valid[:, :, None], x, np.nan)
    centre = np.nanmedian(padded, axis=1)
    scale = 1.4826 * np.nanmedian(np.abs(padded - centre[:, None, :]), axis=1)
    spread = np.sqrt(np.nanmean((padded - np.nanmean(padded, axis=1)[:, None, :]) ** 2, axis=1))
    scale = np.where(scale <= 0, spread, scale)
    scale = np.where(scale <= 0, 1.0, scale)
    dist = np.where(valid, (((x - centre[:, None, :]) / scale[:, None, :]) ** 2).sum(axis=2), np.inf)
    kept = _smallest(dist, h)
    for _ in range(max_iter):
        mu, cov = _mean_cov(x, kept)
        new = _smallest(np.where(valid, _mahalanobis_sq(x, mu, cov), np.inf), h)
        if np.array_equal(new, kept):
            break
        kept = new
    mu, cov = _mean_cov(x, kept)
    dist = np.where(valid, _mahalanobis_sq(x, mu, cov), np.nan)
    consistency = np.nanmedian(dist, axis=1) / chi2.ppf(0.5, k)
    inliers = valid & (np.nan_to_num(dist, nan=np.inf) <= chi2.ppf(0.99, k) * np.maximum(consistency, 1e-12)[:, None])
    use = inliers.sum(axis=1) > k
    mu_in, cov_in = _mean_cov(x, np.where(use[:, None], inliers, kept))
    mu, cov = np.where(use[:, None], mu_in, mu), np.where(use[:, None, None], cov_in, cov)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 1e-9 * np.maximum(evals.max(axis=1), 1e-300)[:, None])
    whitener = np.einsum("gij,gj,gkj->gik", evecs, evals ** -0.5, evecs)
    whitened = (x - mu[:, None, :]) @ whitener
    centred = np.where(valid[:, :, None], whitened - _masked_mean(whitened, valid)[:, None, :], 0.0)
    s = centred.transpose(0, 2, 1) @ centred / rows[:, None, None]
    s_evals, s_evecs = np.linalg.eigh(s - np.eye(k))
    norm = np.maximum(np.abs(s_evals).max(axis=1), 1e-12)
    q = np.exp(alpha * s_evals / norm[:, None])
    to_q = whitener @ (s_evecs * np.sqrt(q / q.sum(axis=1, keepdims=True))[:, None, :])
    A = basis @ to_q
    a = -np.einsum("gk,gkj->gj", np.einsum("gd,gdk->gk", means, basis) + mu, to_q)
    if pad is not None:
        A = np.concatenate([A, np.zeros((*A.shape[:2], pad - k))], axis=2)
        a = np.concatenate([a, np.zeros((len(a), pad - k))], axis=1)
    return [{"k": k, "A": A[i], "a": a[i], "kernel": "blas" if pad is None else "stacked"} for i in range(len(states))]


def _smallest(dist: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per group, a mask of its h smallest distances (stable order: ties by position)."""
    order = np.argsort(dist, axis=1, kind="stable")
    kept = np.zeros(dist.shape, dtype=bool)
    np.put_along_axis(kept, order, np.arange(dist.shape[1])[None, :] < h[:, None], axis=1)
    return kept


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (mask[:, None, :].astype(np.float64) @ x)[:, 0, :] / np.maximum(mask.sum(axis=1), 1)[:, None]


def _mean_cov(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = _masked_mean(x, mask)
    centred = np.where(mask[:, :, None], x - mu[:, None, :], 0.0)
    cov = centred.transpose(0, 2, 1) @ centred / np.maximum(mask.sum(axis=1), 1)[:, None, None]
    k = x.shape[2]
    ridge = 1e-9 * np.maximum(np.trace(cov, axis1=1, axis2=2) / k, 1e-300)
    return mu, cov + ridge[:, None, None] * np.eye(k)


def _mahalanobis_sq(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    centred = x - mu[:, None, :]
    return np.einsum("grk,grk->gr", centred @ np.linalg.pinv(cov, hermitian=True), centred)
