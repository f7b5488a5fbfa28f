"""One export mechanism for every view: PNG at a chosen DPI, vector SVG and PDF, clipboard.

A view's figure is **composed from its data** (:meth:`gui.views.base.View.figure`, a
:class:`gui.figures.Figure`) and painted by :mod:`gui.figures.render`; no widget is drawn
into it. :func:`export_figure` writes one; :func:`export_widget` and
:func:`copy_to_clipboard`, given a view (anything with a ``figure()`` method), export its
composed figure too, so ``convlens figure`` and the app share the same figures.

For other widgets, three kinds of content can be exported:

* a whole widget (:func:`export_widget`), painted with ``QWidget.render`` over its palette's
  window colour, children included;
* a graphics scene (:func:`export_scene`): a ``QGraphicsScene`` (its ``sceneRect``) or the
  visible part of a ``QGraphicsView`` such as a pyqtgraph ``GraphicsView`` / ``PlotWidget``
  (its viewport, without frame or scroll bars, with the view's background);
* for :func:`render_image` and :func:`copy_to_clipboard`, a scene is exported as a scene and
  any widget (graphics views included) as a whole widget.

Sizes are in logical pixels (96 per inch). PNG is rendered at ``dpi / 96`` times that size and
records the DPI in the file. SVG (``QSvgGenerator``) and PDF (``QPdfWriter``) are vector: text,
lines and pyqtgraph items stay paths; the SVG ``viewBox`` is the logical size and the PDF page
is exactly the content size (the DPI only sets the resolution of any raster part). Nothing
needs a visible window: with an offscreen ``QApplication`` the CLI can export hidden widgets.

Writes are atomic: the file is rendered to a temporary file in the target folder and moved
over the target with :func:`os.replace`, so a failed export leaves no partial file and never
clobbers an existing one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QMarginsF, QPoint, QRectF, QSize, QSizeF, Qt
from PySide6.QtGui import (
    QGuiApplication,
    QImage,
    QPageLayout,
    QPageSize,
    QPaintDevice,
    QPainter,
    QPdfWriter,
    QRegion,
)
from PySide6.QtSvg import QSvgGenerator
from PySide6.QtWidgets import QGraphicsScene, QGraphicsView, QWidget

from .figures import Figure, FigureOptions
from .figures import render as figure_render

__all__ = [
    "FORMATS",
    "copy_to_clipboard",
    "export_dialog_filter",
    "export_figure",
    "export_scene",
    "export_widget",
    "figure_of",
    "render_image",
]

FORMATS = ("png", "svg", "pdf")
"""File formats, chosen by the file suffix."""

_LOGICAL_DPI = 96.0
_CLIPBOARD_DPI = 192
_FILTERS = {
    "png": "PNG image (*.png)",
    "svg": "SVG vector image (*.svg)",
    "pdf": "PDF document (*.pdf)",
}


def export_dialog_filter() -> str:
    """The name filter for a ``QFileDialog`` save dialog, one entry per format."""
    return ";;".join(_FILTERS[fmt] for fmt in FORMATS)


def export_widget(widget: QWidget, path: str | Path, *, dpi: int = 300) -> Path:
    """Export a widget to ``path`` (format from the suffix).

    A view (a widget with a ``figure()`` method) exports its composed figure at ``dpi``, with
    its default options; any other widget is rendered whole, children included.
    """
    if not isinstance(widget, QWidget):
        raise TypeError(f"export_widget() needs a QWidget, not {type(widget).__name__}")
    if _composes(widget):
        return export_figure(widget, path, FigureOptions(dpi=_check_dpi(dpi)))
    return _export(_Content(widget, scene_only=False), path, dpi)


def figure_of(view_or_figure: object, options: FigureOptions | None = None) -> Figure:
    """The composed figure of a view (``view.figure(options)``), or a :class:`Figure` as is."""
    if isinstance(view_or_figure, Figure):
        return view_or_figure
    if not _composes(view_or_figure):
        raise TypeError(f"{type(view_or_figure).__name__} composes no figure")
    options = options or FigureOptions()
    _check_includes(view_or_figure, options)
    figure = view_or_figure.figure(options)  # type: ignore[attr-defined]
    if not isinstance(figure, Figure):
        raise TypeError(f"{type(view_or_figure).__name__}.figure() returned {type(figure).__name__}")
    return figure


def export_figure(view: object, path: str | Path, options: FigureOptions | None = None) -> Path:
    """Write the figure of ``view`` (a view or a :class:`Figure`) to ``path``: PNG at
    ``options.dpi``, or vector SVG / PDF (format from the suffix). Atomic: a failure leaves
    no file and never clobbers an existing one. Returns ``path``.

    Raises ``ValueError`` for an unknown format, figure kind or include key, and when the
    view has nothing to show yet (the message says what is missing).
    """
    path = Path(path)
    fmt = _format_of(path)
    options = options or FigureOptions()
    figure = figure_of(view, options)
    if fmt == "png":
        image = figure_render.render_png(figure, options.dpi)  # in memory first: a failure touches no file
        with _atomic(path) as tmp:
            if not image.save(str(tmp), "PNG"):
                raise OSError(f"cannot write {path}")
    elif fmt == "svg":
        with _atomic(path) as tmp:
            figure_render.write_svg(figure, tmp)
    else:
        with _atomic(path) as tmp:
            figure_render.write_pdf(figure, tmp)
    return path


def _composes(obj: object) -> bool:
    return callable(getattr(obj, "figure", None)) and callable(getattr(obj, "figure_kinds", None))


def _check_includes(view: object, options: FigureOptions) -> None:
    known = {o.key for o in view.figure_options()}  # type: ignore[attr-defined]
    unknown = sorted(set(options.include) - known)
    if unknown:
        title = getattr(view, "title", type(view).__name__)
        raise ValueError(f"the {title} figure has no part named {', '.join(map(repr, unknown))} "
                         f"(parts: {', '.join(sorted(known)) or 'none'})")


def export_scene(
    scene_or_graphicsview: QGraphicsScene | QGraphicsView, path: str | Path, *, dpi: int = 300
) -> Path:
    """Export a ``QGraphicsScene``, or what a ``QGraphicsView`` (pyqtgraph included) shows."""
    if not isinstance(scene_or_graphicsview, (QGraphicsScene, QGraphicsView)):
        kind = type(scene_or_graphicsview).__name__
        raise TypeError(f"export_scene() needs a QGraphicsScene or QGraphicsView, not {kind}")
    return _export(_Content(scene_or_graphicsview, scene_only=True), path, dpi)


def render_image(widget_or_scene: QWidget | QGraphicsScene, *, dpi: int = 300) -> QImage:
    """Render to an image at ``dpi``, DPI recorded: a view's composed figure, or a widget or
    scene at ``dpi / 96`` times its logical size."""
    if _composes(widget_or_scene):
        dpi = _check_dpi(dpi)
        return figure_render.render_png(figure_of(widget_or_scene, FigureOptions(dpi=dpi)), dpi)
    return _render_image(_content_of(widget_or_scene), _check_dpi(dpi))


def copy_to_clipboard(
    widget_or_scene: QWidget | QGraphicsScene, *, dpi: int = _CLIPBOARD_DPI,
    options: FigureOptions | None = None,
) -> None:
    """Put an image on the clipboard: a view's composed figure as PNG pixels (at
    ``options.dpi`` when given, else ``dpi``), or an image of a widget or scene.

    The default 192 DPI stays sharp on high-DPI screens; since the DPI is recorded,
    applications that honour it paste the image at its size.
    """
    if _composes(widget_or_scene):
        options = options or FigureOptions(dpi=_check_dpi(dpi))
        image = figure_render.render_png(figure_of(widget_or_scene, options), options.dpi)
    else:
        image = render_image(widget_or_scene, dpi=dpi)
    QGuiApplication.clipboard().setImage(image)


@dataclass(frozen=True)
class _Content:
    """What gets drawn: a whole widget, the visible part of a graphics view, or a scene."""

    obj: QWidget | QGraphicsScene
    scene_only: bool

    def size(self) -> QSize:
        """The logical size in pixels (at least 1x1)."""
        obj = self.obj
        if isinstance(obj, QGraphicsScene):
            size = obj.sceneRect().size().toSize()
        elif self.scene_only:
            _settle(obj)
            size = obj.viewport().size()
        else:
            size = obj.size()
        return size.expandedTo(QSize(1, 1))

    def paint(self, painter: QPainter, size: QSize) -> None:
        """Paint into the logical rectangle ``(0, 0, size)`` of ``painter``."""
        obj = self.obj
        target = QRectF(0, 0, size.width(), size.height())
        exact = Qt.AspectRatioMode.IgnoreAspectRatio  # source and target sizes agree
        if isinstance(obj, QGraphicsScene):
            _prepare_scene(obj)
            obj.render(painter, target, obj.sceneRect(), exact)
        elif self.scene_only:
            assert isinstance(obj, QGraphicsView)
            _prepare_scene(obj.scene())
            obj.render(painter, target, obj.viewport().rect(), exact)
        else:
            painter.fillRect(target, obj.palette().window())
            QWidget.render(obj, painter, QPoint())  # not QGraphicsView.render, which hides it


def _content_of(obj: QWidget | QGraphicsScene) -> _Content:
    if isinstance(obj, QGraphicsScene):
        return _Content(obj, scene_only=True)
    if isinstance(obj, QWidget):
        return _Content(obj, scene_only=False)
    raise TypeError(f"expected a QWidget or QGraphicsScene, not {type(obj).__name__}")


def _settle(widget: QWidget) -> None:
    """Make a hidden widget's geometry current (e.g. a view's viewport after ``resize()``).

    Qt defers resize events of hidden widgets; ``QWidget.render`` delivers them, so rendering
    one pixel into a scratch image brings the layout up to date without showing a window.
    """
    if not widget.isVisible():
        scratch = QImage(1, 1, QImage.Format.Format_ARGB32_Premultiplied)
        QWidget.render(widget, scratch, QPoint(), QRegion(0, 0, 1, 1))


def _prepare_scene(scene: QGraphicsScene | None) -> None:
    """Let pyqtgraph update axes and auto-ranges, as its views do before every paint."""
    prepare = getattr(scene, "prepareForPaint", None)
    if callable(prepare):
        prepare()


def _check_dpi(dpi: int) -> int:
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    return dpi


def _format_of(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        allowed = ", ".join(f".{f}" for f in FORMATS)
        raise ValueError(f"cannot export to {path.name!r}: unknown format; use one of {allowed}")
    return fmt


def _export(content: _Content, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fmt = _format_of(path)
    dpi = _check_dpi(dpi)
    if fmt == "png":
        image = _render_image(content, dpi)  # in memory first: a failure touches no file
        with _atomic(path) as tmp:
            if not image.save(str(tmp), "PNG"):
                raise OSError(f"cannot write {path}")
    elif fmt == "svg":
        with _atomic(path) as tmp:
            _write_svg(content, tmp)
    else:
        with _atomic(path) as tmp:
            _write_pdf(content, tmp, dpi)
    return path


def _render_image(content: _Content, dpi: int) -> QImage:
    size = content.size()
    scale = dpi / _LOGICAL_DPI
    width, height = max(1, round(size.width() * scale)), max(1, round(size.height() * scale))
    image = QImage(width, height, QImage.Format.Format_ARGB32_Premultiplied)
    if image.isNull():
        raise MemoryError(f"cannot allocate a {width}x{height} image ({dpi} dpi)")
    image.fill(Qt.GlobalColor.transparent)
    dots_per_meter = round(dpi / 0.0254)
    image.setDotsPerMeterX(dots_per_meter)
    image.setDotsPerMeterY(dots_per_meter)
    with _painting(image, "image") as painter:
        painter.setRenderHints(
            QPainter.RenderHint.Antialiasing
            | QPainter.RenderHint.TextAntialiasing
            | QPainter.RenderHint.SmoothPixmapTransform
        )
        painter.scale(scale, scale)
        content.paint(painter, size)
    return image


def _write_svg(content: _Content, file: Path) -> None:
    size = content.size()
    generator = QSvgGenerator()
    generator.setFileName(str(file))
    generator.setSize(size)
    generator.setViewBox(QRectF(0, 0, size.width(), size.height()))
    generator.setResolution(round(_LOGICAL_DPI))  # physical size = on-screen size
    generator.setTitle(file.name)
    generator.setDescription("Exported by ConvLens")
    with _painting(generator, str(file)) as painter:
        content.paint(painter, size)


def _write_pdf(content: _Content, file: Path, dpi: int) -> None:
    size = content.size()
    writer = QPdfWriter(str(file))
    writer.setResolution(dpi)
    writer.setCreator("ConvLens")
    points = QSizeF(size.width() * 72 / _LOGICAL_DPI, size.height() * 72 / _LOGICAL_DPI)
    page = QPageSize(points, QPageSize.Unit.Point, "", QPageSize.SizeMatchPolicy.ExactMatch)
    if not writer.setPageLayout(QPageLayout(page, QPageLayout.Orientation.Portrait, QMarginsF())):
        raise ValueError(f"cannot make a {points.width():.0f}x{points.height():.0f} pt PDF page")
    with _painting(writer, str(file)) as painter:
        scale = writer.resolution() / _LOGICAL_DPI
        painter.scale(scale, scale)
        content.paint(painter, size)


@contextmanager
def _painting(device: QPaintDevice, what: str) -> Iterator[QPainter]:
    """A painter on ``device`` that is always ended (an active painter crashes on teardown)."""
    painter = QPainter()
    if not painter.begin(device):
        raise OSError(f"cannot paint on {what}")
    try:
        yield painter
    finally:
        ended = painter.end()
    if not ended:
        raise OSError(f"cannot finish writing {what}")


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary file next to ``path``; move it over ``path`` on success only."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    # Created here (O_EXCL, mode 0666 minus umask) so the result gets ordinary permissions.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if tmp.stat().st_size == 0:
            raise OSError(f"cannot write {path}: nothing was written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
