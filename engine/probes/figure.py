"""The probe's figures as PNG, composed with PIL (no Qt, no matplotlib): the invariance curves
per layer beside the linear map's held-out error, the response curves of each layer's most
varying units, and the sweep strip (one image transformed along the sweep, with the predicted
class and its probability under each)."""

from __future__ import annotations

import io
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.probes import transforms as tf

INK = (20, 20, 20)
MUTED = (110, 110, 110)
GRID = (228, 228, 228)
RED = (200, 30, 30)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34)]


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older PIL: one bitmap size
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(xs: Sequence[float], series: Sequence[tuple[str, Sequence[float], tuple[int, int, int], bool]],
               title: str, x_label: str, y_label: str, size: tuple[int, int] = (560, 340),
               y_zero: bool = True) -> Image.Image:
    """One chart: ``series`` of (name, ys, colour, dashed) over ``xs``, with axes, grid and legend."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f, fb = _font(12), _font(14)
    d.text((10, 6), title, fill=INK, font=fb)
    ys_all = [v for _n, ys, _c, _d in series for v in ys if v is not None and math.isfinite(v)]
    ylo = 0.0 if y_zero else (min(ys_all) if ys_all else 0.0)
    yhi = max(ys_all) if ys_all else 1.0
    if yhi - ylo < 1e-12:
        yhi = ylo + (abs(ylo) or 1.0) * 0.1
    pad = (yhi - ylo) * 0.05
    ylo, yhi = (ylo if y_zero and ylo == 0 else ylo - pad), yhi + pad
    xlo, xhi = (min(xs), max(xs)) if len(xs) else (0.0, 1.0)
    if xhi - xlo < 1e-12:
        xlo, xhi = xlo - 0.5, xhi + 0.5
    legend_rows = math.ceil(len(series) / 3)
    left, right, top, bottom = 62, 14, 30 + 16 * legend_rows, 44
    plot = (left, top, w - right, h - bottom)

    def to(x: float, y: float) -> tuple[float, float]:
        return (plot[0] + (plot[2] - plot[0]) * (x - xlo) / (xhi - xlo),
                plot[3] - (plot[3] - plot[1]) * (y - ylo) / (yhi - ylo))

    for t in _ticks(ylo, yhi):
        _x, y = to(xlo, t)
        d.line([(plot[0], y), (plot[2], y)], fill=GRID)
        s = f"{t:.3g}"
        d.text((plot[0] - 6 - d.textlength(s, font=f), y - 7), s, fill=INK, font=f)
    for t in _ticks(xlo, xhi, 8):
        x, _y = to(t, ylo)
        d.line([(x, plot[3]), (x, plot[3] + 4)], fill=INK)
        s = f"{t:g}"
        d.text((x - d.textlength(s, font=f) / 2, plot[3] + 6), s, fill=INK, font=f)
    d.rectangle(plot, outline=INK)
    d.text(((plot[0] + plot[2]) / 2 - d.textlength(x_label, font=f) / 2, h - 18), x_label, fill=MUTED, font=f)
    label = Image.new("RGB", (int(d.textlength(y_label, font=f)) + 4, 16), "white")
    ImageDraw.Draw(label).text((2, 1), y_label, fill=MUTED, font=f)
    rot = label.rotate(90, expand=True)
    img.paste(rot, (4, int((plot[1] + plot[3]) / 2 - rot.height / 2)))
    for j, (name, ys, colour, dashed) in enumerate(series):
        pts = [to(x, y) for x, y in zip(xs, ys, strict=False) if y is not None and math.isfinite(y)]
        if dashed:
            for a, b in itertools.pairwise(pts):
                for k in range(0, 10, 2):
                    p0 = (a[0] + (b[0] - a[0]) * k / 10, a[1] + (b[1] - a[1]) * k / 10)
                    p1 = (a[0] + (b[0] - a[0]) * (k + 1) / 10, a[1] + (b[1] - a[1]) * (k + 1) / 10)
                    d.line([p0, p1], fill=colour, width=2)
        elif len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 2.5, p[1] - 2.5, p[0] + 2.5, p[1] + 2.5], fill=colour)
        lx = left + (j % 3) * ((w - left - right) / 3)
        ly = 28 + 16 * (j // 3)
        if dashed:
            d.line([(lx, ly + 7), (lx + 7, ly + 7)], fill=colour, width=2)
            d.line([(lx + 11, ly + 7), (lx + 18, ly + 7)], fill=colour, width=2)
        else:
            d.line([(lx, ly + 7), (lx + 18, ly + 7)], fill=colour, width=2)
        d.text((lx + 22, ly), name, fill=INK, font=f)
    return img


def _grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    rows = math.ceil(len(images) / columns)
    out = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for k, im in enumerate(images):
        out.paste(im, ((k % columns) * w, (k // columns) * h))
    return out


def _save(img: Image.Image, out: str | os.PathLike[str]) -> Path:
    from engine.cache import atomic_write_bytes

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(out, buf.getvalue())


def _x_label(result: Any) -> str:
    return f"{result.transform} ({tf.UNITS[result.transform]})"


def invariance_figure(result: Any, out: str | os.PathLike[str]) -> Path:
    """Left: mean normalised feature distance vs the parameter, one curve per layer (and the
    share of images whose prediction is kept). Right: the linear map's held-out relative error
    (solid) and the identity map's (dashed) per layer."""
    xs = [float(v) for v in result.values]
    inv = result.invariance()
    series = [(name, list(inv[i]), COLOURS[i % len(COLOURS)], False) for i, name in enumerate(result.layers)]
    series.append(("model input (pixels)", list(result.input_invariance()), (0, 0, 0), True))
    series.append(("prediction kept", list(result.agreement()), MUTED, True))
    left = line_chart(xs, series, f"Invariance: ||psi(Tx) - psi(x)|| / ||psi(x)||, {result.n} images", _x_label(result),
                      "normalised distance / share")
    charts = [left]
    if result.lin_test is not None:
        lin = []
        for i, name in enumerate(result.layers):
            c = COLOURS[i % len(COLOURS)]
            lin.append((f"{name} M_theta", list(result.lin_test[i]), c, False))
            lin.append((f"{name} identity", list(result.lin_identity[i]), c, True))
        charts.append(line_chart(xs, lin, f"Linear map, held-out relative error ({result.n_test} images)",
                                 _x_label(result), "||Y - X M^T|| / ||Y||"))
    return _save(_grid(charts, 2), out)


def responses_figure(result: Any, out: str | os.PathLike[str], top: int = 5) -> Path:
    """Per layer: the mean (over the images) spatially averaged response of its ``top`` most
    varying units vs the parameter."""
    xs = [float(v) for v in result.values]
    charts = []
    for i, name in enumerate(result.layers):
        r = result.responses(i)
        units = result.top_units(i, top)
        series = [(f"unit {u}", list(r[:, u]), COLOURS[k % len(COLOURS)], False) for k, u in enumerate(units)]
        charts.append(line_chart(xs, series, f"{name}: the {len(units)} most varying units", _x_label(result),
                                 "mean activation", size=(460, 300), y_zero=False))
    return _save(_grid(charts, 3), out)


def strip_figure(result: Any, views: Sequence[np.ndarray], j: int, out: str | os.PathLike[str],
                 cell: int = 96, columns: int = 10) -> Path:
    """Image ``j`` of the result transformed along the sweep (``views``: what the model saw at
    each value, :func:`engine.probes.run.sweep_views`), the predicted class and its probability
    under each; a changed prediction in red."""
    f, fb = _font(12), _font(14)
    n = len(views)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    cap = 34
    head = 30
    img = Image.new("RGB", (cols * (cell + 8) + 8, head + rows * (cell + cap + 8)), "white")
    d = ImageDraw.Draw(img)
    ref = int(result.ref_pred[j])
    d.text((8, 6), f"{result.paths[j]}: {result.transform} sweep (untransformed: {result.class_name(ref)})", fill=INK,
           font=fb)
    for k, v in enumerate(views):
        x = 8 + (k % cols) * (cell + 8)
        y = head + (k // cols) * (cell + cap + 8)
        scale = max(1, cell // max(v.shape[:2]))
        im = Image.fromarray(v).resize((v.shape[1] * scale, v.shape[0] * scale), Image.Resampling.NEAREST)
        if im.width > cell or im.height > cell:
            im.thumbnail((cell, cell), Image.Resampling.BILINEAR)
        img.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        p = int(result.pred[j, k])
        colour = INK if p == ref else RED
        if p != ref:
            d.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=RED, width=2)
        d.text((x, y + cell + 3), f"{result.values[k]:g}", fill=MUTED, font=f)
        d.text((x, y + cell + 17), f"{result.class_name(p)[:12]} {result.prob[j, k]:.2f}", fill=colour, font=f)
    return _save(img, out)
