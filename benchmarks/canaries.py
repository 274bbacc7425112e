"""Does the canary self-test predict the real attack's recall?  On the quality benchmark's families
(scikit-learn's digits, breast cancer and wine; an MLP trained on the poisoned data, its penultimate
activations as embeddings; patch and blended triggers at several rates), for each case:

  - real: the share of the real poisoned rows the default detectors quarantine;
  - canary: the embedding-mode power analysis on the same embeddings, planting one cluster of the
    real attack's size in the target class (``canaries.separation`` 6 class SDs, the default).

Writes the table into benchmarks/results/quality.md (section "Canary recall beside the real attack's").

    python benchmarks/canaries.py [--seeds 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import RESULTS, embed, load, poison  # noqa: E402

from poisonguard.canaries import power_of  # noqa: E402
from poisonguard.config import Config  # noqa: E402
from poisonguard.core.screening import fit_detectors  # noqa: E402
from poisonguard.detectors.stats import default_keys, states_by_class  # noqa: E402

CASES = [("digits", "patch", r) for r in (0.01, 0.03, 0.05, 0.10)] + [("digits", "blend", r) for r in (0.05, 0.10)] \
    + [("breast_cancer", "patch", r) for r in (0.03, 0.10)] + [("breast_cancer", "blend", 0.10)] \
    + [("wine", "patch", r) for r in (0.05, 0.10)]
HEADER = "## Canary recall beside the real attack's"


def one(dataset: str, attack: str, rate: float, seed: int) -> tuple[float, float, int]:
    x, y, target, image = load(dataset)
    rng = np.random.default_rng(seed)
    xp, yp, truth = poison(x, y, target, image, attack, rate, rng)
    e = embed(xp, yp, seed)
    config = Config(seed=seed)
    keys = default_keys(len(yp), seed)
    states = states_by_class(e, yp, keys, config.max_fit_rows_per_class)
    detectors = fit_detectors(states, config)
    flags = np.zeros(len(yp), dtype=bool)
    for detector in detectors.values():
        flags |= detector.flag(e, yp, keys)
    real = float(flags[truth].mean())
    share = truth.sum() / max(int((yp == target).sum()), 1)
    config.canaries.sizes = [float(min(share, 0.5))]
    power = power_of(states, config, classes=[target])
    return real, power["recall"], int(truth.sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for dataset, attack, rate in CASES:
        started = time.perf_counter()
        results = [one(dataset, attack, rate, seed) for seed in range(args.seeds)]
        real, canary = float(np.mean([r[0] for r in results])), float(np.mean([r[1] for r in results]))
        rows.append((f"{dataset} {attack} {rate:.0%}", results[0][2], real, canary))
        print(f"{rows[-1][0]}: {rows[-1][1]} poisoned rows, real recall {real:.3f}, canary recall {canary:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    real, canary = np.array([r[2] for r in rows]), np.array([r[3] for r in rows])
    agree = float(np.mean((real >= 0.5) == (canary >= 0.5)))
    corr = float(np.corrcoef(real, canary)[0, 1]) if real.std() and canary.std() else float("nan")
    lines = [HEADER, "", f"`python benchmarks/canaries.py --seeds {args.seeds}`: the default detectors on the real "
             "attack, and the embedding-mode canary power analysis on the same embeddings with one planted cluster "
             "of the real attack's size in the target class.", "",
             "| case | poisoned rows | real recall | canary recall |", "|---|---|---|---|"]
    lines += [f"| {case} | {n} | {r:.3f} | {c:.3f} |" for case, n, r, c in rows]
    lines += ["", f"Agreement on 'caught' (recall >= 0.5): {agree:.0%} of cases; Pearson correlation {corr:.2f}.", ""]
    text = RESULTS.read_text() if RESULTS.exists() else ""
    text = text.split(HEADER)[0].rstrip() + "\n\n" + "\n".join(lines)
    RESULTS.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
