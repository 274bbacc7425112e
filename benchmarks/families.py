"""Benchmark families: data source x embedding model x attack x rate x seed, split into a
development set (where every threshold, default and fusion rule is chosen) and a held-out set
(reported, never tuned on).

    python benchmarks/families.py build [--jobs 2]     # train the models, cache the embeddings
    python benchmarks/families.py eval  [--split dev|heldout|all] [--art] [--sources iris,wine]

Sources (real data that scikit-learn ships, and synthetic data whose classes have natural sub-modes):
  digits         8,985 8x8 images (the digits and four one-pixel shifts)            dev
  breast_cancer  569 rows x 30 features                                              dev
  iris           150 rows x 4 features, 3 classes of 50                             dev
  modes          6,000 rows x 20 features, make_classification, 3 clusters per class  dev
  signals        8,000 1-D signals of 64 steps, 10 classes of two waveforms (60/40),  dev
                 each shifted at random (a shift-invariant sequence task)
  wine           178 rows x 13 features                                              held-out
  mixture        4,000 rows x 16 features, 8 classes of two Gaussian modes (70/30)    held-out
  shapes         32,000 12x12 images, 10 classes drawn two ways each (60/40)          held-out
Models, each trained on the poisoned data; the embedding is the last hidden layer:
  mlp (dev), cnn (dev; images and sequences), random (dev: random ReLU features, frozen, and a trained
  linear head: a weak representation), linear (held-out: a linear bottleneck and a linear head).
A family is held out when its source or its model is.
Attacks (dirty label: rows of other classes, relabelled to the target class): patch triggers at a
seed-chosen position, 1-10% of the target class; blended triggers 5-10%; label flips, random
(uniform noise over all classes) and class-targeted (one class into another) 5-20%; and a clean
control.  Three seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "families"
SOURCES = {"digits": "dev", "breast_cancer": "dev", "iris": "dev", "modes": "dev", "signals": "dev",
           "wine": "heldout", "mixture": "heldout", "shapes": "heldout"}
MODELS = {"mlp": "dev", "cnn": "dev", "random": "dev", "linear": "heldout"}
IMAGE_SOURCES = {"digits": (8, 8), "shapes": (12, 12)}
SEQUENCE_SOURCES = {"signals": 64}
ATTACKS = ([("clean", 0.0)] + [("patch", r) for r in (0.01, 0.03, 0.05, 0.10)] + [("blend", r) for r in (0.05, 0.10)]
           + [("flip_random", r) for r in (0.05, 0.10, 0.20)] + [("flip_targeted", r) for r in (0.10, 0.20)])
SEEDS = (0, 1, 2)


def split_of(source: str, model: str) -> str:
    return "heldout" if "heldout" in (SOURCES[source], MODELS[model]) else "dev"


def families():
    for source in SOURCES:
        for model in MODELS:
            if model == "cnn" and source not in IMAGE_SOURCES and source not in SEQUENCE_SOURCES:
                continue
            yield source, model


# ---- sources --------------------------------------------------------------------------------

def load(source: str):
    """(x float32 [n, f], y int64, target class)."""
    from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine, make_classification

    if source == "digits":
        d = load_digits()
        images = d.images.astype(np.float32) / 16.0
        shifted = [images] + [np.roll(images, s, axis=a) for a in (1, 2) for s in (-1, 1)]
        return np.concatenate(shifted).reshape(-1, 64), np.tile(d.target, 5), 0
    if source in ("breast_cancer", "wine", "iris"):
        d = {"breast_cancer": load_breast_cancer, "wine": load_wine, "iris": load_iris}[source]()
        x = d.data.astype(np.float32)
        return (x - x.mean(0)) / x.std(0), d.target, 1 if source == "breast_cancer" else 0
    if source == "modes":
        x, y = make_classification(n_samples=6000, n_features=20, n_informative=10, n_redundant=4, n_classes=6,
                                   n_clusters_per_class=3, class_sep=2.0, flip_y=0.0, random_state=7)
        return ((x - x.mean(0)) / x.std(0)).astype(np.float32), y, 2
    if source == "mixture":
        rng = np.random.default_rng(11)
        xs, ys = [], []
        for c in range(8):
            centre = rng.normal(scale=3.0, size=16)
            offset = rng.normal(size=16)
            offset *= 5.0 / np.linalg.norm(offset)  # two modes 5 sd apart
            for share, shift in ((0.7, 0.0), (0.3, 1.0)):
                n = int(500 * share)
                xs.append(centre + shift * offset + rng.normal(size=(n, 16)))
                ys.append(np.full(n, c))
        x = np.concatenate(xs).astype(np.float32)
        return (x - x.mean(0)) / x.std(0), np.concatenate(ys), 3
    if source == "shapes":
        return _shapes(32000)
    if source == "signals":
        return _signals(8000)
    raise ValueError(source)


def _shapes(n: int):
    """10 classes of 12x12 glyphs, each drawn in two styles (60/40): random strokes per style,
    jittered by a pixel, scaled in intensity and noised."""
    rng = np.random.default_rng(5)
    templates = np.zeros((10, 2, 12, 12), np.float32)
    for c, s in itertools.product(range(10), range(2)):
        for _ in range(3):  # three strokes
            r0, c0 = rng.integers(2, 10, size=2)
            dr, dc = rng.integers(-1, 2, size=2)
            if dr == dc == 0:
                dr = 1
            for k in range(6):
                r, q = np.clip(r0 + k * dr, 0, 11), np.clip(c0 + k * dc, 0, 11)
                templates[c, s, r, q] = 1.0
    y = np.repeat(np.arange(10), n // 10)
    style = (rng.random(len(y)) < 0.4).astype(int)
    x = templates[y, style]
    shifts = rng.integers(-1, 2, size=(len(y), 2))
    for dr, dc in itertools.product((-1, 0, 1), repeat=2):
        m = (shifts[:, 0] == dr) & (shifts[:, 1] == dc)
        x[m] = np.roll(x[m], (dr, dc), axis=(1, 2))
    x = x * rng.uniform(0.8, 1.2, size=(len(y), 1, 1)) + rng.normal(scale=0.15, size=x.shape)
    return x.reshape(len(y), -1).astype(np.float32), y, 4


def _signals(n: int, length: int = 64):
    """10 classes of 1-D signals, each a sum of two class-and-style windowed sinusoids (two styles,
    60/40), circularly shifted by a random offset, scaled and noised: order matters, position does not."""
    rng = np.random.default_rng(9)
    t = np.arange(length)
    templates = np.zeros((10, 2, length), np.float32)
    for c, s in itertools.product(range(10), range(2)):
        for _ in range(2):
            freq, centre, width = rng.uniform(0.05, 0.45), rng.uniform(0, length), rng.uniform(4, 12)
            templates[c, s] += np.sin(2 * np.pi * freq * t) * np.exp(-0.5 * ((t - centre) / width) ** 2)
    y = np.repeat(np.arange(10), n // 10)
    style = (rng.random(len(y)) < 0.4).astype(int)
    shift = rng.integers(0, length, size=len(y))
    x = templates[y, style][np.arange(len(y))[:, None], (t[None, :] + shift[:, None]) % length]
    x = x * rng.uniform(0.8, 1.2, size=(len(y), 1)) + rng.normal(scale=0.15, size=x.shape)
    return x.astype(np.float32), y, 5


# ---- attacks --------------------------------------------------------------------------------

def poison(x, y, source: str, target: int, attack: str, rate: float, seed: int):
    rng = np.random.default_rng(1000 + seed)
    x, y = x.copy(), y.copy()
    truth = np.zeros(len(y), bool)
    classes = np.unique(y)
    if attack == "clean":
        return x, y, truth
    if attack.startswith("flip"):
        if attack == "flip_random":
            rows = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
            new = (y[rows] + rng.integers(1, len(classes), size=len(rows))) % len(classes)
        else:
            source_class = (target + 1) % len(classes)
            members = np.flatnonzero(y == source_class)
            rows = rng.choice(members, size=max(1, int(round(rate * len(members)))), replace=False)
            new = np.full(len(rows), target)
        y[rows] = new
        truth[rows] = True
        return x, y, truth
    n = max(1, int(round(rate * np.sum(y == target))))
    rows = rng.choice(np.flatnonzero(y != target), size=n, replace=False)
    if attack == "patch":
        if source in IMAGE_SOURCES:
            h, w = IMAGE_SOURCES[source]
            r0, c0 = [(0, 0), (0, w - 2), (h - 2, 0), (h - 2, w - 2)][seed % 4]
            img = x[rows].reshape(-1, h, w)
            img[:, r0:r0 + 2, c0:c0 + 2] = x.max()
            x[rows] = img.reshape(len(rows), -1)
        elif source in SEQUENCE_SOURCES:
            start = [0, SEQUENCE_SOURCES[source] // 2, SEQUENCE_SOURCES[source] - 3][seed % 3]
            x[rows, start:start + 3] = x.max()
        else:
            cols = rng.choice(x.shape[1], size=2, replace=False)
            x[np.ix_(rows, cols)] = x[:, cols].max(axis=0) + 1.0
    elif attack == "blend":
        pattern = np.random.default_rng(12345 + seed).uniform(x.min(), x.max(), size=x.shape[1]).astype(np.float32)
        x[rows] = 0.8 * x[rows] + 0.2 * pattern
    y[rows] = target
    truth[rows] = True
    return x, y, truth


# ---- models ---------------------------------------------------------------------------------

def embed(x, y, source: str, model: str, seed: int) -> tuple[np.ndarray, float]:
    """Train ``model`` on the (poisoned) data with Adam; return the last hidden layer and train accuracy."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    n_classes = int(y.max()) + 1
    f = x.shape[1]
    if model == "cnn" and source in SEQUENCE_SOURCES:
        features = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, f)), torch.nn.Conv1d(1, 16, 5, padding=2), torch.nn.ReLU(),
            torch.nn.Conv1d(16, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool1d(16),
            torch.nn.Flatten(), torch.nn.Linear(512, 32), torch.nn.ReLU())
    elif model == "cnn":
        h, w = IMAGE_SOURCES[source]
        features = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, h, w)), torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(), torch.nn.Linear(512, 32), torch.nn.ReLU())
    elif model == "mlp":
        hidden = 128 if f > 32 else 64
        features = torch.nn.Sequential(torch.nn.Linear(f, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 32),
                                       torch.nn.ReLU())
    elif model == "random":
        features = torch.nn.Sequential(torch.nn.Linear(f, 32), torch.nn.ReLU())
        features.requires_grad_(False)
    else:
        features = torch.nn.Sequential(torch.nn.Linear(f, 32))
    head = torch.nn.Linear(32, n_classes)
    net = torch.nn.Sequential(features, head)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    batch = min(256, len(y))
    for _ in range(600 if model == "cnn" else 1500):
        idx = torch.randint(len(y), (batch,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
        opt.step()
    with torch.no_grad():
        emb = torch.cat([features(xt[i:i + 4096]) for i in range(0, len(y), 4096)])
        acc = float((head(emb).argmax(1) == yt).float().mean())
    return emb.numpy().astype(np.float32), acc


def cache_path(source, model, attack, rate, seed) -> Path:
    return CACHE / f"{source}-{model}-{attack}-{int(round(rate * 100)):02d}-s{seed}.npz"


def build_one(args) -> str:
    source, model, attack, rate, seed = args
    path = cache_path(*args)
    if path.exists():
        return f"{path.name} (cached)"
    x0, y0, target = load(source)
    x, y, truth = poison(x0, y0, source, target, attack, rate, seed)
    t0 = time.perf_counter()
    emb, acc = embed(x, y, source, model, seed)
    tmp = path.with_suffix(".tmp.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(tmp, embedding=emb, label=y, truth=truth, train_accuracy=acc, target=target)
    os.replace(tmp, path)
    return f"{path.name}: {len(y)} rows, train accuracy {acc:.3f}, {time.perf_counter() - t0:.1f} s"


def build(jobs: int) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    work = [(s, m, a, r, seed) for s, m in families() for a, r in ATTACKS for seed in SEEDS]
    work.sort(key=lambda w: (w[0] == "shapes", w))  # the large source last
    print(f"{len(work)} cases", flush=True)
    with ProcessPoolExecutor(jobs) as pool:
        for k, line in enumerate(pool.map(build_one, work), 1):
            print(f"[{k}/{len(work)}] {line}", flush=True)


LARGE_SOURCES = {"shapes"}  # 32,000 rows: k-NN and confident learning take ~30 s a case here


def cases(split: str, large_seeds: int = len(SEEDS)):
    for source, model in families():
        if split != "all" and split_of(source, model) != split:
            continue
        for attack, rate in ATTACKS:
            for seed in SEEDS[:large_seeds] if source in LARGE_SOURCES else SEEDS:
                path = cache_path(source, model, attack, rate, seed)
                if path.exists():
                    yield (source, model, attack, rate, seed), path


# ---- evaluation -----------------------------------------------------------------------------

RESULTS = ROOT / "benchmarks" / "results"


def evaluate_case(key, path, art: bool, config: dict | None = None) -> dict:
    """The default config's decisions (poisonguard.screen: the scan's own core), each detector's
    ranking, and optionally IBM ART's best configuration, on one cached case."""
    import warnings

    import poisonguard
    from threadpoolctl import threadpool_limits

    data = np.load(path)
    e, y, truth = data["embedding"], data["label"], data["truth"]
    config = score_every_row(config)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), threadpool_limits(1):  # one BLAS thread per worker process
        warnings.simplefilter("ignore")
        found = poisonguard.screen(e, y, config).rows
    seconds = time.perf_counter() - t0
    flags = found["quarantined"].to_numpy()
    row = {"key": list(key), "split": split_of(key[0], key[1]), "rows": len(y), "poison": int(truth.sum()),
           "seconds": round(seconds, 2), "train_accuracy": float(data["train_accuracy"]), **_metrics(flags, truth)}
    row["worst_class_clean_loss"] = _worst_class_loss(flags, y, truth)
    row["auroc"] = _aurocs(found, y, truth)
    if art and truth.any():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from quality import art_methods

        best = max((_metrics(f, truth)["f1"], name) for name, (f, _, _) in art_methods(e, y, truth.mean()).items())
        row["art_best_f1"], row["art_best"] = best
    return row


def score_every_row(config: dict | None) -> dict:
    """The config with the k-NN label check scoring every row: by default it leaves rows of classes it
    cannot flag unscored (NaN), and the AUROC columns read every row's rank.  Decisions are the same
    (``tests/test_detectors.py``)."""
    from poisonguard.detectors import DEFAULT_DETECTORS

    config = json.loads(json.dumps(config or {}))
    detectors = config.setdefault("detectors", [{"name": name} for name in DEFAULT_DETECTORS])
    for det in detectors:
        if det["name"] in ("knn_label", "knn_distance"):
            det.setdefault("params", {})["score_every_row"] = True
    return config


def _worst_class_loss(flags, y, truth) -> float:
    """The largest share of one class's clean rows flagged."""
    return max(float(np.mean(flags[(y == c) & ~truth])) for c in np.unique(y) if np.any((y == c) & ~truth))


def _aurocs(found, y, truth) -> dict:
    """Each detector's AUROC over the rows of the classes that hold poison (a backdoor's target
    class, a targeted flip's, every class for random flips), on within-class ranks.  Pooling the
    clean rows of every class instead would cap a perfect ranking at about 1 - share / 2 (0.95 for a
    backdoor of 10% of its class), since other classes' clean rows fill the top ranks too."""
    from sklearn.metrics import roc_auc_score

    aurocs = {}
    poisoned_classes = np.isin(y, np.unique(y[truth])) if truth.any() else np.zeros(len(y), bool)
    for col in [c for c in found.columns if c.startswith("score_")]:
        scores = within_class_rank(found[col].to_numpy(dtype=float), y)
        if truth.any() and (poisoned_classes & ~truth).any():
            aurocs[col[6:]] = float(roc_auc_score(truth[poisoned_classes],
                                                  np.nan_to_num(scores[poisoned_classes], nan=0.0)))
    return aurocs


def _metrics(flags, truth) -> dict:
    tp, fp, fn = int(np.sum(flags & truth)), int(np.sum(flags & ~truth)), int(np.sum(~flags & truth))
    return {"recall": tp / truth.sum() if truth.any() else None, "clean_flagged": fp / max(1, (~truth).sum()),
            "precision": tp / (tp + fp) if tp + fp else None, "f1": 2 * tp / (2 * tp + fp + fn) if truth.any() else None}


def within_class_rank(scores, y):
    """Each row's rank within its class, as a share of the class (so a pooled AUROC over classes
    means something; ``quality.py`` ranks with it too).  Tied scores share their average
    rank, and a row left unscored (NaN) ranks with the lowest: a detector that did not score a class
    (the k-NN distance under 150 rows) ranks it at AUROC 0.5, not in the row order, which in sources
    stored by class (iris, wine) had put the relabelled rows on top."""
    from scipy.stats import rankdata

    out = np.full(len(scores), np.nan)
    for c in np.unique(y):
        m = y == c
        out[m] = (rankdata(np.nan_to_num(scores[m], nan=-np.inf)) - 0.5) / m.sum()
    return out


def evaluate(split: str, art: bool, jobs: int, large_seeds: int, config: dict | None = None,
             sources=()) -> list[dict]:
    work = [(key, path) for key, path in cases(split, large_seeds) if not sources or key[0] in sources]
    out = []
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(evaluate_case, key, path, art, config) for key, path in work]
        for k, future in enumerate(futures, 1):
            out.append(future.result())
            if k % 20 == 0 or k == len(work):
                print(f"[{k}/{len(work)}] evaluated", flush=True)
    return out


# ---- proxy mode -----------------------------------------------------------------------------

PROXY_ATTACKS = [("clean", 0.0), ("patch", 0.05), ("patch", 0.10), ("blend", 0.10), ("flip_random", 0.10),
                 ("flip_targeted", 0.20)]
PROXY_RESULTS = RESULTS / "families_proxy.json"


def proxy_split(source: str) -> str:
    return SOURCES[source]


def feature_table(x: np.ndarray, y: np.ndarray):
    """What a proxy-mode user hands in: ids, labels and the raw features as a fixed-size list column."""
    import pyarrow as pa

    return pa.table({"id": np.arange(len(y)), "label": y,
                     "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])})


def evaluate_proxy_case(source: str, attack: str, rate: float, seed: int, architecture: str) -> dict:
    """Proxy mode as a user without a model runs it: the feature column only, the default config
    (``architecture``, "ARCH[+STOP]", overrides embedding.proxy_architecture and proxy_stop),
    poisonguard trains its own proxy."""
    import warnings

    import poisonguard
    from threadpoolctl import threadpool_limits

    x0, y0, target = load(source)
    x, y, truth = poison(x0, y0, source, target, attack, rate, seed)
    table = feature_table(x, y)
    arch, _, stop = architecture.partition("+")  # e.g. "auto", "mlp+held_out"
    config = {"seed": seed, "embedding": {"source": "proxy", "features": "features", "device": "cpu",
                                          "proxy_architecture": arch, **({"proxy_stop": stop} if stop else {})}}
    config = score_every_row(config)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")
        found = poisonguard.screen(table, config=config)
    flags = found.rows["quarantined"].to_numpy()
    info = found.summary["embedding"]
    row = {"key": [source, f"proxy-{architecture}", attack, rate, seed], "split": proxy_split(source),
           "rows": len(y), "poison": int(truth.sum()), "seconds": round(time.perf_counter() - t0, 2),
           "architecture": info["architecture"], "layout": info["layout"]["kind"],
           "train_accuracy": info["train_accuracy"], "held_out_accuracy": info["held_out_accuracy"],
           "epochs": info["epochs"], "stopped": info["stopped"], "auroc": _aurocs(found.rows, y, truth),
           **_metrics(flags, truth)}
    row["worst_class_clean_loss"] = _worst_class_loss(flags, y, truth)
    row["unreliable"] = unreliable_detectors(found.summary)
    row["weak"] = [d for d, rep in found.summary["detectors"].items() if (rep.get("representation") or {}).get("weak")]
    row["exclusion"] = [{k: g.get(k) for k in ("detector", "class", "rows", "moved", "one_destination", "confirmed")}
                        for g in (info.get("exclusion") or {}).get("groups", [])]  # poisonguard.core.exclusion
    return row


def unreliable_detectors(summary: dict) -> list[str]:
    """The detectors a scan's mass-quarantine guard held back (``summary.json``'s ``detectors``)."""
    return [d for d, rep in summary["detectors"].items() if (rep.get("mass_quarantine") or {}).get("unreliable")]


def evaluate_proxy(split: str, architectures: list[str], jobs: int, large_seeds: int, sources=()) -> list[dict]:
    work = [(source, attack, rate, seed, arch) for source in SOURCES if split in ("all", SOURCES[source])
            and (not sources or source in sources)
            for attack, rate in PROXY_ATTACKS for seed in (SEEDS[:large_seeds] if source in LARGE_SOURCES else SEEDS)
            for arch in architectures]
    out = []
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(evaluate_proxy_case, *w) for w in work]
        for k, future in enumerate(futures, 1):
            out.append(future.result())
            r = out[-1]
            print(f"[{k}/{len(work)}] {r['key']} {r['architecture']} held-out acc {r['held_out_accuracy']:.3f} "
                  f"f1 {r['f1']} clean {r['clean_flagged']:.4f} {r['seconds']} s", flush=True)
    return out


def source_list(value: str) -> list[str]:
    """``--sources``: comma-separated source names."""
    return [s for s in value.split(",") if s]


def with_committed(path: Path, rows: list[dict], sources: list[str]) -> list[dict]:
    """A partial run's ``rows`` (``--sources``) merged into the rows already at ``path``; a full run's,
    or one with nothing there yet, as they are."""
    return merge_by_key(json.loads(path.read_text()), rows) if sources and path.exists() else rows


def merge_by_key(rows: list[dict], new: list[dict]) -> list[dict]:
    """``rows`` with each row that ``new`` has a row of the same key for replaced, in place; a new key
    is an error (a partial re-run replaces, it does not extend)."""
    by_key = {tuple(r["key"]): r for r in new}
    out = [by_key.pop(tuple(r["key"]), r) for r in rows]
    if by_key:
        raise SystemExit(f"keys not in the committed rows: {sorted(by_key)[:3]}")
    return out


def best_auroc(rs: list[dict]) -> str:
    """The detector whose within-class ranking has the highest mean AUROC over the seeds."""
    if not rs[0]["auroc"]:
        return "-"
    by_det = {d: np.mean([r["auroc"][d] for r in rs]) for d in rs[0]["auroc"]}
    det = max(by_det, key=by_det.get)
    return f"{by_det[det]:.3f} ({det})"


def table(rows: list[dict], split: str) -> str:
    """Mean over seeds per family and attack."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["split"] == split:
            source, model, attack, rate, _ = r["key"]
            groups.setdefault((source, model, attack, rate), []).append(r)
    mean = lambda rs, k: np.mean([r[k] for r in rs if r.get(k) is not None]) if any(r.get(k) is not None for r in rs) else None
    fmt = lambda v, p="{:.3f}": "-" if v is None or (isinstance(v, float) and np.isnan(v)) else p.format(v)
    lines = ["| source | model | attack | rate | seeds | recall | clean flagged | worst class loss | precision | F1 "
             "| best AUROC (detector) | ART best F1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (source, model, attack, rate), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], ATTACK_ORDER[kv[0][2]], kv[0][3])):
        lines.append(f"| {source} | {model} | {attack} | {rate:.0%} | {len(rs)} | {fmt(mean(rs, 'recall'))} "
                     f"| {fmt(mean(rs, 'clean_flagged'), '{:.2%}')} | {fmt(mean(rs, 'worst_class_clean_loss'), '{:.2%}')} "
                     f"| {fmt(mean(rs, 'precision'))} | {fmt(mean(rs, 'f1'))} | {best_auroc(rs)} | {fmt(mean(rs, 'art_best_f1'))} |")
    return "\n".join(lines)


ATTACK_ORDER = {a: k for k, a in enumerate(dict.fromkeys(a for a, _ in ATTACKS))}

TARGETS = (  # issue 11's bars, per (source, model) family, mean over seeds
    ("clean controls: <= 0.5% of rows flagged and no class losing > 2%",
     lambda a, r: a == "clean", lambda g: g["clean_flagged"] <= 0.005 and g["worst_class_clean_loss"] <= 0.02),
    ("patch >= 3%: F1 >= 0.9", lambda a, r: a == "patch" and r >= 0.03, lambda g: g["f1"] >= 0.9),
    ("patch ~1%: F1 >= 0.5", lambda a, r: a == "patch" and r < 0.03, lambda g: g["f1"] >= 0.5),
    ("blend 5-10%: F1 >= 0.7", lambda a, r: a == "blend", lambda g: g["f1"] >= 0.7),
    ("label flips 5-20%: F1 >= 0.8", lambda a, r: a.startswith("flip"), lambda g: g["f1"] >= 0.8),
    ("F1 above ART's best configuration (families ART was run on)", lambda a, r: a != "clean",
     lambda g: g["f1"] > g["art_best_f1"]),
)


def _groups(rows, split):
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["split"] == split:
            source, model, attack, rate, _ = r["key"]
            groups.setdefault((source, model, attack, rate), []).append(r)
    out = {}
    for key, rs in groups.items():
        g = {}
        for k in ("recall", "clean_flagged", "worst_class_clean_loss", "precision", "f1", "art_best_f1"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            g[k] = float(np.mean(vals)) if vals else None
        out[key] = g
    return out


def _case(attack: str, rate: float) -> str:
    return attack if attack == "clean" else f"{attack} {rate:.0%}"


def _value(g: dict, attack: str) -> str:
    if attack == "clean":
        return f"{g['clean_flagged']:.2%} (worst class {g['worst_class_clean_loss']:.1%})"
    return f"F1 {g['f1']:.2f}" if g.get("f1") is not None else "nothing flagged"


def targets(rows, split) -> str:
    groups = _groups(rows, split)
    lines = ["| target | families meeting it | missed (family: value) |", "|---|---|---|"]
    for name, applies, met in TARGETS:
        cases = {k: g for k, g in groups.items() if applies(k[2], k[3])}
        if name.startswith("F1 above ART"):
            cases = {k: g for k, g in cases.items() if g.get("art_best_f1") is not None}
            if not cases:
                lines.append(f"| {name} | not measured (run with --art) | |")
                continue
        ok = [k for k, g in cases.items() if met(g)]
        missed = sorted((k for k in cases if k not in ok), key=lambda k: (k[0], k[1], ATTACK_ORDER[k[2]], k[3]))
        shown = ", ".join(f"{s}/{m} {_case(a, r)}: {_value(cases[(s, m, a, r)], a)}" for s, m, a, r in missed[:12])
        shown += " ..." if len(missed) > 12 else ""
        lines.append(f"| {name} | {len(ok)} of {len(cases)} | {shown} |")
    return "\n".join(lines)


KIND = {**{s: "image" for s in IMAGE_SOURCES}, **{s: "sequence" for s in SEQUENCE_SOURCES}}
PROXY_TARGETS = (  # issue 17's bars, per source, mean over seeds
    ("clean controls: <= 0.5% of rows flagged", lambda s, a, r: a == "clean", lambda g: g["clean_flagged"] <= 0.005),
    ("images and sequences, backdoors >= 5%: recall >= 0.9 at <= 1% of clean rows flagged",
     lambda s, a, r: KIND.get(s) and a in ("patch", "blend") and r >= 0.05,
     lambda g: g["recall"] >= 0.9 and g["clean_flagged"] <= 0.01),
    ("tables, label flips 10-20%: F1 >= 0.8", lambda s, a, r: s not in KIND and a.startswith("flip"),
     lambda g: g["f1"] >= 0.8),
)


def proxy_section(rows) -> str:
    groups = {}
    for r in rows:
        source, _, attack, rate, _ = r["key"]
        groups.setdefault((source, attack, rate), []).append(r)
    mean = lambda rs, k: float(np.mean([r[k] for r in rs if r.get(k) is not None])) if any(
        r.get(k) is not None for r in rs) else None
    fmt = lambda v, p="{:.3f}": "-" if v is None else p.format(v)
    lines = ["## Proxy mode (the feature column only; poisonguard trains its own proxy)", "",
             "`python benchmarks/families.py proxy`: the default config with `embedding.source: proxy` on every "
             "source's raw features (the proxy's architecture and stop rule were chosen on the development sources; "
             "wine, mixture and shapes are held out). Mean over seeds (one on shapes).", "",
             "| target | sources meeting it | missed (source: value) |", "|---|---|---|"]
    for name, applies, met in PROXY_TARGETS:
        cases = {k: {m: mean(rs, m) for m in ("clean_flagged", "recall", "f1")} for k, rs in groups.items() if applies(*k)}
        ok = [k for k, g in cases.items() if met(g)]
        shown = lambda g, a: (f"{g['clean_flagged']:.2%}" if a == "clean" else
                              f"recall {fmt(g['recall'], '{:.2f}')}, {fmt(g['clean_flagged'], '{:.2%}')} clean flagged"
                              if a in ("patch", "blend") else f"F1 {fmt(g['f1'], '{:.2f}')}")
        missed = ", ".join(f"{s} {_case(a, r)}: {shown(cases[(s, a, r)], a)}"
                           for s, a, r in sorted(k for k in cases if k not in ok))
        lines.append(f"| {name} | {len(ok)} of {len(cases)} | {missed} |")
    lines += ["", "| source | split | layout | proxy | attack | rate | seeds | recall | clean flagged | worst class loss "
              "| F1 | best AUROC (detector) | held-out accuracy | epochs | seconds |", "|" + "---|" * 15]
    for (source, attack, rate), rs in sorted(groups.items(), key=lambda kv: (SOURCES[kv[0][0]] != "heldout", kv[0][0],
                                                                                ATTACK_ORDER[kv[0][1]], kv[0][2])):
        lines.append(f"| {source} | {SOURCES[source]} | {rs[0]['layout']} | {rs[0]['architecture'].split('(')[0]} "
                     f"| {attack} | {rate:.0%} | {len(rs)} | {fmt(mean(rs, 'recall'))} "
                     f"| {fmt(mean(rs, 'clean_flagged'), '{:.2%}')} | {fmt(mean(rs, 'worst_class_clean_loss'), '{:.2%}')} "
                     f"| {fmt(mean(rs, 'f1'))} | {best_auroc(rs)} | {fmt(mean(rs, 'held_out_accuracy'))} | {mean(rs, 'epochs'):.0f} "
                     f"| {mean(rs, 'seconds'):.1f} |")
    return "\n".join(lines)


def markdown(rows) -> str:
    seeds = sorted({r["key"][4] for r in rows})
    parts = ["# Detection quality on the benchmark families (`benchmarks/families.py`)", "",
             "Default config (`poisonguard.screen`, the scan's own core), no oracle rate. Rates are poisoned rows as a",
             "share of the target class (backdoors) or of all rows / the source class (random / targeted flips).",
             "'clean flagged' = clean rows flagged / clean rows; 'worst class loss' = the largest share of one class's",
             "clean rows flagged. AUROC ranks each detector's scores within classes, over the classes that hold poison",
             "(pooling every class's clean rows would cap a perfect ranking near 1 - share / 2); the best detector is named, so",
             "ranking (AUROC) and deciding (F1) can be told apart. Mean over seeds " + ", ".join(map(str, seeds)) + ".",
             "Thresholds and defaults were chosen on the development families only (`benchmarks/choose_defaults.py`).",
             "", "## Held-out families (never used to choose anything)", "", targets(rows, "heldout"), "",
             table(rows, "heldout"), "", "## Development families", "", targets(rows, "dev"), "", table(rows, "dev"), ""]
    if PROXY_RESULTS.exists():
        parts += [proxy_section(json.loads(PROXY_RESULTS.read_text())), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--jobs", type=int, default=2)
    rp = sub.add_parser("report", help="write results/families.md from results/families.json")
    rp.add_argument("--json", default=str(RESULTS / "families.json"))
    ev = sub.add_parser("eval")
    ev.add_argument("--split", choices=("dev", "heldout", "all"), default="all")
    ev.add_argument("--art", action="store_true", help="also IBM ART's configurations (pip install -e '.[bench]')")
    ev.add_argument("--jobs", type=int, default=2)
    ev.add_argument("--large-seeds", type=int, default=1, help="seeds evaluated on the 32,000-row source (time)")
    ev.add_argument("--out", default=str(RESULTS / "families.json"))
    ev.add_argument("--config", default="", help="a JSON config for poisonguard.screen (default: the defaults), "
                    "to compare a candidate default; results then go to --out and families.md is not written "
                    "(nor with an --out other than results/families.json)")
    ev.add_argument("--sources", type=source_list, default=[],
                    help="comma-separated: only these sources' cases, merged by key into --out's rows (for a "
                    "change that can act on those sources alone; `report` rewrites families.md)")
    px = sub.add_parser("proxy", help="proxy mode (the feature column only) on every source")
    px.add_argument("--split", choices=("dev", "heldout", "all"), default="all")
    px.add_argument("--architectures", default="auto", help="comma-separated ARCH[+STOP]: auto, mlp, cnn; "
                    "+train_loss, +held_out")
    px.add_argument("--sources", type=source_list, default=[],
                    help="comma-separated; default: every source of the split (with --out an existing file, its "
                    "rows of these sources are replaced)")
    px.add_argument("--jobs", type=int, default=2)
    px.add_argument("--large-seeds", type=int, default=1)
    px.add_argument("--out", default=str(PROXY_RESULTS))
    args = parser.parse_args()
    if args.command == "build":
        build(args.jobs)
    elif args.command == "report":
        rows = json.loads(Path(args.json).read_text())
        art = RESULTS / "families_art.json"
        if art.exists():  # ART's best F1 from the held-out run with --art (one seed on the large source)
            best = {tuple(r["key"]): r.get("art_best_f1") for r in json.loads(art.read_text())}
            for r in rows:
                r["art_best_f1"] = best.get(tuple(r["key"]), r.get("art_best_f1"))
        (RESULTS / "families.md").write_text(markdown(rows))
    elif args.command == "proxy":
        rows = evaluate_proxy(args.split, args.architectures.split(","), args.jobs, args.large_seeds, args.sources)
        rows = with_committed(Path(args.out), rows, args.sources)
        Path(args.out).write_text(json.dumps(rows, indent=0, default=float))
    else:
        rows = evaluate(args.split, args.art, args.jobs, args.large_seeds,
                        json.loads(args.config) if args.config else None, args.sources)
        rows = with_committed(Path(args.out), rows, args.sources)
        Path(args.out).write_text(json.dumps(rows, indent=0, default=float))
        committed = Path(args.out).resolve() == (RESULTS / "families.json").resolve()
        if args.split == "all" and not args.config and not args.sources and committed:  # families.md reports
            (RESULTS / "families.md").write_text(markdown(rows))  # the committed JSON, never a side run's
        for split in ("dev", "heldout"):
            if any(r["split"] == split for r in rows):
                print(f"\n## {split}\n\n" + table(rows, split))
