"""Does the canary self-test predict the real attack's recall?  On the benchmark families
(``benchmarks/families.py``: data source x embedding model x attack x rate x seed, each model trained
on the poisoned data), for every backdoor case (patch and blended triggers, 1-10% of the target class):

  - real: the share of the real poisoned rows the default detectors quarantine;
  - canary: the embedding-mode power analysis (``poisonguard.canaries.power_of``) on the same
    embeddings, planting one group of the real attack's size in the target class at each distance
    of the default grid (``canaries.distances``), read at the median distance and as a user reads
    the grid (at the largest grid distance at or below the real attack's own);
  - matched: the same canaries at the real attack's measured distance and spread (an oracle: how
    faithful a planted group is when its geometry is right).

The median distance (3.95 SDs) and ``canaries.spread`` are the median shape of the real backdoors on
the *development* families, printed by ``shape``; the held-out families report how well the
self-test then predicts recall on data it was not calibrated on.

    python benchmarks/canaries.py shape            # the development medians behind the defaults
    python benchmarks/canaries.py eval [--jobs 2] [--sources iris,wine]  # writes results/canaries.json and a section of quality.md
    python benchmarks/canaries.py report           # the section again, from results/canaries.json
    python benchmarks/canaries.py eval --leave-out-flagged   # results/canaries_left_out.{json,md}
    python benchmarks/canaries.py grid [--split dev]  # a finer grid of distances: results/canaries_grid.json

``--leave-out-flagged`` plants the groups among the rows the default detectors do not flag, as proxy
mode's canaries do (``held_back_rows``).  Measured, it predicted the real recall worse in embedding
space (results/canaries_left_out.md), so the self-test plants among every row of the class.
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
MEDIAN_DISTANCE = 3.95  # the development families' median backdoor distance, one of the default grid's
HEADER = "## Canary recall beside the real attack's"
BACKDOORS = ("patch", "blend")


def _backdoor_cases(split: str):
    return [(key, path) for key, path in F.cases(split, large_seeds=1) if key[2] in BACKDOORS]


def _radius_sq(z: np.ndarray) -> float:
    return float(((z - z.mean(axis=0)) ** 2).sum(axis=1).mean())


def real_shape(e: np.ndarray, y: np.ndarray, truth: np.ndarray, target: int) -> tuple[float, float] | None:
    """The real poison's centre distance from its target class's clean rows (in the class's standard
    deviations along the displacement) and its spread (tr cov(poison) / tr cov(class))."""
    e = e.astype(np.float64)
    clean, poison = e[(y == target) & ~truth], e[truth]
    if len(poison) < 3:
        return None
    delta = poison.mean(0) - clean.mean(0)
    u = delta / max(np.linalg.norm(delta), 1e-300)
    return (float(np.linalg.norm(delta) / np.sqrt(max(float(u @ np.cov(clean.T) @ u), 1e-24))),
            float(_radius_sq(poison) / max(_radius_sq(clean), 1e-300)))


def shape(split: str = "dev") -> dict:
    """Quartiles of the real backdoors' shape (``real_shape``) over a split's cases."""
    gaps, spreads = [], []
    for _, path in _backdoor_cases(split):
        data = np.load(path)
        measured = real_shape(data["embedding"], data["label"], data["truth"], int(data["target"]))
        if measured is None:
            continue
        gaps.append(measured[0])
        spreads.append(measured[1])
    q = lambda v: [round(float(x), 3) for x in np.percentile(v, [25, 50, 75])]
    return {"cases": len(gaps), "distance_quartiles": q(gaps), "spread_quartiles": q(spreads)}


def read_at(grid, distance: float) -> float:
    """The grid distance a user reads for an attack ``distance`` SDs out: the largest at or below it
    ("an attack at least this far out would have been caught"), the smallest where none is."""
    return max([d for d in grid if d <= distance], default=min(grid))


def _scanned(key, path) -> tuple:
    """A cached case as the default detectors see it: (embeddings, labels, truth, target class, the
    default config at the case's seed with canaries of the real attack's size, row keys, class states,
    the rows flagged)."""
    from poisonguard.config import Config
    from poisonguard.core.screening import fit_detectors
    from poisonguard.detectors.stats import default_keys, states_by_class

    data = np.load(path)
    e, y, truth, target = data["embedding"], data["label"], data["truth"], int(data["target"])
    config = Config(seed=key[4])
    config.canaries.sizes = [float(min(truth.sum() / max(int((y == target).sum()), 1), 0.5))]
    keys = default_keys(len(y), config.seed)
    states = states_by_class(e, y, keys, config.max_fit_rows_per_class)
    flags = np.zeros(len(y), dtype=bool)
    for detector in fit_detectors(states, config).values():
        flags |= detector.flag(e, y, keys)
    return e, y, truth, target, config, keys, states, flags


def one(key, path, leave_out: bool = False) -> dict:
    from threadpoolctl import threadpool_limits

    from poisonguard.canaries import power_of
    from poisonguard.detectors.stats import states_by_class

    with threadpool_limits(1):
        e, y, truth, target, config, keys, states, flags = _scanned(key, path)
        held = 0
        if leave_out:  # the families' classes fit in the sample: these are the exact states of the rows kept
            held = int(flags[y == target].sum())
            states = states_by_class(e[~flags], y[~flags], keys[~flags], config.max_fit_rows_per_class)
        power = power_of(states, config, classes=[target])
        trials = {t["distance_sd"]: t["caught"] / t["rows"] for t in power["per_class"][str(target)]["trials"]}
        measured = real_shape(e, y, truth, target)
        grid = None
        if measured is not None:  # the grid read as a user reads it: the nearest distance at or below the attack's
            grid = trials[read_at(trials, measured[0])]
            # the same canaries planted at the real poison's own shape: how faithful planted clusters are
            # when their geometry is right (an oracle: a user's self-test cannot know it)
            config.canaries.distances = [float(min(max(measured[0], 1e-3), 100.0))]
            config.canaries.spread = float(min(max(measured[1], 1e-3), 100.0))
            matched = float(power_of(states, config, classes=[target])["recall"])
    return {"key": list(key), "split": F.split_of(key[0], key[1]), "poison": int(truth.sum()),
            "real_recall": float(flags[truth].mean()), "held_back_rows": held,
            "canary_recall": float(trials[MEDIAN_DISTANCE]),
            "grid_recall": grid, "real_distance": None if measured is None else measured[0],
            "real_spread": None if measured is None else measured[1],
            "matched_recall": None if measured is None else matched}


def evaluate(jobs: int, leave_out: bool = False, sources=()) -> list[dict]:
    work = [(key, path) for key, path in _backdoor_cases("all") if not sources or key[0] in sources]
    out = []
    with ProcessPoolExecutor(jobs) as pool:
        for k, row in enumerate(pool.map(one, *zip(*work), [leave_out] * len(work)), 1):
            out.append(row)
            if k % 20 == 0 or k == len(work):
                print(f"[{k}/{len(work)}]", flush=True)
    return out


FINE_GRID = (2.0, 2.8, 3.95, 5.6, 8.0, 11.3)  # the default grid and the distances halfway (geometrically) between


def one_grid(key, path, distances=FINE_GRID) -> dict:
    """The real recall beside every distance of a finer grid's canaries (``grid``)."""
    from threadpoolctl import threadpool_limits

    from poisonguard.canaries import power_of

    with threadpool_limits(1):
        e, y, truth, target, config, _, states, flags = _scanned(key, path)
        config.canaries.distances = list(distances)
        power = power_of(states, config, classes=[target])
    measured = real_shape(e, y, truth, target)
    return {"key": list(key), "split": F.split_of(key[0], key[1]), "real_recall": float(flags[truth].mean()),
            "trials": {str(t["distance_sd"]): t["caught"] / t["rows"] for t in power["per_class"][str(target)]["trials"]},
            "real_distance": None if measured is None else measured[0]}


def grid_readings(rows: list[dict], grid) -> str:
    """The grid read as a user reads it (``one``), on a finer run's trials restricted to ``grid``."""
    rows = [r for r in rows if r["real_distance"] is not None]
    real = np.array([r["real_recall"] >= 0.5 for r in rows])
    said = np.array([r["trials"][str(read_at(grid, r["real_distance"]))] >= 0.5 for r in rows])
    return (f"{len(grid)} distances ({', '.join(str(d) for d in grid)}): agreement {np.mean(real == said):.1%}; "
            f"{_readings(real, said)}")


def _summary(rows: list[dict], column: str = "canary_recall") -> str:
    rows = [r for r in rows if r.get(column) is not None]
    real, canary = np.array([r["real_recall"] for r in rows]), np.array([r[column] for r in rows])
    agree = float(np.mean((real >= 0.5) == (canary >= 0.5)))
    corr = float(np.corrcoef(real, canary)[0, 1]) if real.std() and canary.std() else float("nan")
    mae = float(np.mean(np.abs(real - canary)))
    families: dict = {}
    for r in rows:
        families.setdefault(tuple(r["key"][:2]), []).append((r["real_recall"], r[column]))
    means = np.array([np.mean(v, axis=0) for v in families.values()])
    family_corr = float(np.corrcoef(means[:, 0], means[:, 1])[0, 1]) if len(means) > 2 else float("nan")
    return (f"{len(rows)} cases: agreement on caught (recall >= 0.5) {agree:.0%}, Pearson {corr:.2f}, mean |difference| "
            f"{mae:.2f}; per family (mean over its backdoor cases, {len(means)} families) Pearson {family_corr:.2f}; "
            f"{_readings(real >= 0.5, canary >= 0.5)}")


def _readings(real: np.ndarray, said: np.ndarray) -> str:
    """How far each reading of the self-test can be trusted: the share of "caught" readings whose real
    attack was caught (a wrong one is false assurance), of "missed" readings whose real attack was
    missed, the agreement a reading that always says the commoner outcome would reach, and Cohen's
    kappa (agreement beyond what the two rates give by chance)."""
    base = max(real.mean(), 1 - real.mean())
    chance = real.mean() * said.mean() + (1 - real.mean()) * (1 - said.mean())
    kappa = (np.mean(real == said) - chance) / (1 - chance) if chance < 1 else float("nan")
    return (f"a \"caught\" reading was right in {int((real & said).sum())} of {int(said.sum())}, a \"missed\" reading "
            f"in {int((~real & ~said).sum())} of {int((~said).sum())}; always saying "
            f"\"{'caught' if real.mean() >= 0.5 else 'missed'}\" would agree {base:.0%}; Cohen's kappa {kappa:.2f}")


def _mean(rows: list[dict], column: str, fmt: str) -> str:
    values = [r[column] for r in rows if r.get(column) is not None]
    return format(float(np.mean(values)), fmt) if values else "-"


def markdown(rows: list[dict], dev_shape: dict) -> str:
    from poisonguard.config import CanaryConfig

    defaults = CanaryConfig()
    lines = [HEADER, "",
             "`python benchmarks/canaries.py eval`: on every backdoor case of the benchmark families, the default "
             "detectors' recall on the real attack beside the embedding-mode canary power analysis on the same "
             "embeddings (one planted group of the real attack's size in the target class, at each distance of the "
             f"default grid, {', '.join(str(d) for d in defaults.distances)} class SDs along its direction, spread "
             f"{defaults.spread}). {MEDIAN_DISTANCE} SDs and spread {defaults.spread} are the median shape of the real "
             "backdoors on the MLP and CNN development families. With the "
             "random-feature development families added the median is distance "
             f"{dev_shape['distance_quartiles'][1]} (quartiles {dev_shape['distance_quartiles'][0]}-"
             f"{dev_shape['distance_quartiles'][2]}), spread {dev_shape['spread_quartiles'][1]} (quartiles "
             f"{dev_shape['spread_quartiles'][0]}-{dev_shape['spread_quartiles'][2]}), over {dev_shape['cases']} cases; "
             "that shape predicted worse on the development families (agreement 56% against 58%, per-family Pearson "
             "0.48 against 0.60), so the default stays. Three readings of the self-test beside the real recall: "
             f"the canaries at the median distance ({MEDIAN_DISTANCE} SDs) alone; the grid read as a user reads it "
             "(the canaries at the largest grid distance at or below the real attack's own distance: \"an attack at "
             "least this far out would have been caught\"); and, as an oracle no self-test has, canaries planted at "
             "each real attack's measured distance and spread, which says how faithful a planted cluster is when its "
             "geometry is right. Mean over seeds (one on shapes).", ""]
    for split, title in (("heldout", "Held-out families"), ("dev", "Development families")):
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        lines += [f"### {title}", "", f"- Canaries at the median distance: {_summary(part)}.",
                  f"- The grid, at the largest distance at or below the attack's: {_summary(part, 'grid_recall')}.",
                  f"- Oracle, canaries at each attack's own shape: {_summary(part, 'matched_recall')}.", "",
                  "| family | attack | rate | seeds | poisoned rows | real distance (SDs) | real spread | real recall "
                  "| canaries at 3.95 SDs | grid reading | canaries at the real shape |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        groups: dict = {}
        for r in part:
            groups.setdefault(tuple(r["key"][:4]), []).append(r)
        for (source, model, attack, rate), rs in sorted(groups.items()):
            lines.append(f"| {source}/{model} | {attack} | {rate:.0%} | {len(rs)} | {np.mean([r['poison'] for r in rs]):.0f} "
                         f"| {_mean(rs, 'real_distance', '.1f')} | {_mean(rs, 'real_spread', '.2f')} "
                         f"| {np.mean([r['real_recall'] for r in rs]):.3f} | {np.mean([r['canary_recall'] for r in rs]):.3f} "
                         f"| {_mean(rs, 'grid_recall', '.3f')} | {_mean(rs, 'matched_recall', '.3f')} |")
        lines.append("")
    return "\n".join(lines + _grid_lines() + _proxy_lines())


def _grid_lines() -> list[str]:
    """The default grid beside finer ones, from ``grid``'s run (results/canaries_grid.json)."""
    path = RESULTS / "canaries_grid.json"
    if not path.exists():
        return []
    from poisonguard.config import CanaryConfig

    rows = json.loads(path.read_text())
    default = tuple(CanaryConfig().distances)
    grids = [default, tuple(sorted(set(default) | {11.3})), tuple(d for d in FINE_GRID if d != 11.3), FINE_GRID]
    split = {r["split"] for r in rows}
    return ["### A finer grid", "",
            f"`python benchmarks/canaries.py grid`: the {'/'.join(sorted(split))} families' backdoor cases with canaries "
            f"at {', '.join(str(d) for d in FINE_GRID)} class SDs in one run, each grid read from its own distances "
            "(the user's reading above). Each distance is one more planted group, and every group refits every "
            "detector: the self-test's cost grows with the grid.", ""] + \
        [f"- {grid_readings(rows, g)}" for g in grids] + [""]


ALONE = "a proxy per target class (the attack's target class alone)"
PROXY_VARIANTS = (("proxy_canaries.md", "patch canaries, one proxy for every target class (the default)"),
                  ("proxy_canaries_per_target.md", f"patch canaries, {ALONE}"),
                  ("proxy_canaries_per_target_blend.md", f"blended canaries, {ALONE}"),
                  ("proxy_canaries_blend.md", "blended canaries, one proxy for every target class"))


def _proxy_lines() -> list[str]:
    """Proxy mode's canaries against the real attack (``benchmarks/proxy_canaries.py``), one line a
    variant, from the tables it wrote."""
    found = [(name, what, (RESULTS / name).read_text().strip().splitlines()[-1]) for name, what in PROXY_VARIANTS
             if (RESULTS / name).exists()]
    if not found:
        return []
    lines = ["### Proxy mode", "",
             "`python benchmarks/proxy_canaries.py`: proxy mode scans (the CNN proxy) of the families' images and "
             "sequences (patches of 5% and 10% and the 10% blend on digits, the signals and the glyphs, 21 cases) "
             "with canaries on: the real attack's recall beside its target class's canaries caught, per case in each "
             "file.", ""] + [f"- {what} (`results/{name}`): {last}" for name, what, last in found]
    patch, blend = (_proxy_table(RESULTS / name) for name in ("proxy_canaries_per_target.json",
                                                               "proxy_canaries_per_target_blend.json"))
    if patch and blend:  # each attack beside the canaries of its own kind: a user's choice of trigger, not a rule
        pairs = np.array([(blend if case[1] == "blend" else patch)[case] for case in patch if case in blend])
        real, canary = pairs[:, 0], pairs[:, 1]
        lines.append(f"- each attack beside canaries of its own kind ({ALONE}; patch canaries for the patches, "
                     f"blended for the blends): caught / missed agree on {int(((real >= 0.5) == (canary >= 0.5)).sum())} "
                     f"of {len(pairs)} cases; Pearson correlation {np.corrcoef(real, canary)[0, 1]:.2f}.")
    return lines + [""]


def _proxy_table(path: Path) -> dict:
    """(source, attack, rate, seed) -> (real recall, target-class canary recall) from the rows a
    ``proxy_canaries.py`` run wrote (results/NAME.json)."""
    if not path.exists():
        return {}
    return {tuple(r["case"]): (r["real_recall"], r["target_caught"] / max(r["target_canaries"] or 0, 1))
            for r in json.loads(path.read_text())}


def left_out_markdown(rows: list[dict], baseline: list[dict]) -> str:
    """The left-out run beside the default's (results/canaries.json), split by whether the real attack
    was caught: where it was not, nothing of it is left out and the two should agree."""
    base = {tuple(r["key"]): r for r in baseline}
    lines = ["# Canaries planted among the rows the scan keeps (embedding mode)", "",
             "`python benchmarks/canaries.py eval --leave-out-flagged`: the embedding-mode power analysis of "
             "`results/quality.md` (\"Canary recall beside the real attack's\"), with the rows the default detectors "
             "flag left out of their classes before any group is planted, as proxy mode's canaries leave them out of "
             "their trials. Beside each line, the default (every row of the class kept) from `results/canaries.json`.", ""]
    for split, title in (("heldout", "Held-out families"), ("dev", "Development families")):
        part = [r for r in rows if r["split"] == split and tuple(r["key"]) in base]
        if not part:
            continue
        before = [base[tuple(r["key"])] for r in part]
        lines += [f"## {title}", ""]
        for label, column in (("median distance", "canary_recall"), ("grid reading", "grid_recall"),
                              ("oracle shape", "matched_recall")):
            lines += [f"- {label}, left out: {_summary(part, column)}",
                      f"- {label}, default: {_summary(before, column)}"]
        for caught in (True, False):
            mine = [(r, b) for r, b in zip(part, before) if (r["real_recall"] >= 0.5) == caught]
            if mine:
                share = [float(np.mean([x["canary_recall"] >= 0.5 for x in side])) for side in zip(*mine)]
                held = np.median([r["held_back_rows"] / max(r["poison"], 1) for r, _ in mine])
                lines.append(f"- real attack {'caught' if caught else 'missed'} ({len(mine)} cases; median rows left "
                             f"out {held:.2f} times the poisoned rows): canaries at 3.95 SDs caught in {share[0]:.0%} "
                             f"left out, {share[1]:.0%} by default")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("shape")
    sub.add_parser("report", help="rewrite the quality.md section from results/canaries.json")
    gr = sub.add_parser("grid", help="a finer grid of distances on one split: writes results/canaries_grid.json")
    gr.add_argument("--split", default="dev")
    gr.add_argument("--jobs", type=int, default=2)
    ev = sub.add_parser("eval")
    ev.add_argument("--jobs", type=int, default=2)
    ev.add_argument("--leave-out-flagged", action="store_true",
                    help="plant among the rows the detectors do not flag; writes results/canaries_left_out.*")
    ev.add_argument("--sources", type=F.source_list, default=[],
                    help="comma-separated: only these sources' cases, merged by key into the committed JSON")
    args = parser.parse_args()
    sources = getattr(args, "sources", [])  # eval's only
    if args.command == "shape":
        print(json.dumps({split: shape(split) for split in ("dev", "heldout")}, indent=1))
    elif args.command == "grid":
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(one_grid, *zip(*_backdoor_cases(args.split))))
        (RESULTS / "canaries_grid.json").write_text(json.dumps(rows, indent=0))
        print("\n".join(_grid_lines()))
    elif args.command == "eval" and args.leave_out_flagged:
        rows = evaluate(args.jobs, leave_out=True, sources=sources)
        rows = F.with_committed(RESULTS / "canaries_left_out.json", rows, sources)
        (RESULTS / "canaries_left_out.json").write_text(json.dumps(rows, indent=0))
        text = left_out_markdown(rows, json.loads((RESULTS / "canaries.json").read_text()))
        (RESULTS / "canaries_left_out.md").write_text(text)
        print(text)
    else:
        if args.command == "report":
            rows = json.loads((RESULTS / "canaries.json").read_text())
        else:
            rows = F.with_committed(RESULTS / "canaries.json", evaluate(args.jobs, sources=sources), sources)
            (RESULTS / "canaries.json").write_text(json.dumps(rows, indent=0))
        quality = RESULTS / "quality.md"
        text = quality.read_text() if quality.exists() else ""
        section = markdown(rows, shape("dev"))
        quality.write_text(text.split(HEADER)[0].rstrip() + "\n\n" + section)
        print(section)
