"""The token page: one self-contained HTML file (inline CSS; no scripts, fonts or images from anywhere).

Every token of a document is a `<span class="t">` (`class="t s"` when the selection keeps it) whose background
encodes its excess loss (model loss - reference loss) on a diverging scale: blue where the model already does
better than the reference, white near zero, red where the reference is much better (Rho-1 keeps the reddest).
The scale is symmetric, clipped at the 98th percentile of |excess| so one outlier does not wash out the page.
Without reference losses the background encodes the loss itself (white to orange). Each span's `title` (the
tooltip) holds the piece, loss, reference loss, excess and whether it is selected.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#111;
background:#fff;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px;margin:0}
.note{color:#444;font-size:13px;max-width:900px}
.legend{display:flex;align-items:center;gap:14px;flex-wrap:wrap;font-size:13px;margin:12px 0 18px}
.bar{width:320px;height:14px;border:1px solid #999}
.ticks{display:flex;justify-content:space-between;width:322px;font-size:11px;color:#333}
.doc{border:1px solid #ddd;border-radius:6px;margin:14px 0;padding:10px 14px}
.doc summary{cursor:pointer;font-size:13px;color:#333}
.text{white-space:pre-wrap;word-wrap:break-word;overflow-wrap:anywhere;font-family:Menlo,Consolas,
"DejaVu Sans Mono",monospace;font-size:13px;line-height:1.85;margin-top:8px;max-height:640px;overflow-y:auto}
.t{border-radius:2px;padding:1px 0;box-shadow:inset -1px 0 0 #fff}
.t.s,.m.s{box-shadow:inset 0 -2.5px 0 #111,inset -1px 0 0 #fff}
.t:not(.s),.m:not(.s){color:#555}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
"""


@dataclass
class DocView:
    title: str
    pieces: list[str]
    loss: np.ndarray
    ref: np.ndarray | None
    selected: np.ndarray | None


LEVELS = 20  # colour steps on each side of zero


def _diverging(v: float) -> str:
    """v in [-1, 1] -> blue .. white .. red (light enough at the ends for dark text)."""
    a = min(1.0, abs(v))
    light = 97 - 40 * a
    hue = 0 if v > 0 else 215
    return f"hsl({hue},{int(25 + 60 * a)}%,{light:.0f}%)"


def _sequential(v: float) -> str:
    a = min(1.0, max(0.0, v))
    return f"hsl(28,{int(30 + 60 * a)}%,{97 - 40 * a:.0f}%)"


def _color_css(signed: bool) -> str:
    """Classes c0..c{2 LEVELS}: the bucket of a token's value (c{LEVELS} is zero on the diverging scale)."""
    if signed:
        return "".join(f".c{i}{{background:{_diverging((i - LEVELS) / LEVELS)}}}" for i in range(2 * LEVELS + 1))
    return "".join(f".c{i}{{background:{_sequential(i / (2 * LEVELS))}}}" for i in range(2 * LEVELS + 1))


def _bucket(v: float, signed: bool) -> int:
    v = max(-1.0, min(1.0, v)) if signed else max(0.0, min(1.0, v))
    return int(round(v * LEVELS)) + LEVELS if signed else int(round(v * 2 * LEVELS))


def _scale(values: list[np.ndarray], signed: bool) -> float:
    flat = np.concatenate([v for v in values if len(v)]) if values else np.zeros(1)
    flat = np.abs(flat) if signed else flat
    return float(max(np.percentile(flat, 98), 1e-6)) if flat.size else 1.0


def _shown(piece: str) -> str:
    """Whitespace-only tokens stay visible: a newline shows as a return sign before the line break."""
    return piece.replace("\n", "\u21b5\n") if piece else ""


def _token_span(piece: str, loss: float, ref: float | None, sel: bool | None, scale: float) -> str:
    tip = [f"{piece!r}", f"loss {loss:.3f}"]
    if ref is not None:
        tip += [f"ref_loss {ref:.3f}", f"excess {loss - ref:+.3f}"]
        color = _bucket((loss - ref) / scale, True)
    else:
        color = _bucket(loss / scale, False)
    if sel is not None:
        tip.append("selected" if sel else "not selected")
    cls = f"t s c{color}" if sel else f"t c{color}"
    return f'<span class="{cls}" title="{html.escape(chr(10).join(tip))}">{html.escape(_shown(piece))}</span>'



def _legend(scale: float, signed: bool, with_selection: bool) -> str:
    if signed:
        stops = ",".join(_diverging(v) for v in np.linspace(-1, 1, 9))
        ticks = [f"{-scale:.2f}", "0", f"+{scale:.2f}"]
        what = "excess loss = loss - reference loss (nats); red: the reference predicts it much better"
    else:
        stops = ",".join(_sequential(v) for v in np.linspace(0, 1, 9))
        ticks = ["0", f"{scale / 2:.2f}", f"{scale:.2f}"]
        what = "token loss (nats)"
    sel = ('<span><span class="m s">selected</span> (underlined) &nbsp; '
           '<span class="m">not selected</span> (grey text)</span>') if with_selection else ""
    bar = (f'<div><div class="bar" style="background:linear-gradient(to right,{stops})"></div>'
           f'<div class="ticks">{"".join(f"<span>{t}</span>" for t in ticks)}</div></div>')
    return f'<div class="legend">{bar}<span>{what}; clipped at the 98th percentile</span>{sel}</div>'


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_page(title: str, notes: list[str], docs: list[DocView], tables: list[tuple[str, str, bool]],
                open_docs: int = 50) -> str:
    """The whole page: title, notes, legend, summary tables (heading, html, shown open), then each document."""
    signed = any(d.ref is not None for d in docs)
    values = [(d.loss - d.ref) if d.ref is not None else d.loss for d in docs]
    scale = _scale(values, signed)
    with_sel = any(d.selected is not None for d in docs)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{CSS}{_color_css(signed)}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append(_legend(scale, signed, with_sel))
    for heading, tbl, is_open in tables:
        parts.append(f'<details{" open" if is_open else ""}><summary><h2 style="display:inline">'
                     f"{html.escape(heading)}</h2></summary>{tbl}</details>")
    parts.append("<h2>Documents</h2>")
    for i, d in enumerate(docs):
        spans = "".join(
            _token_span(p, float(d.loss[j]), float(d.ref[j]) if d.ref is not None else None,
                        bool(d.selected[j]) if d.selected is not None else None, scale)
            for j, p in enumerate(d.pieces))
        is_open = " open" if i < open_docs else ""
        parts.append(f'<details class="doc"{is_open}><summary><h3 style="display:inline">{html.escape(d.title)}'
                     f'</h3></summary><div class="text">{spans}</div></details>')
    parts.append("</body></html>")
    return "\n".join(parts)
