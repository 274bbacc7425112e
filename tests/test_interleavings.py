"""Property: whatever the interleaving of scans, reviews and a scan killed (SIGKILL or SIGTERM) in any
phase, every published run conserves the rows, its clean/ holds no row that the run's fitted
detectors flagged unless a logged review released it, and the provenance log verifies."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from conftest import DIGITS_CONFIG, POISONED, read_outputs, read_review, run_cli, write_rows
from poisonguard import provenance as prov

EXE = str(Path(sys.executable).with_name("poisonguard"))
ROWS = 1797


def _sequence(seed: int, phase: str) -> list[tuple]:
    """Scans and reviews drawn at random around one scan killed (SIGKILL or SIGTERM) a moment after it
    logged ``phase``'s start (fixed delays after the process started had stopped reaching past the
    imports once those took longer than the delays: ~5 s of a 6-7 s subprocess scan here)."""
    rng = random.Random(seed)

    def around() -> list[tuple]:
        return [("scan",) if rng.random() < 0.5 else ("review", rng.randrange(2**16)) for _ in range(rng.randint(0, 2))]

    kill = ("kill", rng.choice([signal.SIGKILL, signal.SIGTERM]), phase, rng.choice([0.0, 0.01, 0.05]))
    return [("scan",), *around(), kill, *around()]


def _released_ever(log: Path) -> set[str]:
    out = set()
    for record in prov.records(str(log)):
        review = record["run"]["facets"].get("poisonguard_review")
        if review:
            out |= {d["id"] for d in review["decisions"] if d["decision"] == "release"}
    return out


def _check(out: Path, log: Path) -> None:
    assert prov.verify(str(log))[0]
    if not out.exists():
        return
    assert (out / "_SUCCESS").exists()
    clean, held = read_outputs(out)
    ids = clean.column("id").to_pylist() + held.column("id").to_pylist()
    assert len(ids) == ROWS == len(set(ids))
    summary = json.loads((out / "summary.json").read_text())
    released = _released_ever(log)
    for name, report in summary["detectors"].items():
        for label, decision in report["classes"].items():
            if not decision["suspicious"]:
                continue
            rows = clean.filter(pc.equal(clean.column("label"), int(label)))
            over = rows.filter(pc.greater(rows.column(f"score_{name}"), decision["threshold"]))
            assert set(over.column("id").to_pylist()) <= released, (name, label)


def _review(out: Path, state: Path, seed: int, tmp: Path) -> None:
    if not out.exists():
        return
    rows = read_review(out / "review.csv")
    if not rows:
        return
    rng = random.Random(seed)
    for row in rng.sample(rows, min(len(rows), 4)):
        row["decision"] = rng.choice(["release", "confirm"])
    path = write_rows(tmp / f"decisions-{seed}.csv", rows)
    code, _, stderr = run_cli("review", out, "--decisions", path, "--reviewer", "prop", "--state", state)
    assert code == 0, stderr


def _killed_scan(out: Path, state: Path, sig: int, phase: str, delay: float) -> None:
    proc = subprocess.Popen([EXE, "scan", str(POISONED), "--out", str(out), "--config", str(DIGITS_CONFIG),
                             "--state", str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stderr:  # the progress log: "[poisonguard] fit: start"
        if f"] {phase}: start" in line:
            time.sleep(delay)
            break
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.stderr.close()
    proc.wait(timeout=120)


@pytest.mark.parametrize("seed, phase", [(0, "plan"), (1, "score"), (2, "publish")])
def test_random_interleavings_of_scan_review_and_kill_keep_every_invariant(tmp_path_factory, seed, phase):
    steps = _sequence(seed, phase)
    tmp = tmp_path_factory.mktemp("interleave")
    out, state, log = tmp / "runs" / "run", tmp / "state", tmp / "runs" / "poisonguard-provenance.jsonl"
    for step in steps:
        if step[0] == "scan":
            code, _, stderr = run_cli("scan", POISONED, "--out", out, "--config", DIGITS_CONFIG, "--quiet",
                                      "--state", state)
            assert code == 0, stderr
            assert not [p for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]
        elif step[0] == "review":
            _review(out, state, step[1], tmp)
        else:
            _killed_scan(out, state, step[1], step[2], step[3])
        _check(out, log)
    code, _, stderr = run_cli("scan", POISONED, "--out", out, "--config", DIGITS_CONFIG, "--quiet", "--state", state)
    assert code == 0, stderr
    _check(out, log)
