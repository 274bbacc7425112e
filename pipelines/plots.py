"""The report's plots, drawn as small SVG documents from data (no plotting library).

Each plot's cost is bounded by its bins or its capped points, not by the rows scanned; every text
is escaped, so labels from the data are shown literally.  Thumbnails go into one PNG sprite.
"""

from __future__ import annotations

import base64
import struct
import zlib
from html import escape

import numpy as np

CLEAN, FLAGGED, INK, GRID = "#9bb7d4", "#d9534f", "#333", "#ddd"
FONT = 'font-family="sans-serif" font-size="10"'


def data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _doc(width: int, height: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT}><rect width="100%" height="100%" fill="white"/>'
            + "".join(body) + "</svg>")


def _text(x, y, text, anchor="start", extra="") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{INK}" {extra}>{escape(str(text))}</text>'


def _legend(x, y, items) -> list[str]:
    out = []
    for i, (colour, name) in enumerate(items):
        out.append(f'<rect x="{x}" y="{y + 13 * i - 8}" width="9" height="9" fill="{colour}"/>')
        out.append(_text(x + 13, y + 13 * i, name))
    return out


def stacked_bars(labels: list[str], clean: list[int], held: list[int]) -> str:
    """Rows per class: clean below, quarantined on top."""
    width = max(320, 26 * len(labels) + 70)
    height, left, bottom, top = 190, 50, 150, 12
    peak = max([c + h for c, h in zip(clean, held)] + [1])
    step = (width - left - 10) / max(len(labels), 1)
    body = [f'<line x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" stroke="{INK}"/>',
            _text(left - 4, top + 4, f"{peak}", "end"), _text(left - 4, bottom, "0", "end")]
    for i, (label, c, h) in enumerate(zip(labels, clean, held)):
        x = left + i * step + step * 0.15
        w = step * 0.7
        hc, hh = (bottom - top) * c / peak, (bottom - top) * h / peak
        body.append(f'<rect x="{x:.1f}" y="{bottom - hc:.1f}" width="{w:.1f}" height="{hc:.1f}" fill="{CLEAN}">'
                    f'<title>class {escape(str(label))}: {c} clean</title></rect>')
        if h:
            body.append(f'<rect x="{x:.1f}" y="{bottom - hc - hh:.1f}" width="{w:.1f}" height="{hh:.1f}" '
                        f'fill="{FLAGGED}"><title>class {escape(str(label))}: {h} quarantined</title></rect>')
        if len(labels) <= 40:
            body.append(_text(x + w / 2, bottom + 12, str(label)[:8], "middle"))
    body += _legend(width - 110, top + 6, [(CLEAN, "clean"), (FLAGGED, "quarantined")])
    body.append(_text(left, height - 8, "rows per class"))
    return _doc(width, height, body)


def histogram(clean: np.ndarray, flagged: np.ndarray, threshold: float | None, title: str, bins: int = 40) -> str:
    """A detector's scores in one class: its clean sample and the rows *it* flagged, log counts,
    and the threshold it used."""
    width, height, left, bottom, top = 300, 190, 34, 150, 22
    given = len(clean) + len(flagged)
    clean, flagged = clean[np.isfinite(clean)], flagged[np.isfinite(flagged)]
    body = [_text(width / 2, 13, title, "middle", 'font-weight="bold"')]
    if given and not len(clean) + len(flagged):  # e.g. the k-NN check skips classes it cannot flag
        body.append(_text(width / 2, height / 2, "not scored in this class", "middle"))
        return _doc(width, height, body)
    both = np.concatenate([clean, flagged, [] if threshold is None or not np.isfinite(threshold) else [threshold]])
    if not len(both) or both.max() <= both.min():
        body.append(_text(width / 2, height / 2, "no spread in scores", "middle"))
        return _doc(width, height, body)
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(values, edges)[0] for values in (clean, flagged)]
    peak = np.log10(max(c.max() for c in counts) + 1)
    scale_x = (width - left - 8) / (hi - lo)
    for values, colour in zip(counts, (CLEAN, FLAGGED)):
        for i, n in enumerate(values):
            if n:
                h = (bottom - top) * np.log10(n + 1) / peak
                body.append(f'<rect x="{left + (edges[i] - lo) * scale_x:.1f}" y="{bottom - h:.1f}" '
                            f'width="{max((edges[1] - edges[0]) * scale_x - 0.5, 0.5):.1f}" height="{h:.1f}" '
                            f'fill="{colour}" fill-opacity="0.85"><title>{n} rows</title></rect>')
    if threshold is not None and np.isfinite(threshold):
        x = left + (threshold - lo) * scale_x
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="black" stroke-dasharray="4 3"/>')
        right = x > width * 0.6
        body.append(_text(x - 3 if right else x + 3, top + 8, f"threshold {threshold:.3g}", "end" if right else "start"))
    body += [f'<line x1="{left}" y1="{bottom}" x2="{width - 8}" y2="{bottom}" stroke="{INK}"/>',
             _text(left, bottom + 12, f"{lo:.3g}"), _text(width - 8, bottom + 12, f"{hi:.3g}", "end"),
             _text(left - 3, top + 4, "log", "end")]
    body += _legend(left + 4, height - 10, [(CLEAN, "clean (sample)")])
    body += _legend(left + 120, height - 10, [(FLAGGED, "flagged by this detector")])
    return _doc(width, height, body)


def scatter(clean_xy: np.ndarray, flagged_xy: np.ndarray, title: str) -> str:
    """A 2-D projection; the caller caps the points."""
    size, pad = 300, 14
    both = np.vstack([clean_xy, flagged_xy]) if len(flagged_xy) else clean_xy
    lo, hi = both.min(axis=0), both.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)

    def px(xy):
        unit = (xy - lo) / span
        return pad + unit[:, 0] * (size - 2 * pad), size - pad - unit[:, 1] * (size - 2 * pad - 16)

    body = [_text(size / 2, 13, title, "middle", 'font-weight="bold"')]
    for xy, colour, r in ((clean_xy, CLEAN, 1.8), (flagged_xy, FLAGGED, 2.6)):
        if len(xy):
            xs, ys = px(xy)
            body.append(f'<g fill="{colour}">' + "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}"/>'
                                                         for x, y in zip(xs, ys)) + "</g>")
    body += _legend(pad, size - 4 - 13, [(CLEAN, "clean (sample)"), (FLAGGED, "flagged")])
    return _doc(size, size, body)


def png_sprite(images: list[np.ndarray], scale: int = 4) -> tuple[str, int, int]:
    """One grayscale PNG holding every image side by side (each scaled to [0, 255] and enlarged
    ``scale`` times); returns the data URI and one cell's width and height in pixels."""
    cells = []
    for img in images:
        img = np.asarray(img, dtype=np.float64)
        img = img.mean(axis=0) if img.ndim == 3 else img
        finite = img[np.isfinite(img)]
        lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
        unit = np.nan_to_num((img - lo) / (hi - lo) if hi > lo else np.zeros_like(img))
        cells.append(np.kron(255 - 255 * unit, np.ones((scale, scale))).astype(np.uint8))
    h, w = cells[0].shape
    sprite = np.hstack(cells)
    raw = b"".join(b"\x00" + row.tobytes() for row in sprite)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", sprite.shape[1], h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode(), w, h
