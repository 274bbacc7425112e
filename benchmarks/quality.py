"""Detection quality: every poisonguard detector, the default fusion, and IBM ART, on the same rows.

For each dataset that scikit-learn ships (digits with its one-pixel shifts, breast cancer, wine) and each attack
(patch trigger, blended trigger, label flip, none), poison a copy of the data, train a small MLP
on it to convergence, take its penultimate activations as embeddings, and run:
  - poisonguard: each default detector alone, the default fusion (``poisonguard.screen``, the scan's
    own core: a row is quarantined if any detector flags it) and the fusion of spectral +
    activation_clustering;
  - ART SpectralSignatureDefense with its defaults (expected_pp_poison=0.33) and with the true rate;
  - ART ActivationDefence with its defaults (smaller cluster) and with silhouette analysis.
Prints one table (recall, false-positive rate, precision, F1, AUROC, seconds; mean over seeds) and
writes it to benchmarks/results/quality.md.  ART is optional: `pip install -e ".[bench]"`.

    python benchmarks/quality.py [--seeds 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import poisonguard  # noqa: E402
from families import within_class_rank  # noqa: E402  (benchmarks/, the script's own folder)
from poisonguard.detectors import DEFAULT_DETECTORS, DETECTORS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quality.md"
TARGETS = "## Targets (default fusion, no oracle)"


# ---- data and attacks ---------------------------------------------------------------------

def load(name: str):
    if name == "digits":
        d = load_digits()
        images = d.images.astype(np.float32) / 16.0
        # the original and four one-pixel shifts: 8985 rows, ~900 per class
        shifted = [images] + [np.roll(images, s, axis=a) for a in (1, 2) for s in (-1, 1)]
        x = np.concatenate(shifted).reshape(-1, 64)
        return x, np.tile(d.target, 5), 0, True
    d = load_breast_cancer() if name == "breast_cancer" else load_wine()
    x = d.data.astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    target = 1 if name == "breast_cancer" else 0
    return x, d.target, target, False


def poison(x, y, target, image, attack, rate, rng):
    """Dirty-label poisoning: rows of other classes get the trigger (or none) and the target label."""
    x, y = x.copy(), y.copy()
    is_poison = np.zeros(len(y), dtype=bool)
    if attack == "clean":
        return x, y, is_poison
    n = max(1, int(round(rate * np.sum(y == target))))
    rows = rng.choice(np.flatnonzero(y != target), size=n, replace=False)
    if attack == "patch":
        if image:
            img = x[rows].reshape(-1, 8, 8)
            img[:, 6:8, 6:8] = 1.0
            x[rows] = img.reshape(-1, 64)
        else:
            cols = np.array([1, 3]) % x.shape[1]
            x[np.ix_(rows, cols)] = x[:, cols].max(axis=0) + 1.0
    elif attack == "blend":
        pattern = np.random.default_rng(12345).uniform(x.min(), x.max(), size=x.shape[1]).astype(np.float32)
        x[rows] = 0.8 * x[rows] + 0.2 * pattern
    y[rows] = target
    is_poison[rows] = True
    return x, y, is_poison


def embed(x, y, seed: int, epochs: int = 600) -> np.ndarray:
    """Penultimate activations of an MLP trained to convergence on the (poisoned) data."""
    torch.manual_seed(seed)
    hidden = 128 if x.shape[1] > 32 else 64
    features = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(hidden, 32), torch.nn.ReLU())
    head = torch.nn.Linear(32, int(y.max()) + 1)
    params = list(features.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(features(xt)), yt).backward()
        opt.step()
    with torch.no_grad():
        return features(xt).numpy()


# ---- methods -------------------------------------------------------------------------------

def poisonguard_methods(e, y, seed):
    out, flags_by = {}, {}
    for name in DEFAULT_DETECTORS:
        cls = DETECTORS[name]
        t0 = time.perf_counter()
        # every row scored, so the AUROC column ranks all of them (the flags are the same either way)
        every = {"score_every_row": True} if "score_every_row" in cls().get_params() else {}
        det = cls(random_state=seed, **every).fit(e, y)
        scores = det.score_samples(e, y)
        flags = det.flag(e, y, scores=scores)
        out[name] = (flags, within_class_rank(scores, y), time.perf_counter() - t0)
        flags_by[name] = flags
    out["fusion:spectral+ac"] = (flags_by["spectral"] | flags_by["activation_clustering"], None,
                                 out["spectral"][2] + out["activation_clustering"][2])
    t0 = time.perf_counter()  # the scan's own core: every default detector, its gates and second looks
    found = poisonguard.screen(e, y, {"seed": seed}).rows
    out["fusion:default"] = (found["quarantined"].to_numpy(), None, time.perf_counter() - t0)
    return out


class _Embeddings:
    """The duck-typed classifier ART's defences need: activations are the embeddings themselves."""

    def __init__(self, n_classes):
        self.layer_names = ["embedding"]
        self.nb_classes = n_classes

    def get_activations(self, x, layer=None, batch_size=128, framework=False):
        return np.asarray(x)


def art_methods(e, y, true_rate):
    try:
        from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    except ImportError:
        return {}
    n_classes = int(y.max()) + 1
    onehot = np.eye(n_classes)[y]
    out = {}
    for label, kwargs in (("ART spectral (default)", {}), ("ART spectral (true rate)", {"expected_pp_poison": max(true_rate, 1e-3)})):
        t0 = time.perf_counter()
        defence = SpectralSignatureDefense(_Embeddings(n_classes), e, onehot, batch_size=512, **kwargs)
        _, is_clean = defence.detect_poison()
        scores = np.zeros(len(y))
        for c in range(n_classes):
            m = y == c
            if m.sum():
                scores[m] = SpectralSignatureDefense.spectral_signature_scores(e[m]).ravel()
        out[label] = (np.asarray(is_clean) == 0, within_class_rank(scores, y), time.perf_counter() - t0)
    for label, kwargs in (("ART activation (default)", {}), ("ART activation (silhouette)", {"cluster_analysis": "silhouette-scores"})):
        t0 = time.perf_counter()
        defence = ActivationDefence(_Embeddings(n_classes), e, onehot)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _, is_clean = defence.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA", **kwargs)
            except IndexError:  # ART 1.20's silhouette analysis indexes with an empty float array where a
                continue  # small cluster's silhouette is under its threshold; ART's best is over the others
        out[label] = (np.asarray(is_clean) == 0, None, time.perf_counter() - t0)
    return out


# ---- metrics and table ----------------------------------------------------------------------

def metrics(flags, scores, truth):
    tp = np.sum(flags & truth)
    fp = np.sum(flags & ~truth)
    fn = np.sum(~flags & truth)
    recall = tp / truth.sum() if truth.any() else np.nan
    precision = tp / (tp + fp) if tp + fp else (np.nan if not truth.any() else 0.0)
    f1 = 2 * tp / (2 * tp + fp + fn) if truth.any() else np.nan
    fpr = fp / (~truth).sum()
    auroc = np.nan
    if truth.any() and scores is not None:
        auroc = roc_auc_score(truth, np.nan_to_num(scores, nan=0.0))
    return {"recall": recall, "fpr": fpr, "precision": precision, "f1": f1, "auroc": auroc}


CASES = {
    "digits": [("patch", r) for r in (0.01, 0.03, 0.05, 0.10)] + [("blend", r) for r in (0.03, 0.05, 0.10)]
    + [("flip", r) for r in (0.05, 0.10, 0.20)] + [("clean", 0.0)],
    "breast_cancer": [("patch", r) for r in (0.03, 0.10)] + [("blend", r) for r in (0.05, 0.10)]
    + [("flip", r) for r in (0.05, 0.10, 0.20)] + [("clean", 0.0)],
    "wine": [("patch", r) for r in (0.05, 0.10)] + [("blend", 0.10)] + [("flip", r) for r in (0.10, 0.20)]
    + [("clean", 0.0)],
}


def run(seeds: int, quick: bool) -> str:
    rows = []
    cases = {k: v[:3] + v[-1:] for k, v in CASES.items()} if quick else CASES
    for dataset, case_list in cases.items():
        x0, y0, target, image = load(dataset)
        for attack, rate in case_list:
            per_method: dict[str, list] = {}
            for seed in range(seeds):
                rng = np.random.default_rng(1000 + seed)
                x, y, truth = poison(x0, y0, target, image, attack, rate, rng)
                e = embed(x, y, seed, epochs=300 if quick else 600)
                methods = poisonguard_methods(e, y, seed)
                methods.update(art_methods(e, y, truth.mean()))
                for name, (flags, scores, seconds) in methods.items():
                    per_method.setdefault(name, []).append({**metrics(flags, scores, truth), "seconds": seconds})
            case = f"{dataset} {attack}" + (f" {int(round(rate * 100))}%" if attack != "clean" else "")
            for name, results in per_method.items():
                mean = {k: float(np.nanmean([r[k] for r in results])) if not all(np.isnan(r[k]) for r in results)
                        else np.nan for k in results[0]}
                rows.append((case, name, mean))
            print(f"done: {case}", file=sys.stderr, flush=True)
    return table(rows, seeds)


def table(rows, seeds) -> str:
    def fmt(v, pct=False):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        return f"{100 * v:.2f}%" if pct else f"{v:.3f}"

    lines = [f"# Detection quality (mean over {seeds} seeds per case)", "",
             "Rates are poisoned rows as a share of the target class. FPR = clean rows flagged / clean rows.",
             "AUROC ranks scores within each class (pooled); '-' where a method has no score.",
             "Each default detector alone and the scan's default fusion beside IBM ART, on MLP embeddings of",
             "scikit-learn's digits, breast cancer and wine (`python benchmarks/quality.py`). The defaults are",
             "chosen and reported on the benchmark families (`families.md`): development and held-out.", "",
             "| case | method | recall | FPR | precision | F1 | AUROC | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for case, name, m in rows:
        lines.append(f"| {case} | {name} | {fmt(m['recall'])} | {fmt(m['fpr'], True)} | {fmt(m['precision'])} | "
                     f"{fmt(m['f1'])} | {fmt(m['auroc'])} | {m['seconds']:.2f} |")
    lines += ["", verdicts(rows)]
    return "\n".join(lines) + "\n"


def verdicts(rows) -> str:
    """The issue's targets, checked against the default fusion."""
    by_case: dict[str, dict[str, dict]] = {}
    for case, name, m in rows:
        by_case.setdefault(case, {})[name] = m
    out = [TARGETS, ""]
    for case, methods in by_case.items():
        fusion = methods["fusion:default"]
        art = [m for n, m in methods.items() if n.startswith("ART")]
        if case.endswith("clean"):
            ok = fusion["fpr"] <= 0.005
            out.append(f"- {case}: flagged {100 * fusion['fpr']:.2f}% (target <= 0.5%): {'met' if ok else 'MISSED'}")
            continue
        attack = case.split()[1]
        rate = int(case.split()[-1].rstrip("%"))
        target = {"patch": 0.9 if rate >= 3 else None, "blend": 0.7, "flip": 0.8}[attack]
        best_art = max((m["f1"] for m in art), default=np.nan)
        parts = [f"F1 {fusion['f1']:.3f}"]
        if target is not None:
            parts.append(f"target {target}: {'met' if fusion['f1'] >= target else 'MISSED'}")
        if art:
            parts.append(f"best ART F1 {best_art:.3f}: {'beaten' if fusion['f1'] > best_art else 'NOT beaten'}")
        out.append(f"- {case}: " + "; ".join(parts))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="fewer cases and epochs (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    text = run(args.seeds, args.quick)
    print(text)
    if not args.quick:
        write_keeping_other_sections(Path(args.out), text)


def write_keeping_other_sections(path: Path, text: str) -> None:
    """This benchmark's table and targets replace the file's head; the sections other benchmarks
    write after it (``canaries.py``, ``label_checks.py``: every ``## `` section but its own) stay."""
    old = path.read_text() if path.exists() else ""
    starts = [m.start() for m in re.finditer(r"^## .*$", old, flags=re.M) if m.group(0) != TARGETS]
    path.write_text(text.rstrip() + "\n" + ("\n" + old[starts[0]:] if starts else ""))


if __name__ == "__main__":
    main()
