"""report.html: one self-contained page (plots inline as SVG) a reviewer can read in a minute.

Rendered from what a run folder holds: summary.json, quarantine/ (every held-back row) and a
bounded sample of clean/ in each class with findings (the rows with the smallest seeded id hash).  In
a scan the score pass has kept that sample's candidates (``core.report_sample``), so the report does
not read the clean rows; ``poisonguard report RUN_DIR`` re-renders it from clean/.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard import plots
from poisonguard.core import copies
from poisonguard.run.summary import canary_kind, proxy_line
from poisonguard.names import CLEAN, DETECTOR, PROXY_MODEL, QUARANTINE, QUARANTINE_REASONS, REPORT, REPORT_SAMPLE, \
    REVIEW_CONFIRMED, SUMMARY, WORK, detector_reason, input_labels, part_source, score_column

MAX_FLAGGED_POINTS = 1500
MAX_THUMBNAILS = 12

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def _read_folder(folder: str, columns: list[str], sources: list[str]) -> pa.Table:
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        table = pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names])
        index = part_source(os.path.basename(path))
        source = sources[index] if index is not None and index < len(sources) else ""
        parts.append(table.append_column("_source", pa.array([source] * table.num_rows, pa.string())))
    return pa.concat_tables(parts) if parts else pa.table({})


def _clean_sample(folder: str, columns: list[str], label_col: str, id_col: str, per_class: int, seed: int,
                  classes: list[str], clean_rows: dict, candidates: str | None = None) -> pa.Table:
    """A seeded random sample of at most ``per_class`` clean rows of each of ``classes`` (labels as the
    summary spells them): those with the smallest seeded hash of their id (the same rows whatever the
    order of the part files).  ``candidates``: the folder where the score pass kept them
    (``core.report_sample``); used where it holds every class's sample (by ``clean_rows``, the
    summary's clean count per class), else every clean row is read."""
    if not classes:
        return pa.table({})
    if candidates and os.path.isdir(candidates):
        sample = _bottom(_read_parts(candidates, columns, label_col, classes), id_col, label_col, per_class, seed)
        found = Counter(_labels(sample, label_col)) if sample.num_rows else Counter()
        if all(found[c] >= min(per_class, clean_rows.get(c, 0)) for c in classes):
            return sample
    return _bottom(_read_parts(folder, columns, label_col, classes), id_col, label_col, per_class, seed)


def _read_parts(folder: str, columns: list[str], label_col: str, classes: list[str]) -> pa.Table:
    parts, wanted = [], set(classes)
    for path in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in columns if c in names])
        parts.append(table.filter(pa.array(np.isin(_labels(table, label_col), list(wanted)))))
    return pa.concat_tables(parts) if parts else pa.table({})


def _labels(table: pa.Table, label_col: str) -> np.ndarray:
    """Labels as the report and the summary spell them."""
    return np.asarray(table.column(label_col).cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)


def _bottom(table: pa.Table, id_col: str, label_col: str, per_class: int, seed: int) -> pa.Table:
    from poisonguard.core.report_sample import bottom_per_class, keys_of

    if not table.num_rows:
        return table
    keys = keys_of(table, id_col, seed)
    return bottom_per_class(table.append_column("_key", pa.array(keys)), keys, label_col, per_class)


def _embeddings(table: pa.Table, summary: dict, run_dir: str) -> np.ndarray | None:
    info, params = summary.get("embedding", {}), summary["parameters"]
    if not table.num_rows:
        return None
    if info.get("source", "column") == "column":
        col = params["columns"]["embedding"]
        if col not in table.column_names:
            return None
        values = table.column(col).to_numpy(zero_copy_only=False)
        return np.stack([np.asarray(v, dtype=np.float32) if v is not None else np.full(info["dim"], np.nan)
                         for v in values])
    from poisonguard.config import EmbeddingConfig
    from poisonguard.embed import Embedder

    emb = EmbeddingConfig.model_validate(params["embedding"])
    model = os.path.join(run_dir, PROXY_MODEL) if info["source"] == "proxy" else emb.model
    if not model or not os.path.exists(model) or emb.features not in table.column_names:
        return None
    n_features = len(next(v for v in table.column(emb.features).to_pylist() if v is not None))
    column, _ = Embedder(model, emb, n_features, "cpu")(table.column(emb.features))
    return np.stack([np.asarray(v, dtype=np.float32) if v is not None else np.full(column.type.list_size, np.nan)
                     for v in column.to_pylist()])


@functools.cache
def _template():
    """The report's compiled template, once per process (compiling it took a tenth of a second a scan)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2")


def render_report(run_dir: str, table: dict | None = None, summary: dict | None = None,
                  integrity: dict | None = None, out_dir: str | None = None, shown_as: str = "RUN_DIR") -> str:
    """Write RUN_DIR/report.html (or ``out_dir``/report.html) and return its path; ``table``: the
    workbench's quarantine table, ``summary``: the run's summary (read from RUN_DIR/summary.json when not given); ``integrity``: a
    re-render's check of the quarantine files against the log ({checked, line}); ``shown_as``: the run
    folder as a reviewer names it to ``poisonguard review`` (its published path or URI).  A scan renders it in
    its staging folder, where the score pass's clean-sample candidates still are; a re-render of a
    published run reads the clean rows."""
    summary = summary if summary is not None else json.loads(Path(run_dir, SUMMARY).read_text())
    params = summary["parameters"]
    cols, report_cfg = params["columns"], params.get("report", {})
    detectors = [d["name"] for d in params["detectors"]]
    sources = input_labels([i["path"] for i in summary["inputs"]])
    image_col = report_cfg.get("image_column")
    wanted = [cols["id"], cols["label"], cols["embedding"], *(score_column(d) for d in detectors), QUARANTINE_REASONS]
    if params.get("embedding", {}).get("features"):
        wanted.append(params["embedding"]["features"])
    if image_col:
        wanted.append(image_col)
    held = _read_folder(os.path.join(run_dir, QUARANTINE), wanted, sources)
    classes = _classes_with_findings(summary, detectors)
    shown = classes[: report_cfg.get("max_classes", 20)]
    clean = _clean_sample(os.path.join(run_dir, CLEAN), wanted, cols["label"], cols["id"],
                          report_cfg.get("max_points_per_class", 1500), params.get("seed", 0), shown,
                          {c: v.get("clean", 0) for c, v in summary["per_class"].items()},
                          os.path.join(run_dir, WORK, REPORT_SAMPLE))
    sections = [_class_section(label, summary, held, clean, detectors, cols, report_cfg, run_dir)
                for label in classes[: report_cfg.get("max_classes", 20)]]
    if table is None:
        from poisonguard.workbench import build_table

        table = build_table(run_dir, summary)
    page = _template().render(
        summary=summary, counts=summary["counts"], sections=sections, detectors=detectors,
        drift=summary.get("drift") or {}, overview=_overview_plot(summary),
        hidden_classes=max(0, len(classes) - len(sections)), table=table,
        proxy_line=proxy_line(summary.get("embedding") or {}),
        canary_kind=canary_kind(summary["canaries"]) if summary.get("canaries") else "",
        copies_line=copies.line(summary.get("copies")),
        run_to_run=summary.get("run_to_run") or {}, integrity=integrity, run_dir=shown_as)
    path = os.path.join(out_dir or run_dir, REPORT)
    Path(path).write_text(page, encoding="utf-8")
    return path


def _classes_with_findings(summary: dict, detectors: list[str]) -> list[str]:
    flagged = set()
    for name in detectors:
        for label, decision in summary["detectors"].get(name, {}).get("classes", {}).items():
            if decision.get("suspicious"):
                flagged.add(label)
    return sorted(flagged, key=lambda c: -summary["per_class"].get(c, {}).get("quarantined", 0))


def _overview_plot(summary: dict) -> str:
    per_class = summary["per_class"]
    labels = list(per_class)
    return plots.data_uri(plots.stacked_bars(labels, [per_class[c]["clean"] for c in labels],
                                             [per_class[c]["quarantined"] for c in labels]))


def _floats(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=float)


def _class_section(label, summary, held, clean, detectors, cols, report_cfg, run_dir) -> dict:
    label_col = cols["label"]

    def rows_of(table):
        if not table.num_rows:
            return table
        values = np.asarray(table.column(label_col).cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
        return table.filter(pa.array(values == label))

    held_c, clean_c = rows_of(held), rows_of(clean)
    reasons = held_c.column(QUARANTINE_REASONS).to_pylist() if held_c.num_rows else []
    detector_flagged = np.array([any(r.startswith(DETECTOR) or r == REVIEW_CONFIRMED for r in rs) for rs in reasons],
                                dtype=bool)
    suspects = held_c.filter(pa.array(detector_flagged)) if held_c.num_rows else held_c
    decisions = {d: summary["detectors"].get(d, {}).get("classes", {}).get(label, {}) for d in detectors}

    active = [d for d in detectors if score_column(d) in clean_c.column_names]
    distributions = []
    for name in active:
        own = np.array([detector_reason(name) in rs for rs in reasons], dtype=bool)
        flagged = _floats(held_c.filter(pa.array(own)), score_column(name)) if own.any() else np.zeros(0)
        distributions.append(plots.data_uri(plots.histogram(
            _floats(clean_c, score_column(name)), flagged, decisions[name].get("threshold"), name)))

    projection = None
    emb_clean = _embeddings(clean_c, summary, run_dir)
    emb_sus = _embeddings(suspects, summary, run_dir) if suspects.num_rows else None
    if emb_clean is not None and len(emb_clean) > 2:
        x = emb_clean if emb_sus is None else np.vstack([emb_clean, emb_sus])
        ok = np.isfinite(x).all(axis=1)
        centred = x[ok] - x[ok].mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.column_stack([centred @ vt[:1].T, np.zeros(len(centred))])
        is_sus = np.r_[np.zeros(len(emb_clean), bool), np.ones(0 if emb_sus is None else len(emb_sus), bool)][ok]
        projection = plots.data_uri(plots.scatter(xy[~is_sus], xy[is_sus][:MAX_FLAGGED_POINTS],
                                                  "PCA of the class's embeddings"))

    top_n = report_cfg.get("top_suspects", 20)
    order = _suspect_order(suspects, active)
    top = suspects.take(order[:top_n]) if suspects.num_rows else suspects
    table_rows = [{
        "id": row[cols["id"]], "reasons": ", ".join(row[QUARANTINE_REASONS]), "source": row["_source"],
        "scores": [("-" if row.get(score_column(d)) is None or not np.isfinite(row[score_column(d)])
                    else f"{row[score_column(d)]:.3g}") for d in active],
    } for row in top.to_pylist()]

    thumbnails = None
    image_col, shape = report_cfg.get("image_column"), report_cfg.get("image_shape")
    if image_col and shape and image_col in top.column_names and top.num_rows:
        shown = top.slice(0, MAX_THUMBNAILS)
        typical = clean_c.take(np.arange(min(MAX_THUMBNAILS, clean_c.num_rows)))  # seeded random (see _clean_sample)
        thumbnails = _thumbnails(shown, typical, image_col, cols["id"], shape)
    return {
        "label": label, "rows": summary["per_class"].get(label, {}).get("rows", 0),
        "quarantined": summary["per_class"].get(label, {}).get("quarantined", 0),
        "flagged": int(suspects.num_rows), "shown": len(table_rows),
        "decisions": [(d, decisions[d]) for d in detectors if decisions[d]],
        "distributions": distributions, "projection": projection, "suspects": table_rows,
        "score_names": active, "thumbnails": thumbnails,
    }


def _suspect_order(suspects: pa.Table, active: list[str]) -> np.ndarray:
    if not suspects.num_rows:
        return np.zeros(0, dtype=int)
    ranks = np.zeros(suspects.num_rows)
    for name in active:
        values = np.nan_to_num(np.asarray(suspects.column(score_column(name)).to_numpy(zero_copy_only=False), float),
                               nan=-np.inf)
        ranks += np.argsort(np.argsort(values))
    reasons = np.array([len(r) for r in suspects.column(QUARANTINE_REASONS).to_pylist()])
    return np.lexsort((-ranks, -reasons))


def _thumbnails(suspects: pa.Table, typical: pa.Table, image_col: str, id_col: str, shape: list[int]) -> dict:
    """One sprite for the suspects and a random sample of the class's clean rows, each labelled by id."""
    rows = [("suspect", r) for r in suspects.select([id_col, image_col]).to_pylist()] + \
           [("clean, random", r) for r in typical.select([id_col, image_col]).to_pylist()]
    rows = [(kind, r) for kind, r in rows if r[image_col] is not None]
    if not rows:
        return None
    uri, width, height = plots.png_sprite([np.asarray(r[image_col], dtype=float).reshape(shape) for _, r in rows])
    cells = [{"kind": kind, "id": r[id_col], "x": i * width} for i, (kind, r) in enumerate(rows)]
    return {"sprite": uri, "width": width, "height": height, "cells": cells}


def render_report_or_stub(run_dir: str, table: dict | None = None, summary: dict | None = None,
                          shown_as: str = "RUN_DIR") -> None:
    """The report is for people: a plotting failure leaves a short page saying so, not a failed scan."""
    import html
    import logging

    from poisonguard.errors import one_line

    try:
        render_report(run_dir, table, summary, shown_as=shown_as)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger("poisonguard").warning("report.html could not be rendered fully: %s", one_line(exc))
        Path(run_dir, REPORT).write_text(
            "<!DOCTYPE html><html><body><h1>poisonguard report</h1><p>The report could not be rendered: "
            f"{html.escape(one_line(exc))}. Run <code>poisonguard report {html.escape(shown_as)}</code> to retry; "
            "summary.json holds every figure.</p></body></html>", encoding="utf-8")
