"""What every analysis view is, and how the shell finds them.

A view is one module in ``gui/views/`` holding a :class:`View` subclass, or a package there
whose ``__init__`` imports one (a view too large for one file, e.g. ``image_browser/``). The
main window discovers every such class (:func:`discover_views`), puts each in a dock, lists it
in the View menu, adds its :meth:`View.analysis_actions` to the Analysis menu, exports the
figure :meth:`View.figure` composes from the view's data (never a grab of its widgets; the
kinds and include-toggles it offers are :meth:`View.figure_kinds` and
:meth:`View.figure_options`), and saves :meth:`View.save_state` in project files. Adding a
view therefore touches no shell code. Views talk to each other only through ``ctx.selection``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWidget

from ..context import AppContext
from ..figures import Figure, FigureKind, FigureOption, FigureOptions


class View(QWidget):
    """Base class of the dockable views."""

    #: dock title
    title: str = ""
    #: stable name for saved layouts and project files
    object_name: str = ""
    #: where the dock goes in the default layout
    area: Qt.DockWidgetArea = Qt.DockWidgetArea.RightDockWidgetArea
    #: order in menus and default tabbing (lower first)
    order: int = 100
    #: shown in the default layout
    visible_by_default: bool = True
    #: the explanation the Sanity check view checks for this view ("heatmap", "dissection", a
    #: class-evidence method, ...); None: the view shows nothing the check applies to
    sanity_explanation: str | None = None

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.ctx = ctx
        self.setObjectName(f"view-{self.object_name}")

    def on_screen(self) -> bool:
        """Whether the view is shown with some of it on screen (a dock tabbed behind another is
        "visible" with nothing on screen): views start work of their own only then."""
        return self.isVisible() and not self.visibleRegion().isEmpty()

    def when_on_screen(self, callback: Callable[[], None]) -> None:
        """Call from ``showEvent``: ``callback`` runs once the view is laid out, and again each
        time its dock's tab is raised (a tabbed dock gets no show event then; its
        ``visibilityChanged`` says so). The callback checks :meth:`on_screen` itself."""
        from PySide6.QtCore import QTimer
        from PySide6.QtWidgets import QDockWidget

        dock = self.parentWidget()
        if isinstance(dock, QDockWidget) and dock is not getattr(self, "_watched_dock", None):
            self._watched_dock = dock
            dock.visibilityChanged.connect(lambda on: QTimer.singleShot(0, callback) if on else None)
        QTimer.singleShot(0, callback)  # once laid out: its visible region is known then

    def export_target(self) -> QWidget:
        """What 'Export figure' exports: the view itself, whose :meth:`figure` is composed."""
        return self

    def figure_kinds(self) -> list[FigureKind]:
        """The figures this view composes, the default first (empty: none)."""
        return []

    def figure_options(self) -> list[FigureOption]:
        """The view-specific include-toggles its figures take (``FigureOptions.include``)."""
        return []

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """The figure of what the view shows, composed from its data.

        Raises ``ValueError`` saying what is missing when there is nothing to show yet.
        """
        raise ValueError(f"the {self.title or type(self).__name__} view has no figure")

    def figure_kind(self, options: FigureOptions) -> str:
        """``options.kind`` checked against :meth:`figure_kinds` (empty: the first)."""
        kinds = [k.key for k in self.figure_kinds()]
        if not options.kind:
            return kinds[0] if kinds else ""
        if options.kind not in kinds:
            raise ValueError(f"the {self.title} view has no '{options.kind}' figure "
                             f"(figures: {', '.join(kinds) or 'none'})")
        return options.kind

    def figure_includes(self, options: FigureOptions, kind: str) -> dict[str, bool]:
        """Each include-toggle of ``kind``: ``options.include`` or the toggle's default."""
        return {o.key: options.wants(o.key, o.default) for o in self.figure_options()
                if not o.kinds or kind in o.kinds}

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        """Entries for the Analysis menu: (label, callback)."""
        return []

    def sanity_request(self) -> dict[str, Any] | None:
        """What "Sanity check of this view" asks the Sanity check view to run (the generic
        ``sanity_request`` selection item): the view's explanation at the selected layer and unit.
        None where :attr:`sanity_explanation` is unset."""
        if not self.sanity_explanation:
            return None
        sel = self.ctx.selection
        return {"explanation": self.sanity_explanation, "layer": sel.layer, "unit": sel.unit}

    def save_state(self) -> dict[str, Any]:
        """JSON-serialisable parameters for project files."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Apply what :meth:`save_state` returned (unknown keys are ignored)."""

    def shutdown(self) -> None:
        """Called before the window closes."""


def discover_views() -> list[type[View]]:
    """Every concrete :class:`View` subclass defined in the modules of ``gui.views``.

    A view may be one module (``gui/views/dissection.py``) or a package of its own
    (``gui/views/image_browser/``): a package's classes count when they are defined in it or in
    one of its submodules, and the package's ``__init__`` imports the module defining the view.
    """
    from . import __path__ as views_path

    found: dict[str, type[View]] = {}
    for mod in pkgutil.iter_modules(views_path):
        if mod.name.startswith("_") or mod.name == "base":
            continue
        module = importlib.import_module(f"{__package__}.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, View) and obj is not View and obj.object_name \
                    and _defined_in(obj, module.__name__):
                found[obj.object_name] = obj
    return sorted(found.values(), key=lambda c: (c.order, c.title))


def _defined_in(cls: type, module: str) -> bool:
    """Whether ``cls`` is defined in ``module`` or, for a package, in one of its submodules."""
    return cls.__module__ == module or cls.__module__.startswith(module + ".")
