"""Scale: poisonguard scan vs a plain in-memory numpy floor, side by side, on synthetic Parquet.

Each dataset has 10 classes, a planted 5% sub-population in class 3 (shifted 8 sigma along a random
direction), an embedding column and a 128-float feature column.  For each size it runs, as separate
processes so that peak RSS (whole process tree, sampled every 50 ms) is measured for each:
  - `poisonguard scan` with the default detectors and engine (and any extra flags given with --scan-args,
    e.g. `--engine beam` or a runner's);
  - the floor: the in-memory engine on the same Parquet (the same screening core and batches, no
    Beam, no run lifecycle, report or provenance), writing the same clean/quarantine Parquet.
Prints wall time, rows/s, peak RSS, the ratio to the floor and recall/FPR; writes
benchmarks/results/scale.md.  Where torch sees a CUDA device it runs every size again with the
score pass on the GPU (``scoring_device: cuda``) and adds those rows.

    python benchmarks/scale.py [--sizes 100000x128,1000000x128,3000000x128,1000000x512] [--workdir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "scale.md"
from poisonguard.detectors import DEFAULT_DETECTORS  # noqa: E402
CLASSES, TARGET, SHARE, FEATURES = 10, 3, 0.05, 128
ROW_GROUP = 131072


def generate(path: Path, n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Write the dataset in row groups; return the boolean poison mask."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, dim)).astype(np.float32) * 4
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    poison = np.zeros(n, dtype=bool)
    schema = pa.schema([("id", pa.string()), ("label", pa.int64()),
                        ("embedding", pa.list_(pa.float32(), dim)), ("features", pa.list_(pa.float32(), FEATURES))])
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for start in range(0, n, ROW_GROUP):
            stop = min(start + ROW_GROUP, n)
            m = stop - start
            labels = rng.integers(0, CLASSES, m)
            x = centres[labels] + rng.normal(size=(m, dim)).astype(np.float32)
            planted = (labels == TARGET) & (rng.random(m) < SHARE)
            x[planted] += 8 * direction
            poison[start:stop] = planted
            features = rng.normal(size=(m * FEATURES,)).astype(np.float32)
            writer.write_table(pa.table({
                "id": pa.array([f"row-{i:09d}" for i in range(start, stop)]),
                "label": pa.array(labels, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features), FEATURES),
            }, schema=schema), row_group_size=ROW_GROUP)
    return poison


def floor(path: str, out: str) -> None:
    """The floor: the in-memory engine (the same screening core, no Beam, no run lifecycle or report)."""
    from poisonguard.config import Config
    from poisonguard.core.screening import Screener
    from poisonguard.engines import memory
    from poisonguard.engines.outputs import write_block
    from poisonguard.io import ROWS_PER_WORK_ITEM, plan_inputs

    config = Config()
    plan = plan_inputs([path], config)
    for folder in ("clean", "quarantine"):
        os.makedirs(f"{out}/{folder}", exist_ok=True)

    def sink(file_index, first_row, clean, held, sample):
        write_block(out, file_index, first_row, clean, held)

    memory.run(Screener(config, plan), "floor", sink, ROWS_PER_WORK_ITEM)


def reference(path: str, out: str) -> None:
    """The plain-numpy reference screen: read the Parquet, per class a spectral signature and activation
    clustering, write the flagged ids; nothing else (no validation, suite, other detectors, report,
    provenance or run lifecycle).  Its flag rules are the simplest oracle-free ones (spectral score
    beyond mean + 6 SD of the class; the smaller 2-means cluster in 10 PCA dimensions when it holds
    under 35% of the class): it is the speed floor, not a quality bar."""
    from sklearn.cluster import KMeans

    table = pq.read_table(path, columns=["id", "label", "embedding"])
    dim = table.schema.field("embedding").type.list_size
    x = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float64).reshape(-1, dim)
    y = table.column("label").to_numpy()
    flagged = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        centred = x[rows] - x[rows].mean(axis=0)
        _, vectors = np.linalg.eigh(centred.T @ centred / len(rows))
        spectral = (centred @ vectors[:, -1]) ** 2
        flagged[rows[spectral > spectral.mean() + 6 * spectral.std()]] = True
        reduced = centred @ vectors[:, -10:]
        km = KMeans(n_clusters=2, n_init=3, random_state=0).fit(reduced[:: max(1, len(rows) // 5000)])
        assign = km.predict(reduced)
        small = int(np.argmin(np.bincount(assign, minlength=2)))
        if (assign == small).mean() < 0.35:
            flagged[rows[assign == small]] = True
    os.makedirs(f"{out}/quarantine", exist_ok=True)
    pq.write_table(pa.table({"id": table.column("id").filter(pa.array(flagged))}), f"{out}/quarantine/part-0.parquet")


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS of the whole process tree (MiB), exit code."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [parent] + parent.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.returncode not in (0, 1):
        print(stderr[-3000:], file=sys.stderr)
    return wall, peak / 2**20, proc.returncode


def quality(out: Path, poison: np.ndarray) -> tuple[float, float]:
    import pyarrow.dataset as ds

    held = ds.dataset(str(out / "quarantine"), format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    flagged = np.zeros(len(poison), dtype=bool)
    flagged[[int(i.split("-")[1]) for i in held]] = True
    return float(flagged[poison].mean()), float(flagged[~poison].mean())


def run(sizes: list[tuple[int, int]], workdir: Path, scan_args: list[str], repeat: int = 1) -> str:
    exe = str(Path(sys.executable).with_name("poisonguard"))
    lines = ["# Scale: poisonguard scan vs the in-memory numpy floor", "",
             f"Machine: {os.cpu_count()} cores. Rows carry id, label, the embedding and a {FEATURES}-float "
             f"feature column; 10 classes, 5% planted in class {TARGET}. The default detectors "
             f"({', '.join(DEFAULT_DETECTORS)}), default config. "
             f"Scan flags: `{' '.join(scan_args) or '(none: the default engine, in memory, in process)'}`."
             + (f" Each command ran {repeat} times, interleaved; the table gives the fastest wall time of each "
                "and the largest peak RSS." if repeat > 1 else ""), "",
             "The floor is the in-memory engine (same core, no Beam); the reference is a plain numpy screen (read the "
             "Parquet, per-class spectral signature and activation clustering, nothing else).", "",
             "| rows x dim | file MiB | scan s | scan rows/s | scan peak RSS MiB | floor s | floor peak RSS MiB | "
             "reference s | reference peak RSS MiB | scan/floor | scan/reference | recall (scan/floor/ref) | "
             "FPR (scan/floor/ref) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, dim in sizes:
        data = workdir / f"data-{n}x{dim}.parquet"
        poison = generate(data, n, dim)
        mib = data.stat().st_size / 2**20
        print(f"generated {n}x{dim}: {mib:.0f} MiB", file=sys.stderr, flush=True)
        scan_out, floor_out = workdir / f"scan-{n}x{dim}", workdir / f"floor-{n}x{dim}"
        ref_out = workdir / f"reference-{n}x{dim}"
        runs: dict[str, list[tuple[float, float]]] = {"scan": [], "floor": [], "reference": []}
        for _ in range(repeat):  # interleaved, so that a busy minute on a shared machine hits all three
            scan_s, scan_rss, code = measure([exe, "scan", str(data), "--out", str(scan_out), "--quiet",
                                              "--provenance-log", str(workdir / "prov.jsonl"), *scan_args])
            assert code in (0, 1), f"scan failed with {code}"
            runs["scan"].append((scan_s, scan_rss))
            for name, out in (("floor", floor_out), ("reference", ref_out)):
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, code = measure([sys.executable, __file__, f"--{name}", str(data), str(out)])
                assert code == 0, f"{name} failed"
                runs[name].append((wall, rss))
        (scan_s, scan_rss), (floor_s, floor_rss), (ref_s, ref_rss) = (
            (min(w for w, _ in runs[k]), max(r for _, r in runs[k])) for k in ("scan", "floor", "reference"))
        if repeat > 1:
            print(f"{n}x{dim} walls: " + "; ".join(f"{k} {', '.join(f'{w:.1f}' for w, _ in v)}"
                                                     for k, v in runs.items()), file=sys.stderr, flush=True)
        (r_scan, f_scan), (r_floor, f_floor) = quality(scan_out, poison), quality(floor_out, poison)
        r_ref, f_ref = quality(ref_out, poison)
        lines.append(f"| {n:,} x {dim} | {mib:.0f} | {scan_s:.1f} | {n / scan_s:,.0f} | {scan_rss:.0f} | "
                     f"{floor_s:.1f} | {floor_rss:.0f} | {ref_s:.1f} | {ref_rss:.0f} | {scan_s / floor_s:.2f} | "
                     f"{scan_s / ref_s:.2f} | {r_scan:.3f} / {r_floor:.3f} / {r_ref:.3f} | "
                     f"{100 * f_scan:.3f}% / {100 * f_floor:.3f}% / {100 * f_ref:.3f}% |")
        print(lines[-1], file=sys.stderr, flush=True)
        for p in (data, scan_out, floor_out, ref_out):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000x128,1000000x128,3000000x128,1000000x512")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--scan-args", default="", help="extra flags for poisonguard scan (e.g. the runner)")
    parser.add_argument("--out", default=str(RESULTS), help="results file: the tables are appended to it")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each command per size (fastest kept)")
    parser.add_argument("--floor", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--reference", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor(*args.floor)
        return
    if args.reference:
        reference(*args.reference)
        return
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="poisonguard-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    text = run(sizes, workdir, args.scan_args.split(), args.repeat)
    import torch

    if torch.cuda.is_available():  # the same sizes with the score pass (and any model) on the GPU
        cuda = run(sizes, workdir, args.scan_args.split() + ["--set", "scoring_device=cuda",
                                                              "--set", "embedding.device=cuda"], args.repeat)
        text += "\n## With `scoring_device: cuda`\n\n" + cuda.split("\n", 2)[2]
    else:
        text += "\nNo CUDA device on this machine: on a GPU machine the same command adds the cuda rows.\n"
    print(text)
    out = Path(args.out)
    if out.exists() and out.read_text().strip():  # the results file is a history: each run is appended
        title = text.split("\n", 1)[0].lstrip("# ")
        text = f"\n## {title}: `scale.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')})\n" + text.split("\n", 1)[1]
        with out.open("a") as handle:
            handle.write(text)
    else:
        out.write_text(text)


if __name__ == "__main__":
    main()
