"""Exclusionary reclassification in proxy mode (Chen et al. 2018), measured before it is built
(results/exclusion.md).

Proxy mode can retrain its model, so it could ask issue 11's exclusionary question for real: a
group of rows that a detector splits off but does not flag (its best split short of the decision
bar), left out of the proxy's training; does a proxy that never saw them assign them to their
label, or to another class?  Dirty-label poison should go back to its source classes; a class's own
rows should keep their label.  Every case of the proxy backdoor benchmark on the families' images
and sequences (patches of 5%, the 10% blend, and the clean controls) is run as proxy mode runs it:

1. the default proxy trained on every row (the families are under ``proxy_max_rows``), its embedding
   screened with the default detectors;
2. candidate groups: each sub-population detector's best split per class with Ashman's D >= 3
   (flagged or not), holding at most 15% of its class and at least 5 rows, taken as that class's
   highest-scoring rows in the split's share;
3. a second proxy, same seed and config, trained without the union of the candidate groups; each
   group's *reclassified share* is the share of its rows that this proxy assigns to another class.

The question is whether a share separates groups that are mostly poison from groups of clean rows.

    python benchmarks/exclusion.py [--jobs 2] [--sources digits,signals] [--seeds 0,1,2] [--append]
    python benchmarks/exclusion.py --report   # exclusion.md from exclusion.json and exclusion_proxy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as F  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SUBPOPULATION = ("spectral", "activation_clustering", "spectre", "knn_distance")
MIN_D, MAX_SHARE, MIN_ROWS = 3.0, 0.15, 5
ATTACKS = (("clean", 0.0), ("patch", 0.05), ("blend", 0.10), ("flip_targeted", 0.20))


def _proxy(x, y, seed):
    from poisonguard.config import validated
    from poisonguard.proxy import fit_proxy

    config = validated({"seed": seed, "embedding": {"source": "proxy", "features": "features", "device": "cpu"}},
                       "benchmarks/exclusion.py")
    plan = types.SimpleNamespace(n_features=x.shape[1], total_rows=len(x), files=[])
    return fit_proxy(x, y, plan, config)


def run(case) -> dict:
    import poisonguard
    import torch
    from poisonguard.core.exclusion import one_destination_share
    from threadpoolctl import threadpool_limits

    source, attack, rate, seed = case
    t0 = time.perf_counter()
    x0, y0, target = F.load(source)
    x, y, truth = F.poison(x0, y0, source, target, attack, rate, seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    xt = torch.from_numpy(x)
    model, _ = _proxy(x, y, seed)
    with torch.no_grad():
        emb = model.embed(xt).numpy()
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        found = poisonguard.screen(emb, y, F.score_every_row(None))
    flags = found.rows["quarantined"].to_numpy()
    groups, union = [], np.zeros(len(y), bool)
    for det in SUBPOPULATION:
        scores = np.nan_to_num(found.rows[f"score_{det}"].to_numpy(float), nan=-np.inf)
        for label, decision in found.summary["detectors"][det]["classes"].items():
            d, share = decision.get("separation"), decision.get("minority_share") or 0.0
            members = np.flatnonzero(y == int(label))
            k = int(round(share * len(members)))
            if d is None or d < MIN_D or not 0 < share <= MAX_SHARE or k < MIN_ROWS:
                continue
            rows = members[np.argsort(-scores[members], kind="stable")[:k]]
            union[rows] = True
            groups.append({"detector": det, "class": int(label), "separation": round(float(d), 2),
                           "flagged": bool(decision.get("suspicious")), "rows": rows})
    out = {"key": [source, attack, rate, seed], "rows": len(y), "poison": int(truth.sum()),
           **F._metrics(flags, truth), "groups": []}
    if groups:
        excluded, _ = _proxy(x[~union], y[~union], seed)
        classes = np.unique(y[~union])
        with torch.no_grad():
            predicted = classes[excluded(xt[union]).argmax(1).numpy()]
        moved = np.zeros(len(y), bool)
        moved[np.flatnonzero(union)] = predicted != y[union]
        for g in groups:
            rows = g.pop("rows")
            went = predicted[np.searchsorted(np.flatnonzero(union), rows)][moved[rows]]
            g.update(size=len(rows), poison_share=round(float(truth[rows].mean()), 3),
                     reclassified=round(float(moved[rows].mean()), 3),
                     one_destination=None if not len(went) else round(one_destination_share(went), 3),
                     reclassified_poison=round(float(moved[rows][truth[rows]].mean()), 3) if truth[rows].any() else None,
                     reclassified_clean=round(float(moved[rows][~truth[rows]].mean()), 3) if (~truth[rows]).any() else None)
            out["groups"].append(g)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def report(rows: list[dict]) -> str:
    poisoned = [g["reclassified"] for r in rows for g in r["groups"] if g["poison_share"] >= 0.5]
    clean = [g["reclassified"] for r in rows for g in r["groups"] if g["poison_share"] <= 0.1]
    lines = ["# Exclusionary reclassification in proxy mode (`benchmarks/exclusion.py`)", "",
             "Proxy mode can retrain its model: a group that a detector splits off is left out of a second proxy's "
             "training (same seed and config), and the group's reclassified share is the share of its rows that "
             "proxy assigns to another class than their label. Dirty-label poison should go back to its source "
             "classes; a class's own rows should keep their label. Cases: the proxy benchmark's images and "
             "sequences, clean controls, 5% patches, 10% blends and 20% targeted flips, the default proxy and "
             "detectors.", "",
             f"Candidate groups: Ashman's D >= {MIN_D}, at most {MAX_SHARE:.0%} of the class, at least {MIN_ROWS} rows. "
             f"{len(poisoned)} groups are mostly poison (>= 50% of their rows), {len(clean)} are clean (<= 10%).", ""]
    if poisoned and clean:
        lines.append(f"- mostly-poison groups' reclassified share: min {min(poisoned):.2f}, median {np.median(poisoned):.2f}, max {max(poisoned):.2f}")
        lines.append(f"- clean groups' reclassified share: min {min(clean):.2f}, median {np.median(clean):.2f}, max {max(clean):.2f}")
        for t in (0.5, 0.6, 0.7, 0.8, 0.9):
            lines.append(f"- a group confirmed at a reclassified share >= {t}: {sum(p >= t for p in poisoned)} of "
                         f"{len(poisoned)} poison groups, {sum(c >= t for c in clean)} of {len(clean)} clean groups")
    moved = [(g["poison_share"] >= 0.5, g["one_destination"], r["key"]) for r in rows for g in r["groups"]
             if not g["flagged"] and g["reclassified"] >= 0.6 and g.get("one_destination") is not None
             and (g["poison_share"] >= 0.5 or g["poison_share"] <= 0.1)]
    if any(p for p, *_ in moved) and any(not p for p, *_ in moved):
        poison_to = ", ".join(f"{k[0]} {k[1]} {k[2]:.0%} seed {k[3]} {o:.2f}" for p, o, k in sorted(moved, key=lambda m: m[2]) if p)
        clean_to = [o for p, o, _ in moved if not p]
        lines += ["", "Where the moved rows went (`one class`: the share of a group's reclassified rows that went to the "
                  "class most of them went to), for the groups their detector did not flag that moved at 0.6 or more: "
                  f"mostly-poison groups {poison_to}; {len(clean_to)} clean groups {min(clean_to):.2f}-"
                  f"{max(clean_to):.2f}. Dirty-label poison goes back to the several classes it was taken from; a clean "
                  "group that moves goes to the one class that looks like it (the class a targeted flip filled with "
                  "its style, a look-alike). A patch can send its rows to one class (the signals' spike, read as one "
                  "class by a proxy that never learnt it), where other detectors flag them."]
    lines += ["", "| source | attack | rate | seed | scan F1 | detector | class | D | flagged | rows | poison share "
              "| reclassified | of poison | of clean | one class |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    for r in rows:
        source, attack, rate, seed = r["key"]
        head = f"| {source} | {attack} | {rate:.0%} | {seed} | {fmt(r['f1'])} "
        if not r["groups"]:
            lines.append(head + "| (no candidate group) | | | | | | | | | |")
        for g in r["groups"]:
            lines.append(head + f"| {g['detector']} | {g['class']} | {g['separation']:.2f} | {'yes' if g['flagged'] else 'no'} "
                         f"| {g['size']} | {g['poison_share']:.2f} | {g['reclassified']:.2f} | {fmt(g['reclassified_poison'])} "
                         f"| {fmt(g['reclassified_clean'])} | {fmt(g.get('one_destination'))} |")
    return "\n".join(lines) + "\n"


def proxy_section(rows: list[dict]) -> str:
    """The check (``embedding.proxy_exclusion``, the default since round 23) on the proxy benchmark's
    images and sequences, beside the same cases without it (``results/exclusion_proxy.json``:
    ``families.py proxy`` rows, ``proxy_exclusion`` true or false)."""
    pairs: dict = {}
    for r in rows:
        pairs.setdefault(tuple(r["key"]), {})[r["proxy_exclusion"]] = r
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    changed = [k for k, p in pairs.items() if any(g["confirmed"] for g in p[True]["exclusion"])]
    asked = sum(bool(p[True]["exclusion"]) for p in pairs.values())
    moved_to_one = [(k, g) for k, p in pairs.items() for g in p[True]["exclusion"]
                    if not g["confirmed"] and g.get("one_destination") is not None and g["moved"] >= 0.6]
    lines = ["## The check in a scan (`embedding.proxy_exclusion`)", "",
             f"`families.py proxy` on the images and sequences ({len(pairs)} cases), with the check (round 23's "
             "default) and without it (round 22's default), on one machine; decisions are the same scan where no "
             "group was confirmed, and the seconds are the two runs' (on different days, not a paired timing). "
             f"{asked} cases had a candidate group (a second proxy trained); "
             f"{len(changed)} had a confirmed group:", "",
             "| source | attack | rate | seed | F1 without | F1 with | recall without | recall with "
             "| clean flagged without | with | seconds without | with | confirmed (detector, class, rows, moved share) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(changed):
        a, b = pairs[k][False], pairs[k][True]
        groups = ", ".join(f"{g['detector']} {g['class']} {g['rows']} {g['moved']:.2f}" for g in b["exclusion"] if g["confirmed"])
        lines.append(f"| {k[0]} | {k[2]} | {k[3]:.0%} | {k[4]} | {fmt(a['f1'])} | {fmt(b['f1'])} | {fmt(a['recall'])} "
                     f"| {fmt(b['recall'])} | {a['clean_flagged']:.2%} | {b['clean_flagged']:.2%} | {a['seconds']:.0f} "
                     f"| {b['seconds']:.0f} | {groups} |")
    clean = [k for k in pairs if k[2] == "clean"]
    lines += ["", f"Clean controls: {sum(not any(g['confirmed'] for g in pairs[k][True]['exclusion']) for k in clean)} "
              f"of {len(clean)} with no confirmed group."]
    if moved_to_one:
        lines += ["", "Groups that moved at 0.6 or more and were not confirmed, most of their moved rows going to one "
                  "class: " + "; ".join(f"{k[0]} {k[2]} {k[3]:.0%} seed {k[4]}, {g['detector']} class {g['class']} "
                                        f"({g['rows']} rows): moved {g['moved']:.2f}, {g['one_destination']:.2f} to one class"
                                        for k, g in sorted(moved_to_one)) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--sources", default="digits,signals")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--attacks", default=",".join(a for a, _ in ATTACKS), help="comma-separated, of " +
                        ", ".join(a for a, _ in ATTACKS))
    parser.add_argument("--append", action="store_true", help="keep the committed rows of other cases")
    parser.add_argument("--report", action="store_true", help="rewrite exclusion.md from the committed JSON files")
    args = parser.parse_args()
    if args.report:
        write_report(json.loads((RESULTS / "exclusion.json").read_text()))
        return
    cases = [(s, a, r, seed) for s in args.sources.split(",") for a, r in ATTACKS if a in args.attacks.split(",")
             for seed in map(int, args.seeds.split(","))]
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for k, row in enumerate(pool.map(run, cases), 1):
            rows.append(row)
            print(f"[{k}/{len(cases)}] {row['key']} f1 {row['f1']} groups {len(row['groups'])} {row['seconds']} s", flush=True)
    if args.append and (RESULTS / "exclusion.json").exists():
        done = {tuple(r["key"]) for r in rows}
        rows = [r for r in json.loads((RESULTS / "exclusion.json").read_text()) if tuple(r["key"]) not in done] + rows
    (RESULTS / "exclusion.json").write_text(json.dumps(rows, indent=1))
    write_report(rows)
    print(report(rows).split("\n\n")[2])


def write_report(rows: list[dict]) -> None:
    """results/exclusion.md: the study, and the check in a scan where its rows were measured."""
    proxy = RESULTS / "exclusion_proxy.json"
    text = report(rows) + ("\n" + proxy_section(json.loads(proxy.read_text())) if proxy.exists() else "")
    (RESULTS / "exclusion.md").write_text(text)


if __name__ == "__main__":
    main()
