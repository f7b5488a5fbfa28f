"""The image browser view: filter/sort toolbar, thumbnail grid, single-image pane.

Selection
---------
The grid mirrors the shared :class:`~gui.selection.Selection`: the current item is
``selection.current_image`` and the selected items are ``selection.selected_images``, both as
image indices (source rows). Changes made in the grid are written to the selection; changes
made elsewhere select and scroll to the item. A guard flag stops the echo. Filtering never
changes the selection: hidden images stay selected until the user selects something else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from PySide6.QtCore import QItemSelection, QItemSelectionModel, QModelIndex, Qt
from PySide6.QtGui import QImage, QResizeEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.data.images import ImageSet
from engine.predict import Predictions
from gui.context import AppContext
from gui.figures import Figure, FigureKind, FigureOption, FigureOptions
from gui.thumbnails import ThumbnailCache
from gui.views.base import View

from . import figures
from .delegate import ThumbnailDelegate
from .detail import ImageDetail
from .model import NO_LABEL, THUMB_SIZE, ImageListModel, RowFilter, SortKey
from .preview import PREVIEW_MAX_SIDE, PreviewLoader
from .proxy import ImageFilterProxy

__all__ = ["ImageBrowser"]


class ImageBrowser(View):
    """Dockable image browser: filter/sort toolbar, thumbnail grid, single-image pane."""

    title = "Images"
    object_name = "images"
    area = Qt.DockWidgetArea.LeftDockWidgetArea
    order = 10

    def __init__(
        self,
        ctx: AppContext,
        parent: QWidget | None = None,
        thumbnails: ThumbnailCache | None = None,
    ) -> None:
        """``thumbnails``: the cache to use (default: a new one with the on-disk cache)."""
        super().__init__(ctx, parent)
        selection = ctx.selection
        self.selection = selection
        self._syncing = False
        if thumbnails is None:
            thumbnails = ThumbnailCache(THUMB_SIZE, parent=self)
            self.destroyed.connect(thumbnails.close)
        self.thumbnails = thumbnails
        self.model = ImageListModel(thumbnails, self)
        self.proxy = ImageFilterProxy(self.model, self)

        self._build_toolbar()
        self.view = QListView(self)
        self.view.setViewMode(QListView.ViewMode.IconMode)
        self.view.setMovement(QListView.Movement.Static)
        self.view.setResizeMode(QListView.ResizeMode.Adjust)
        self.view.setLayoutMode(QListView.LayoutMode.Batched)
        self.view.setBatchSize(1000)
        self.view.setUniformItemSizes(True)
        self.view.setWrapping(True)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        delegate = ThumbnailDelegate(thumbnails.size, self.view.fontMetrics().height(), self.view)
        self.view.setItemDelegate(delegate)
        self.view.setGridSize(delegate.cell)
        self.view.verticalScrollBar().setSingleStep(delegate.cell.height() // 3)
        self.view.setModel(self.proxy)
        sm = self.view.selectionModel()
        sm.currentChanged.connect(self._view_current_changed)
        sm.selectionChanged.connect(self._view_selection_changed)

        self.detail = ImageDetail(self)
        self._preview = PreviewLoader(PREVIEW_MAX_SIDE, self)
        self._preview.loaded.connect(self._preview_loaded)
        self.splitter = QSplitter(Qt.Orientation.Horizontal, self)
        self.splitter.addWidget(self.view)
        self.splitter.addWidget(self.detail)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setChildrenCollapsible(False)
        self._split_set = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.splitter, 1)

        self.proxy.modelReset.connect(self._proxy_reset)
        selection.images_changed.connect(self._images_changed)
        selection.current_image_changed.connect(self._current_image_changed)
        selection.selected_images_changed.connect(self._selected_images_changed)
        self._images_changed(selection.images)
        if ctx.session is not None:
            ctx.session.predictions_changed.connect(self.set_predictions)
            if ctx.session.predictions is not None:
                self.set_predictions(ctx.session.predictions)

    # -- public API ---------------------------------------------------------------------------

    def set_predictions(self, preds: Predictions | None) -> None:
        """Show the model's predictions (matched to images by path); None removes them."""
        self.model.set_predictions(preds)
        self._fill_prediction_controls()
        self._show_current(reload_image=False)

    # -- figures ------------------------------------------------------------------------------

    def figure_kinds(self) -> list[FigureKind]:
        return list(figures.FIGURE_KINDS)

    def figure_options(self) -> list[FigureOption]:
        return list(figures.FIGURE_OPTIONS)

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """The current image with its prediction, or a contact sheet of the filtered images."""
        return figures.compose(self, options or FigureOptions())

    # -- toolbar ------------------------------------------------------------------------------

    def _build_toolbar(self) -> None:
        """Two rows, so every control stays visible in a narrow dock: search, sort and count on
        top; the label, prediction, correctness and confidence filters below."""
        self.toolbar = QWidget(self)
        self.text_filter = QLineEdit(self)
        self.text_filter.setPlaceholderText("Filter file names…")
        self.text_filter.setClearButtonEnabled(True)
        self.label_filter = QComboBox(self)
        self.label_filter.setToolTip("Show images with this label")
        self.prediction_filter = QComboBox(self)
        self.prediction_filter.setToolTip("Show images predicted as this class")
        self.correctness_filter = QComboBox(self)
        self.correctness_filter.setToolTip("Correctly or wrongly predicted labelled images")
        for text, value in (("All", "all"), ("Correct", "correct"), ("Incorrect", "incorrect")):
            self.correctness_filter.addItem(text, value)
        self.min_confidence = QDoubleSpinBox(self)
        self.min_confidence.setRange(0.0, 1.0)
        self.min_confidence.setSingleStep(0.05)
        self.min_confidence.setDecimals(2)
        self.min_confidence.setPrefix("conf ≥ ")
        self.min_confidence.setToolTip("Minimum confidence of the prediction")
        self.sort_combo = QComboBox(self)
        self.sort_combo.setToolTip("Sort order")
        for key in SortKey:
            self.sort_combo.addItem(key.value, key)
        self.count_label = QLabel(self)
        self.count_label.setContentsMargins(6, 0, 6, 0)
        rows = QVBoxLayout(self.toolbar)
        rows.setContentsMargins(4, 4, 4, 4)
        rows.setSpacing(4)
        for widgets in ((self.text_filter, self.sort_combo, self.count_label),
                        (self.label_filter, self.prediction_filter, self.correctness_filter, self.min_confidence)):
            row = QHBoxLayout()
            row.setSpacing(4)
            for w in widgets:
                w.setSizePolicy(QSizePolicy.Policy.Expanding if w is not self.count_label else QSizePolicy.Policy.Fixed,
                                QSizePolicy.Policy.Fixed)
                row.addWidget(w)
            rows.addLayout(row)

        self.text_filter.textChanged.connect(self._apply_filter)
        self.label_filter.currentIndexChanged.connect(self._apply_filter)
        self.prediction_filter.currentIndexChanged.connect(self._apply_filter)
        self.correctness_filter.currentIndexChanged.connect(self._apply_filter)
        self.min_confidence.valueChanged.connect(self._apply_filter)
        self.sort_combo.currentIndexChanged.connect(self._apply_sort)

    def _fill_label_controls(self) -> None:
        combo = self.label_filter
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(f"All labels ({self.model.rowCount()})", None)
        for i, count in self.model.label_counts():
            name = "(unlabelled)" if i == NO_LABEL else self.model.labels[i]
            combo.addItem(f"{name} ({count})", i)
        combo.setEnabled(bool(self.model.labels))
        combo.blockSignals(False)

    def _fill_prediction_controls(self) -> None:
        has_preds = self.model.has_predictions
        combo = self.prediction_filter
        previous = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        combo.addItem("All predictions", None)
        for c, count in sorted(self.model.class_counts(), key=lambda t: self.model.classes[t[0]]):
            combo.addItem(f"{self.model.classes[c]} ({count})", c)
        combo.setCurrentIndex(max(0, combo.findData(previous)))
        combo.setEnabled(has_preds)
        combo.blockSignals(False)
        scored = self.model.has_scored
        self.correctness_filter.setEnabled(scored)
        if not scored:
            self.correctness_filter.setCurrentIndex(0)
        self.min_confidence.setEnabled(has_preds)
        sort_items = self.sort_combo.model()
        for row in range(self.sort_combo.count()):
            key: SortKey = self.sort_combo.itemData(row)
            enabled = has_preds or not key.needs_predictions
            sort_items.item(row).setEnabled(enabled)  # type: ignore[attr-defined]
        if not has_preds:
            self.sort_combo.setCurrentIndex(0)
        self._apply_filter()

    def _current_filter(self) -> RowFilter:
        return RowFilter(
            text=self.text_filter.text(),
            label=self.label_filter.currentData(),
            predicted=self.prediction_filter.currentData(),
            correctness=self.correctness_filter.currentData() or "all",
            min_confidence=self.min_confidence.value() if self.min_confidence.isEnabled() else 0.0,
        )

    def _apply_filter(self) -> None:
        self.proxy.set_filter(self._current_filter())
        self._update_count()

    def _apply_sort(self) -> None:
        self.proxy.set_sort(self.sort_combo.currentData())

    def _update_count(self) -> None:
        self.count_label.setText(f"{self.proxy.rowCount()} of {self.model.rowCount()} images")

    # -- selection sync -----------------------------------------------------------------------

    @contextmanager
    def _sync(self) -> Iterator[None]:
        """Mark changes made while mirroring, so that they are not echoed back."""
        old, self._syncing = self._syncing, True
        try:
            yield
        finally:
            self._syncing = old

    def _images_changed(self, images: object) -> None:
        with self._sync():
            self.model.set_images(images if isinstance(images, ImageSet) else None)
            self.text_filter.blockSignals(True)
            self.text_filter.clear()
            self.text_filter.blockSignals(False)
            self._fill_label_controls()
            self._fill_prediction_controls()
        self._show_current(reload_image=True)

    def _proxy_reset(self) -> None:
        self._mirror_selection(scroll=True)
        self._update_count()

    def _current_image_changed(self, index: int) -> None:
        if not self._syncing:
            self._mirror_selection(scroll=True)
        self._show_current(reload_image=True)

    def _selected_images_changed(self, rows: object) -> None:
        if not self._syncing:
            self._mirror_selection(scroll=False)

    def _mirror_selection(self, scroll: bool) -> None:
        """Make the grid's current item and selection those of ``self.selection``."""
        sm = self.view.selectionModel()
        current = self.selection.current_image
        selected = self.selection.selected_images
        with self._sync():
            items = self.proxy.proxy_selection(selected)
            row = self.proxy.proxy_row(current)
            if row >= 0:
                index = self.proxy.index(row, 0)
                if current not in selected:
                    items.select(index, index)
                sm.setCurrentIndex(index, QItemSelectionModel.SelectionFlag.NoUpdate)
                if scroll:
                    self.view.scrollTo(index)
            else:
                sm.clearCurrentIndex()
            sm.select(items, QItemSelectionModel.SelectionFlag.ClearAndSelect)

    def _view_current_changed(self, current: QModelIndex, previous: QModelIndex) -> None:
        if self._syncing or not current.isValid():
            return
        with self._sync():
            self.selection.current_image = self.proxy.source_row(current.row())

    def _view_selection_changed(self, selected: QItemSelection, deselected: QItemSelection) -> None:
        if self._syncing:
            return
        rows = self.proxy.source_rows(self.view.selectionModel().selection())
        with self._sync():
            self.selection.selected_images = rows

    # -- single-image pane --------------------------------------------------------------------

    def _show_current(self, reload_image: bool) -> None:
        row = self.selection.current_image
        if not 0 <= row < self.model.rowCount():
            self._preview.cancel()
            self.detail.show_record(None, "", None, "", [])
            return
        m = self.model
        label = m.label(row) or ""
        self.detail.show_record(
            m.path(row), label, m.correct(row), m.prediction_text(row), m.top_classes(row)
        )
        if reload_image:
            self.detail.set_image(None, "Loading…")
            self._preview.request(m.path(row))

    def _preview_loaded(self, image: QImage | None, why: str = "") -> None:
        message = "" if image is not None else "Cannot read this image" + (f":\n{why}" if why else "")
        self.detail.set_image(image, message)

    # -- layout -------------------------------------------------------------------------------

    def resizeEvent(self, event: QResizeEvent) -> None:
        """Put the single-image pane beside the grid when wide, below it when tall."""
        super().resizeEvent(event)
        wide = self.width() >= 1.2 * self.height()
        orientation = Qt.Orientation.Horizontal if wide else Qt.Orientation.Vertical
        if self.splitter.orientation() != orientation or not self._split_set:
            self.splitter.setOrientation(orientation)
            self.splitter.setSizes([3000, 1000])  # scaled to the space: 3/4 grid, 1/4 pane
            self._split_set = True
