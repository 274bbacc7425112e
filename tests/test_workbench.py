"""The reviewer's workbench: the full quarantine table in a real browser, review.csv round trips,
run-to-run counts, released rows marked in clean/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import DIGITS_CONFIG, POISONED, gaussian_table, read_outputs, read_review, run_cli, write, write_rows


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert exe, "Chromium is required for the report test (make test installs Debian's chromium)"
    return exe


def _dom(report, query: str = "", fragment: str = "") -> str:
    url = report.as_uri() + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _rows(dom: str) -> list[tuple[str, str]]:
    """(id, full row html) of the rendered table rows."""
    body = dom.split('id="q-table"', 1)[1].split("</tbody>", 1)[0]
    return re.findall(r'<tr id="row-[^"]*" data-id="([^"]*)"[^>]*>(.*?)</tr>', body, re.S)


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A scan, a partial review (3 confirmed, 2 released), and the report re-rendered from the log."""
    root = tmp_path_factory.mktemp("workbench")
    out, state = root / "runs" / "run1", root / "state"
    code, _, stderr = run_cli("scan", POISONED, "--out", out, "--config", DIGITS_CONFIG, "--state", state, "--quiet")
    assert code == 0, stderr
    rows = read_review(out / "review.csv")
    for row, decision in zip(rows, ["confirm"] * 3 + ["release"] * 2):
        row["decision"], row["note"] = decision, "checked"
    code, stdout, stderr = run_cli("review", out, "--decisions", write_rows(root / "d.csv", rows[:5]),
                                   "--reviewer", "ada")
    assert code == 0, stderr
    assert f"{len(rows) - 5} quarantined row(s) still undecided" in stdout
    assert run_cli("report", out)[0] == 0
    return root, out, state, rows


def test_sorting_by_a_score_column_orders_the_rows(reviewed):
    _, out, _, _ = reviewed
    dom = _dom(out / "report.html", "sort=score_spectral&dir=desc")
    rows = _rows(dom)
    assert len(rows) == int(re.search(r'data-total="(\d+)"', dom).group(1)) > 10
    raw = [float(re.search(r'title="raw ([-0-9.e+]+)', cells.split("</td>", 4)[4]).group(1)) for _, cells in rows]
    ratios = [float(m.group(1)) if (m := re.search(r'>([-0-9.e+]+)×<', cells.split("</td>", 5)[4] + "</td>")) else None
              for _, cells in rows]
    keys = [r if r is not None else v for r, v in zip(ratios, raw)]
    assert keys == sorted(keys, reverse=True)


def test_filtering_undecided_after_a_partial_review_shows_exactly_the_undecided_rows(reviewed):
    _, out, _, rows = reviewed
    dom = _dom(out / "report.html", "status=undecided")
    shown = _rows(dom)
    assert {i for i, _ in shown} == {r["id"] for r in rows[5:]}
    assert all(">undecided<" in cells for _, cells in shown)
    confirmed = _rows(_dom(out / "report.html", "status=confirmed"))
    assert {i for i, _ in confirmed} == {r["id"] for r in rows[:3]}
    assert all("ada" in cells and "checked" in cells for _, cells in confirmed)


def test_a_row_anchor_scrolls_to_that_row_even_when_a_filter_hides_it(reviewed):
    _, out, _, rows = reviewed
    target = rows[-1]["id"]
    dom = _dom(out / "report.html", "status=confirmed", f"row-{quote(target, safe='')}")
    assert f'data-target-row="{target}"' in dom
    assert re.search(rf'<tr id="row-{re.escape(quote(target, safe=""))}" data-id="{re.escape(target)}" class="target"',
                     dom)


def test_review_csv_is_in_report_order_with_thresholds_links_and_earlier_decisions(reviewed):
    _, out, _, rows = reviewed
    again = read_review(out / "review.csv")  # re-written by `poisonguard report` after the review
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    assert all(r["report_link"] == f"report.html#row-{quote(r['id'], safe='')}" for r in again)
    assert [r["decision"] for r in again[:5]] == ["confirm"] * 3 + ["release"] * 2
    assert all(r["decision"] == "" for r in again[5:])
    flagged_by = [c[len("threshold_"):] for c, v in again[0].items() if c.startswith("threshold_") and v]
    assert flagged_by and all(len(again[0][f"score_{d}"].split(".")[-1]) <= 4 for d in flagged_by)


def test_a_spreadsheet_saved_review_applies_once_and_a_contradiction_replaces(reviewed, tmp):
    root, out, state, rows = reviewed
    header = ["note", "decision", "id"]  # columns in another order
    lines = [",".join(header)] + [f"from excel,confirm,{rows[6]['id']}", f"from excel,release,{rows[7]['id']}"]
    path = tmp / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")  # UTF-8 BOM and CRLF
    decisions = state / "decisions.jsonl"
    code, stdout, stderr = run_cli("review", out, "--decisions", path, "--reviewer", "bo")
    assert code == 0, stderr
    assert "recorded 1 release and 1 confirm" in stdout
    before = decisions.read_bytes()
    log = root / "runs" / "poisonguard-provenance.jsonl"
    records = len(log.read_text().splitlines())
    code, stdout, _ = run_cli("review", out, "--decisions", path, "--reviewer", "bo")
    assert code == 0 and "recorded 0 release and 0 confirm" in stdout and "2 already recorded" in stdout
    assert decisions.read_bytes() == before and len(log.read_text().splitlines()) == records
    path.write_bytes(f"id,decision\r\n{rows[6]['id']},release\r\n".encode())
    code, stdout, _ = run_cli("review", out, "--decisions", path, "--reviewer", "cy")
    assert code == 0 and "recorded 1 release" in stdout
    logged = [d["decision"] for line in log.read_text().splitlines()
              for d in json.loads(line)["run"]["facets"].get("poisonguard_review", {}).get("decisions", [])
              if d["id"] == rows[6]["id"]]
    assert logged == ["confirm", "release"]  # both in the log; the latest counts
    from poisonguard.state import StateFolder

    backed, _ = StateFolder(str(state)).backed_decisions(str(log))
    assert list(backed[rows[6]["id"]].values()) == ["release"]


def test_run_to_run_counts_and_released_rows_marked_in_clean(tmp):
    table = gaussian_table(200, 5, 6)
    x = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 6).copy()
    x[:12] += 25.0  # twelve rows of class 0 far away
    table = table.set_column(2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel().astype(np.float32)), 6))
    state, runs = tmp / "state", tmp / "runs"
    code, _, stderr = run_cli("scan", write(table, tmp / "a.parquet"), "--out", runs / "one", "--state", state, "--quiet")
    assert code == 0, stderr
    rows = read_review(runs / "one" / "review.csv")
    assert len(rows) >= 12
    for row, decision in zip(rows, ["release", "release", "confirm"]):
        row["decision"] = decision
    assert run_cli("review", runs / "one", "--decisions", write_rows(tmp / "d.csv", rows[:3]), "--reviewer", "ana")[0] == 0
    gone = rows[3]["id"]
    keep = pc.invert(pc.equal(table.column("id"), gone))
    second = table.filter(keep)
    x2 = np.asarray(second.column("embedding").combine_chunks().flatten()).reshape(-1, 6).copy()
    x2[-4:] += 25.0  # four rows of class 4 newly far away (2% of it)
    second = second.set_column(2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x2.ravel().astype(np.float32)), 6))
    code, _, stderr = run_cli("scan", write(second, tmp / "b.parquet"), "--out", runs / "two", "--state", state, "--quiet")
    assert code == 0, stderr
    summary = json.loads((runs / "two" / "summary.json").read_text())
    r2r = summary["run_to_run"]
    assert r2r["previous_run"] == json.loads((runs / "one" / "summary.json").read_text())["run_id"]
    assert r2r["ids"]["resolved_released"] == sorted([rows[0]["id"], rows[1]["id"]])
    assert gone in r2r["ids"]["resolved_gone_or_clean"]
    assert r2r["counts"]["still_undecided"] == len(rows) - 4
    assert second.column("id")[-1].as_py() in r2r["ids"]["newly_quarantined"]
    clean = read_outputs(runs / "two")[0]
    released = clean.filter(pc.equal(clean.column("review_status"), "released")).column("id").to_pylist()
    assert sorted(released) == sorted([rows[0]["id"], rows[1]["id"]])
    page = (runs / "two" / "report.html").read_text()
    assert 'id="r2r-resolved_released">2<' in page


def test_a_large_quarantine_is_paged(tmp):
    from poisonguard.report import render_report

    table = gaussian_table(700, 3, 4)
    code, _, _ = run_cli("scan", write(table, tmp / "t.parquet"), "--out", tmp / "run", "--quiet", "--set", "fail_on=1",
                         "--set", "detectors=[{name: knn_label, params: {min_disagreement: 0.0001, max_share: 0.99}}]",
                         "--set", "embedding.max_abs_value=0.5")  # nearly every row quarantined
    assert code == 0
    render_report(str(tmp / "run"))
    dom = _dom(tmp / "run" / "report.html")
    total = int(re.search(r'data-total="(\d+)"', dom).group(1))
    assert total > 1000 and f'data-shown="{total}"' in dom
    assert len(_rows(dom)) == 200 and "page 1 of" in dom


def test_ids_that_look_like_markup_cannot_break_out_of_the_table_data(tmp):
    import html

    table = gaussian_table(100, 3, 4)
    ids = table.column("id").to_pylist()
    evil = ["</script><script>alert(1)</script>", "<!--<script>", 'a&b"\'']
    ids[:3] = evil
    x = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 4).copy()
    x[:3] += 40.0  # the three rows are flagged, so they are in the table
    table = table.set_column(0, "id", pa.array(ids)).set_column(
        2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel().astype(np.float32)), 4))
    code, _, stderr = run_cli("scan", write(table, tmp / "m.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0, stderr
    page = (tmp / "run" / "report.html").read_text()
    data = page.split('<script type="application/json" id="q-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and set(evil) <= {row[0] for row in json.loads(data)["rows"]}
    dom = _dom(tmp / "run" / "report.html")
    assert 'data-loaded="ok"' in dom
    assert dom.count("<script") == page.count("<script") == 3  # no script element came from the data
    assert set(evil) <= {html.unescape(i) for i, _ in _rows(dom)}
