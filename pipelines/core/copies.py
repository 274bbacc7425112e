"""Exact copies: rows whose embedding is bit for bit another row's, and copies that disagree on
their label.

One poisoned row repeated many times, a dataset concatenated with itself, or a label flipped on one
of two copies: the detectors see fifteen copies as one tight cluster and quarantine them as they
would a planted backdoor, under a detector's reason, and two copies with different labels as a
label issue or not at all.  A reviewer is owed the plainer fact, so the scan counts them.  Copies are
reported, not decided on: honest data has them too (re-crawled pages, augmentation, a class of
blank images), and which copy of a pair with two labels is right is a reviewer's question.

Pass 1 hashes each scorable row's embedding (``content_hashes``) and the embedding with its label
(``labelled_hashes``); the fit counts groups of two or more rows per hash (``CopyGroups``), each
engine over buckets of the hash, so that no group spans two buckets; pass 2 marks the rows of a
block that fall in a group, so that the summary says how many of them were quarantined.

The hash is linear in the embedding read as 64-bit words (two float32 values each; one integer
matrix product a block, no loop per row), with random odd weights, followed by a 64-bit finaliser;
-0.0 and 0.0 hash alike.  Two unrelated rows share a hash with probability about 2^-64 (rows that
differ only in the high bits of their words, signs say, about 2^-32); a crafted collision only
changes what this count reports, never which rows are quarantined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from poisonguard.core.block import hash_strings

BUCKETS = 16  # the Beam engine groups the (content, labelled) hash pairs by content hash modulo this


@lru_cache(maxsize=8)
def _weights(words: int) -> np.ndarray:
    """Random odd 64-bit weights, one per word of a row, the same for every block of a width."""
    drawn = np.random.default_rng([0x9E3779B9, words]).integers(0, 2**63, size=words, dtype=np.uint64)
    return drawn * np.uint64(2) + np.uint64(1)


def _finalise(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def content_hashes(x: np.ndarray) -> np.ndarray:
    """A uint64 per row of a float32 matrix; equal rows, and only those (but for about 2^-64 a pair),
    share it.  The rows are read as 64-bit words (two values each, a zero appended to an odd row)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        return np.zeros(len(x), dtype=np.uint64)
    d = x.shape[1]
    values = x + np.float32(0.0)  # a contiguous copy in which -0.0 is 0.0
    if d % 2:
        values = np.hstack([values, np.zeros((len(x), 1), np.float32)])
    words = values.view(np.uint64)
    with np.errstate(over="ignore"):
        h = words @ _weights(words.shape[1])
    return _finalise(h + np.uint64(d))


def labelled_hashes(content: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A uint64 per row of its content hash and its label: copies share it only where labels agree."""
    values, inverse = np.unique(np.asarray(labels), return_inverse=True)
    tags = hash_strings(values.astype(str).astype(object))[inverse.ravel()]
    with np.errstate(over="ignore"):
        return _finalise(content ^ _finalise(tags + np.uint64(0x632BE59BD9B4E019)))


@dataclass
class CopyGroups:
    """The groups of exact copies: their content hashes (sorted), sizes, and those whose copies
    carry two or more labels."""

    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    conflicting: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    @classmethod
    def of_pairs(cls, pairs: np.ndarray) -> "CopyGroups":
        """From an (n, 2) array of (content, labelled) hashes holding every row of each content hash."""
        pairs = np.asarray(pairs, dtype=np.uint64).reshape(-1, 2)
        values, counts = np.unique(pairs[:, 0], return_counts=True)
        copied = counts >= 2
        rows = pairs[np.isin(pairs[:, 0], values[copied])]
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
        first = np.ones(len(rows), bool)  # the first row of each distinct (content, labelled) pair
        first[1:] = (rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] != rows[:-1, 1])
        labels_per, per = np.unique(rows[first, 0], return_counts=True)
        return cls(values[copied], counts[copied].astype(np.int64), labels_per[per >= 2])

    @classmethod
    def union(cls, parts: list["CopyGroups"]) -> "CopyGroups":
        """Groups found in disjoint buckets of the content hash, as one."""
        parts = [p for p in parts if len(p.hashes)]
        if not parts:
            return cls()
        hashes = np.concatenate([p.hashes for p in parts])
        order = np.argsort(hashes, kind="stable")
        return cls(hashes[order], np.concatenate([p.sizes for p in parts])[order],
                   np.sort(np.concatenate([p.conflicting for p in parts])))

    def marks(self, content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(in a group, in a group whose copies disagree on the label) per content hash."""
        return np.isin(content, self.hashes), np.isin(content, self.conflicting)

    def report(self) -> dict:
        conflicting = np.isin(self.hashes, self.conflicting)
        return {"groups": int(len(self.hashes)), "rows": int(self.sizes.sum()),
                "largest": int(self.sizes.max()) if len(self.sizes) else 0,
                "conflicting_label_groups": int(conflicting.sum()),
                "conflicting_label_rows": int(self.sizes[conflicting].sum())}


def summary(fit: dict, counts: dict) -> dict:
    """summary.json's ``copies``: the fit's groups and pass 2's quarantined counts."""
    seen = counts.get("copies", {})
    return {**fit, "quarantined": int(seen.get("quarantined", 0)),
            "conflicting_label_quarantined": int(seen.get("conflicting_label_quarantined", 0))}


def line(copies: dict | None) -> str:
    """One sentence for the terminal and the report ('' where no row has a copy)."""
    if not copies or not copies.get("groups"):
        return ""
    text = (f"exact copies: {copies['rows']} rows in {copies['groups']} group(s) of identical embeddings "
            f"(largest {copies['largest']}), {copies['quarantined']} of them quarantined")
    if copies.get("conflicting_label_groups"):
        text += (f"; {copies['conflicting_label_rows']} rows in {copies['conflicting_label_groups']} group(s) "
                 f"whose copies carry different labels ({copies['conflicting_label_quarantined']} quarantined)")
    return text
