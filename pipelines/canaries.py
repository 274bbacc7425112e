"""Canary self-test: would this scan have caught an attack on *this* data, model and class sizes?

Opt-in (``--canaries`` / ``canaries.enabled``) and run beside the scan, never inside it: the published
rows, scores and reasons are the same with and without it.

* **Proxy mode.**  Canary rows (a trigger stamped on rows of other classes, relabelled to the target
  class; ``rate`` of the target class's rows, at least 3; ``trigger``: a patch, a blend over the
  whole input, or both, each run as alone) are added to the proxy's training sample, so a second
  proxy learns them as a real backdoor, each target class with a trigger of its own.  By default
  one proxy learns every target's canaries (one training); ``triggers_per_proxy`` 1
  trains a proxy per target, one attack each as a real attack has, at a training each.  Neither
  was better where measured (README, "Canaries").  The detectors are then fitted on that proxy's
  embeddings of the sample and the canaries, one target at a time, and the canaries they flag are
  counted: "3 of 3 canaries found in class 7".  The rows the detectors flag on that proxy before
  any canary is added are left out of the trials (``held_back_rows``): the question is whether an
  attack on the rows this scan would keep is caught, and a backdoor already found shares its class
  with the canaries planted there and pulls the class's split towards itself (on the families'
  signals, a 10% patch had its target class's canaries caught 0 of 44 beside it, 44 of 44 without).
* **Column and model mode** (the model cannot be retrained): a power analysis in embedding space.
  For each class, groups of ``sizes`` (shares of the class, at least 3 rows) are planted with the
  shape real backdoors take in a poisoned model's representation, measured on the development
  families (``benchmarks/canaries.py shape``): the group's centre at each of ``distances`` class
  standard deviations from the class mean, measured along its direction, which is drawn from the
  class's own covariance (real poison moves along directions of 3-4 times the class's average
  variance); its rows drawn with the class's covariance times ``spread`` (medians 3.95 and 1.8:
  dirty-label rows are wider than the class they were put into, not a tight cluster).  The
  detectors are refitted with each planted group and, per distance, the smallest one caught (90 % of
  its rows flagged) is reported: "class 7: a backdoor of >= 12 rows at >= 3.95 SDs would have been
  caught".  One distance cannot stand for every attack: on the benchmark families, real backdoors sit
  0.5 to 28 class SDs out, and canaries at each attack's own distance and spread agree with its real
  recall on 86-87% of cases where canaries at the median shape agree on 65-75% and the grid read
  this way on 77-84% (development and held-out families, ``benchmarks/results/quality.md``); so the finding is a grid, read as "an attack at least this far
  out, of at least this size, would have been caught".

Canary ids carry the reserved prefix ``names.CANARY_PREFIX``; an input row using it is quarantined.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import numpy as np

from poisonguard.config import Config
from poisonguard.core.screening import FEATURE_VIEW, FEATURE_VIEW_DETECTORS, Screener, fit_detectors, split_views, \
    view_rows
from poisonguard.core.threads import blas_threads, limit_worker
from poisonguard.detectors.calibration import MIN_CLASS_ROWS
from poisonguard.detectors.stats import ClassState, default_keys, states_by_class
from poisonguard.engines.progress import Progress

log = logging.getLogger("poisonguard")
PROGRESS_EVERY_S = 10.0  # the power analysis refits every detector per planted group: minutes on large classes
CAUGHT = 0.9  # share of a planted cluster's rows that must be flagged for it to count as caught


def self_test(plan, config: Config, rows_per_item: int) -> dict:
    log.info("canaries: self-test (%s mode)", "proxy" if config.embedding.source == "proxy" else "embedding")
    with blas_threads(config.blas_threads):
        result = proxy_canaries(plan, config) if config.embedding.source == "proxy" else \
            embedding_power(plan, config, rows_per_item)
    if not result["planted"]:  # no recall to report: a required minimum is not met by nothing
        result["recall"] = None
        result.setdefault("why", f"nothing planted: no class has the {MIN_CLASS_ROWS} rows a planted group needs")
    result["min_recall"] = config.canaries.min_recall
    result["passed"] = config.canaries.min_recall is None or (
        result["recall"] is not None and result["recall"] >= config.canaries.min_recall)
    return result


def _flagged(detectors: dict, x: np.ndarray, y: np.ndarray, keys: np.ndarray, features=None,
             feature_view: bool = False) -> np.ndarray:
    """Rows any detector flags; with ``feature_view`` the detectors that read the feature column score
    ``features`` (none given: planted embedding rows have none, and those detectors are left out)."""
    flags = np.zeros(len(x), dtype=bool)
    for name, detector in detectors.items():
        if feature_view and features is None and name in FEATURE_VIEW_DETECTORS:
            continue
        flags |= detector.flag(view_rows(name, x, features if feature_view else None), y, keys)
    return flags


def _eligible(sizes: dict, limit: int) -> list:
    classes = [c for c, n in sizes.items() if n >= MIN_CLASS_ROWS]
    return sorted(classes, key=lambda c: (-sizes[c], str(c)))[:limit]


def embedding_power(plan, config: Config, rows_per_item: int) -> dict:
    from poisonguard.engines import memory

    states, _, _ = memory.fit_pass(Screener(config, plan), rows_per_item)
    return power_of(states, config)


def power_of(states: dict, config: Config, classes: list | None = None) -> dict:
    """The power analysis on fitted class states (``classes``: which to plant in; default the largest)."""
    rng = np.random.default_rng(config.seed)
    settings = config.canaries
    per_class, planted, caught = {}, 0, 0
    embedded, featured = split_views(states)
    feature_view = bool(featured)  # (model mode, label_view features: those checks are left out)
    if classes is None:
        classes = _eligible({c: s.n for c, s in embedded.items()}, settings.max_classes)
    progress = Progress("canaries", len(classes) * len(settings.distances) * len(settings.sizes),
                        every_s=PROGRESS_EVERY_S, unit="planted groups")
    with _trials(states, config, feature_view, progress) as caught_of:
        for label in classes:
            state = states[label]
            groups = _planted_groups(state, settings, rng)
            hits = caught_of(label, [(rows, keys) for _, _, rows, keys in groups])
            trials = [{"distance_sd": distance, "share": share, "rows": len(rows), "caught": h}
                      for (distance, share, rows, _), h in zip(groups, hits)]
            planted, caught = planted + sum(t["rows"] for t in trials), caught + sum(hits)
            smallest = {str(d): next((t["rows"] for t in trials if t["distance_sd"] == d and t["caught"] >= CAUGHT * t["rows"]),
                                     None) for d in settings.distances}
            per_class[str(label)] = {"rows": int(state.n), "trials": trials, "smallest_caught_rows": smallest,
                                     "finding": _finding(label, smallest, trials[-1]["rows"])}
    return {"mode": "embedding", "distances_sd": settings.distances, "spread": settings.spread,
            "planted": planted, "caught": caught,
            "recall": caught / planted if planted else None, "per_class": per_class}


def _planted_groups(state: ClassState, settings, rng: np.random.Generator) -> list:
    """(distance, share, rows, keys) of every group planted in one class, grid order."""
    values, vectors = np.linalg.eigh(np.asarray(state.covariance, dtype=np.float64))
    root = vectors * np.sqrt(np.maximum(values, 0.0))  # cov = root @ root.T
    direction = root @ rng.normal(size=state.dim)  # along the class's own variation, as real poison moves
    direction /= max(np.linalg.norm(direction), 1e-300)
    sd_along = float(np.sqrt(max(direction @ state.covariance @ direction, 1e-24)))
    shape = root * np.sqrt(settings.spread)  # rows ~ N(0, spread * cov)
    groups = []
    for distance in settings.distances:
        for share in settings.sizes:
            k = max(3, int(round(share * state.n)))
            centre = state.mean + distance * sd_along * direction
            rows = (centre + rng.normal(size=(k, state.dim)) @ shape.T).astype(np.float32)
            keys = rng.integers(0, np.iinfo(np.uint64).max, size=k, dtype=np.uint64, endpoint=True)
            groups.append((distance, share, rows, keys))
    return groups


@contextmanager
def _trials(states: dict, config: Config, feature_view: bool, progress: Progress):
    """A function (label, [(rows, keys)]) -> rows of each planted group flagged, in order: each group
    planted alone in its class and every detector refitted.  ``canaries.workers`` > 1 refits in that
    many processes (spawned; each holds a copy of the class states); the groups are drawn here, so
    the results are those of one process."""
    workers = config.canaries.workers
    if workers > 1 and multiprocessing.current_process().daemon:
        log.warning("canaries: this process is a daemon (a worker pool's?) and may not start processes; "
                    "canaries.workers=%d runs in this one", workers)
        workers = 1
    if workers == 1:
        def caught_of(label, groups):
            return [_progressed(progress, _caught(states, config, feature_view, label, rows, keys)) for rows, keys in groups]

        yield caught_of
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(states, config, feature_view))

    def caught_of(label, groups):
        return [_progressed(progress, h) for h in pool.map(_caught_in_worker, [(label, r, k) for r, k in groups])]

    try:
        yield caught_of
    except BaseException:  # Ctrl-C / SIGTERM: stop the refits under way, drop the groups not started
        for process in list((pool._processes or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progressed(progress: Progress, hits: int) -> int:
    progress.add(1)
    return hits


def _caught(states: dict, config: Config, feature_view: bool, label, rows: np.ndarray, keys: np.ndarray) -> int:
    state = states[label]
    trial = dict(states)
    trial[label] = state.merge(ClassState.from_block(rows, keys, state.capacity))
    return int(_flagged(fit_detectors(trial, config), rows, np.full(len(rows), label), keys,
                        feature_view=feature_view).sum())


_worker: tuple | None = None


def _start_worker(states: dict, config: Config, feature_view: bool) -> None:
    global _worker
    limit_worker(config.blas_threads)
    _worker = (states, config, feature_view)


def _caught_in_worker(task) -> int:
    label, rows, keys = task
    return _caught(*_worker, label, rows, keys)


def beside_quarantined(result: dict | None, per_class: dict) -> dict | None:
    """Embedding mode plants among every row of a class, the rows this scan quarantined included, and
    a planted group beside rows the detectors flag can be caught with them: each class's finding says
    how many there were (``quarantined_in_class``).  On the benchmark families, canaries at 3.95 SDs
    were caught in 80% of the held-out cases whose real attack was found, 59% with its rows left out
    (``benchmarks/canaries.py eval --leave-out-flagged``); left in, they predict the real recall better."""
    if not result or result.get("mode") != "embedding":
        return result
    cells = {}
    for label, cell in result["per_class"].items():
        held = int(per_class.get(label, {}).get("quarantined", 0))
        note = (f"; class {label} holds {held} rows this scan quarantined, and a group planted beside rows "
                "already found can be caught with them") if held else ""
        cells[label] = {**cell, "quarantined_in_class": held, "finding": cell["finding"] + note}
    return {**result, "per_class": cells}


def _finding(label, smallest: dict, largest: int) -> str:
    """"class 7: a backdoor of >= 12 rows at >= 3.95 SDs would have been caught (>= 3 rows at 8.0 SDs;
    none at 2.0 SDs, up to 90 rows)": the nearest distance where one was caught leads."""
    hits = [(d, rows) for d, rows in smallest.items() if rows]
    misses = " or ".join(d for d, rows in smallest.items() if not rows)
    if not hits:
        return f"class {label}: no planted cluster of up to {largest} rows was caught at {misses} SDs"
    (first, rows), rest = hits[0], [f">= {r} rows at {d} SDs" for d, r in hits[1:]]
    rest += [f"none at {misses} SDs, up to {largest} rows"] if misses else []
    lead = f"class {label}: a backdoor of >= {rows} rows at >= {first} SDs would have been caught"
    return lead + (f" ({'; '.join(rest)})" if rest else "")


def _stamp(x: np.ndarray, target_index: int, shape: list[int], rng: np.random.Generator,
           trigger: str = "patch", alpha: float = 0.2) -> np.ndarray:
    """A distinct trigger per target class.  Patch: a 2x2 patch at its own place of an image (a grid
    of places, then a second value), a 3-step burst at its own place of a sequence, else a few fixed
    feature positions.  Blend: every value mixed with a random pattern of its own over the input's
    range, x' = (1 - alpha) x + alpha p."""
    span = float(x.max() - x.min()) or 1.0
    out = x.copy()
    if trigger == "blend":
        pattern = rng.uniform(float(x.min()), float(x.max()), size=x.shape[1]).astype(x.dtype)
        return (1.0 - alpha) * out + alpha * pattern
    if len(shape) == 2:
        seq = out.reshape(len(out), *shape)
        places = max(1, shape[-1] // 3)
        start, level = 3 * (target_index % places), target_index // places
        seq[..., start:start + 3] = float(x.max()) + (0.5 + 0.5 * level) * span
        return seq.reshape(len(out), -1)
    if len(shape) == 3:
        img = out.reshape(len(out), *shape)
        h, w = shape[-2], shape[-1]
        places = max(1, (h // 2) * (w // 2))
        place, level = target_index % places, target_index // places
        r, c = 2 * (place // (w // 2)), 2 * (place % (w // 2))
        img[..., r:r + 2, c:c + 2] = float(x.max()) + (0.5 + 0.5 * level) * span
        return img.reshape(len(out), -1)
    high = float(x.max()) + 0.5 * span
    positions = rng.choice(x.shape[1], size=min(x.shape[1], max(2, x.shape[1] // 16)), replace=False)
    out[:, positions] = high
    return out


def _decided(emb, y, keys, features, config: Config, feature_view: bool) -> np.ndarray:
    """The rows the detectors flag, fitted on these rows' states (and the feature column's)."""
    states = states_by_class(emb, y, keys, config.max_fit_rows_per_class)
    if feature_view:
        states.update({(FEATURE_VIEW, c): s for c, s in states_by_class(
            features, y, keys, config.max_fit_rows_per_class).items()})
    return _flagged(fit_detectors(states, config), emb, y, keys, features=features, feature_view=feature_view)


TRIGGERS = ("patch", "blend")  # what ``canaries.trigger: both`` runs, each as it runs alone


def proxy_canaries(plan, config: Config) -> dict:
    from poisonguard.proxy import read_training_sample

    x, labels = read_training_sample(plan, config)
    if config.canaries.trigger != "both":
        return _proxy_canaries(x, labels, plan, config, config.canaries.trigger)
    return _both({kind: _proxy_canaries(x, labels, plan, config, kind) for kind in TRIGGERS})


def _both(results: dict) -> dict:
    """Patch and blended canaries side by side: each class's finding names both, and the recall that
    counts (``min_recall``) is the lower of the two, since each predicts its own kind of attack."""
    first = results[TRIGGERS[0]]
    if first["recall"] is None:
        return {**first, "trigger": "both"}
    per_class = {}
    for label in first["per_class"]:
        cells = {kind: result["per_class"][label] for kind, result in results.items()}
        per_class[label] = {
            "canaries": sum(c["canaries"] for c in cells.values()), "caught": sum(c["caught"] for c in cells.values()),
            "held_back_rows": max(c["held_back_rows"] for c in cells.values()),
            "clean_rows_flagged": float(np.mean([c["clean_rows_flagged"] for c in cells.values()])),
            "by_trigger": {kind: {k: v for k, v in c.items() if k != "finding"} for kind, c in cells.items()},
            "finding": " and ".join(f"{c['caught']} of {c['canaries']} {kind} canaries" for kind, c in cells.items())
                       + f" found in class {label}"}
    return {"mode": "proxy", "trigger": "both", "rate": first["rate"],
            "planted": sum(r["planted"] for r in results.values()), "caught": sum(r["caught"] for r in results.values()),
            "recall": min(r["recall"] for r in results.values()),
            "by_trigger": {kind: {"planted": r["planted"], "caught": r["caught"], "recall": r["recall"]}
                           for kind, r in results.items()},
            "clean_rows_flagged": float(np.mean([r["clean_rows_flagged"] for r in results.values()])),
            "proxies": sum(r["proxies"] for r in results.values()),
            "held_back_rows": max(r["held_back_rows"] for r in results.values()),
            "proxy_train_accuracy": min(r["proxy_train_accuracy"] for r in results.values()), "per_class": per_class}


def _proxy_canaries(x, labels, plan, config: Config, trigger: str) -> dict:
    from poisonguard.layout import infer_layout

    rng = np.random.default_rng(config.seed)
    classes, counts = np.unique(labels, return_counts=True)
    sizes = dict(zip(classes.tolist(), counts.tolist()))
    layout = infer_layout(x, config.embedding.features_shape, config.embedding.features)
    targets = _eligible(sizes, config.canaries.max_classes)
    per_class, held_back, accuracy = {}, [], []
    step = config.canaries.triggers_per_proxy or max(len(targets), 1)
    for start in range(0, len(targets), step):  # one proxy per group of targets, each its own trigger
        cx, cy = [], []
        for i, target in enumerate(targets[start:start + step], start):  # a trigger of its own, however grouped
            others = np.flatnonzero(labels != target)
            k = min(max(3, int(round(config.canaries.rate * sizes[target]))), len(others))
            if k:
                cx.append(_stamp(x[rng.choice(others, size=k, replace=False)], i, layout.shape, rng, trigger,
                                 config.canaries.blend_alpha))
                cy.append(np.full(k, target, dtype=labels.dtype))
        if cx:
            found, held, fit = _proxy_trials(x, labels, np.concatenate(cx), np.concatenate(cy), plan, config, layout)
            per_class.update(found)
            held_back.append(held)
            accuracy.append(fit["train_accuracy"])
    if not per_class:
        why = (f"nothing planted: no class has the {MIN_CLASS_ROWS} rows a planted group needs" if not targets
               else "nothing planted: no other class's rows to stamp the canary trigger on")
        return {"mode": "proxy", "planted": 0, "caught": 0, "recall": None, "per_class": {}, "why": why}
    planted = sum(c["canaries"] for c in per_class.values())
    caught = sum(c["caught"] for c in per_class.values())
    return {"mode": "proxy", "trigger": trigger, "rate": config.canaries.rate,
            "planted": planted, "caught": caught,
            "recall": caught / planted,
            "clean_rows_flagged": float(np.mean([c["clean_rows_flagged"] for c in per_class.values()])),
            "proxies": len(accuracy), "held_back_rows": max(held_back),
            "proxy_train_accuracy": min(accuracy), "per_class": per_class}


def _proxy_trials(x, labels, canary_x, canary_y, plan, config: Config, layout) -> tuple[dict, int, dict]:
    """A proxy trained on the sample and these canaries; then, one target class at a time, the
    detectors fitted on its embeddings of the rows they do not already flag and that class's
    canaries: (per-class findings, rows left out, the proxy's fit)."""
    import torch

    from poisonguard.proxy import fit_proxy

    all_x, y = np.concatenate([x, canary_x]), np.concatenate([labels, canary_y])
    model, info = fit_proxy(all_x, y, plan, config, layout)  # the layout the triggers were stamped in
    with torch.inference_mode():
        emb = np.concatenate([model.embed(torch.from_numpy(all_x[i:i + 8192]).reshape([-1, *layout.shape])).numpy()
                              for i in range(0, len(all_x), 8192)])
    keys = default_keys(len(y), config.seed)
    is_canary = np.r_[np.zeros(len(x), bool), np.ones(len(canary_x), bool)]
    feature_view = plan.label_view == "features"
    held = np.zeros(len(y), dtype=bool)
    held[:len(x)] = _decided(emb[:len(x)], labels, keys[:len(x)], all_x[:len(x)], config, feature_view)
    per_class = {}
    for target in dict.fromkeys(canary_y.tolist()):  # one attack at a time, as a real one would be
        mine = is_canary & (y == target)
        rows = (~is_canary & ~held) | mine
        flags = _decided(emb[rows], y[rows], keys[rows], all_x[rows], config, feature_view)
        found = int(flags[mine[rows]].sum())
        per_class[str(target)] = {"canaries": int(mine.sum()), "caught": found, "held_back_rows": int(held.sum()),
                                  "clean_rows_flagged": float(flags[~mine[rows]].mean()),
                                  "finding": f"{found} of {int(mine.sum())} canaries found in class {target}"}
    return per_class, int(held.sum()), info
