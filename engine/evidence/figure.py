"""Headless pictures of class evidence (PIL and numpy, no Qt): the map over the image with the
causal check's blobs outlined, and the deletion / insertion curves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAUSAL = (40, 170, 60)
NON_CAUSAL = (220, 40, 40)
INK = (20, 20, 20)
MUTED = (120, 120, 120)
DELETION = (200, 60, 40)
INSERTION = (40, 90, 200)

# a perceptually ordered map (inferno-like), anchor colours at equal steps
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) colours of ``values`` in [0, 1]."""
    v = np.clip(np.nan_to_num(values), 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return np.rint(_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).astype(np.uint8)


def positive_scaled(m: np.ndarray) -> np.ndarray:
    """The positive evidence of a map scaled to [0, 1] by its maximum (zeros when none)."""
    top = float(np.max(m)) if m.size else 0.0
    return np.clip(m / top, 0, 1).astype(np.float32) if top > 0 else np.zeros_like(m, np.float32)


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): the image with the map's positive evidence blended over it."""
    v = positive_scaled(m)
    col = colormap(v).astype(np.float32)
    a = (alpha * (0.25 + 0.75 * v))[..., None]
    return np.rint(image.astype(np.float32) * (1 - a) + col * a).astype(np.uint8)


def outlines(labels: np.ndarray, scale: int) -> dict[int, np.ndarray]:
    """Per blob label, a bool (H*scale, W*scale) mask of its outline (the blob's pixels at
    ``scale`` whose 4-neighbour is outside it)."""
    big = np.kron(labels, np.ones((scale, scale), labels.dtype))
    out = {}
    for b in np.unique(big):
        if b == 0:
            continue
        m = big == b
        pad = np.pad(m, 1)
        inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        out[int(b)] = m & ~inner
    return out


def evidence_image(result: Any, i: int, scale: int | None = None, legend: bool = True) -> Image.Image:
    """Image row ``i`` of an :class:`~engine.evidence.run.EvidenceResult`: the overlay enlarged
    by a whole factor (nearest, so small crops stay crisp), blobs outlined (green: causal, red:
    non-causal) with their number, and a caption with the class and each blob's probability drop."""
    img, m = result.images[i], result.maps[i]
    h, w = m.shape
    scale = scale or max(1, 256 // max(h, w))
    ov = np.kron(overlay(img, m), np.ones((scale, scale, 1), np.uint8))
    rows = result.blobs_of(i)
    for r in rows:
        colour = CAUSAL if result.blob_causal[r] else NON_CAUSAL
        edge = outlines(np.where(result.blob_labels[i] == result.blob_id[r], result.blob_id[r], 0), scale)
        for mask in edge.values():
            ov[mask] = colour
    pic = Image.fromarray(ov)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(pic)
    for r in rows:
        y, x = result.blob_centroid[r]
        draw.text((x * scale + scale / 2 - 3, y * scale + scale / 2 - 5), str(int(result.blob_id[r])),
                  fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    if not legend:
        return pic
    lines = [f"{result.class_name(int(result.targets[i]))}: p = {result.probs[i]:.3f}  ({result.params.method}"
             + (f", {result.layer})" if result.layer else ")")]
    for r in rows:
        verdict = "causal" if result.blob_causal[r] else "non-causal"
        lines.append(f"blob {int(result.blob_id[r])}: {int(result.blob_area[r])} px, drop {result.blob_drop[r]:+.3f} {verdict}")
    if not len(rows):
        lines.append("no positive evidence: no blobs")
    cap_h = 12 * len(lines) + 6
    page = Image.new("RGB", (max(pic.width, 230), pic.height + cap_h), (255, 255, 255))
    page.paste(pic, (0, 0))
    d = ImageDraw.Draw(page)
    for k, line in enumerate(lines):
        if k == 0 or not len(rows):
            colour = INK if k == 0 else MUTED
        else:
            colour = CAUSAL if result.blob_causal[rows[k - 1]] else NON_CAUSAL
        d.text((2, pic.height + 3 + 12 * k), line, fill=colour, font=font)
    return page


def write_overlay(result: Any, i: int, path: str | os.PathLike[str]) -> Path:
    import io

    from ..cache import atomic_write_bytes

    buf = io.BytesIO()
    evidence_image(result, i).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def curves_image(result: Any, width: int = 720, height: int = 300) -> Image.Image:
    """Deletion and insertion curves side by side: every image's curve faint, the mean bold,
    the mean AUC in the title."""
    font = ImageFont.load_default()
    page = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(page)
    pw = (width - 30) // 2
    for k, (name, curves, aucs, colour) in enumerate((
            ("deletion", result.deletion, result.deletion_auc, DELETION),
            ("insertion", result.insertion, result.insertion_auc, INSERTION))):
        x0, y0, x1, y1 = 40 + k * (pw + 10), 24, 40 + k * (pw + 10) + pw - 40, height - 34
        d.rectangle((x0, y0, x1, y1), outline=MUTED)
        mean_auc = float(np.mean(aucs)) if len(aucs) else float("nan")
        d.text((x0, 6), f"{name} (mean AUC {mean_auc:.3f}, {len(aucs)} images)", fill=INK, font=font)
        for t in (0.0, 0.5, 1.0):
            yy = y1 - t * (y1 - y0)
            d.text((x0 - 24, yy - 5), f"{t:.1f}", fill=INK, font=font)
            xx = x0 + t * (x1 - x0)
            d.text((xx - 8, y1 + 4), f"{t:.1f}", fill=INK, font=font)
        d.text(((x0 + x1) // 2 - 60, y1 + 16), f"fraction of pixels {'removed' if k == 0 else 'inserted'}", fill=INK, font=font)
        def pts(c: np.ndarray, x0: int = x0, y0: int = y0, x1: int = x1, y1: int = y1) -> list[tuple[float, float]]:
            return [(x0 + f * (x1 - x0), y1 - float(v) * (y1 - y0)) for f, v in zip(result.fractions, c, strict=True)]

        faint = tuple(int(255 - (255 - c) * 0.25) for c in colour)
        for c in curves[:200]:
            d.line(pts(c), fill=faint, width=1)
        groups = [int(t) for t in np.unique(result.targets)] if len(curves) else []
        if len(groups) > 4:
            groups = []
        shades = [colour, tuple(int(c * 0.45) for c in colour), tuple(int(c * 0.7) for c in colour), INK]
        if groups and len(groups) > 1:
            for g, shade in zip(groups, shades, strict=False):
                rows = result.targets == g
                d.line(pts(curves[rows].mean(axis=0)), fill=shade, width=3)
            for j, (g, shade) in enumerate(zip(groups, shades, strict=False)):
                rows = result.targets == g
                label = f"mean of '{result.class_name(g)}' ({int(rows.sum())}): AUC {float(aucs[rows].mean()):.3f}"
                yy = int(y0 + 0.4 * (y1 - y0)) + 13 * j
                d.rectangle((x1 - 204, yy - 1, x1 - 2, yy + 11), fill=(255, 255, 255))
                d.line([(x1 - 200, yy + 5), (x1 - 186, yy + 5)], fill=shade, width=3)
                d.text((x1 - 182, yy), label, fill=INK, font=font)
        elif len(curves):
            d.line(pts(curves.mean(axis=0)), fill=colour, width=3)
    d.text((2, height // 2 - 30), "p", fill=INK, font=font)
    return page


def write_curves(result: Any, path: str | os.PathLike[str]) -> Path:
    import io

    from ..cache import atomic_write_bytes

    buf = io.BytesIO()
    curves_image(result).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
