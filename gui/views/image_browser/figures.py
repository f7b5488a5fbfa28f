"""The image browser's figures, composed from its data (never a grab of the grid):

* ``image``: the current image at its native pixels (enlarged by whole factors, never
  smoothed), its label, the model's prediction with its confidence and the top classes;
* ``sheet``: a contact sheet of the images the grid shows now (filtered and sorted), each
  with its name, label and prediction.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
from PySide6.QtGui import QColor

from engine.types import ConvLensError
from gui.figures import (
    Figure,
    FigureKind,
    FigureOption,
    FigureOptions,
    HBarChart,
    Picture,
    Row,
    Stack,
    Text,
    Tile,
    TileGrid,
)

from .model import NO_LABEL

if TYPE_CHECKING:
    from .view import ImageBrowser

__all__ = ["FIGURE_KINDS", "FIGURE_OPTIONS", "MAX_SHEET", "compose"]

FIGURE_KINDS = [FigureKind("image", "Image: the current image with its prediction"),
                FigureKind("sheet", "Contact sheet of the filtered images")]
FIGURE_OPTIONS = [
    FigureOption("prediction", "Label, prediction and top classes", True),
    FigureOption("captions", "Captions under the sheet's images", True, ("sheet",)),
]
MAX_SHEET = 120
"""At most this many images on a contact sheet (the first ones in the grid's order)."""
SHEET_SIDE = 256
"""Images larger than this are reduced to it for the sheet (they are shown small anyway)."""
_GREEN, _RED = QColor(40, 150, 60), QColor(200, 50, 40)


def compose(view: ImageBrowser, options: FigureOptions) -> Figure:
    kind = view.figure_kind(options)
    include = view.figure_includes(options, kind)
    if view.model.rowCount() == 0:
        raise ValueError("Images: nothing to export yet: open an image folder first")
    if kind == "sheet":
        return _sheet(view, options, include)
    return _image(view, options, include)


def _load(path: str, max_side: int | None = None) -> np.ndarray:
    """The image's RGB pixels (reduced to ``max_side`` when given); ValueError naming the cause."""
    from PIL import Image

    from engine.data.images import load_image

    try:
        rgb = load_image(path)
    except ConvLensError as e:  # "<path>: <cause>"
        raise ValueError(f"cannot read {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if max_side and max(rgb.shape[:2]) > max_side:
        pil = Image.fromarray(rgb)
        pil.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        rgb = np.asarray(pil)
    return rgb


def _model_name(view: ImageBrowser) -> str:
    session = view.ctx.session
    model = getattr(session, "model", None)
    return model.name if model is not None else ""


def _image(view: ImageBrowser, options: FigureOptions, include: dict[str, bool]) -> Figure:
    row = view.selection.current_image
    m = view.model
    if not 0 <= row < m.rowCount():
        raise ValueError("Images: nothing to export yet: select an image")
    path = m.path(row)
    rgb = _load(path)
    h, w = rgb.shape[:2]
    label = m.label(row)
    picture = Picture.of(rgb, f"{w}×{h} px, shown with its own pixels", max_width=240.0, max_height=240.0)
    side: list = []
    if include.get("prediction", True):
        lines = [f"Label: {label if label is not None else '(none)'}"]
        prediction = m.prediction_text(row)
        if prediction:
            verdict = {True: " (correct)", False: " (wrong)", None: ""}[m.correct(row)]
            lines.append(f"Predicted: {prediction}{verdict}")
        side.append(Text("\n".join(lines)))
        top = m.top_classes(row)
        if top:
            side.append(Text(f"Top {len(top)} classes", bold=True))
            side.append(HBarChart([(c, p, c == label) for c, p in top], x_label="probability"))
    body = Row([picture, Stack(side)], weights=[1, 1]) if side else picture
    image_set = view.selection.images
    rel = image_set.relative_path(image_set.records[row]) if image_set is not None else os.path.basename(path)
    model = _model_name(view)
    subtitle = " · ".join(x for x in (rel, f"image {row} of {m.rowCount()}",
                                      f"model {model}" if model else "") if x)
    title = f"{os.path.basename(path)}: " + (f"predicted {m.prediction_text(row)}" if m.prediction_text(row)
                                             else f"label {label}" if label is not None else "image")
    return Figure(title, subtitle, [body], options.width_pt, options.dpi, description=f"{rel} ({model})")


def _filter_text(view: ImageBrowser) -> str:
    f = view._current_filter()
    m = view.model
    parts = []
    if f.text:
        parts.append(f"names containing '{f.text}'")
    if f.label is not None:
        parts.append("unlabelled" if f.label == NO_LABEL else f"label {m.labels[f.label]}")
    if f.predicted is not None:
        parts.append(f"predicted {m.classes[f.predicted]}")
    if f.correctness != "all":
        parts.append(f"{f.correctness}ly predicted")
    if f.min_confidence > 0:
        parts.append(f"confidence ≥ {f.min_confidence:.2f}")
    return ", ".join(parts)


def _sheet(view: ImageBrowser, options: FigureOptions, include: dict[str, bool]) -> Figure:
    m, proxy = view.model, view.proxy
    rows = [proxy.source_row(r) for r in range(proxy.rowCount())]
    if not rows:
        raise ValueError("Images: nothing to export: the filter shows no image")
    shown = rows[:MAX_SHEET]
    captions = include.get("captions", True)
    tiles = []
    scored = False
    for r in shown:
        try:
            rgb = _load(m.path(r), SHEET_SIDE)
        except ValueError:
            rgb = np.full((24, 24, 3), 200, np.uint8)
        cap = ""
        if captions:
            lines = [os.path.basename(m.path(r))]
            label, pred = m.label(r), m.prediction_text(r)
            verdict = {True: " ✓", False: " ✗", None: ""}[m.correct(r)]
            if pred:
                lines.append(f"{pred}{verdict}")
            elif label is not None:
                lines.append(label)
            scored = scored or m.correct(r) is not None
            cap = "\n".join(lines)
        tiles.append(Tile.of(rgb, cap))
    cols = 10 if options.inches >= 5 else 5
    filt = _filter_text(view)
    what = f"{len(rows)} of {m.rowCount()} images" + (f" ({filt})" if filt else "")
    if len(rows) > len(shown):
        what += f"; the first {len(shown)} shown"
    sort = view.sort_combo.currentData()
    model = _model_name(view)
    subtitle = " · ".join(x for x in (what, f"sorted by {sort.value.lower()}" if sort is not None else "",
                                      f"predictions of {model}" if model and m.has_predictions else "") if x)
    elements: list = [TileGrid(tiles, columns=min(cols, len(tiles)), gap=3.0, caption_size=5.0)]
    if captions and scored:
        elements.append(Text("✓ prediction matches the label · ✗ it does not", size=6.0))
    image_set = view.selection.images
    source = os.path.basename(str(image_set.source)) if image_set is not None else ""
    title = f"Contact sheet: {source}" if source else "Contact sheet"
    return Figure(title, subtitle, elements, options.width_pt, options.dpi)
