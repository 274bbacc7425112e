"""Backdoors larger than the benchmark families' (which plant 1-10% of the target class): what the
default decisions do at 15% and 25%, on the development families.

A group of 15% or more of its class, no wider than twice the rest, is taken for a natural sub-mode
(``detectors.base.natural_submode``), and one past 35% is pinned at the share limit, so large
backdoors are mostly left to those rules; this measures how much.  The same sources, models and
attacks as ``benchmarks/families.py`` (each model trained on the poisoned data), the default config,
no oracle rate.  Writes ``results/large_attacks.md``.

A narrower sub-mode rule buys little here and costs the families: at a spread bound of 1.5 (instead
of 2) 30 of the 80 cases were found (28 now) and digits/CNN's 10% targeted flip fell from F1 0.99 to
0.59 (a clean sub-mode 1.5-2 times as spread as its class flagged beside it); at 1.2, 32 of 80, and
three development families lost F1 to clean sub-modes (1.4-1.7% of their clean rows flagged).
A 12-15% group is a sub-mode only at 0.7-1.3 times its class's spread, in a class of 150 sample rows
or more: without those two bounds that tier took collapsed 15% backdoors (spread 0.52) and iris's
small classes for sub-modes, 38 of 96 found against 42; with them 51 of 96, as without the tier.

    python benchmarks/large_attacks.py [--jobs 2] [--seeds 2]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as F  # noqa: E402

RATES = (0.15, 0.25)  # of the target class before relabelling: 13% and 20% of it after
ATTACKS = ("patch", "blend")
OUT = F.RESULTS / "large_attacks.md"


def dev_families() -> list[tuple[str, str]]:
    return [(s, m) for s, m in F.families() if F.split_of(s, m) == "dev"]


def case(args) -> dict:
    source, model, attack, rate, seed = args
    import poisonguard
    from threadpoolctl import threadpool_limits

    x0, y0, target = F.load(source)
    x, y, truth = F.poison(x0, y0, source, target, attack, rate, seed)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        e, _ = F.embed(x, y, source, model, seed)
        found = poisonguard.screen(e, y, {"seed": seed})
    flags = found.rows["quarantined"].to_numpy()
    in_target, rest = y == target, (y == target) & ~truth
    spread = float(e[truth].var(axis=0).sum() / max(e[rest].var(axis=0).sum(), 1e-300))
    return {"key": [source, model, attack, rate, seed], "share": float(truth.sum() / in_target.sum()),
            "spread": spread, **F._metrics(flags, truth)}


def markdown(rows: list[dict]) -> str:
    lines = ["# Backdoors past the benchmark's rates (`python benchmarks/large_attacks.py`)", "",
             "Development families, default config. 'share' is the poison's share of its target class after "
             "relabelling; 'spread' is tr(cov) of the poisoned rows over that of the class's clean rows (a "
             "group of >= 15% of its class no wider than 2 times the rest is judged a natural sub-mode). "
             "One row per seed.", "",
             "| source | model | attack | rate | seed | share | spread | recall | clean flagged | F1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        source, model, attack, rate, seed = r["key"]
        lines.append(f"| {source} | {model} | {attack} | {rate:.0%} | {seed} | {r['share']:.2f} | {r['spread']:.2f} | "
                     f"{r['recall']:.3f} | {100 * r['clean_flagged']:.2f}% | {r['f1']:.3f} |")
    found = [r for r in rows if r["recall"] >= 0.5]
    lines += ["", f"Found (recall >= 0.5): {len(found)} of {len(rows)} cases; "
              + ", ".join(f"at {rate:.0%}: {sum(r['key'][3] == rate for r in found)} of "
                          f"{sum(r['key'][3] == rate for r in rows)}" for rate in RATES) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    work = [(s, m, a, r, seed) for s, m in dev_families() for a in ATTACKS for r in RATES
            for seed in F.SEEDS[:args.seeds]]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(case, work))
    text = markdown(rows)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
