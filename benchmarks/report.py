"""Report cost: render time and size of report.html, and the time headless Chromium takes to open it,
for the digits sample and for a run whose quarantine holds 100,000 rows.

    python benchmarks/report.py [--rows 100000] [--workdir DIR]

Writes benchmarks/results/report.md.
"""

from __future__ import annotations

import argparse
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
RESULTS = ROOT / "benchmarks" / "results" / "report.md"


def _scan(args: list[str]) -> None:
    from poisonguard.cli import main

    assert main([*map(str, args), "--quiet"]) in (0, 1)


def _measure(run: Path) -> tuple[float, float, float]:
    from poisonguard.report import render_report

    start = time.perf_counter()
    render_report(str(run))
    render = time.perf_counter() - start
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    start = time.perf_counter()
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (run / "report.html").as_uri()], capture_output=True, text=True, timeout=300)
    opened = time.perf_counter() - start
    assert 'data-loaded="ok"' in out.stdout
    return render, (run / "report.html").stat().st_size / 2**20, opened


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workdir")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pg-report-"))
    _scan(["scan", ROOT / "data/samples/digits_poisoned.parquet", "--out", work / "sample",
           "--config", ROOT / "configs/digits.yaml"])
    rng = np.random.default_rng(0)
    n, dim = args.rows, 16
    x = rng.normal(size=(n, dim)).astype(np.float32)
    data = work / "big.parquet"
    pq.write_table(pa.table({"id": [f"row-{i:07d}" for i in range(n)], "label": rng.integers(0, 10, n),
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}), data)
    # every row quarantined: values beyond the configured magnitude, plus the default detectors' scores
    _scan(["scan", data, "--out", work / "big", "--set", "embedding.max_abs_value=1.5", "--set", "fail_on=1"])
    import pyarrow.dataset as pads

    held = pads.dataset(str(work / "big" / "quarantine"), format="parquet").count_rows()
    lines = ["# Report: render time, size and opening time", "",
             "Measured on this repository's 2-core machine: `python benchmarks/report.py`. Render is",
             "poisonguard's own time to write report.html from the run folder; open is headless Chromium loading",
             "the page and running its script (`--dump-dom`, process start included).", "",
             "| run | quarantined rows | render | report.html | open in Chromium |", "|---|---|---|---|---|"]
    for name, rows in (("digits sample (1,797 rows)", None), (f"{n:,} rows", held)):
        run = work / ("sample" if rows is None else "big")
        render, size, opened = _measure(run)
        count = pads.dataset(str(run / "quarantine"), format="parquet").count_rows()
        lines.append(f"| {name} | {count:,} | {render:.2f} s | {size:.1f} MiB | {opened:.2f} s |")
        print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
