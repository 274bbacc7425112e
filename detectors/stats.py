"""Mergeable per-class statistics: the only state a detector is fitted from.

``ClassState`` holds, for one class, the row count, the mean and the scatter matrix
M2 = sum (x - mean)(x - mean)^T in float64, merged with the pairwise update of
Chan, Golub and LeVeque (1979):

    n = na + nb,   delta = mean_b - mean_a,
    mean = mean_a + delta * nb / n,
    M2 = M2_a + M2_b + delta delta^T * na * nb / n.

It also holds a bounded uniform sample of the class: the ``capacity`` rows with the
smallest 64-bit keys, where a key is a seeded hash of the row id.  Keeping the k smallest
keys is associative and commutative, so the sample does not depend on how the data was
sharded or in which order shards were merged (bottom-k / priority sampling).

While the sample still holds every row of the class (n <= capacity) the state keeps no scatter
matrix: mean and covariance come exactly from the rows.  So a dataset of 10^5 small classes
costs its rows, not 10^5 d x d matrices; M2 appears when a class outgrows its sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClassState:
    dim: int
    capacity: int
    n: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]
    sample_keys: np.ndarray = field(default=None)  # type: ignore[assignment]
    sample_x: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, dtype=np.float64)
        if self.sample_keys is None:
            self.sample_keys = np.zeros(0, dtype=np.uint64)
        if self.sample_x is None:
            self.sample_x = np.zeros((0, self.dim), dtype=np.float32)

    @classmethod
    def from_block(cls, x: np.ndarray, keys: np.ndarray, capacity: int) -> "ClassState":
        x = np.asarray(x)
        state = cls(dim=x.shape[1], capacity=capacity)
        if len(x) == 0:
            return state
        x64 = x.astype(np.float64, copy=False)
        state.n = len(x)
        state.mean = x64.mean(axis=0)
        if len(x) > capacity:
            centred = x64 - state.mean
            state.m2 = centred.T @ centred
        state.sample_keys, state.sample_x = _bottom_k(
            np.asarray(keys, dtype=np.uint64), x.astype(np.float32, copy=False), capacity
        )
        return state

    @property
    def exact(self) -> bool:
        """True while the sample holds every row (then no scatter matrix is kept)."""
        return self.m2 is None

    def scatter(self) -> np.ndarray:
        """M2 = sum (x - mean)(x - mean)^T, from the rows while the state is exact."""
        if self.m2 is not None:
            return self.m2
        centred = self.sample_x.astype(np.float64) - self.mean
        return centred.T @ centred

    def merge(self, other: "ClassState") -> "ClassState":
        """Return the state of the union of both row sets (neither input is changed)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        keys, xs = _merge_samples(self.sample_keys, self.sample_x, other.sample_keys, other.sample_x, self.capacity)
        if self.exact and other.exact and n <= self.capacity:
            mean = xs.astype(np.float64).mean(axis=0)  # exact, whatever the merge order
            return ClassState(self.dim, self.capacity, n, mean, None, keys, xs)
        m2 = self.scatter() + other.scatter() + np.outer(delta, delta) * (self.n * other.n / n)
        return ClassState(self.dim, self.capacity, n, mean, m2, keys, xs)

    @property
    def covariance(self) -> np.ndarray:
        """Population covariance M2 / n (zeros for an empty class)."""
        if self.n == 0:
            return np.zeros((self.dim, self.dim))
        return self.scatter() / self.n

    @property
    def variance(self) -> np.ndarray:
        """The covariance's diagonal, without forming the d x d matrix while the state is exact."""
        if self.n == 0:
            return np.zeros(self.dim)
        if self.m2 is not None:
            return np.diag(self.m2) / self.n
        return ((self.sample_x.astype(np.float64) - self.mean) ** 2).sum(axis=0) / self.n


def pooled_moments(states) -> tuple[np.ndarray, np.ndarray]:
    """The mean and standard deviation of each column over every class's rows (within-class variance
    plus the spread of the class means), the deviation 1 where a column is constant: what
    standardises a view for a distance read across classes."""
    states = [s for s in states if s.n > 0]
    n = np.array([s.n for s in states], dtype=np.float64)
    means = np.stack([np.asarray(s.mean, dtype=np.float64) for s in states])
    centre = n @ means / n.sum()
    variance = (n @ np.stack([s.variance for s in states]) + n @ (means - centre) ** 2) / n.sum()
    scale = np.sqrt(np.maximum(variance, 0.0))
    return centre, np.where(scale > 1e-12, scale, 1.0)


def _bottom_k(keys: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows with the smallest keys, sorted by (key, row bytes) so ties are order-free."""
    if len(keys) > k:
        cut = np.partition(keys, k - 1)[k - 1]
        keep = keys <= cut
        keys, x = keys[keep], x[keep]
    order = np.argsort(keys, kind="stable")
    if len(keys) > 1 and np.any(keys[order[1:]] == keys[order[:-1]]):  # equal keys: break ties by the row
        row_tiebreak = np.ascontiguousarray(x).view(np.uint8).reshape(len(x), -1).sum(axis=1)
        order = np.lexsort((row_tiebreak, keys))
    order = order[:k]
    return keys[order], x[order]


def _merge_samples(keys_a, x_a, keys_b, x_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Bottom-k of the union of two bottom-k samples.  Rows of one sample whose keys lie above a
    full other sample's largest key cannot enter it, so they are dropped before concatenating: once
    a class's sample is full, most of a new block's rows are."""
    if len(keys_a) >= k and len(keys_b):
        keep = keys_b <= keys_a[-1]
        keys_b, x_b = keys_b[keep], x_b[keep]
    if len(keys_b) >= k and len(keys_a):
        keep = keys_a <= keys_b[-1]
        keys_a, x_a = keys_a[keep], x_a[keep]
    return _bottom_k(np.concatenate([keys_a, keys_b]), np.concatenate([x_a, x_b]), k)


def states_of_block(x: np.ndarray, codes: np.ndarray, n_codes: int, keys: np.ndarray,
                    capacity: int) -> list[ClassState]:
    """Every class's state of one block at once: ``codes`` (0..n_codes-1) name each row's class.
    One sort by (class, key) gives every class's bottom-k sample, sums give the means; only a class
    with more rows than ``capacity`` builds a scatter matrix.  The same states as
    ``ClassState.from_block`` class by class, without its per-class sorts (10^4 classes a block)."""
    x = np.asarray(x)
    keys = np.asarray(keys, dtype=np.uint64)
    order = np.lexsort((keys, codes))
    sorted_codes, sorted_keys = codes[order], keys[order]
    tied = (sorted_codes[1:] == sorted_codes[:-1]) & (sorted_keys[1:] == sorted_keys[:-1])
    if tied.any():  # equal keys in a class: break ties by the row, as _bottom_k does
        row_tiebreak = np.ascontiguousarray(x.astype(np.float32, copy=False)).view(np.uint8).reshape(len(x), -1).sum(axis=1)
        order = np.lexsort((row_tiebreak, keys, codes))
    counts = np.bincount(codes, minlength=n_codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    xs = x.astype(np.float32, copy=False)[order]
    present = counts > 0
    sums = np.zeros((n_codes, x.shape[1]))
    sums[present] = np.add.reduceat(xs, starts[present], axis=0, dtype=np.float64)  # float64 sums, no float64 copy
    means = sums / np.maximum(counts, 1)[:, None]
    skeys = keys[order]
    out = []
    for c in range(n_codes):
        n, start = int(counts[c]), int(starts[c])
        state = ClassState(dim=x.shape[1], capacity=capacity)
        if n:
            rows = slice(start, start + min(n, capacity))
            state.n, state.mean = n, means[c]
            state.sample_keys, state.sample_x = skeys[rows], xs[rows]
            if n > capacity:
                centred = np.subtract(xs[start:start + n], means[c], dtype=np.float64)
                state.m2 = centred.T @ centred
        out.append(state)
    return out


def merge_states(states) -> ClassState | None:
    merged = None
    for state in states:
        merged = state if merged is None else merged.merge(state)
    return merged


def states_by_class(
    x: np.ndarray, y: np.ndarray, keys: np.ndarray, capacity: int
) -> dict[object, ClassState]:
    """Per-class states of an in-memory dataset (the same math the Beam combiner runs)."""
    out: dict[object, ClassState] = {}
    for label in _sorted_labels(y):
        mask = y == label
        out[_py(label)] = ClassState.from_block(x[mask], keys[mask], capacity)
    return out


def default_keys(n: int, seed: int) -> np.ndarray:
    """Sample keys for rows that have no ids: a seeded hash of the row position."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)


def _sorted_labels(y: np.ndarray) -> list:
    return sorted(set(y.tolist()), key=lambda v: (str(type(v)), v))


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


STACK_VALUES = 1 << 23  # padded rows x dimensions per stack of classes (64 MiB of float64)


def stacks(states: dict, budget_values: int = STACK_VALUES) -> list[list]:
    """The labels of ``states`` in stacks for fitting many classes at once: sorted by sample length
    (similar lengths share a stack, so little is padding), each stack's classes x longest sample x
    dim within ``budget_values``."""
    labels = sorted(states, key=lambda c: len(states[c].sample_x))
    if not labels:
        return []
    lengths = np.array([len(states[c].sample_x) for c in labels])
    budget = max(budget_values // max(states[labels[0]].dim, 1), int(lengths.max()))
    out, start = [], 0
    while start < len(labels):
        fits = (np.arange(1, len(labels) - start + 1) * lengths[start:]) <= budget
        stop = start + max(1, int(fits.sum()))
        out.append(labels[start:stop])
        start = stop
    return out


def padded_samples(states: list[ClassState]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classes' samples as one float64 (classes, longest, dim) array, zero-padded, with the mask of
    real rows (each class's first rows) and each class's row count."""
    rows = np.array([len(s.sample_x) for s in states])
    x = np.zeros((len(states), int(rows.max()), states[0].dim))
    for i, s in enumerate(states):
        x[i, : rows[i]] = s.sample_x
    return x, np.arange(x.shape[1])[None, :] < rows[:, None], rows
