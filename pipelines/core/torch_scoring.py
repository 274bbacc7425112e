"""Per-row detector scoring as torch on a device (``scoring_device: cuda``).

The fitted detectors are the same; only the heavy per-row arithmetic of the score pass moves:

* spectral and activation clustering: the stacked per-class projection x . w_y + b_y;
* SPECTRE: the whitened quadratic form y^T Q y, class by class;
* knn_label: the distances to the projected reference and their k + 1 smallest (``torch.cdist``,
  ``torch.topk``), then the detector's own neighbour counting;
* confident_label: the softmax (or, for two classes, the sigmoid) of the refitted linear model.

knn_distance stays on the CPU (numpy): it searches only the rows of classes it has found suspicious.

Thresholds, decisions and the reasons stay with the detectors, so a GPU run differs from a CPU run
only where a score lies within floating-point rounding of its class threshold.  Arithmetic is
float64 except the k-NN distances (float32, as scikit-learn's search).  Device tensors of the fitted
models are built once per worker and reused for every batch.  torch is imported only here.
"""

from __future__ import annotations

import weakref

import numpy as np

from poisonguard.detectors.base import codes_in, rows_by_label


def resolve_device(choice: str) -> str | None:
    """The torch device for ``scoring_device`` (None: numpy on the CPU)."""
    if choice == "cpu":
        return None
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        from poisonguard.errors import ConfigError

        raise ConfigError("scoring_device is cuda but no CUDA device is available")
    return None


class TorchScorer:
    """Scores and flags of one batch for each fitted detector, with torch on ``device``."""

    KNN_CHUNK = 4096

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        # per fitted detector (weakly: a new fit, e.g. a re-read side input, never meets old tensors)
        self._tensors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _on_device(self, detector, key: str, make):
        cache = self._tensors.setdefault(detector, {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _t(self, array, dtype=None):
        return self.torch.as_tensor(np.ascontiguousarray(array), dtype=dtype or self.torch.float64, device=self.device)

    def score_and_flag(self, detector, X: np.ndarray, y: np.ndarray, keys) -> tuple[np.ndarray, np.ndarray]:
        from poisonguard.detectors import ConfidentLabel, KnnLabel, Spectre

        if isinstance(detector, ConfidentLabel):
            return detector.score_and_flag(X, y, keys, proba_fn=self._linear_proba(detector))
        if isinstance(detector, KnnLabel):
            scores = detector.score_with(X, y, keys, self._neighbours(detector))
        elif getattr(detector, "linear_", None) is not None:
            scores = detector.set_aside_submodes(X, y, self._linear(detector, X, y))
        elif isinstance(detector, Spectre):
            scores = detector.set_aside_submodes(X, y, self._spectre(detector, X, y))
        else:
            return detector.score_and_flag(X, y, keys)
        return scores, detector.flag(X, y, keys, scores=scores)

    # ---- the kernels ------------------------------------------------------------------------
    def _linear(self, detector, X, y) -> np.ndarray:
        index, w, b = detector.linear_
        scores = np.full(len(X), np.nan)
        codes = codes_in(index, y)
        ok = np.flatnonzero(codes >= 0)
        if not len(ok):
            return scores
        W, B = self._on_device(detector, "linear", lambda: (self._t(w), self._t(b)))
        c = self.torch.as_tensor(codes[ok], device=self.device)
        x = self._t(np.asarray(X, dtype=np.float64)[ok])
        projection = (x * W[c]).sum(dim=1) + B[c]
        scores[ok] = detector._from_linear(projection.cpu().numpy())
        return scores

    def _spectre(self, detector, X, y) -> np.ndarray:
        scores = np.full(len(X), np.nan)
        for label, rows in rows_by_label(np.asarray(y)):
            model = detector.class_models_.get(label)
            if model is None:
                continue
            A, a = self._on_device(detector, f"class:{label!r}", lambda m=model: (self._t(m["A"]), self._t(m["a"])))
            x = self._t(np.asarray(X[rows], dtype=np.float64))
            white = x @ A + a  # tau(x) = |x A + a|^2 (detectors.spectre)
            scores[rows] = (white * white).sum(dim=1).cpu().numpy()
        return scores

    def _neighbours(self, detector):
        torch = self.torch

        def reference():
            centre, vectors = detector.projection_ if detector.projection_ is not None else (None, None)
            ref = self._t(detector.reference_x_, torch.float32)
            if centre is not None:
                ref = (ref - self._t(centre, torch.float32)) @ self._t(vectors, torch.float32)
            return ref, (None if centre is None else (self._t(centre, torch.float32), self._t(vectors, torch.float32)))

        ref, projection = self._on_device(detector, "knn", reference)
        k = detector.k_ + 1

        def search(X):
            dist_out, idx_out = [], []
            for start in range(0, len(X), self.KNN_CHUNK):
                x = self._t(np.asarray(X[start:start + self.KNN_CHUNK], dtype=np.float32), torch.float32)
                if projection is not None:
                    x = (x - projection[0]) @ projection[1]
                # exact differences, not the |x|^2 + |r|^2 - 2xr shortcut: a row must find itself at distance 0
                dist = torch.cdist(x, ref, compute_mode="donot_use_mm_for_euclid_dist")
                dist, idx = torch.topk(dist, k, dim=1, largest=False, sorted=True)
                dist_out.append(dist.cpu().numpy())
                idx_out.append(idx.cpu().numpy())
            return np.concatenate(dist_out), np.concatenate(idx_out)

        return search

    def _linear_proba(self, detector):
        model = detector.model_
        if model is None:
            return None
        torch = self.torch
        coef, intercept = self._on_device(detector, "logistic",
                                          lambda: (self._t(model.coef_), self._t(model.intercept_)))

        def proba(z):
            logits = self._t(z) @ coef.T + intercept
            if logits.shape[1] == 1:  # two classes: scikit-learn's sigmoid of the one decision function
                p1 = torch.sigmoid(logits[:, 0])
                return torch.stack([1 - p1, p1], dim=1).cpu().numpy()
            return torch.softmax(logits, dim=1).cpu().numpy()

        return proba
