"""Dockable views of the main window; each takes the shared :class:`~gui.selection.Selection`.

One module per view, or a package per view when it needs several files (``image_browser/``);
:func:`gui.views.base.discover_views` finds both. Widgets several views use live in
:mod:`gui.widgets`, since views never import each other.
"""
