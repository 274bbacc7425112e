"""Proxy mode's canaries against the real attack, on the families' images and sequences
(results/proxy_canaries.md).

Each poisoned case (patches of 5% and 10%, the 10% blend) is scanned in proxy mode with
``canaries.enabled``: the scan's real recall beside the canaries' recall in the attack's target
class (the canaries stamped there, relabelled to it, caught or not) and over every class.

    python benchmarks/proxy_canaries.py [--jobs 2] [--triggers-per-proxy 1 --max-classes 1] [--trigger blend]

``--triggers-per-proxy 1`` trains a proxy per target class (``canaries.triggers_per_proxy``) and
writes results/proxy_canaries_per_target.md; with ``--max-classes 1`` only the attack's target
class (the largest, with the poisoned rows relabelled into it) is tested, a tenth of the trainings.
``--trigger blend`` stamps blended canaries (``canaries.trigger``) and adds ``_blend`` to the file name.
Each run writes its rows as JSON beside the table (``results/NAME.json``), which ``canaries.py report``
reads for quality.md's canary section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as F  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [(source, attack, rate, seed) for source, seeds in (("digits", (0, 1, 2)), ("signals", (0, 1, 2)), ("shapes", (0,)))
         for attack, rate in (("patch", 0.05), ("patch", 0.1), ("blend", 0.1)) for seed in seeds]


def run(case, triggers_per_proxy: int | None = None, max_classes: int = 20, trigger: str = "patch") -> dict:
    import poisonguard
    import pyarrow.parquet as pq
    from threadpoolctl import threadpool_limits

    source, attack, rate, seed = case
    x0, y0, target = F.load(source)
    x, y, truth = F.poison(x0, y0, source, target, attack, rate, seed)
    table = F.feature_table(x, y)
    config = {"seed": seed, "embedding": {"source": "proxy", "features": "features", "device": "cpu"},
              "canaries": {"enabled": True, "triggers_per_proxy": triggers_per_proxy, "max_classes": max_classes,
                           "trigger": trigger},
              "fail_on": 1.0}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        pq.write_table(table, Path(tmp) / "data.parquet")
        poisonguard.scan(str(Path(tmp) / "data.parquet"), out=str(Path(tmp) / "run"), config=config)
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        held = set(pq.read_table(Path(tmp) / "run" / "quarantine").column("id").to_pylist())
    canaries = summary["canaries"]
    in_target = canaries["per_class"].get(str(target), {})
    return {"case": [source, attack, rate, seed], "real_recall": float(np.isin(np.flatnonzero(truth), list(held)).mean()),
            "target_canaries": in_target.get("canaries"), "target_caught": in_target.get("caught"),
            "target_held_back": in_target.get("held_back_rows"), "proxies": canaries.get("proxies"),
            "canary_recall": canaries["recall"], "seconds": round(time.perf_counter() - start, 1)}


def markdown(rows: list[dict], triggers_per_proxy: int | None = None, max_classes: int = 20,
             trigger: str = "patch") -> str:
    how = ("`--triggers-per-proxy 1`: a proxy per target class (`canaries.triggers_per_proxy: 1`)" if triggers_per_proxy
           else "one proxy learns every target class's canaries, each its own trigger (the default)")
    if max_classes == 1:
        how += "; `--max-classes 1`: the attack's target class alone, so 'all canaries' is that class's"
    if trigger == "blend":
        how += ("; `--trigger blend`: blended canaries (`canaries.trigger: blend`, each target class's own random "
                "pattern at weight 0.2)")
    lines = ["# Proxy canaries against the real attack", "",
             f"`python benchmarks/proxy_canaries.py`: proxy mode (default config, the CNN proxy) with "
             f"`canaries.enabled` on the families' images and sequences; the real attack's recall beside the "
             f"canaries caught in its target class and over every class; {how}. 'Left out': the rows the "
             f"detectors flag on the target class's canary proxy before any canary is added, which its trials "
             f"leave out.", "",
             "| source | attack | rate | seed | real recall | target-class canaries caught | left out | all canaries | "
             "proxies | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    agree = 0
    for r in rows:
        source, attack, rate, seed = r["case"]
        share = r["target_caught"] / r["target_canaries"] if r["target_canaries"] else float("nan")
        agree += (r["real_recall"] >= 0.5) == (share >= 0.5)
        lines.append(f"| {source} | {attack} | {rate:.0%} | {seed} | {r['real_recall']:.2f} | "
                     f"{r['target_caught']} of {r['target_canaries']} | {r['target_held_back']} | "
                     f"{r['canary_recall']:.2f} | {r['proxies']} | {r['seconds']:.0f} |")
    real = np.array([r["real_recall"] for r in rows])
    target = np.array([r["target_caught"] / r["target_canaries"] for r in rows])
    correlation = (f"Pearson correlation of the real recall with the target class's canary recall "
                   f"{np.corrcoef(real, target)[0, 1]:.2f}" if np.ptp(real) and np.ptp(target) else
                   f"no correlation: the target class's canary recall is {target[0]:.2f} in every case")
    lines += ["", f"Caught / missed (recall >= 0.5) agree on {agree} of {len(rows)} cases; {correlation}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--triggers-per-proxy", type=int, default=None)
    parser.add_argument("--max-classes", type=int, default=20)
    parser.add_argument("--trigger", choices=["patch", "blend"], default="patch")
    args = parser.parse_args()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = []
        work = partial(run, triggers_per_proxy=args.triggers_per_proxy, max_classes=args.max_classes,
                       trigger=args.trigger)
        for k, row in enumerate(pool.map(work, CASES), 1):
            print(f"[{k}/{len(CASES)}] {json.dumps(row)}", flush=True)
            rows.append(row)
    text = markdown(rows, args.triggers_per_proxy, args.max_classes, args.trigger)
    name = "proxy_canaries" + ("_per_target" if args.triggers_per_proxy == 1 else "") + \
        ("_blend" if args.trigger == "blend" else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
