"""Choose the decision thresholds of the default detectors on the development families only.

Each detector is fitted once per development case with a permissive decision, recording per class
its separation D, class size and the rows it would flag; the class-level rule
(D >= max(min_separation, 2.95 + 130 / n) and cross-class z >= min_class_z, and for knn_label
score >= min_disagreement) is then replayed for every point of a grid.  The objective: the highest
mean F1 over the poisoned development cases, subject to at most 0.5% of rows flagged on every
development clean control and no clean class losing more than 2%.  Prints the grid's best points;
the chosen values become the detectors' defaults and are then reported on the held-out families.

    python benchmarks/choose_defaults.py

Scope: this grid chose the first round's values (``min_separation``, ``min_class_z``,
``min_disagreement``, ``max_share``) and replays that round's class rule only.  The rules added
since were chosen on the same development families with their own evidence: the diffuse-minority
and pinned-split rules with ``split_shapes.py``, the second looks, the weak-representation verdict
and the k-NN check's ``min_share`` with ``families.py eval --split dev --config ...`` (each rule's
docstring gives the candidates and the counts); the replay here does not include them.
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as F  # noqa: E402

from poisonguard.detectors import DETECTORS  # noqa: E402
from poisonguard.detectors.calibration import leave_one_out_z, separated_minority  # noqa: E402

CLUSTER = ("spectral", "activation_clustering", "spectre")
SEPARATIONS = (4.0, 5.0, 6.0, 8.0, 12.0)
CLASS_Z = (None, 3.0, 6.0)
DISAGREEMENT = (0.7, 0.9)
MAX_SHARE = (0.35, 0.2, 0.12)


RECORDS = F.CACHE.parent / "decisions"


def record(path) -> dict:
    """Every row's (test-transformed) score under each cluster detector, knn_label's disagreement and
    confident_label's flags: all a class decision needs, so the grid replays it without refitting."""
    cached = RECORDS / Path(path).name
    if not cached.exists():
        data = np.load(path)
        e, y = data["embedding"], data["label"]
        arrays = {"truth": data["truth"], "y": y}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in CLUSTER:
                det = DETECTORS[name](random_state=0).fit(e, y)
                arrays[name] = det._test_transform(det.score_samples(e, y))
            arrays["knn"] = DETECTORS["knn_label"](random_state=0).fit(e, y).score_samples(e, y)
            arrays["confident_label"] = DETECTORS["confident_label"](random_state=0).fit(e, y).flag(e, y)
        RECORDS.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(cached)
    data = np.load(cached, allow_pickle=False)
    return {k: data[k] for k in data.files}


def replay(rec: dict, params: tuple, use: tuple) -> np.ndarray:
    """The default fusion (a row is held if any detector in ``use`` flags it) under ``params``."""
    min_sep, min_z, disagreement, max_share = params
    y = rec["y"]
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    flags = np.zeros(len(y), bool)
    for name in use:
        mine = np.zeros(len(y), bool)
        if name == "confident_label":  # its own decision, as it stands
            flags |= rec["confident_label"]
            continue
        if name == "knn_label":
            s = rec["knn"] >= disagreement
            for rows in members:
                if s[rows].mean() <= 0.35:
                    mine[rows] = s[rows]
            flags |= _guarded(mine, y)
            continue
        separations, critical, above = _splits(rec, name, max_share, members)
        tested = np.isfinite(separations)
        z = np.full(len(classes), np.inf)
        if min_z is not None and tested.sum() >= 5:
            z[tested] = leave_one_out_z(separations[tested], 0.25)
        passing = tested & (separations >= np.maximum(min_sep, critical)) & ((z >= min_z) if min_z is not None else True)
        for k in np.flatnonzero(passing):
            mine[members[k]] = above[k]
        flags |= _guarded(mine, y)
    return flags


def _splits(rec: dict, name: str, max_share: float, members: list):
    """Per class: Ashman's D of the best split, its small-class critical value, and which rows lie
    beyond the split (independent of min_separation, so computed once per max_share)."""
    key = ("_splits", name, max_share)
    if key not in rec:
        scores = rec[name]
        out_d, out_crit, out_rows = [], [], []
        for rows in members:
            decision = separated_minority(scores[rows], max_share=max_share, min_separation=1e-9, min_rows=3)
            out_d.append(decision.separation if decision.suspicious or np.isfinite(decision.separation) else np.nan)
            out_crit.append(2.95 + 130.0 / max(decision.rows_tested, 1))
            out_rows.append(scores[rows] > decision.threshold if decision.suspicious else np.zeros(len(rows), bool))
        rec[key] = (np.array(out_d, float), np.array(out_crit), out_rows)
    return rec[key]


def _guarded(flags: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The mass-quarantine guard (calibration.guard_mass_quarantine) replayed on one detector's flags."""
    classes = np.unique(y)
    heavy = sum(flags[y == c].mean() >= 0.05 for c in classes)
    return np.zeros_like(flags) if len(classes) >= 3 and heavy > 0.5 * len(classes) else flags


def score(recs, keys, params, use) -> dict:
    f1s, clean_worst, clean_share = [], 0.0, 0.0
    for key, rec in zip(keys, recs):
        flags = replay(rec, params, use)
        truth, y = rec["truth"], rec["y"]
        if truth.any():
            tp, fp, fn = np.sum(flags & truth), np.sum(flags & ~truth), np.sum(~flags & truth)
            f1s.append(2 * tp / (2 * tp + fp + fn))
        else:
            clean_share = max(clean_share, flags.mean())
            clean_worst = max(clean_worst, max(flags[y == c].mean() for c in np.unique(y)))
    return {"mean_f1": float(np.mean(f1s)), "clean_share": float(clean_share), "worst_class": float(clean_worst)}


def main() -> None:
    work = list(F.cases("dev"))
    keys = [k for k, _ in work]
    print(f"{len(work)} development cases", flush=True)
    with ProcessPoolExecutor(2) as pool:
        recs = list(pool.map(record, [p for _, p in work]))
    results = []
    label_sets = [("knn_label",), ("confident_label",), ("knn_label", "confident_label")]
    cluster_sets = [(), ("spectral", "activation_clustering", "spectre"), ("spectral",), ("spectre",),
                    ("activation_clustering",)]
    detector_sets = [c + l for c in cluster_sets for l in label_sets if c + l]
    for use in detector_sets:
        for params in itertools.product(SEPARATIONS, CLASS_Z, DISAGREEMENT, MAX_SHARE):
            if "knn_label" not in use and params[2] != DISAGREEMENT[0]:
                continue
            if not any(n in CLUSTER for n in use) and (params[0], params[1], params[3]) != (SEPARATIONS[0], CLASS_Z[0], MAX_SHARE[0]):
                continue
            results.append({"detectors": use, "min_separation": params[0], "min_class_z": params[1],
                            "min_disagreement": params[2], "max_share": params[3], **score(recs, keys, params, use)})
    feasible = [r for r in results if r["clean_share"] <= 0.005 and r["worst_class"] <= 0.02]
    feasible.sort(key=lambda r: -r["mean_f1"])
    print("feasible (clean controls <= 0.5%, worst class <= 2%), best first:")
    for r in feasible[:15]:
        print(json.dumps(r, default=str))
    print("best overall regardless of constraints:")
    for r in sorted(results, key=lambda r: -r["mean_f1"])[:5]:
        print(json.dumps(r, default=str))
    out = Path(__file__).resolve().parent / "results" / "choose_defaults.json"
    out.write_text(json.dumps({"cases": len(work), "feasible": feasible[:30], "all": results}, default=str, indent=0))


if __name__ == "__main__":
    main()
