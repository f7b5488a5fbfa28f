"""The image browser: a virtualized thumbnail grid of the image set, filters, and one image.

One module per part; this package re-exports the names other modules and tests use.

* :mod:`.model`: :class:`ImageListModel`, one row per image of the selection's image set
  (row = image index), with the file name, label, thumbnail and, once
  :meth:`ImageBrowser.set_predictions` was called, the predicted class, confidence and
  correctness, all kept in numpy arrays; :class:`RowFilter` and :class:`SortKey`.
* :mod:`.proxy`: :class:`ImageFilterProxy`, the filtered, sorted rows the grid shows (a numpy
  permutation, not a ``QSortFilterProxyModel``).
* :mod:`.delegate`: :class:`ThumbnailDelegate` paints each cell (thumbnail, file name, label,
  prediction and a green/red correctness marker) from one ``data()`` call (:attr:`Role.CELL`).
  Thumbnails come from :class:`gui.thumbnails.ThumbnailCache`.
* :mod:`.preview`: :class:`PreviewLoader` decodes the current image on a worker thread.
* :mod:`.detail`: :class:`ImageDetail`, the current image scaled to fit, its name, label and the
  model's top classes with probability bars.
* :mod:`.view`: :class:`ImageBrowser`, the dockable view, and how it mirrors the shared
  selection.
"""

from __future__ import annotations

from .delegate import ThumbnailDelegate
from .detail import ImageDetail
from .model import (
    NO_LABEL,
    READY_COALESCE_MS,
    THUMB_SIZE,
    TOP_K,
    Cell,
    Correctness,
    ImageListModel,
    Role,
    RowFilter,
    SortKey,
)
from .preview import PREVIEW_MAX_SIDE, PreviewLoader
from .proxy import ImageFilterProxy
from .view import ImageBrowser

__all__ = [
    "NO_LABEL",
    "PREVIEW_MAX_SIDE",
    "READY_COALESCE_MS",
    "THUMB_SIZE",
    "TOP_K",
    "Cell",
    "Correctness",
    "ImageBrowser",
    "ImageDetail",
    "ImageFilterProxy",
    "ImageListModel",
    "PreviewLoader",
    "Role",
    "RowFilter",
    "SortKey",
    "ThumbnailDelegate",
]
