"""report.html: one self-contained page (plots inline as PNG) a reviewer can read in a minute.

Rendered from what a run folder holds: summary.json, quarantine/ (every held-back row) and a
bounded per-class sample of clean/ (the rows with the smallest seeded id hash), so the cost is
bounded whatever the dataset size.  ``poisonguard report RUN_DIR`` re-renders it.
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PART = re.compile(r"part-(\d+)-\d+\.parquet$")


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _read_folder(folder: str, columns: list[str], sources: list[str]) -> pa.Table:
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        table = pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names])
        match = PART.search(path)
        source = sources[int(match.group(1))] if match and int(match.group(1)) < len(sources) else ""
        parts.append(table.append_column("_source", pa.array([source] * table.num_rows, pa.string())))
    return pa.concat_tables(parts) if parts else pa.table({})


def _clean_sample(folder: str, columns: list[str], label_col: str, id_col: str, per_class: int) -> pa.Table:
    """At most ``per_class`` clean rows per class: those with the smallest hash of their id."""
    from pipelines.validation import hash_strings

    kept: pa.Table | None = None
    for path in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        names = pq.read_schema(path).names
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=[c for c in columns if c in names]):
            table = pa.Table.from_batches([batch])
            table = table.append_column("_key", pa.array(hash_strings(
                np.asarray(table.column(id_col).cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object))))
            kept = table if kept is None else pa.concat_tables([kept, table])
            kept = _bottom_per_class(kept, label_col, per_class)
    return kept if kept is not None else pa.table({})


def _bottom_per_class(table: pa.Table, label_col: str, per_class: int) -> pa.Table:
    frame = table.select([label_col, "_key"]).to_pandas()
    frame["_row"] = np.arange(len(frame))
    rows = frame.sort_values("_key").groupby(label_col, sort=False, dropna=False).head(per_class)["_row"].to_numpy()
    return table.take(np.sort(rows))


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
    from pipelines.config import EmbeddingConfig
    from pipelines.embed import Embedder

    emb = EmbeddingConfig.model_validate(params["embedding"])
    model = os.path.join(run_dir, "proxy_model.pt") if info["source"] == "proxy" else emb.model
    if not model or not os.path.exists(model) or emb.features not in table.column_names:
        return None
    n_features = len(next(v for v in table.column(emb.features).to_pylist() if v is not None))
    column, _ = Embedder(model, emb, n_features, "cpu")(table.column(emb.features))
    return np.stack([np.asarray(v, dtype=np.float32) if v is not None else np.full(column.type.list_size, np.nan)
                     for v in column.to_pylist()])


def render_report(run_dir: str) -> str:
    """Write RUN_DIR/report.html and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    summary = json.loads(Path(run_dir, "summary.json").read_text())
    params = summary["parameters"]
    cols, report_cfg = params["columns"], params.get("report", {})
    detectors = [d["name"] for d in params["detectors"]]
    sources = [i["path"] for i in summary["inputs"]]
    image_col = report_cfg.get("image_column")
    wanted = [cols["id"], cols["label"], cols["embedding"], *(f"score_{d}" for d in detectors), "quarantine_reasons"]
    if params.get("embedding", {}).get("features"):
        wanted.append(params["embedding"]["features"])
    if image_col:
        wanted.append(image_col)
    held = _read_folder(os.path.join(run_dir, "quarantine"), wanted, sources)
    clean = _clean_sample(os.path.join(run_dir, "clean"), wanted, cols["label"], cols["id"],
                          report_cfg.get("max_points_per_class", 1500))
    classes = _classes_with_findings(summary, detectors)
    sections = [_class_section(label, summary, held, clean, detectors, cols, report_cfg, run_dir)
                for label in classes[: report_cfg.get("max_classes", 20)]]
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template("report.html.j2").render(
        summary=summary, counts=summary["counts"], sections=sections, detectors=detectors,
        drift=summary.get("drift") or {}, overview=_overview_plot(summary),
        hidden_classes=max(0, len(classes) - len(sections)))
    path = os.path.join(run_dir, "report.html")
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
    import matplotlib.pyplot as plt

    per_class = summary["per_class"]
    labels = list(per_class)
    clean = [per_class[c]["clean"] for c in labels]
    held = [per_class[c]["quarantined"] for c in labels]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(labels) + 2), 2.6))
    ax.bar(labels, clean, color="#9bb7d4", label="clean")
    ax.bar(labels, held, bottom=clean, color="#d9534f", label="quarantined")
    ax.set_ylabel("rows")
    ax.set_xlabel("class")
    ax.legend(frameon=False, fontsize=8)
    ax.tick_params(axis="x", labelrotation=90 if len(labels) > 20 else 0)
    return _png(fig)


def _class_section(label, summary, held, clean, detectors, cols, report_cfg, run_dir) -> dict:
    import matplotlib.pyplot as plt

    label_col = cols["label"]

    def rows_of(table):
        if not table.num_rows:
            return table
        values = np.asarray(table.column(label_col).cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
        return table.filter(pa.array(values == label))

    held_c, clean_c = rows_of(held), rows_of(clean)
    detector_flagged = np.array([any(r.startswith("detector:") or r == "review:confirmed" for r in reasons)
                                 for reasons in held_c.column("quarantine_reasons").to_pylist()], dtype=bool) \
        if held_c.num_rows else np.zeros(0, bool)
    suspects = held_c.filter(pa.array(detector_flagged)) if held_c.num_rows else held_c
    decisions = {d: summary["detectors"].get(d, {}).get("classes", {}).get(label, {}) for d in detectors}

    active = [d for d in detectors if f"score_{d}" in clean_c.column_names]
    fig, axes = plt.subplots(1, max(len(active), 1), figsize=(3.2 * max(len(active), 1), 2.4), squeeze=False)
    for ax, name in zip(axes[0], active):
        c_scores = np.asarray(clean_c.column(f"score_{name}").to_numpy(zero_copy_only=False), dtype=float)
        s_scores = np.asarray(suspects.column(f"score_{name}").to_numpy(zero_copy_only=False), dtype=float) \
            if suspects.num_rows else np.zeros(0)
        both = np.concatenate([c_scores, s_scores])
        both = both[np.isfinite(both)]
        bins = np.linspace(both.min(), both.max(), 40) if len(both) and both.max() > both.min() else 10
        ax.hist(c_scores[np.isfinite(c_scores)], bins=bins, color="#9bb7d4", label="clean (sample)")
        if len(s_scores):
            ax.hist(s_scores[np.isfinite(s_scores)], bins=bins, color="#d9534f", alpha=0.85, label="flagged")
        threshold = decisions[name].get("threshold")
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7, frameon=False)
    distributions = _png(fig)

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
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        ax.scatter(xy[~is_sus, 0], xy[~is_sus, 1], s=5, color="#9bb7d4", label="clean (sample)")
        ax.scatter(xy[is_sus, 0], xy[is_sus, 1], s=9, color="#d9534f", label="flagged")
        ax.set_title("PCA of the class's embeddings", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.tick_params(labelsize=7)
        projection = _png(fig)

    top_n = report_cfg.get("top_suspects", 20)
    order = _suspect_order(suspects, active)
    top = suspects.take(order[:top_n]) if suspects.num_rows else suspects
    table_rows = [{
        "id": row[cols["id"]], "reasons": ", ".join(row["quarantine_reasons"]), "source": os.path.basename(row["_source"]),
        "scores": [("-" if row.get(f"score_{d}") is None or not np.isfinite(row[f"score_{d}"]) else f"{row[f'score_{d}']:.3g}")
                   for d in active],
    } for row in top.to_pylist()]

    thumbnails = None
    image_col, shape = report_cfg.get("image_column"), report_cfg.get("image_shape")
    if image_col and shape and image_col in top.column_names and top.num_rows:
        typical = clean_c.take(np.arange(min(len(table_rows), 12, clean_c.num_rows)))
        thumbnails = _thumbnails(top.slice(0, 12).column(image_col).to_pylist(),
                                 typical.column(image_col).to_pylist() if typical.num_rows else [], shape)
    return {
        "label": label, "rows": summary["per_class"].get(label, {}).get("rows", 0),
        "quarantined": summary["per_class"].get(label, {}).get("quarantined", 0),
        "flagged": int(suspects.num_rows),
        "decisions": [(d, decisions[d]) for d in detectors if decisions[d]],
        "distributions": distributions, "projection": projection, "suspects": table_rows,
        "score_names": active, "thumbnails": thumbnails,
    }


def _suspect_order(suspects: pa.Table, active: list[str]) -> np.ndarray:
    if not suspects.num_rows:
        return np.zeros(0, dtype=int)
    ranks = np.zeros(suspects.num_rows)
    for name in active:
        values = np.nan_to_num(np.asarray(suspects.column(f"score_{name}").to_numpy(zero_copy_only=False), float),
                               nan=-np.inf)
        ranks += np.argsort(np.argsort(values))
    reasons = np.array([len(r) for r in suspects.column("quarantine_reasons").to_pylist()])
    return np.lexsort((-ranks, -reasons))


def _thumbnails(suspects: list, typical: list, shape: list[int]) -> str:
    import matplotlib.pyplot as plt

    cols = max(len(suspects), len(typical), 1)
    fig, axes = plt.subplots(2, cols, figsize=(0.8 * cols + 1.2, 2.0), squeeze=False)
    for row, images, title in ((0, suspects, "suspects"), (1, typical, "typical clean")):
        for i in range(cols):
            ax = axes[row][i]
            ax.axis("off")
            if i < len(images) and images[i] is not None:
                img = np.asarray(images[i], dtype=float).reshape(shape)
                img = img[0] if img.ndim == 3 and img.shape[0] == 1 else (np.moveaxis(img, 0, -1) if img.ndim == 3 else img)
                ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None)
        axes[row][0].set_title(title, fontsize=8, loc="left")
    return _png(fig)

