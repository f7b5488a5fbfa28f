"""Network Dissection (Bau et al., CVPR 2017): which units of a layer detect which concepts.

Controls choose the concept data set (the built-in generated set, cached per image count and
size under ``<cache>/concepts/builtin-<n>-<size>``, or a Broden-layout folder), the layers, the
activation quantile, the IoU threshold and the union rule. "Run" submits one job through
``ctx.session.run`` (key ``"dissection"``: a new run supersedes the previous one) that
generates the built-in set when needed and then runs :func:`engine.dissection.run.dissect`
(itself cached on disk by the engine).

Results: one summary line per layer, a bar chart of detectors per concept category and layer,
and a sortable, filterable table of every unit (layer, unit, category, label, IoU, detector).
Clicking a row selects that layer and unit in the shared selection (so the Heatmaps view shows
it); the side panel then shows the unit's top concept images with the unit's mask outlined
(cyan) and the pixels of the unit's concept outlined (yellow). The mask is the one the IoUs
counted, from the engine's one code path (:func:`engine.dissection.report.top_image_masks`,
i.e. :mod:`engine.dissection.masks`): the activation upsampled to the image's label-mask size
and compared with the unit's threshold by the result's rule (``S >= T``, or ``S > T`` for the
NetDissect-Lite rule and for units whose threshold tied), then shown at the image's size. Those
few masks are computed lazily on the worker. "Export report…" writes the engine's HTML report
into a folder.

The settings give the same dissection as ``convlens dissect``: the "lite" rule is the
command's ``--rule lite`` (NetDissect-Lite's union rule and ``S > T`` masks), and the built-in
set defaults to the command's :data:`engine.concepts.BUILTIN_DEFAULT_IMAGES` images.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.concepts import BUILTIN_DEFAULT_IMAGES, BUILTIN_DEFAULT_SIZE
from engine.types import Progress

from ..context import AppContext
from ..figures import (
    BarChart,
    Figure,
    FigureKind,
    FigureOption,
    FigureOptions,
    Legend,
    Row,
    Stack,
    Text,
    Tile,
    TileGrid,
)
from ..jobs import JobHandle
from ..tiles import TileMosaic, mask_outline
from ..widgets.layer_picker import LayerPicker
from ..widgets.result_table import Column, ResultTable
from .base import View

__all__ = ["COLUMNS", "DissectionView", "report_target"]

COLUMNS: tuple[Column, ...] = (
    Column("layer", "Layer"),
    Column("unit", "Unit", "int"),
    Column("category", "Category", searchable=True),
    Column("label", "Label", searchable=True),
    Column("iou", "IoU", "float", format=".4f"),
    Column("detector", "Detector", "bool", format=lambda v: "yes" if v else ""),
)
"""The table's columns: keys of ``DissectionResult.to_rows()``."""
THUMB = 96
"""Side of a top-concept-image thumbnail."""
FIGURE_TOP_UNITS = 4
"""The figure shows the top concept images of this many best units (and the selected one)."""
FIGURE_IMAGES = 6
"""Top concept images per unit in the figure."""
NEED_MODEL = "Load a model to run Network Dissection."
READY = "Tick the layers to dissect and press Run Network Dissection."
_UNIT_OUTLINE = np.array([0, 255, 255], dtype=np.uint8)
_CONCEPT_OUTLINE = np.array([255, 220, 0], dtype=np.uint8)
_LAYER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# --------------------------------------------------------------------------------------------
# the view
# --------------------------------------------------------------------------------------------


class DissectionView(View):
    """Run Network Dissection and browse its results; see the module docstring."""

    title = "Network Dissection"
    object_name = "dissection"
    sanity_explanation = "dissection"
    order = 30

    #: a dissection finished and its results are shown
    result_ready = Signal(object)
    #: the side panel shows the top concept images of (layer, unit)
    unit_images_ready = Signal(str, int)

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.result: Any = None  # engine DissectionResult
        self.concepts: Any = None  # engine ConceptDataset of the result
        # (layer, unit) -> (concept image indices, masked images at native size) for figures
        self._figure_tiles: dict[tuple[str, int], tuple[list[int], list[np.ndarray]]] = {}
        self._figure_handle: JobHandle | None = None
        #: (layer, unit) -> [(concept image index, bool mask at its label-mask size)] shown in the side panel
        self.shown_masks: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
        self._handle: JobHandle | None = None
        self._broden_folder = ""
        self._syncing = False
        # from a project file: the layers to tick once the model's layers are listed, and whether
        # the saved result is shown again (rerun, which the content-keyed cache answers)
        self._restored_layers: list[str] | None = None
        self._rerun_restored = False
        self._build()
        ctx.session.model_loaded.connect(self._model_loaded)
        ctx.selection.unit_changed.connect(self._selection_changed)
        ctx.selection.layer_changed.connect(self._selection_changed)
        if ctx.session.model is not None:
            self._model_loaded(ctx.session.model)
        self._update_controls()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.source_combo = QComboBox()
        self.source_combo.addItem("Built-in (generated)", "builtin")
        self.source_combo.addItem("Broden folder…", "broden")
        self.source_combo.activated.connect(self._source_activated)
        self.n_images_spin = QSpinBox()
        self.n_images_spin.setRange(16, 100_000)
        self.n_images_spin.setSingleStep(100)
        self.n_images_spin.setValue(BUILTIN_DEFAULT_IMAGES)
        self.n_images_spin.setToolTip("Number of generated concept images")
        self.size_spin = QSpinBox()
        self.size_spin.setRange(16, 512)
        self.size_spin.setSingleStep(16)
        self.size_spin.setValue(BUILTIN_DEFAULT_SIZE)
        self.size_spin.setSuffix(" px")
        self.size_spin.setToolTip("Side of the generated images")
        self.folder_label = QLabel()
        self.folder_label.setWordWrap(True)
        self.layer_picker = LayerPicker()
        self.layer_picker.setToolTip("Layers to dissect (spatial layers only), grouped by block, with their shapes")
        self.layer_picker.setMinimumHeight(100)
        self.quantile_spin = QDoubleSpinBox()
        self.quantile_spin.setDecimals(4)
        self.quantile_spin.setRange(0.0001, 0.5)
        self.quantile_spin.setSingleStep(0.001)
        self.quantile_spin.setValue(0.005)
        self.quantile_spin.setToolTip("Top fraction of a unit's activations that its mask keeps (paper: 0.005)")
        self.iou_spin = QDoubleSpinBox()
        self.iou_spin.setDecimals(3)
        self.iou_spin.setRange(0.0, 1.0)
        self.iou_spin.setSingleStep(0.01)
        self.iou_spin.setValue(0.04)
        self.iou_spin.setToolTip("A unit is a detector when its best IoU exceeds this (paper: 0.04)")
        self.rule_combo = QComboBox()
        self.rule_combo.addItem("paper", "paper")
        self.rule_combo.addItem("lite", "lite")
        self.rule_combo.setToolTip("paper: Bau et al. 2017 (masks S ≥ T); lite: NetDissect-Lite's union rule "
                                   "and masks S > T (as convlens dissect --rule lite)")
        self.run_button = QPushButton("Run Network Dissection")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.report_button = QPushButton("Export report…")
        self.report_button.clicked.connect(self.export_report_dialog)

        sizes = QHBoxLayout()
        sizes.addWidget(self.n_images_spin)
        sizes.addWidget(QLabel("images of"))
        sizes.addWidget(self.size_spin)
        sizes.addStretch(1)
        data_form = QFormLayout()
        data_form.addRow("Concepts", self.source_combo)
        data_form.addRow("", sizes)
        data_form.addRow("", self.folder_label)
        param_form = QFormLayout()
        param_form.addRow("Quantile", self.quantile_spin)
        param_form.addRow("IoU threshold", self.iou_spin)
        param_form.addRow("Rule", self.rule_combo)
        layers_box = QVBoxLayout()
        layers_box.addWidget(QLabel("Layers"))
        layers_box.addWidget(self.layer_picker, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 4)
        buttons.addStretch(1)
        buttons.addWidget(self.report_button)
        settings = QGroupBox("Settings")
        grid = QGridLayout(settings)
        # concepts and parameters on the left, the (tall) layer list beside them
        forms = QVBoxLayout()  # packed at the top: the layer list beside them sets the height
        forms.addLayout(data_form)
        forms.addLayout(param_form)
        forms.addStretch(1)
        grid.addLayout(forms, 0, 0)
        grid.addLayout(layers_box, 0, 1)
        grid.addLayout(buttons, 1, 0, 1, 2)
        grid.addWidget(self.status, 2, 0, 1, 2)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)

        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextFormat(Qt.TextFormat.RichText)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.chart = pg.PlotWidget(background="w")
        self.chart.setMinimumHeight(100)
        self.chart.setMenuEnabled(False)
        self.chart.setMouseEnabled(x=False, y=False)
        self.chart.hideButtons()
        self.chart.setLabel("left", "detectors")
        self.chart.setTitle("Detectors per concept category", color="k", size="10pt")
        for side in ("left", "bottom"):
            axis = self.chart.getAxis(side)
            axis.setPen("k")
            axis.setTextPen("k")

        self.unit_table = ResultTable(COLUMNS, row_id=("layer", "unit"), muted_unless="detector",
                                      placeholder="Filter by label or category…", sort=("iou", True))
        self.detectors_check = QCheckBox("Detectors only")
        self.detectors_check.toggled.connect(lambda _b: self._apply_filter())
        self.unit_table.add_filter_widget(self.detectors_check)
        self.unit_table.row_selected.connect(self._row_selected)
        self.filter_edit = self.unit_table.filter_edit
        self.table, self.model, self.proxy = self.unit_table.view, self.unit_table.model, self.unit_table.proxy
        table_box = self.unit_table

        self.results = QSplitter(Qt.Orientation.Vertical)
        summary_box = QWidget()
        summary_layout = QVBoxLayout(summary_box)
        summary_layout.setContentsMargins(0, 0, 0, 0)
        summary_layout.addWidget(self.summary_label)
        summary_layout.addWidget(self.chart, 1)
        self.results.addWidget(summary_box)
        self.results.addWidget(table_box)
        self.results.setStretchFactor(0, 2)
        self.results.setStretchFactor(1, 3)
        self.results.setChildrenCollapsible(False)

        self.unit_title = QLabel()
        self.unit_title.setWordWrap(True)
        font = self.unit_title.font()
        font.setBold(True)
        self.unit_title.setFont(font)
        self.unit_images = TileMosaic()
        self.unit_images.set_placeholder("Click a row to see the unit's top concept images.", None)
        images_scroll = QScrollArea()
        images_scroll.setWidget(self.unit_images)
        images_scroll.setWidgetResizable(False)
        images_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.legend_label = QLabel(_legend_html("≥"))
        self.legend_label.setWordWrap(True)
        self.legend_label.setToolTip("The unit's mask is the one its IoUs counted: its activation upsampled to the image's "
                                     "label-mask size and compared with its dissection threshold by the result's rule")
        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        side_layout.addWidget(self.unit_title)
        side_layout.addWidget(images_scroll, 1)
        side_layout.addWidget(self.legend_label)
        scrollbar = images_scroll.verticalScrollBar().sizeHint().width()
        side.setMinimumWidth(2 * (THUMB + self.unit_images.gap) + self.unit_images.gap + scrollbar + 8)
        self._side_scroll = images_scroll

        self.body = QSplitter(Qt.Orientation.Horizontal)
        self.body.addWidget(self.results)
        self.body.addWidget(side)
        self.body.setStretchFactor(0, 3)
        self.body.setStretchFactor(1, 1)
        self.body.setChildrenCollapsible(False)

        # settings above results in a splitter, the settings scrolling: the view fits a
        # 1024x640 window (both parts keep a usable minimum, the user moves the divider)
        self.settings_scroll = QScrollArea()
        self.settings_scroll.setWidget(settings)
        self.settings_scroll.setWidgetResizable(True)
        self.settings_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.settings_scroll.setMinimumHeight(90)
        self.outer = QSplitter(Qt.Orientation.Vertical)
        self.outer.addWidget(self.settings_scroll)
        self.outer.addWidget(self.body)
        self.outer.setStretchFactor(0, 0)
        self.outer.setStretchFactor(1, 1)
        self.outer.setChildrenCollapsible(False)
        layout = QVBoxLayout(self)
        layout.addWidget(self.outer, 1)

    # ------------------------------------------------------------------ View API

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        return [("Run Network Dissection", self.run)]

    def save_state(self) -> dict[str, Any]:
        return {
            "source": self.source_combo.currentData(),
            "n_images": self.n_images_spin.value(),
            "image_size": self.size_spin.value(),
            "broden_folder": self._broden_folder,
            "layers": self.checked_layers(),
            "quantile": self.quantile_spin.value(),
            "iou_threshold": self.iou_spin.value(),
            "rule": self.rule_combo.currentData(),
            "filter": self.filter_edit.text(),
            "detectors_only": self.detectors_check.isChecked(),
            "show_result": self.result is not None,
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("broden_folder"), str):
            self._broden_folder = state["broden_folder"]
        index = self.source_combo.findData(state.get("source"))
        if index >= 0:
            self.source_combo.setCurrentIndex(index)
        for key, spin in (("n_images", self.n_images_spin), ("image_size", self.size_spin)):
            if isinstance(state.get(key), int):
                spin.setValue(state[key])
        for key, dspin in (("quantile", self.quantile_spin), ("iou_threshold", self.iou_spin)):
            if isinstance(state.get(key), (int, float)):
                dspin.setValue(float(state[key]))
        index = self.rule_combo.findData(state.get("rule"))
        if index >= 0:
            self.rule_combo.setCurrentIndex(index)
        if isinstance(state.get("layers"), list):
            self._restored_layers = [str(x) for x in state["layers"]]
            self.set_checked_layers(self._restored_layers)
        self._rerun_restored = state.get("show_result") is True
        if isinstance(state.get("filter"), str):
            self.filter_edit.setText(state["filter"])
        if isinstance(state.get("detectors_only"), bool):
            self.detectors_check.setChecked(state["detectors_only"])
        self._update_controls()
        if self.ctx.session.model is not None:
            self._restored_layers = None
            self._rerun_if_restored()

    def _rerun_if_restored(self) -> None:
        if self._rerun_restored and self.checked_layers():
            self._rerun_restored = False
            self.run()

    def shutdown(self) -> None:
        self.cancel()

    # ------------------------------------------------------------------ settings

    def checked_layers(self) -> list[str]:
        """The layers ticked in the list, in model order."""
        return self.layer_picker.checked_layers()

    def set_checked_layers(self, layers: Sequence[str]) -> None:
        """Tick exactly ``layers`` (unknown names are ignored)."""
        self.layer_picker.set_checked_layers(layers)

    def params(self) -> Any:
        """The engine ``DissectionParams`` of the controls."""
        from engine.dissection.run import DissectionParams

        rule = self.rule_combo.currentData()
        # as convlens dissect: --rule lite is NetDissect-Lite's union rule *and* its S > T masks
        return DissectionParams(quantile=self.quantile_spin.value(), iou_threshold=self.iou_spin.value(),
                                mask_rule=rule, strict_mask=rule == "lite")

    def _model_loaded(self, info: Any) -> None:
        # the engine's default layers never include a 1x1 layer; one ticked by hand is dissected
        # with the engine's warning that its IoU is image-level (shown with the result)
        self.layer_picker.set_layers([li for li in info.layers if li.is_spatial], info.default_layers)
        if self._restored_layers is not None:  # a project's layers, not the model's defaults
            self.set_checked_layers(self._restored_layers)
            self._restored_layers = None
        self._update_controls()
        self._rerun_if_restored()

    def _source_activated(self, _index: int) -> None:
        if self.source_combo.currentData() == "broden":
            folder = QFileDialog.getExistingDirectory(self, "Broden-layout concept folder", self._broden_folder)
            if folder:
                self._broden_folder = folder
            elif not self._broden_folder:
                self.source_combo.setCurrentIndex(self.source_combo.findData("builtin"))
        self._update_controls()

    def set_broden_folder(self, folder: str) -> None:
        """Use the Broden-layout concept set in ``folder``."""
        self._broden_folder = folder
        self.source_combo.setCurrentIndex(self.source_combo.findData("broden"))
        self._update_controls()

    def set_builtin(self, n_images: int, image_size: int) -> None:
        """Use the built-in generated set with ``n_images`` images of ``image_size`` px."""
        self.source_combo.setCurrentIndex(self.source_combo.findData("builtin"))
        self.n_images_spin.setValue(n_images)
        self.size_spin.setValue(image_size)
        self._update_controls()

    def _update_controls(self) -> None:
        builtin = self.source_combo.currentData() == "builtin"
        self.n_images_spin.setEnabled(builtin)
        self.size_spin.setEnabled(builtin)
        self.folder_label.setText("" if builtin else (self._broden_folder or "(no folder chosen)"))
        self.folder_label.setVisible(not builtin)
        running = self._handle is not None
        self.run_button.setEnabled(not running and self.ctx.session.model is not None)
        self.cancel_button.setEnabled(running)
        self.progress.setVisible(running)
        self.report_button.setEnabled(self.result is not None and not running)
        if self.ctx.session.model is None and not running:
            self.status.setText(NEED_MODEL)
        elif self.status.text() in ("", NEED_MODEL):
            self.status.setText(READY)

    # ------------------------------------------------------------------ running

    def run(self) -> JobHandle | None:
        """Start a dissection with the current settings (superseding one under way)."""
        session = self.ctx.session
        layers = self.checked_layers()
        if session.model is None:
            self.status.setText(NEED_MODEL)
            return None
        if not layers:
            self.status.setText("Tick at least one layer.")
            return None
        builtin = self.source_combo.currentData() == "builtin"
        if not builtin and not self._broden_folder:
            self.status.setText("Choose a Broden-layout folder first.")
            return None
        source = None if builtin else Path(self._broden_folder)
        n_images, size, params = self.n_images_spin.value(), self.size_spin.value(), self.params()

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, tuple[Any, Any]]:
            from engine.concepts import builtin_concepts, open_broden
            from engine.jobs import subjob

            from ..cluster import dissect  # where the "Run on" setting says (in process by default)

            share = 0.0
            if source is None:
                share = 0.3
                concepts = yield from subjob(builtin_concepts(n_images, size), 0.0, share, "built-in concepts: ")
            else:
                yield Progress(0.0, f"opening {source}")
                concepts = open_broden(str(source))
            result = yield from subjob(dissect(backend, loaded.cache_id, concepts, layers, params), share, 1.0)
            return result, concepts

        handle = session.run("Network Dissection", job, key="dissection", on_done=self._finished)
        if handle is None:
            return None
        if self._handle is not None:
            self._handle.cancel()
        self._handle = handle
        handle.progress.connect(self._progress)
        handle.failed.connect(self._failed)
        handle.cancelled.connect(self._cancelled)
        self.progress.setValue(0)
        self.progress.setFormat("starting…")
        where = (f"the built-in concepts ({n_images} images of {size} px)" if source is None
                 else f"the Broden set in {source}")
        self.status.setText(f"Dissecting {', '.join(layers)} on {where}…")
        self._update_controls()
        return handle

    def cancel(self) -> None:
        """Cancel the dissection under way, if any."""
        if self._handle is not None:
            self._handle.cancel()

    def _progress(self, p: Progress) -> None:
        if p.fraction is None:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(round(1000 * p.fraction))
        self.progress.setFormat(f"%p% {p.message}" if p.message else "%p%")

    def _failed(self, error: BaseException) -> None:
        if self._handle is not None and self._handle.state == "failed":
            self._handle = None
            self.status.setText(f"Dissection failed: {error}")
            self._update_controls()

    def _cancelled(self) -> None:
        if self._handle is not None and self._handle.state == "cancelled":
            self._handle = None
            self.status.setText("Dissection cancelled.")
            self._update_controls()

    def _finished(self, value: tuple[Any, Any]) -> None:
        self._handle = None
        self.set_result(*value)
        self._update_controls()

    # ------------------------------------------------------------------ results

    def set_result(self, result: Any, concepts: Any) -> None:
        """Show a ``DissectionResult`` computed on ``concepts``."""
        self.result, self.concepts = result, concepts
        self._figure_tiles = {}
        secs = result.seconds.get("total")
        took = "from the cache" if result.from_cache else (f"in {secs:.1f} s" if secs is not None else "")
        passes = "" if result.from_cache else f", {'one forward pass' if result.passes == 1 else f'{result.passes} forward passes'}"
        self.status.setText(f"Dissected {len(result.layers)} layer(s) on {result.n_images} concept images "
                            f"({len(result.categories)} categories) {took}{passes}.")
        # each line starts with its layer's bar colour: the line doubles as the chart's legend
        lines = [f"<span style='color:{_LAYER_COLORS[j % len(_LAYER_COLORS)]}'>■</span> {html.escape(line)}"
                 for j, line in enumerate(self.summary_lines())]
        # the engine's warnings (a 1x1 layer is image-level) and its tie fallbacks, as the report says them;
        # all its notes (passes too) in the tooltip
        for name, ld in result.layers.items():
            tied = int(np.count_nonzero(ld.tie_fallback))
            if tied:
                lines.append(f"<span style='color:#555'>{html.escape(name)}: {tied} unit{'' if tied == 1 else 's'} "
                             "with a tied threshold use S &gt; T</span>")
        lines += [f"<span style='color:#b35900'>⚠ {html.escape(w)}</span>" for w in result.warnings]
        self.summary_label.setText("<br>".join(lines))
        self.summary_label.setToolTip("\n".join([*result.notes, *result.warnings]))
        self.legend_label.setText(_legend_html(">" if result.params.strict_mask else "≥"))
        self.shown_masks = {}
        self._draw_chart()
        self.unit_table.set_rows(result.to_rows())
        self._update_controls()
        self._selection_changed()
        self._prepare_figure_tiles()
        self.result_ready.emit(result)

    def summary_lines(self) -> list[str]:
        """Per dissected layer: "conv3: 12/64 units are detectors covering 9 concepts"."""
        if self.result is None:
            return []
        return [self.result.summary_line(name) for name in self.result.layers]

    def _draw_chart(self) -> None:
        result = self.result
        self.chart.clear()
        categories = list(result.categories)
        layers = list(result.layers)
        width = 0.8 / max(1, len(layers))
        top = 1
        for j, name in enumerate(layers):
            s = result.layers[name].summary
            per_cat = dict(zip(s.categories, s.detectors_per_category.tolist(), strict=True))
            heights = [int(per_cat.get(c, 0)) for c in categories]
            top = max(top, *heights) if heights else top
            x = np.arange(len(categories)) - 0.4 + width * (j + 0.5)
            color = _LAYER_COLORS[j % len(_LAYER_COLORS)]
            self.chart.addItem(pg.BarGraphItem(x=x, height=heights, width=width * 0.9, brush=color,
                                               pen=pg.mkPen(color), name=name))
        self.chart.getAxis("bottom").setTicks([list(enumerate(categories))])
        self.chart.setXRange(-0.6, len(categories) - 0.4, padding=0)
        self.chart.setYRange(0, top * 1.15, padding=0)

    def _apply_filter(self) -> None:
        self.unit_table.set_threshold("detector", 1 if self.detectors_check.isChecked() else None)

    def visible_rows(self) -> list[dict[str, Any]]:
        """The table's rows as shown (filtered and sorted)."""
        return self.unit_table.visible_rows()

    def _row_selected(self, row_id: tuple[str, int]) -> None:
        """The user chose a row: select its layer and unit everywhere and show the unit."""
        layer, unit = row_id
        sel = self.ctx.selection
        self._syncing = True
        try:
            sel.layer = layer
            sel.unit = unit
        finally:
            self._syncing = False
        self._show_unit(layer, unit)

    def _selection_changed(self, *_args: object) -> None:
        """Follow the shared selection: select its row and show its unit when dissected."""
        if self._syncing or self.result is None:
            return
        layer, unit = self.ctx.selection.layer, self.ctx.selection.unit
        self.unit_table.select_id((layer, unit))
        if self.model.find_id((layer, unit)) >= 0:
            self._show_unit(layer, unit)

    # ------------------------------------------------------------------ top concept images

    def _show_unit(self, layer: str, unit: int) -> None:
        """Describe the unit and compute its top concept images with masks on the worker."""
        result, concepts = self.result, self.concepts
        if result is None or layer not in result.layers:
            return
        ld = result.layers[layer]
        s = ld.summary
        verdict = "detector" if s.is_detector[unit] else "not a detector"
        tie = " (tied threshold: mask S > T)" if len(ld.tie_fallback) and ld.tie_fallback[unit] else ""
        self.unit_title.setText(f"{layer} unit {unit}: {s.label_name[unit]} ({s.category_name[unit]}), "
                                f"IoU {s.iou[unit]:.3f}, {verdict}{tie}")
        indices = [int(i) for i in ld.top_images[unit] if i >= 0]
        self.unit_images.set_placeholder("Computing masks…", None)

        def job(backend: Any, _loaded: Any) -> Generator[Progress, None, tuple[str, int, list[int], np.ndarray,
                                                                                 list[tuple[int, np.ndarray]]]]:
            yield Progress(None, f"masks of {layer} unit {unit}")
            natives: list[np.ndarray] = []
            masks: list[tuple[int, np.ndarray]] = []
            thumbs = _masked_concept_thumbs(backend, concepts, result, layer, unit, indices, natives, masks)
            self_tiles[(layer, unit)] = (indices, natives)
            return layer, unit, indices, thumbs, masks

        self_tiles = self._figure_tiles

        handle = self.ctx.session.run(f"Dissection: {layer} unit {unit} masks", job, key="dissection-masks",
                                      on_done=self._unit_images_done)
        if handle is not None:
            handle.failed.connect(self._unit_images_failed)

    def _unit_images_done(self, value: tuple[str, int, list[int], np.ndarray, list[tuple[int, np.ndarray]]]) -> None:
        layer, unit, indices, thumbs, masks = value
        ld = self.result.layers.get(layer) if self.result is not None else None
        if ld is None:
            return
        self.shown_masks = {(layer, unit): masks}
        cols = max(1, (self._side_scroll.viewport().width() - self.unit_images.gap) // (THUMB + self.unit_images.gap))
        values = ld.top_values[unit]
        self.unit_images.set_tiles(thumbs, indices, cols, labels=[f"{v:#.3g}" for v in values[:len(indices)]],
                                   tips=[f"{Path(self.concepts.image_path(i)).name}\nmax {v:.4g}"
                                         for i, v in zip(indices, values, strict=False)])
        self.unit_images_ready.emit(layer, unit)

    def _unit_images_failed(self, error: BaseException) -> None:
        self.unit_images.set_placeholder(f"Could not compute the masks: {error}", None)

    # ------------------------------------------------------------------ figure

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("result", "Dissection result: detectors per category and concept, unit tiles")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("chart", "Detectors per concept category", True),
                FigureOption("concepts", "Detectors per concept", True),
                FigureOption("summary", "One summary line per layer", True),
                FigureOption("unit_tiles", "Top concept images of the best and the selected units", True)]

    def top_units(self, n: int = FIGURE_TOP_UNITS) -> list[tuple[str, int]]:
        """The ``n`` units with the best IoU over every dissected layer, detectors first."""
        if self.result is None:
            return []
        scored = []
        for name, ld in self.result.layers.items():
            s = ld.summary
            for u in range(ld.units):
                scored.append((bool(s.is_detector[u]), float(s.iou[u]), name, u))
        scored.sort(key=lambda t: (not t[0], -t[1]))
        return [(name, u) for _d, _iou, name, u in scored[:n]]

    def figure_tiles_ready(self) -> bool:
        """Whether the top units' figure tiles are computed (or there is nothing to compute)."""
        return self.result is None or all(key in self._figure_tiles for key in self.top_units())

    def _prepare_figure_tiles(self) -> None:
        """Compute the masked top concept images of the best units on the worker, for figures."""
        result, concepts = self.result, self.concepts
        wanted = [key for key in self.top_units() if key not in self._figure_tiles]
        if result is None or not wanted:
            return
        tiles = self._figure_tiles
        plan = []
        for layer, unit in wanted:
            ld = result.layers[layer]
            plan.append((layer, unit, [int(i) for i in ld.top_images[unit] if i >= 0][:FIGURE_IMAGES]))

        def job(backend: Any, _loaded: Any) -> Generator[Progress, None, None]:
            for j, (layer, unit, indices) in enumerate(plan):
                yield Progress(j / len(plan), f"figure tiles of {layer} unit {unit}")
                natives: list[np.ndarray] = []
                _masked_concept_thumbs(backend, concepts, result, layer, unit, indices, natives)
                tiles[(layer, unit)] = (indices, natives)

        self._figure_handle = self.ctx.session.run("Dissection: figure tiles", job, key="dissection-figure")

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """Detectors per concept category and per concept (bar charts with labelled axes and a
        legend of the layers), the layers' summary lines and the top concept images of the best
        units and of the selected unit, with their labels and IoU."""
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        result = self.result
        if result is None:
            raise ValueError("Network Dissection: nothing to export yet: run Network Dissection first")
        layers = list(result.layers)
        colors = [QColor(_LAYER_COLORS[j % len(_LAYER_COLORS)]) for j in range(len(layers))]
        threshold = result.params.iou_threshold
        elements: list[Any] = []
        if include.get("chart", True):
            categories = list(result.categories)
            series = []
            for name, color in zip(layers, colors, strict=False):
                s = result.layers[name].summary
                per_cat = dict(zip(s.categories, s.detectors_per_category.tolist(), strict=True))
                series.append((name, [float(per_cat.get(c, 0)) for c in categories], color))
            elements.append(BarChart(categories, series, y_label="detectors (units)", x_label="concept category",
                                     title="Detectors per concept category"))
        if include.get("concepts", True):
            counts: dict[str, list[int]] = {}
            for j, name in enumerate(layers):
                s = result.layers[name].summary
                for u in range(result.layers[name].units):
                    if s.is_detector[u]:
                        counts.setdefault(str(s.label_name[u]), [0] * len(layers))[j] += 1
            concepts = sorted(counts, key=lambda c: (-sum(counts[c]), c))[:16]
            if concepts:
                series = [(name, [float(counts[c][j]) for c in concepts], color)
                          for j, (name, color) in enumerate(zip(layers, colors, strict=False))]
                extra = f" (the {len(concepts)} most frequent of {len(counts)})" if len(counts) > len(concepts) else ""
                elements.append(BarChart(concepts, series, y_label="detectors (units)", x_label="concept",
                                         title=f"Detectors per concept{extra}"))
            else:
                elements.append(Text(f"No unit is a detector (IoU > {threshold:g}) in {', '.join(layers)}."))
        if include.get("summary", True):
            elements.append(Text("\n".join(self.summary_lines())))
        if include.get("unit_tiles", True):
            units = self.top_units()
            sel = (self.ctx.selection.layer, self.ctx.selection.unit)
            if sel in self._figure_tiles and sel not in units:
                units = [*units, sel]
            blocks: list[Any] = []
            for layer, unit in units:
                if (layer, unit) not in self._figure_tiles:
                    continue
                _indices, images = self._figure_tiles[(layer, unit)]
                ld = result.layers[layer]
                s = ld.summary
                verdict = "detector" if s.is_detector[unit] else "not a detector"
                mark = " (selected)" if (layer, unit) == sel else ""
                head = (f"{layer} unit {unit}{mark}: {s.label_name[unit]} ({s.category_name[unit]}), "
                        f"IoU {s.iou[unit]:.3f}, {verdict}")
                values = ld.top_values[unit]
                tiles = [Tile.of(img, f"act {v:.3g}") for img, v in zip(images[:FIGURE_IMAGES], values, strict=False)]
                blocks.append(Stack([Text(head, bold=True, size=6.5),
                                     TileGrid(tiles, columns=FIGURE_IMAGES, caption_size=5.5, gap=3.0)], gap=2))
            if blocks:
                elements.append(Text("Top concept images of the best units", bold=True))
                if options.inches >= 5:  # two units side by side
                    blocks = [Row(blocks[i:i + 2] if i + 1 < len(blocks) else [blocks[i], Stack([])], gap=12)
                              for i in range(0, len(blocks), 2)]
                elements.extend(blocks)
                rel = ">" if result.params.strict_mask else "≥"
                elements.append(Legend([(f"unit's mask (activation {rel} its dissection threshold)", QColor(0, 255, 255)),
                                        ("pixels of the unit's concept", QColor(255, 220, 0))], outline=True))
        model = self.ctx.session.model
        model_name = model.name if model is not None else result.model
        source = ("built-in concepts" if self.source_combo.currentData() == "builtin"
                  else f"Broden set {Path(result.concepts_root).name}")
        p = result.params
        subtitle = (f"{source}: {result.n_images} images, {len(result.categories)} categories · "
                    f"top {p.quantile:g} of each unit's activations as its mask · detector: IoU > {threshold:g} · "
                    f"{p.mask_rule} rule, masks S {'>' if p.strict_mask else '≥'} T")
        return Figure(f"Network Dissection of {model_name}: {', '.join(layers)}", subtitle, elements,
                      options.width_pt, options.dpi)

    # ------------------------------------------------------------------ report

    def export_report_dialog(self) -> None:
        """Ask for a folder and write the HTML report there."""
        if self.result is None:
            return
        folder = QFileDialog.getExistingDirectory(self, "Folder for the dissection report")
        if folder:
            self.export_report(folder)

    def export_report(self, folder: str | Path) -> JobHandle | None:
        """Write the engine's dissection report (a job; returns its handle).

        The report goes into ``folder`` when it is empty, missing or an earlier report (the
        engine replaces the folder as a whole); otherwise into a new ``dissection-report``
        subfolder, so that choosing e.g. one's documents folder never deletes anything.
        """
        result, concepts = self.result, self.concepts
        if result is None:
            return None
        out = report_target(Path(folder))

        def job(backend: Any, _loaded: Any) -> Generator[Progress, None, Path]:
            from engine.dissection.report import write_report

            yield Progress(None, f"writing the report to {out}")
            return write_report(result, concepts, out, backend=backend)

        handle = self.ctx.session.run("Dissection report", job, key="dissection-report", on_done=self._report_done)
        if handle is not None:
            handle.failed.connect(self._report_failed)
            self.status.setText(f"Writing the report to {out}…")
        return handle

    def _report_done(self, path: Path) -> None:
        self.status.setText(f"Report written to {path}")

    def _report_failed(self, error: BaseException) -> None:
        self.status.setText(f"Report failed: {error}")


def report_target(folder: Path) -> Path:
    """``folder`` if writing a report may replace it, else a fresh subfolder of it."""
    from engine.cache import free_output_dir

    return free_output_dir(folder, "dissection-report")


def _legend_html(rel: str) -> str:
    """The side panel's legend; ``rel`` is the mask's comparison (≥ for the paper's rule, > for Lite's)."""
    return (f"<span style='color:#00ffff'>■</span> unit mask (activation {html.escape(rel)} threshold)<br>"
            "<span style='color:#ffdc00'>■</span> pixels of the unit's concept")


def _masked_concept_thumbs(backend: Any, concepts: Any, result: Any, layer: str, unit: int, indices: Sequence[int],
                           natives: list[np.ndarray] | None = None,
                           masks: list[tuple[int, np.ndarray]] | None = None) -> np.ndarray:
    """(n, THUMB, THUMB, 3) thumbnails of concept images with the unit's and the concept's masks.

    The unit's masks are the engine's (:func:`engine.dissection.report.top_image_masks`: the
    dissection's rule, threshold and tie fallback, at each image's label-mask size, as the
    IoUs counted them and the report draws them); with ``masks`` they are appended to it as
    ``(image index, bool mask)``. With ``natives``, the images at their own size (both masks
    scaled to it, nearest) are appended to it, in the order of ``indices``: the figure shows
    them with their own pixels. Images that cannot be read stay black. Runs on the worker.
    """
    from PIL import Image

    from engine.data.images import load_image
    from engine.dissection.report import top_image_masks

    def scaled(mask: np.ndarray, w: int, h: int) -> np.ndarray:
        if mask.shape == (h, w):
            return mask
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0

    out = np.zeros((len(indices), THUMB, THUMB, 3), dtype=np.uint8)
    label = int(result.layers[layer].summary.label[unit])
    got = dict(top_image_masks(backend, concepts, result, layer, unit, indices))
    for j, i in enumerate(indices):
        mask = got.get(i)
        if mask is None:
            if natives is not None:
                natives.append(np.zeros((THUMB, THUMB, 3), dtype=np.uint8))
            continue
        if masks is not None:
            masks.append((i, mask))
        img = load_image(concepts.image_path(i))
        h, w = img.shape[:2]
        concept = np.zeros(mask.shape, dtype=bool)  # the label maps are at the label-mask size too
        for _cat, labels in concepts.sample(i).pixel_labels:
            concept |= labels == label
        thumb = np.asarray(Image.fromarray(img).resize((THUMB, THUMB), Image.Resampling.BILINEAR))
        small, small_concept = scaled(mask, THUMB, THUMB), scaled(concept, THUMB, THUMB)
        shown = np.where(small[..., None], thumb, (thumb * 0.45).astype(np.uint8))
        shown[mask_outline(small_concept)] = _CONCEPT_OUTLINE
        shown[mask_outline(small)] = _UNIT_OUTLINE
        out[j] = shown
        if natives is not None:
            full_mask, full_concept = scaled(mask, w, h), scaled(concept, w, h)
            full = np.where(full_mask[..., None], img, (img * 0.45).astype(np.uint8))
            full[mask_outline(full_concept)] = _CONCEPT_OUTLINE
            full[mask_outline(full_mask)] = _UNIT_OUTLINE
            natives.append(full)
    return out
