"""Does the canary self-test predict the real attack's recall?  On the benchmark families
(``benchmarks/families.py``: data source x embedding model x attack x rate x seed, each model trained
on the poisoned data), for every backdoor case (patch and blended triggers, 1-10% of the target class):

  - real: the share of the real poisoned rows the default detectors quarantine;
  - canary: the embedding-mode power analysis (``poisonguard.canaries.power_of``) on the same
    embeddings, planting one group of the real attack's size in the target class.

The canaries' shape (``canaries.distance`` and ``canaries.spread``) is the median shape of the real
backdoors on the *development* families, printed by ``shape``; the held-out families report how well
the self-test then predicts recall on data it was not calibrated on.

    python benchmarks/canaries.py shape            # the development medians behind the defaults
    python benchmarks/canaries.py eval [--jobs 2]  # writes results/canaries.json and a section of quality.md
    python benchmarks/canaries.py report           # the section again, from results/canaries.json
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import families as F  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HEADER = "## Canary recall beside the real attack's"
BACKDOORS = ("patch", "blend")


def _backdoor_cases(split: str):
    return [(key, path) for key, path in F.cases(split, large_seeds=1) if key[2] in BACKDOORS]


def _radius_sq(z: np.ndarray) -> float:
    return float(((z - z.mean(axis=0)) ** 2).sum(axis=1).mean())


def shape(split: str = "dev") -> dict:
    """The real poison's centre distance from its target class's clean rows (in the class's standard
    deviations along the displacement) and its spread (tr cov(poison) / tr cov(class)): quartiles."""
    gaps, spreads = [], []
    for _, path in _backdoor_cases(split):
        data = np.load(path)
        e, y, truth = data["embedding"].astype(np.float64), data["label"], data["truth"]
        clean, poison = e[(y == int(data["target"])) & ~truth], e[truth]
        if len(poison) < 3:
            continue
        delta = poison.mean(0) - clean.mean(0)
        u = delta / np.linalg.norm(delta)
        gaps.append(np.linalg.norm(delta) / np.sqrt(max(float(u @ np.cov(clean.T) @ u), 1e-24)))
        spreads.append(_radius_sq(poison) / _radius_sq(clean))
    q = lambda v: [round(float(x), 3) for x in np.percentile(v, [25, 50, 75])]
    return {"cases": len(gaps), "distance_quartiles": q(gaps), "spread_quartiles": q(spreads)}


def one(key, path) -> dict:
    from threadpoolctl import threadpool_limits

    from poisonguard.canaries import power_of
    from poisonguard.config import Config
    from poisonguard.core.screening import fit_detectors
    from poisonguard.detectors.stats import default_keys, states_by_class

    data = np.load(path)
    e, y, truth, target = data["embedding"], data["label"], data["truth"], int(data["target"])
    config = Config(seed=key[4])
    keys = default_keys(len(y), config.seed)
    with threadpool_limits(1):
        states = states_by_class(e, y, keys, config.max_fit_rows_per_class)
        flags = np.zeros(len(y), dtype=bool)
        for detector in fit_detectors(states, config).values():
            flags |= detector.flag(e, y, keys)
        share = truth.sum() / max(int((y == target).sum()), 1)
        config.canaries.sizes = [float(min(share, 0.5))]
        power = power_of(states, config, classes=[target])
    return {"key": list(key), "split": F.split_of(key[0], key[1]), "poison": int(truth.sum()),
            "real_recall": float(flags[truth].mean()), "canary_recall": float(power["recall"])}


def evaluate(jobs: int) -> list[dict]:
    work = _backdoor_cases("all")
    out = []
    with ProcessPoolExecutor(jobs) as pool:
        for k, row in enumerate(pool.map(one, *zip(*work)), 1):
            out.append(row)
            if k % 20 == 0 or k == len(work):
                print(f"[{k}/{len(work)}]", flush=True)
    return out


def _summary(rows: list[dict]) -> str:
    real, canary = np.array([r["real_recall"] for r in rows]), np.array([r["canary_recall"] for r in rows])
    agree = float(np.mean((real >= 0.5) == (canary >= 0.5)))
    corr = float(np.corrcoef(real, canary)[0, 1]) if real.std() and canary.std() else float("nan")
    mae = float(np.mean(np.abs(real - canary)))
    families: dict = {}
    for r in rows:
        families.setdefault(tuple(r["key"][:2]), []).append((r["real_recall"], r["canary_recall"]))
    means = np.array([np.mean(v, axis=0) for v in families.values()])
    family_corr = float(np.corrcoef(means[:, 0], means[:, 1])[0, 1]) if len(means) > 2 else float("nan")
    return (f"{len(rows)} cases: agreement on caught (recall >= 0.5) {agree:.0%}, Pearson {corr:.2f}, mean |difference| "
            f"{mae:.2f}; per family (mean over its backdoor cases, {len(means)} families) Pearson {family_corr:.2f}")


def markdown(rows: list[dict], dev_shape: dict) -> str:
    from poisonguard.config import CanaryConfig

    defaults = CanaryConfig()
    lines = [HEADER, "",
             "`python benchmarks/canaries.py eval`: on every backdoor case of the benchmark families, the default "
             "detectors' recall on the real attack beside the embedding-mode canary power analysis on the same "
             "embeddings (one planted group of the real attack's size in the target class). The canaries' shape is "
             f"the configured default: distance {defaults.distance} class SDs along its direction, spread "
             f"{defaults.spread}, the median of the real backdoors on the MLP and CNN development families. With the "
             "random-feature development families added the median is distance "
             f"{dev_shape['distance_quartiles'][1]} (quartiles {dev_shape['distance_quartiles'][0]}-"
             f"{dev_shape['distance_quartiles'][2]}), spread {dev_shape['spread_quartiles'][1]} (quartiles "
             f"{dev_shape['spread_quartiles'][0]}-{dev_shape['spread_quartiles'][2]}), over {dev_shape['cases']} cases; "
             "that shape predicted worse on the development families (agreement 56% against 58%, per-family Pearson "
             "0.48 against 0.60), so the default stays. Mean over seeds (one on shapes).", ""]
    for split, title in (("heldout", "Held-out families"), ("dev", "Development families")):
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        lines += [f"### {title}", "", _summary(part) + ".", "",
                  "| family | attack | rate | seeds | poisoned rows | real recall | canary recall |", "|---|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in part:
            groups.setdefault(tuple(r["key"][:4]), []).append(r)
        for (source, model, attack, rate), rs in sorted(groups.items()):
            lines.append(f"| {source}/{model} | {attack} | {rate:.0%} | {len(rs)} | {np.mean([r['poison'] for r in rs]):.0f} "
                         f"| {np.mean([r['real_recall'] for r in rs]):.3f} | {np.mean([r['canary_recall'] for r in rs]):.3f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("shape")
    sub.add_parser("report", help="rewrite the quality.md section from results/canaries.json")
    ev = sub.add_parser("eval")
    ev.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    if args.command == "shape":
        print(json.dumps({split: shape(split) for split in ("dev", "heldout")}, indent=1))
    else:
        if args.command == "report":
            rows = json.loads((RESULTS / "canaries.json").read_text())
        else:
            rows = evaluate(args.jobs)
            (RESULTS / "canaries.json").write_text(json.dumps(rows, indent=0))
        quality = RESULTS / "quality.md"
        text = quality.read_text() if quality.exists() else ""
        section = markdown(rows, shape("dev"))
        quality.write_text(text.split(HEADER)[0].rstrip() + "\n\n" + section)
        print(section)
