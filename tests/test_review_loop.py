"""The reviewer loop: report in a real browser, review.csv -> review -> a second scan that honours it, drift."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import (DIGITS_CONFIG, POISONED, TRUTH, error_lines, read_outputs, read_review, run_cli, scan_page,
                      write, write_rows)

REPORT_SETTINGS = ["--set", "report.image_column=pixels", "--set", "report.image_shape=[8, 8]"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "Chromium is required for the report test (make test installs Debian's chromium)"
    return exe


@pytest.fixture(scope="module")
def first_scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    code, _, stderr = run_cli("scan", POISONED, "--out", root / "run1", "--config", DIGITS_CONFIG,
                              "--state", root / "state", "--quiet", *REPORT_SETTINGS)
    assert code == 0, stderr
    return root


def test_report_renders_in_headless_chromium(first_scan, tmp):
    report = first_scan / "run1" / "report.html"
    html_text = report.read_text()
    assert "http://" not in html_text and "https://" not in html_text  # self-contained
    exe = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([exe, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-loaded="ok"' in dom.stdout
    assert 'data-broken-images="0"' in dom.stdout
    images = int(dom.stdout.split('data-images="')[1].split('"')[0])
    assert images >= 4  # overview, score distributions, projection, thumbnails
    assert 'id="rows-in">1797<' in dom.stdout and "Class 0" in dom.stdout
    shot = tmp / "report.png"
    run = subprocess.run([exe, *flags, "--window-size=1200,1800", f"--screenshot={shot}", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 1000 and pixels.std() > 0.05  # a rendered page, not a blank one


def test_report_command_rerenders_the_same_page_from_the_clean_rows(first_scan):
    """The scan's report took its clean sample from the score pass's candidates; the re-render reads
    every clean row: the same page."""
    report = first_scan / "run1" / "report.html"
    page = report.read_text()
    report.unlink()
    code, stdout, stderr = run_cli("report", first_scan / "run1")
    assert code == 0 and report.exists() and str(report) in stdout and "warning" not in stderr
    assert scan_page(report.read_text()) == page and 'id="integrity"' not in page
    assert "class-section" in page
    assert f"poisonguard review {(first_scan / 'run1').resolve()} --decisions review.csv" in page
    elsewhere = first_scan / "elsewhere"
    code, stdout, _ = run_cli("report", first_scan / "run1", "--to", elsewhere)
    assert code == 0 and stdout.strip() == str(elsewhere / "report.html")
    assert (elsewhere / "report.html").read_text() == report.read_text()
    assert (elsewhere / "review.csv").read_bytes() == (first_scan / "run1" / "review.csv").read_bytes()


def _fill(review_csv, decisions):
    rows = read_review(review_csv)
    for row in rows:
        if row["id"] in decisions:
            row["decision"], row["note"] = decisions[row["id"]], "checked by hand"
    write_rows(review_csv, rows)
    return rows


def test_review_then_rescan_honours_decisions(first_scan, tmp):
    run1, state = first_scan / "run1", first_scan / "state"
    truth = pq.read_table(TRUTH).to_pandas().set_index("id")
    review_rows = read_review(run1 / "review.csv")
    held_ids = [r["id"] for r in review_rows]
    poisoned = [i for i in held_ids if truth.loc[i, "poisoned"]]
    false_alarms = [i for i in held_ids if not truth.loc[i, "poisoned"]]
    assert len(poisoned) >= 5  # the sample's scan may hold no clean row; a reviewer may release any held row
    confirm, release = poisoned[:3], (false_alarms + poisoned[3:])[:2]
    decided = tmp / "review.csv"
    shutil.copy(run1 / "review.csv", decided)
    _fill(decided, {**{i: "confirm" for i in confirm}, **{i: "release" for i in release}})
    log = first_scan / "poisonguard-provenance.jsonl"  # one long-lived log backs the decisions
    before = {p: p.read_bytes() for p in [log, *state.rglob("*")] if p.is_file()}
    code, stdout, stderr = run_cli("review", run1, "--decisions", decided, "--reviewer", "ada", "--dry-run")
    assert code == 0, stderr
    assert "dry run, nothing written" in stdout and "2 release and 3 confirm decision(s) would be recorded" in stdout
    assert {p: p.read_bytes() for p in [log, *state.rglob("*")] if p.is_file()} == before
    code, stdout, stderr = run_cli("review", run1, "--decisions", decided, "--reviewer", "ada")
    assert code == 0, stderr
    assert "recorded 2 release and 3 confirm" in stdout

    # edit one released row: it must be scored afresh, not let through on the old decision
    table = pq.read_table(POISONED)
    ids = table.column("id").to_pylist()
    edited_row = ids.index(release[1])
    pixels = table.column("pixels").to_pylist()
    pixels[edited_row] = [v + 1.0 for v in pixels[edited_row]]
    edited = table.set_column(table.schema.get_field_index("pixels"), "pixels",
                              pa.array(pixels, table.schema.field("pixels").type))
    data = write(edited, tmp / "digits_next_cycle.parquet")

    # detectors that miss everything: confirmed rows must still be held back
    code, _, stderr = run_cli("scan", data, "--out", tmp / "run2", "--config", DIGITS_CONFIG, "--state", state,
                              "--provenance-log", log, "--quiet",
                              "--set", "detectors=[{name: spectral, params: {min_separation: 1000}}]")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run2")
    held_reasons = dict(zip(held.column("id").to_pylist(), held.column("quarantine_reasons").to_pylist()))
    for row_id in confirm:
        assert held_reasons[row_id] == ["review:confirmed"]
    summary = json.loads((tmp / "run2" / "summary.json").read_text())
    assert summary["review"]["confirmed"] == 3

    # default detectors: the unedited released row goes to clean, the edited one is judged afresh
    code, _, stderr = run_cli("scan", data, "--out", tmp / "run3", "--config", DIGITS_CONFIG, "--state", state,
                              "--provenance-log", log, "--quiet")
    assert code == 0, stderr
    clean, held = read_outputs(tmp / "run3")
    clean_ids = set(clean.column("id").to_pylist())
    assert release[0] in clean_ids
    assert json.loads((tmp / "run3" / "summary.json").read_text())["review"]["released"] >= 1
    scores = {r["id"]: r for r in (clean.to_pylist() + held.to_pylist()) if r["id"] == release[1]}
    assert np.isfinite(scores[release[1]]["score_spectral"])
    log = [json.loads(line) for line in (first_scan / "poisonguard-provenance.jsonl").read_text().splitlines()]
    reviews = [e for e in log if e["job"]["name"] == "review"]
    assert reviews and reviews[-1]["run"]["facets"]["poisonguard_review"]["reviewer"] == "ada"


@pytest.mark.parametrize("bad,needle", [
    ({"digit-99999": "release"}, "is not in this run"),
    ({"digit-00001": "release"}, "is in this run's clean output, not its quarantine"),
    (None, "is not release or confirm"),
])
def test_bad_decisions_are_rejected_and_nothing_is_applied(first_scan, tmp, bad, needle):
    run1 = first_scan / "run1"
    state = tmp / "fresh-state"
    decided = tmp / "review.csv"
    shutil.copy(run1 / "review.csv", decided)
    first = read_review(decided)[0]["id"]
    rows = _fill(decided, {first: "maybe"} if bad is None else {first: "confirm"})
    if bad:
        rows.append({**rows[0], "id": next(iter(bad)), "decision": bad[next(iter(bad))]})
        write_rows(decided, rows)
    code, _, stderr = run_cli("review", run1, "--decisions", decided, "--reviewer", "bob", "--state", state)
    assert code == 2
    line = error_lines(stderr)[0]
    assert needle in line and "nothing applied" in line
    assert not (state / "decisions.jsonl").exists()


@pytest.mark.parametrize("name,content,needle", [
    ("latin1.csv", "id,decision,note\ndigit-00001,release,caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("long.csv", b"id,decision,note\ndigit-00001,release," + b"x" * 200_000 + b"\n", "not a readable CSV file"),
    ("broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
])
def test_unreadable_decisions_files_are_bad_input(first_scan, tmp, name, content, needle):
    """A decisions file poisonguard cannot read is the reviewer's input to fix (exit 2, one line
    naming the file), not an internal error: each of these once ended in exit 3."""
    path = tmp / name
    path.write_bytes(content)
    state = tmp / "fresh-state"
    code, _, stderr = run_cli("review", first_scan / "run1", "--decisions", path, "--reviewer", "bob", "--state", state)
    assert code == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and needle in lines[0] and name in lines[0] and "Traceback" not in stderr
    assert not (state / "decisions.jsonl").exists()


def test_report_on_a_damaged_quarantine_file_is_exit_2(first_scan, tmp):
    run = tmp / "run"
    shutil.copytree(first_scan / "run1", run)
    next((run / "quarantine").glob("*.parquet")).write_bytes(b"not parquet")
    code, _, stderr = run_cli("report", run)  # checked against the log the summary names
    assert code == 2, stderr
    assert "changed since the run was published" in error_lines(stderr)[0] and "report not rendered" in stderr
    code, _, stderr = run_cli("report", run, "--provenance-log", tmp / "elsewhere.jsonl")  # no log to check against
    assert code == 2, stderr
    assert "quarantine files are unreadable" in error_lines(stderr)[0] and "NOT checked" in stderr


def test_report_shows_quarantine_rows_only_as_the_log_recorded_them(first_scan, tmp):
    """Rows taken out of a quarantine file after the scan (to hide them from reviewers) fail the
    re-render; a run moved away from its log renders with a warning on the page and on stderr."""
    run = tmp / "run"
    shutil.copytree(first_scan / "run1", run)
    part = next((run / "quarantine").glob("*.parquet"))
    pq.write_table(pq.read_table(part).slice(1), part)
    code, _, stderr = run_cli("report", run)
    assert code == 2 and "changed since the run was published" in error_lines(stderr)[0]
    assert (run / "report.html").read_bytes() == (first_scan / "run1" / "report.html").read_bytes()  # not rewritten
    shutil.copytree(first_scan / "run1", tmp / "moved")
    code, _, stderr = run_cli("report", tmp / "moved", "--provenance-log", tmp / "elsewhere.jsonl")
    assert code == 0 and "NOT checked against the provenance log" in stderr
    assert '<div class="warn" id="integrity">quarantine files NOT checked' in (tmp / "moved" / "report.html").read_text()


@pytest.mark.parametrize("summary,needle", [("{broken", "summary.json is unreadable"),
                                             ("[" * 100_000 + "]" * 100_000, "summary.json is unreadable"),
                                             ('{"run_id": "x"}', "lacks 'parameters'")])
def test_a_damaged_run_summary_is_bad_input_to_review_and_report(first_scan, tmp, summary, needle):
    run = tmp / "run"
    shutil.copytree(first_scan / "run1", run)
    (run / "summary.json").write_text(summary)
    for args in (["report", run], ["review", run, "--decisions", run / "review.csv", "--reviewer", "bob",
                                   "--state", tmp / "state"]):
        code, _, stderr = run_cli(*args)
        assert code == 2, stderr
        lines = error_lines(stderr)
        assert len(lines) == 1 and needle in lines[0] and "summary.json" in lines[0]


def test_drift_reported_when_a_class_share_doubles_and_not_on_a_rerun(tmp):
    table = pq.read_table(POISONED)
    state = tmp / "state"
    args = ["--config", DIGITS_CONFIG, "--state", state, "--quiet"]
    assert run_cli("scan", POISONED, "--out", tmp / "a", *args)[0] == 0
    assert run_cli("scan", POISONED, "--out", tmp / "b", *args)[0] == 0
    rerun = json.loads((tmp / "b" / "summary.json").read_text())["drift"]
    assert rerun["previous_run"] and rerun["warnings"] == []
    labels = np.asarray(table.column("label"))
    keep = np.flatnonzero(labels != 3)
    threes = np.flatnonzero(labels == 3)
    copies = [table.take(threes).set_column(0, "id", pa.array([f"{i}-copy{k}" for i in
                                                              table.take(threes).column("id").to_pylist()]))
              for k in range(2)]
    doubled = pa.concat_tables([table.take(keep), table.take(threes), *copies])  # share 9.9% -> 24.8%
    assert run_cli("scan", write(doubled, tmp / "shifted.parquet"), "--out", tmp / "c", *args)[0] in (0, 1)
    drift = json.loads((tmp / "c" / "summary.json").read_text())["drift"]
    share = [w for w in drift["warnings"] if w["kind"] == "share"]
    assert [w["class"] for w in share] == ["3"]
    assert share[0]["ratio"] >= 2.0
    complete = [json.loads(line) for line in (tmp / "c" / "provenance.jsonl").read_text().splitlines()][-1]
    assert complete["run"]["facets"]["poisonguard_findings"]["drift"]["warnings"]
    assert "Drift since run" in (tmp / "c" / "report.html").read_text()


def test_a_damaged_state_folder_baseline_is_reported_and_the_scan_goes_on(tmp):
    """Drift and the run-to-run comparison are advisory: a damaged baseline or previous quarantine
    in the state folder is said in summary.json and the log, and the scan publishes as usual (each
    damage here was an internal error, exit 3)."""
    state = tmp / "state"
    args = ["--config", DIGITS_CONFIG, "--state", state, "--quiet"]
    assert run_cli("scan", POISONED, "--out", tmp / "a", *args)[0] == 0
    latest = (state / "latest").read_text().strip()
    (state / "runs" / f"{latest}.json").write_text('{"0": {"share": "a lot"}}')
    (state / "runs" / f"{latest}.quarantine.parquet").write_bytes(b"not parquet")
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "b", *args)
    assert code == 0, stderr
    summary = json.loads((tmp / "b" / "summary.json").read_text())
    assert summary["drift"]["warnings"] == [] and summary["drift"]["note"].startswith("the baseline is damaged")
    assert summary["run_to_run"]["note"].startswith("the previous quarantine in the state folder is damaged")
    assert "baseline is damaged" in stderr
    (state / "latest").write_bytes(b"\xff\xfe")  # a latest-run name that is not text finds no run
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "c", *args)
    assert code == 0, stderr
