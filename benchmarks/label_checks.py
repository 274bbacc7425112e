"""Label-consistency checks compared on the quality benchmark's label-flip cases: deep k-NN
(knn_label, a default) and confident learning on a linear model (confident_label, opt-in).
Writes the section "Label checks: k-NN beside confident learning" of benchmarks/results/quality.md.

    python benchmarks/label_checks.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import RESULTS, embed, load, poison  # noqa: E402

from poisonguard.detectors import ConfidentLabel, KnnLabel  # noqa: E402

CASES = [("digits", r) for r in (0.05, 0.10, 0.20)] + [("breast_cancer", r) for r in (0.05, 0.10, 0.20)] \
    + [("wine", r) for r in (0.10, 0.20)]
HEADER = "## Label checks: k-NN beside confident learning"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    lines = [HEADER, "", f"`python benchmarks/label_checks.py --seeds {args.seeds}`: label flips (rate = flipped rows "
             "as a share of the target class), embeddings of an MLP trained on the flipped data; mean over seeds.", "",
             "| case | method | recall | FPR | F1 | AUROC | seconds |", "|---|---|---|---|---|---|---|"]
    for dataset, rate in CASES:
        results = {"knn_label": [], "confident_label": []}
        for seed in range(args.seeds):
            x, y, target, image = load(dataset)
            xp, yp, truth = poison(x, y, target, image, "flip", rate, np.random.default_rng(seed))
            e = embed(xp, yp, seed)
            for cls in (KnnLabel, ConfidentLabel):
                started = time.perf_counter()
                det = cls(random_state=seed).fit(e, yp)
                scores, flags = det.score_samples(e, yp), det.flag(e, yp)
                seconds = time.perf_counter() - started
                tp, fp = int((flags & truth).sum()), int((flags & ~truth).sum())
                recall, fpr = tp / max(truth.sum(), 1), fp / max((~truth).sum(), 1)
                precision = tp / max(tp + fp, 1)
                f1 = 2 * precision * recall / max(precision + recall, 1e-12)
                ok = np.isfinite(scores)
                auroc = roc_auc_score(truth[ok], scores[ok]) if truth[ok].any() and (~truth[ok]).any() else np.nan
                results[cls.name].append((recall, fpr, f1, auroc, seconds))
        for name, rows in results.items():
            r = np.nanmean(np.array(rows), axis=0)
            lines.append(f"| {dataset} flip {rate:.0%} | {name} | {r[0]:.3f} | {100 * r[1]:.2f}% | {r[2]:.3f} | "
                         f"{r[3]:.3f} | {r[4]:.2f} |")
            print(lines[-1], flush=True)
    text = RESULTS.read_text()
    before, _, after = text.partition(HEADER)
    rest = after.split("\n## ", 1)
    tail = ("\n## " + rest[1]) if len(rest) == 2 else ""
    RESULTS.write_text(before.rstrip() + "\n\n" + "\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    main()
