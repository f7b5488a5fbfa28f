"""The one selection every view shares: model, image set, current image, layer, unit, class,
and generic items.

Views receive the :class:`Selection` in their constructor, listen to its signals and call its
setters; they never talk to each other. Each signal fires once per real change, after the whole
change (including cascaded resets) is applied, so a slot that reads other properties sees a
consistent state. Cascades:

* setting ``model`` resets ``layer``, ``unit`` and ``class_index``;
* setting ``images`` resets ``current_image`` and ``selected_images``;
* setting ``layer`` resets ``unit``.

``model`` and ``images`` are opaque objects (an engine ``ModelSpec``, a loaded-model handle,
an image set) compared by identity: setting a new object, even an equal one, is a change,
because a reloaded model or a re-scanned folder must refresh the views.

Generic items
-------------
Besides those fields, a view can publish what it shows under a *kind* of its own choosing
(``"graph-node"``, ``"neighbour-image"``, ...) and other views may listen, without any change
to this module per method::

    selection.set_item("graph-node", ("layer3", 12))     # publish (None clears)
    selection.item("graph-node")                         # -> ("layer3", 12), None when unset
    selection.item_changed.connect(slot)                 # slot(kind, value)

A value is plain data: None, bool, int, float (finite), str, and tuples (lists are stored as
tuples) and dicts with str keys of those, so that it survives a project file. Like the fields,
``item_changed`` fires once per real change (equal values, of the same types, are no change),
after every field signal of the same change. Setting a new model or a new image set clears every
item, since items name things in the results of one model on one image set.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from PySide6.QtCore import QObject, Signal

__all__ = ["Selection"]

_NONE = -1


class Selection(QObject):
    """Shared selection state; lives on the GUI thread."""

    model_changed = Signal(object)
    images_changed = Signal(object)
    current_image_changed = Signal(int)
    selected_images_changed = Signal(object)
    layer_changed = Signal(str)
    unit_changed = Signal(int)
    class_changed = Signal(int)
    item_changed = Signal(str, object)
    """``(kind, value)`` of a generic item; ``value`` is None when the item was cleared."""

    # Field -> its signal, in emission order: a field is announced after those it depends on.
    _SIGNALS: ClassVar[dict[str, str]] = {
        "model": "model_changed",
        "images": "images_changed",
        "current_image": "current_image_changed",
        "selected_images": "selected_images_changed",
        "layer": "layer_changed",
        "unit": "unit_changed",
        "class_index": "class_changed",
    }

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._state: dict[str, Any] = {
            "model": None,
            "images": None,
            "current_image": _NONE,
            "selected_images": (),
            "layer": "",
            "unit": _NONE,
            "class_index": _NONE,
        }
        self._items: dict[str, Any] = {}

    # -- read access ----------------------------------------------------------------------

    @property
    def model(self) -> object | None:
        """The model (a ``ModelSpec`` or whatever loaded-model handle the app sets), or None."""
        return self._state["model"]

    @model.setter
    def model(self, value: object | None) -> None:
        self.set_model(value)

    @property
    def images(self) -> object | None:
        """The image set, or None."""
        return self._state["images"]

    @images.setter
    def images(self, value: object | None) -> None:
        self.set_images(value)

    @property
    def current_image(self) -> int:
        """Index of the current image in the image set, -1 for none."""
        return self._state["current_image"]

    @current_image.setter
    def current_image(self, value: int) -> None:
        self.set_current_image(value)

    @property
    def selected_images(self) -> tuple[int, ...]:
        """Indices of the selected images, sorted and unique."""
        return self._state["selected_images"]

    @selected_images.setter
    def selected_images(self, value: Iterable[int]) -> None:
        self.set_selected_images(value)

    @property
    def layer(self) -> str:
        """Name of the selected layer, "" for none."""
        return self._state["layer"]

    @layer.setter
    def layer(self, value: str) -> None:
        self.set_layer(value)

    @property
    def unit(self) -> int:
        """Selected unit (channel) of the selected layer, -1 for none."""
        return self._state["unit"]

    @unit.setter
    def unit(self, value: int) -> None:
        self.set_unit(value)

    @property
    def class_index(self) -> int:
        """Selected output class, -1 for none."""
        return self._state["class_index"]

    @class_index.setter
    def class_index(self, value: int) -> None:
        self.set_class_index(value)

    def item(self, kind: str) -> Any:
        """The generic item published under ``kind``, or None."""
        return self._items.get(kind)

    @property
    def items(self) -> dict[str, Any]:
        """Every generic item set, by kind (a copy)."""
        return dict(self._items)

    # -- setters --------------------------------------------------------------------------

    def set_model(self, model: object | None) -> None:
        """Set the model; a new model resets layer, unit and class."""
        if model is not self.model:
            self._apply(model=model, layer="", unit=_NONE, class_index=_NONE, items={})

    def set_images(self, images: object | None) -> None:
        """Set the image set; a new set resets the current image and the image selection."""
        if images is not self.images:
            self._apply(images=images, current_image=_NONE, selected_images=(), items={})

    def set_current_image(self, index: int) -> None:
        """Set the current image index (-1 for none)."""
        self._apply(current_image=_index(index, "current_image"))

    def set_selected_images(self, indices: Iterable[int]) -> None:
        """Set the selected image indices (stored sorted, without duplicates)."""
        self._apply(selected_images=_indices(indices))

    def set_layer(self, layer: str) -> None:
        """Set the layer ("" for none); a different layer resets the unit."""
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a str, not {type(layer).__name__}")
        if layer != self.layer:
            self._apply(layer=layer, unit=_NONE)

    def set_unit(self, unit: int) -> None:
        """Set the unit of the current layer (-1 for none)."""
        self._apply(unit=_index(unit, "unit"))

    def set_class_index(self, class_index: int) -> None:
        """Set the class (-1 for none)."""
        self._apply(class_index=_index(class_index, "class"))

    def set_item(self, kind: str, value: Any) -> None:
        """Publish ``value`` (plain data, see the module docstring) under ``kind``; None clears it.

        Raises TypeError or ValueError for a kind that is not a non-empty str or a value that is
        not plain data, changing nothing.
        """
        kind = _kind(kind)
        self._apply(items={**self._items, kind: _plain(value, f"item {kind!r}")})

    def clear_item(self, kind: str) -> None:
        """Remove the item of ``kind`` (no signal when there is none)."""
        self.set_item(kind, None)

    # -- project files --------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The JSON-serialisable part of the selection, for project files.

        Model and image set are not included: the project file stores their sources.
        """
        return {
            "layer": self.layer,
            "unit": self.unit,
            "class": self.class_index,
            "current_image": self.current_image,
            "selected_images": list(self.selected_images),
            "items": {kind: _json(value) for kind, value in self._items.items()},
        }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Apply a :meth:`snapshot` in one step; missing keys mean "none".

        Call it after setting the model and the image set (which reset these fields). Each
        signal fires at most once; items absent from ``snapshot`` are cleared. Raises ValueError
        or TypeError on malformed values, leaving the selection unchanged.
        """
        layer = snapshot.get("layer", "")
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a str, not {type(layer).__name__}")
        items = snapshot.get("items") or {}
        if not isinstance(items, Mapping):
            raise TypeError(f"items must be a mapping, not {type(items).__name__}")
        self._apply(
            items={_kind(k): _plain(v, f"item {k!r}") for k, v in items.items()},
            layer=layer,
            unit=_index(snapshot.get("unit", _NONE), "unit"),
            class_index=_index(snapshot.get("class", _NONE), "class"),
            current_image=_index(snapshot.get("current_image", _NONE), "current_image"),
            selected_images=_indices(snapshot.get("selected_images", ())),
        )

    def _apply(self, *, items: Mapping[str, Any] | None = None, **changes: Any) -> None:
        """Store ``changes`` (and ``items``: the whole new item map, None values meaning absent),
        then emit one signal per field whose value really changed, then one per changed item."""
        changed = [
            name
            for name in self._SIGNALS
            if name in changes and not _same(name, self._state[name], changes[name])
        ]
        new_items = self._items if items is None else {k: v for k, v in items.items() if v is not None}
        kinds = list(self._items) + [k for k in new_items if k not in self._items]
        changed_items = [k for k in kinds if not _same_plain(self._items.get(k), new_items.get(k))]
        self._state.update(changes)
        self._items = new_items
        for name in changed:
            getattr(self, self._SIGNALS[name]).emit(self._state[name])
        for kind in changed_items:
            self.item_changed.emit(kind, self._items.get(kind))


def _same(name: str, old: Any, new: Any) -> bool:
    """Opaque objects compare by identity, plain values by equality."""
    return old is new if name in ("model", "images") else old == new


def _index(value: Any, what: str, *, allow_none: bool = True) -> int:
    """Validate an index (an int or numpy integer, not a bool): >= 0, or -1 when ``allow_none``."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    index = operator.index(value)
    lowest = _NONE if allow_none else 0
    if index < lowest:
        raise ValueError(f"{what} must be >= {lowest}, got {index}")
    return index


def _indices(values: Iterable[Any]) -> tuple[int, ...]:
    """Validate image indices; return them sorted and without duplicates."""
    if isinstance(values, (str, bytes)):
        raise TypeError("selected images must be a sequence of ints")
    return tuple(sorted({_index(v, "selected image", allow_none=False) for v in values}))


def _kind(kind: Any) -> str:
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"an item kind must be a non-empty str, not {kind!r}")
    return kind


def _plain(value: Any, what: str) -> Any:
    """Validate plain data; lists become tuples, numpy scalars Python scalars."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
        value = value.item()
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what}: {value} is not a finite number")
        return float(value)
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v, what) for v in value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{what}: dict keys must be str")
        return {k: _plain(v, what) for k, v in value.items()}
    raise TypeError(f"{what} must be plain data (None, bool, int, float, str, tuple, dict), "
                    f"not {type(value).__name__}")


def _same_plain(a: Any, b: Any) -> bool:
    """Equality that also tells 1, 1.0 and True apart, recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_plain(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_plain(a[k], b[k]) for k in a)
    return bool(a == b)


def _json(value: Any) -> Any:
    """A plain value as JSON holds it (tuples as lists)."""
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value
