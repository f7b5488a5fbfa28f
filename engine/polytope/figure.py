"""The gallery figure of one image, composed with PIL and numpy (no Qt): the image, its
ranked covered neighbours (predicted class and Dist; different-class intruders framed in red),
and below them the kNN (Euclidean) baseline at the same size."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RED = (200, 30, 30)
GREEN = (40, 150, 60)
INK = (20, 20, 20)


def _thumb(path: str, size: int) -> Image.Image:
    from engine.data.images import load_image
    from engine.types import ConvLensError

    try:
        arr = load_image(path)
    except ConvLensError:
        arr = np.full((size, size, 3), 200, np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)


def gallery_figure(result: Any, j: int, out: str | os.PathLike[str], top: int = 16, thumb: int = 72,
                   columns: int = 8) -> Path:
    """Write the gallery figure of image ``j`` of ``result`` (a PolytopeResult) as a PNG."""
    idx, dist = result.gallery(j)
    idx, dist = idx[:top], dist[:top]
    k = len(result.gallery(j)[0])
    font = ImageFont.load_default()
    root = result.image_source
    path_of = [os.path.join(root, p) for p in result.paths]
    knn_idx = result.knn[j][:min(k, top)] if k else np.zeros(0, np.int64)
    cap = 26
    pad = 8
    big = 2 * thumb + cap
    rows = max(1, -(-len(idx) // columns))
    krows = max(1, -(-len(knn_idx) // columns)) if len(knn_idx) else 0
    width = pad + big + 2 * pad + columns * (thumb + pad)
    head_h = 44
    height = head_h + rows * (thumb + cap + pad) + (krows * (thumb + cap + pad) + 18 if krows else 0) + pad
    height = max(height, head_h + big + 2 * pad)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    s = result.image_summary(j, top=0)
    title = (f"{result.paths[j]}  predicted {s['predicted']}  layer {result.layer}  |P(x)| = {s['n_boundaries']}  "
             f"covered {s['covered']} ({s['covered_different_class']} other-class, delta {s['delta']})")
    prec = "n/a" if s["precision"] is None else f"{s['precision']:.3f}"
    cov = "n/a" if s["coverage"] is None else f"{s['coverage']:.3f}"
    line2 = (f"precision {prec}  coverage {cov}  certificate max|A psi + c - G(psi)| = {s['certificate_error']:.2e}"
             f"  (float32 model: {s['float32_gap']:.1e})")
    draw.text((pad, 6), title, fill=INK, font=font)
    draw.text((pad, 22), line2, fill=INK, font=font)
    img.paste(_thumb(path_of[j], 2 * thumb), (pad, head_h))
    draw.text((pad, head_h + 2 * thumb + 4), "query", fill=INK, font=font)
    x0 = pad + big + 2 * pad

    def strip(items: np.ndarray, labels: list[str], y0: int) -> None:
        for r, i in enumerate(items):
            cx = x0 + (r % columns) * (thumb + pad)
            cy = y0 + (r // columns) * (thumb + cap + pad)
            img.paste(_thumb(path_of[int(i)], thumb), (cx, cy))
            same = result.pred[int(i)] == result.pred[j]
            col = GREEN if same else RED
            draw.rectangle([cx - 2, cy - 2, cx + thumb + 1, cy + thumb + 1], outline=col, width=2 if same else 4)
            draw.text((cx, cy + thumb + 3), labels[r], fill=INK if same else RED, font=font)

    strip(idx, [f"{result.class_name(int(result.pred[i]))[:10]} d={d:.3g}" for i, d in zip(idx, dist, strict=True)],
          head_h)
    if not len(idx):
        draw.text((x0, head_h), "no other image is covered", fill=INK, font=font)
    if krows:
        y0 = head_h + rows * (thumb + cap + pad) + 14
        draw.text((x0, y0 - 14), f"kNN (Euclidean on psi), k = {k}", fill=INK, font=font)
        strip(knn_idx, [result.class_name(int(result.pred[i]))[:14] for i in knn_idx], y0)
    out = Path(out)
    import io

    from engine.cache import atomic_write_bytes

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out
