"""What a class's best split looks like, poisoned or clean: the evidence behind the diffuse-minority
and pinned-split rules (``detectors.base.diffuse_minority``, ``detectors.calibration.separated_minority``).

For every development backdoor and clean case (``benchmarks/families.py``) and each sub-population
detector, each class's best split of its scores (the same exact 1-D two-means as the detectors,
with no separation floor) is recorded: Ashman's D, its cross-class robust z, the share of the class
above the split, and the group's spread tr(cov(group)) / tr(cov(rest)) in the embedding.  A split is
*poisoned* when its class holds poison and at least half of the group is poison.  Then candidate
rules are scored by how many poisoned and clean splits they flag:

    python benchmarks/split_shapes.py [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import choose_defaults as C  # noqa: E402
import families as F  # noqa: E402

from poisonguard.detectors.calibration import PINNED, leave_one_out_z, separated_minority  # noqa: E402

MAX_SHARE = 0.35


def _spread(z: np.ndarray) -> float:
    return float(((z - z.mean(axis=0)) ** 2).sum(axis=1).mean())


def splits(item) -> list[dict]:
    key, path = item
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        rec = C.record(path)
    e = np.load(path)["embedding"].astype(np.float64)
    y, truth = rec["y"], rec["truth"]
    classes = np.unique(y)
    out = []
    for name in C.CLUSTER:
        decisions = [separated_minority(rec[name][y == c], max_share=MAX_SHARE, min_separation=1e-9, min_rows=3)
                     for c in classes]
        d = np.array([x.separation if np.isfinite(x.separation) else np.nan for x in decisions])
        z = np.full(len(classes), np.nan)
        if np.isfinite(d).sum() >= 5:
            z[np.isfinite(d)] = leave_one_out_z(d[np.isfinite(d)], 0.25)
        for k, c in enumerate(classes):
            rows = np.flatnonzero(y == c)
            if decisions[k].why == PINNED:  # the split at the share limit: the top max_share of the class
                n = np.isfinite(rec[name][rows]).sum()
                group = rows[np.argsort(rec[name][rows])[::-1][: n - int(np.ceil(n * (1 - MAX_SHARE)))]]
            else:
                group = rows[rec[name][rows] > decisions[k].threshold] if decisions[k].suspicious else rows[:0]
            if len(group) < 3:
                continue
            rest = np.setdiff1d(rows, group)
            out.append({"key": key, "detector": name, "D": float(d[k]), "z": float(z[k]), "n": len(rows),
                        "rows": len(group), "share": len(group) / len(rows),
                        "spread": _spread(e[group]) / max(_spread(e[rest]), 1e-12),
                        "pinned": decisions[k].why == PINNED,
                        "poisoned": bool(truth[rows].any() and truth[group].mean() >= 0.5)})
    return out


def old_rule(s: dict) -> bool:
    return s["D"] >= max(5.0, 2.95 + 130 / s["n"]) and (np.isnan(s["z"]) or s["z"] >= 6)


def new_rule(s: dict, diffuse_rule) -> bool:
    return not s["pinned"] and (old_rule(s) or diffuse_rule(s))


def diffuse(s: dict, min_d: float, spread: tuple, max_share: float, min_rows: int) -> bool:
    return (s["D"] >= max(min_d, 2.95 + 130 / s["n"]) and spread[0] <= s["spread"] <= spread[1]
            and s["share"] <= max_share and s["rows"] >= min_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = [w for w in F.cases("dev") if w[0][2] in ("clean", "patch", "blend")]
    with ProcessPoolExecutor(args.jobs) as pool:
        found = [s for part in pool.map(splits, work) for s in part]
    pos = [s for s in found if s["poisoned"]]
    neg = [s for s in found if not s["poisoned"]]
    q = lambda v: np.percentile(v, [5, 25, 50, 75, 95]).round(2).tolist()
    print(f"{len(found)} splits in {len(work)} development cases: {len(pos)} poisoned, {len(neg)} clean")
    print("spread ratio, poisoned splits (5/25/50/75/95%):", q([s["spread"] for s in pos]))
    print("spread ratio, clean splits:", q([s["spread"] for s in neg]))
    print("largest poisoned share:", round(max(s["share"] for s in pos), 3),
          "| clean splits the old rule flags:", sum(old_rule(s) for s in neg),
          "of which pinned at max_share:", sum(old_rule(s) and s["pinned"] for s in neg))
    print(f"old rule (D >= 5, z >= 6): {sum(old_rule(s) for s in pos)} poisoned, {sum(old_rule(s) for s in neg)} clean")
    print("not pinned, and the old rule or diffuse(D, spread, share, rows): poisoned, clean")
    for min_d, low, max_share, min_rows in itertools.product((3.5, 4.0), (1.3, 1.5, 1.8), (0.15, 0.2), (3, 5)):
        rule = lambda s: new_rule(s, lambda t: diffuse(t, min_d, (low, 6.0), max_share, min_rows))
        print(f"  D>={min_d} spread {low}-6 share<={max_share} rows>={min_rows}: "
              f"{sum(rule(s) for s in pos)}, {sum(rule(s) for s in neg)}")


if __name__ == "__main__":
    main()
