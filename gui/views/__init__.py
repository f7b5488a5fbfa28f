"""Dockable views of the main window; each takes the shared :class:`~gui.selection.Selection`."""
