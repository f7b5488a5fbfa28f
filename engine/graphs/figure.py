"""A static figure of an inference graph, composed with PIL (no matplotlib needed).

Nodes sit where :func:`engine.graphs.transitions.layout` puts them (layers left to right, the
class node right, the best-scored node of a layer on top); each node is a montage of its word's
patches (the receptive fields of its best columns, cut from the model-input-sized image) with
its layer, word and score under it. Edges are drawn under the nodes, their width growing with
LR and coloured by LR (blue below 0, grey at 0, red above), labelled with P(t|s) and LR.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.types import ConvLensError

log = logging.getLogger("convlens.graphs")

CELL = 44  # pixels per patch in a node montage
GRID = 2  # a node montage is GRID x GRID patches
PAD = 4
LABEL_H = 30
COL_GAP = 150
ROW_GAP = 26
MARGIN = 24
TITLE_H = 34


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older PIL: one bitmap size
        return ImageFont.load_default()


def _lr_colour(lr: float, top: float) -> tuple[int, int, int]:
    t = max(-1.0, min(1.0, lr / top)) if top > 0 else 0.0
    grey = np.array([150, 150, 150])
    end = np.array([200, 30, 30]) if t >= 0 else np.array([40, 70, 200])
    c = grey + (end - grey) * abs(t)
    return (int(c[0]), int(c[1]), int(c[2]))


class _Images:
    """Model-input-sized RGB versions of image files (the boxes are in those pixels)."""

    def __init__(self, preprocess: dict[str, Any] | None, size: tuple[int, int]) -> None:
        self.pre = preprocess
        self.size = size
        self.got: dict[str, np.ndarray | None] = {}

    def get(self, path: str) -> np.ndarray | None:
        if path not in self.got:
            self.got[path] = self._load(path)
        return self.got[path]

    def _load(self, path: str) -> np.ndarray | None:
        from engine.data.images import load_image, preprocess
        from engine.types import Preprocess

        try:
            img = load_image(path)
        except ConvLensError as e:
            log.warning("patch not drawn: %s", e)
            return None
        if self.pre is None:
            pil = Image.fromarray(img).resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            return np.asarray(pil)
        p = self.pre
        spec = Preprocess(**{**p, "input_size": tuple(p["input_size"]), "mean": tuple(p["mean"]),
                             "std": tuple(p["std"])})
        x = preprocess(img, spec)  # (C, H, W) normalised: undo the normalisation for display
        c = x.shape[0]
        mean = np.asarray(spec.mean[:c], np.float32)[:, None, None]
        std = np.asarray(spec.std[:c], np.float32)[:, None, None]
        px = np.clip((x * std + mean) * 255.0, 0, 255).round().astype(np.uint8)
        if spec.channels == "bgr" and c == 3:
            px = px[::-1]
        px = np.repeat(px, 3, 0) if c == 1 else px
        return np.ascontiguousarray(px.transpose(1, 2, 0))


def _montage(node: dict[str, Any], images: _Images) -> Image.Image:
    side = GRID * CELL + (GRID + 1) * PAD
    tile = Image.new("RGB", (side, side), (235, 235, 235))
    for n, p in enumerate(node.get("patches", [])[: GRID * GRID]):
        arr = images.get(p["path"])
        r, c = divmod(n, GRID)
        at = (PAD + c * (CELL + PAD), PAD + r * (CELL + PAD))
        t, left, b, right = p["box"]
        if arr is None or b <= t or right <= left:
            tile.paste((180, 180, 180), (*at, at[0] + CELL, at[1] + CELL))
            continue
        crop = Image.fromarray(arr[t:b, left:right])
        scale = CELL / max(crop.width, crop.height)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                           Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
        tile.paste(crop, (at[0] + (CELL - crop.width) // 2, at[1] + (CELL - crop.height) // 2))
    return tile


def render_graph(explanation: Any, path: str | Path | None = None, *,
                 preprocess: dict[str, Any] | None = None, title: str | None = None) -> Image.Image:
    """Draw ``explanation`` (a :class:`~engine.graphs.model.GraphExplanation`) and save it to
    ``path`` (PNG, or any format PIL writes by extension) when given. ``preprocess`` (the fit's
    preprocessing as a dict) cuts the patches from the images exactly as the model saw them."""
    nodes = {nd["id"]: nd for nd in explanation.nodes}
    if not nodes:
        raise ConvLensError("the graph has no nodes to draw")
    images = _Images(preprocess, tuple(explanation.input_size))
    side = GRID * CELL + (GRID + 1) * PAD
    node_w, node_h = side, side + LABEL_H
    xs = sorted({nd["x"] for nd in nodes.values()})
    dx = min((b - a for a, b in itertools.pairwise(xs)), default=1.0) or 1.0
    ygaps = []
    for li in {nd["layer_index"] for nd in nodes.values()}:
        ys = sorted(nd["y"] for nd in nodes.values() if nd["layer_index"] == li)
        ygaps += [b - a for a, b in itertools.pairwise(ys) if b > a]
    dy = min(ygaps, default=1.0)
    sx, sy = (node_w + COL_GAP) / dx, (node_h + ROW_GAP) / dy
    x0 = min(nd["x"] for nd in nodes.values())
    y1 = max(nd["y"] for nd in nodes.values())
    y0 = min(nd["y"] for nd in nodes.values())
    width = round((xs[-1] - x0) * sx) + node_w + 2 * MARGIN
    height = round((y1 - y0) * sy) + node_h + 2 * MARGIN + TITLE_H
    at = {k: (MARGIN + round((nd["x"] - x0) * sx), MARGIN + TITLE_H + round((y1 - nd["y"]) * sy))
          for k, nd in nodes.items()}
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    small, normal = _font(11), _font(14)
    heading = title or (f"inference graph of class '{explanation.class_name}' ({explanation.images} images)"
                        if explanation.kind == "class" else
                        f"inference graph of {Path(explanation.target).name} (predicted '{explanation.class_name}')")
    draw.text((MARGIN, MARGIN // 2), heading, fill="black", font=_font(16))
    labels: list[tuple[tuple[float, float], str]] = []
    top_lr = max((abs(e["lr"]) for e in explanation.edges), default=1.0) or 1.0
    for e in explanation.edges:  # class (right) -> lower layers (left): from the left side of the source
        (ax, ay), (bx, by) = at[e["source"]], at[e["target"]]
        p, q = (ax, ay + side // 2), (bx + node_w, by + side // 2)
        w = max(1, round(1 + 4 * max(e["lr"], 0.0) / top_lr))
        draw.line([p, q], fill=_lr_colour(e["lr"], top_lr), width=w)
        labels.append(((p[0] + (q[0] - p[0]) * 0.36, p[1] + (q[1] - p[1]) * 0.36),
                       f"P={e['p_t_given_s']:.2f} LR={e['lr']:.2f}"))
    for k, nd in nodes.items():
        x, y = at[k]
        img.paste(_montage(nd, images), (x, y))
        draw.rectangle([x, y, x + side - 1, y + side - 1], outline=(90, 90, 90))
        name = nd["label"] if nd["layer"] == "class" else f"{nd['layer']} word {nd['word']}"
        draw.text((x, y + side + 2), name, fill="black", font=normal)
        sc = nd["score"]
        draw.text((x, y + side + 16), f"score {sc:.3g}" if math.isfinite(sc) else "", fill=(80, 80, 80), font=small)
    for (mx, my), text in labels:  # near the explained node, over every line, on a white ground
        box = draw.textbbox((mx, my), text, font=small, anchor="mm")
        draw.rectangle(box, fill="white")
        draw.text((mx, my), text, fill=(60, 60, 60), font=small, anchor="mm")
    if path is not None:
        import io

        from engine.cache import atomic_write_bytes

        buf = io.BytesIO()
        fmt = (Path(path).suffix.lstrip(".") or "png").upper()
        img.save(buf, format={"JPG": "JPEG", "TIF": "TIFF"}.get(fmt, fmt))
        atomic_write_bytes(path, buf.getvalue())
    return img
