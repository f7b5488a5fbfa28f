"""The sanity check's figure, composed with PIL (no Qt, no matplotlib): similarity to the
original explanation vs the layer randomised (one line per metric, the mean over items with a
band of one standard deviation; x from "original" through each step), and for maps the strip of
the original and randomised maps of the first images."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..cache import atomic_write_bytes

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
INK = (20, 20, 20)
GRID = (225, 225, 225)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older PIL: one bitmap size
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font: Any) -> float:
    return float(draw.textlength(text, font=font))


def heat(m: np.ndarray) -> np.ndarray:
    """An (H, W) map as RGB uint8: its absolute value scaled by its own maximum, a dark-to-hot ramp."""
    a = np.abs(np.asarray(m, np.float64))
    top = a.max() if a.size else 0.0
    t = a / top if top > 0 else a
    r = np.clip(3 * t, 0, 1)
    g = np.clip(3 * t - 1, 0, 1)
    b = np.clip(3 * t - 2, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def plot_image(result: Any, width: int = 720, height: int = 380) -> Image.Image:
    """The similarity-vs-randomised-layer chart."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    left, right, top, bottom = 56, 16, 34, 92
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    mode = "cascading" if result.mode == "cascade" else "independent"
    d.text((left, 8), f"{result.title}: {mode} randomisation, similarity to the original "
                      f"({result.values.shape[2]} {result.item}{'s' if result.values.shape[2] != 1 else ''})",
           fill=INK, font=font)
    labels = ["original", *result.steps]
    n = len(labels)
    lo = min(-0.2, float(np.nanmin(np.nan_to_num(result.mean() - result.spread(), nan=0.0))) if result.n_steps else 0.0)
    lo = max(-1.0, float(np.floor(lo * 5) / 5))

    def px(i: float) -> float:
        return x0 + (x1 - x0) * (i / max(1, n - 1))

    def py(v: float) -> float:
        return y1 - (y1 - y0) * (v - lo) / (1.0 - lo)

    for v in np.arange(lo, 1.0001, 0.2):
        y = py(float(v))
        d.line([(x0, y), (x1, y)], fill=GRID)
        s = f"{v:.1f}"
        d.text((x0 - 8 - _text_w(d, s, small), y - 6), s, fill=INK, font=small)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=INK)
    for i, lab in enumerate(labels):
        x = px(i)
        d.line([(x, y1), (x, y1 + 4)], fill=INK)
        tw = _text_w(d, lab, small)
        # labels turned 45 degrees: drawn on their own layer, rotated
        layer = Image.new("RGBA", (int(tw) + 4, 14), (255, 255, 255, 0))
        ImageDraw.Draw(layer).text((2, 0), lab, fill=INK, font=small)
        rot = layer.rotate(35, expand=True)
        img.paste(rot, (int(x - rot.width + 6), int(y1 + 6)), rot)
    mean, spread = result.mean(), result.spread()
    for m in range(len(result.metrics)):
        col = COLOURS[m % len(COLOURS)]
        ys = np.concatenate([[1.0], mean[:, m]])
        sd = np.concatenate([[0.0], spread[:, m]])
        band = Image.new("RGBA", img.size, (255, 255, 255, 0))
        bd = ImageDraw.Draw(band)
        ok = np.isfinite(ys)
        if result.values.shape[2] > 1 and ok.sum() > 1:
            upper = [(px(i), py(min(1.0, ys[i] + sd[i]))) for i in range(n) if ok[i]]
            lower = [(px(i), py(max(lo, ys[i] - sd[i]))) for i in reversed(range(n)) if ok[i]]
            bd.polygon(upper + lower, fill=(*col, 40))
            img.paste(band, (0, 0), band)
        pts = [(px(i), py(float(ys[i]))) for i in range(n) if ok[i]]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    lx = float(x1 - 10)
    for m, name in reversed(list(enumerate(result.metrics))):
        lx -= _text_w(d, name, small) + 26
        col = COLOURS[m % len(COLOURS)]
        d.line([(lx, top + 8), (lx + 16, top + 8)], fill=col, width=3)
        d.text((lx + 20, top + 2), name, fill=INK, font=small)
    d.text((x0, height - 16), "layers randomised, from the output down" if result.mode == "cascade"
           else "the one layer randomised", fill=INK, font=small)
    return img


def strip_image(result: Any, images: int = 4, cell: int = 56) -> Image.Image | None:
    """Rows: the first images; columns: the original map, then each step's map (None: no maps)."""
    k = min(images, len(result.original_maps))
    if not k:
        return None
    font = _font(11)
    cols = 1 + result.n_steps
    label_h, left = 30, 8
    img = Image.new("RGB", (left + cols * (cell + 4) + 8, label_h + k * (cell + 4) + 8), "white")
    d = ImageDraw.Draw(img)
    for c, lab in enumerate(["original", *result.steps]):
        x = left + c * (cell + 4)
        text = lab if _text_w(d, lab, font) <= cell else lab[: max(3, int(len(lab) * cell / _text_w(d, lab, font))) - 1] + "."
        d.text((x, label_h - 14), text, fill=INK, font=font)
    for r in range(k):
        maps = [result.original_maps[r], *[result.step_maps[s, r] for s in range(result.n_steps)]]
        for c, m in enumerate(maps):
            tile = Image.fromarray(heat(m)).resize((cell, cell), Image.Resampling.NEAREST)
            img.paste(tile, (left + c * (cell + 4), label_h + r * (cell + 4)))
    return img


def sanity_figure(result: Any, out: str | os.PathLike[str], images: int = 4) -> Path:
    """Write the figure (the chart, and for maps the strip under it) as a PNG."""
    chart = plot_image(result)
    strip = strip_image(result, images)
    if strip is not None:
        w = max(chart.width, strip.width)
        fig = Image.new("RGB", (w, chart.height + strip.height + 6), "white")
        fig.paste(chart, (0, 0))
        fig.paste(strip, (0, chart.height + 6))
    else:
        fig = chart
    out = Path(out)
    buf = io.BytesIO()
    fig.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out
