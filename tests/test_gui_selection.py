"""The shared Selection: one signal per real change, cascading resets, snapshot/restore."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.types import ModelSpec
from gui.selection import Selection

NAMES = {
    "model": "model_changed",
    "images": "images_changed",
    "current_image": "current_image_changed",
    "selected_images": "selected_images_changed",
    "layer": "layer_changed",
    "unit": "unit_changed",
    "class": "class_changed",
}


class Recorder:
    """Records (field, value) for every Selection signal, in emission order."""

    def __init__(self, sel: Selection) -> None:
        self.events: list[tuple[str, object]] = []
        for field, signal in NAMES.items():
            getattr(sel, signal).connect(lambda v, f=field: self.events.append((f, v)))

    def take(self) -> list[tuple[str, object]]:
        events, self.events = self.events, []
        return events


@pytest.fixture
def sel(qtbot) -> Selection:
    return Selection()


def test_defaults(sel: Selection) -> None:
    assert (sel.model, sel.images, sel.current_image, sel.selected_images) == (None, None, -1, ())
    assert (sel.layer, sel.unit, sel.class_index) == ("", -1, -1)


def test_signals_fire_once_per_real_change(sel: Selection) -> None:
    rec = Recorder(sel)
    sel.layer = "layer4.1.conv2"
    sel.layer = "layer4.1.conv2"
    sel.unit = 7
    sel.set_unit(7)
    sel.class_index = 281
    sel.class_index = 281
    sel.current_image = 3
    sel.current_image = 3
    sel.selected_images = [5, 2, 5]
    sel.selected_images = (2, 5)
    assert rec.take() == [
        ("layer", "layer4.1.conv2"),
        ("unit", 7),
        ("class", 281),
        ("current_image", 3),
        ("selected_images", (2, 5)),
    ]
    assert sel.selected_images == (2, 5)
    sel.unit = np.int64(7)  # numpy indices are accepted and compare equal
    assert rec.take() == []


def test_model_reset_cascades(sel: Selection) -> None:
    spec = ModelSpec(path="resnet18.pt", arch="resnet18")
    sel.model = spec
    sel.layer, sel.unit, sel.class_index = "layer3", 4, 9
    sel.current_image = 2
    rec = Recorder(sel)
    seen_in_slot: list[tuple[str, int, int]] = []
    sel.model_changed.connect(lambda _: seen_in_slot.append((sel.layer, sel.unit, sel.class_index)))

    sel.model = spec  # same object: no change
    assert rec.take() == []
    other = ModelSpec(path="resnet18.pt", arch="resnet18")  # equal but a new object: a reload
    sel.model = other
    assert rec.take() == [("model", other), ("layer", ""), ("unit", -1), ("class", -1)]
    assert seen_in_slot == [("", -1, -1)]  # state is consistent when the first signal fires
    assert sel.current_image == 2  # images are independent of the model

    sel.model = None  # layer/unit/class already none: only the model changes
    assert rec.take() == [("model", None)]


def test_images_reset_cascades(sel: Selection) -> None:
    first, second = object(), object()
    sel.images = first
    sel.current_image, sel.selected_images = 1, [1, 2]
    sel.layer = "conv1"
    rec = Recorder(sel)
    sel.images = second
    assert rec.take() == [("images", second), ("current_image", -1), ("selected_images", ())]
    assert sel.layer == "conv1"
    sel.images = second
    assert rec.take() == []


def test_layer_resets_unit(sel: Selection) -> None:
    sel.layer, sel.unit = "a", 3
    rec = Recorder(sel)
    sel.layer = "b"
    assert rec.take() == [("layer", "b"), ("unit", -1)]
    sel.layer = "c"  # unit already -1: not re-announced
    assert rec.take() == [("layer", "c")]


def test_invalid_values_are_rejected(sel: Selection) -> None:
    with pytest.raises(ValueError):
        sel.unit = -2
    with pytest.raises(TypeError):
        sel.class_index = True  # type: ignore[assignment]
    with pytest.raises(TypeError):
        sel.layer = 3  # type: ignore[assignment]
    with pytest.raises(ValueError):
        sel.selected_images = [0, -1]
    assert (sel.unit, sel.class_index, sel.layer, sel.selected_images) == (-1, -1, "", ())


def test_snapshot_restore_round_trip(sel: Selection) -> None:
    sel.model, sel.images = ModelSpec(path="m.onnx"), object()
    sel.layer, sel.unit, sel.class_index = "features.10", 12, 3
    sel.current_image, sel.selected_images = 4, [4, 8]
    text = json.dumps(sel.snapshot())

    other = Selection()
    other.model, other.images = ModelSpec(path="m.onnx"), object()
    rec = Recorder(other)
    other.restore(json.loads(text))
    assert other.snapshot() == sel.snapshot()
    assert rec.take() == [  # one signal each: the unit is not reset and then set again
        ("current_image", 4),
        ("selected_images", (4, 8)),
        ("layer", "features.10"),
        ("unit", 12),
        ("class", 3),
    ]
    other.restore(json.loads(text))
    assert rec.take() == []

    other.restore({})  # missing keys mean "none"
    assert other.snapshot() == Selection().snapshot()
    with pytest.raises(TypeError):
        other.restore({"layer": "x", "unit": "12"})
    assert other.layer == ""  # a malformed snapshot changes nothing


# -- generic items ----------------------------------------------------------------------------


class ItemRecorder(Recorder):
    """Also records ``("item", (kind, value))`` for ``item_changed``."""

    def __init__(self, sel: Selection) -> None:
        super().__init__(sel)
        sel.item_changed.connect(lambda kind, value: self.events.append(("item", (kind, value))))


def test_items_fire_once_per_real_change(sel: Selection) -> None:
    rec = ItemRecorder(sel)
    seen: list[object] = []
    sel.item_changed.connect(lambda kind, _v: seen.append(sel.item(kind)))
    assert sel.item("graph-node") is None and sel.items == {}
    sel.set_item("graph-node", ["layer3", 12])  # a list is stored as a tuple
    sel.set_item("graph-node", ("layer3", 12))
    sel.set_item("graph-node", ("layer3", np.int64(12)))  # numpy scalars are plain ints
    sel.set_item("neighbour-image", {"index": 4, "distance": 0.25})
    sel.set_item("neighbour-image", {"distance": 0.25, "index": 4})
    assert rec.take() == [
        ("item", ("graph-node", ("layer3", 12))),
        ("item", ("neighbour-image", {"index": 4, "distance": 0.25})),
    ]
    assert seen == [("layer3", 12), {"index": 4, "distance": 0.25}]  # readable from the slot
    assert sel.item("graph-node") == ("layer3", 12) and type(sel.item("graph-node")[1]) is int
    sel.set_item("flag", 1)
    sel.set_item("flag", True)  # equal in Python, but a different value
    sel.set_item("flag", 1.0)
    assert rec.take() == [("item", ("flag", 1)), ("item", ("flag", True)), ("item", ("flag", 1.0))]

    sel.clear_item("flag")
    sel.clear_item("flag")
    sel.set_item("never-set", None)
    assert rec.take() == [("item", ("flag", None))]
    assert sel.items == {"graph-node": ("layer3", 12), "neighbour-image": {"index": 4, "distance": 0.25}}
    sel.layer, sel.unit = "conv1", 2  # the fields and the items are independent
    assert sel.item("graph-node") == ("layer3", 12)


def test_invalid_items_are_rejected(sel: Selection) -> None:
    sel.set_item("node", 3)
    for kind, value, error in (
        ("", 1, TypeError),
        (7, 1, TypeError),
        ("node", object(), TypeError),
        ("node", {1: "a"}, TypeError),
        ("node", {"a", "b"}, TypeError),
        ("node", ("ok", [np.zeros(2)]), TypeError),
        ("node", float("nan"), ValueError),
    ):
        with pytest.raises(error):
            sel.set_item(kind, value)  # type: ignore[arg-type]
    assert sel.items == {"node": 3}


def test_new_model_or_images_clear_the_items_after_the_fields(sel: Selection) -> None:
    sel.model, sel.images = ModelSpec(path="a.pt", arch="resnet18"), object()
    sel.layer = "layer1"
    sel.set_item("graph-node", "n1")
    sel.set_item("neighbour-image", 3)
    rec = ItemRecorder(sel)
    other = ModelSpec(path="a.pt", arch="resnet18")
    sel.model = other
    assert rec.take() == [("model", other), ("layer", ""),
                          ("item", ("graph-node", None)), ("item", ("neighbour-image", None))]
    sel.set_item("neighbour-image", 5)
    images = object()
    sel.images = images
    assert rec.take() == [("item", ("neighbour-image", 5)), ("images", images),
                          ("item", ("neighbour-image", None))]
    sel.images = images
    assert rec.take() == [] and sel.items == {}


def test_items_round_trip_through_a_project_snapshot(sel: Selection) -> None:
    sel.layer = "conv3"
    sel.set_item("graph-node", ("conv3", 7, {"cluster": 2}))
    sel.set_item("neighbour-image", 11)
    text = json.dumps(sel.snapshot())
    assert json.loads(text)["items"] == {"graph-node": ["conv3", 7, {"cluster": 2}], "neighbour-image": 11}

    other = Selection()
    other.set_item("stale", "x")
    rec = ItemRecorder(other)
    other.restore(json.loads(text))
    assert other.items == sel.items and other.snapshot() == sel.snapshot()
    assert rec.take() == [
        ("layer", "conv3"),
        ("item", ("stale", None)),
        ("item", ("graph-node", ("conv3", 7, {"cluster": 2}))),
        ("item", ("neighbour-image", 11)),
    ]
    other.restore(json.loads(text))
    assert rec.take() == []
    with pytest.raises(TypeError):
        other.restore({"layer": "conv3", "items": {"graph-node": object()}})
    with pytest.raises(TypeError):
        other.restore({"items": ["graph-node"]})
    assert other.items == sel.items  # a malformed snapshot changes nothing
    other.restore({})
    assert other.items == {} and rec.take()[-2:] == [("item", ("graph-node", None)),
                                                      ("item", ("neighbour-image", None))]
