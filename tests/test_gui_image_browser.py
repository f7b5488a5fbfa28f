"""Image browser: model rows, predictions, filters, sorting, selection sync, thumbnails, pane.

Real Qt (offscreen), real image files written with PIL, real background decoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data.images import ImageSet, open_image_set
from engine.predict import Predictions
from gui.context import AppContext

COLORS = {
    "g7.png": (200, 200, 0),  # unlabelled, at the root
    "cat/a1.png": (255, 0, 0),
    "cat/b2.png": (0, 255, 0),
    "cat/c3.png": (0, 0, 255),
    "dog/d4.png": (255, 0, 255),
    "dog/e5.png": (0, 255, 255),
    "dog/f6.png": (90, 90, 90),
}
BROKEN = "cat/zz_broken.png"
# P(dog) per file: cat images with P(dog) > 0.5 and dog images with P(dog) < 0.5 are wrong.
P_DOG = {
    "g7.png": 0.6,
    "cat/a1.png": 0.1,
    "cat/b2.png": 0.7,
    "cat/c3.png": 0.45,
    "cat/zz_broken.png": 0.2,
    "dog/d4.png": 0.8,
    "dog/e5.png": 0.3,
    "dog/f6.png": 0.95,
}


def _write(folder: Path) -> ImageSet:
    for rel, color in COLORS.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (80, 40), color).save(folder / rel)
    (folder / BROKEN).write_bytes(b"this is not a PNG file")
    return open_image_set(folder)


@pytest.fixture
def image_set(tmp_path: Path) -> ImageSet:
    return _write(tmp_path / "images")


def rel(image_set: ImageSet, row: int) -> str:
    return image_set.relative_path(image_set.records[row])


def predictions(image_set: ImageSet) -> Predictions:
    p_dog = np.array([P_DOG[rel(image_set, i)] for i in range(len(image_set))], np.float32)
    return Predictions(
        paths=tuple(r.path for r in image_set.records),
        labels=tuple(r.label for r in image_set.records),
        classes=("cat", "dog"),
        probs=np.stack([1 - p_dog, p_dog], axis=1),
        valid=np.ones(len(image_set), dtype=bool),
        score_kind="probs",
    )


@pytest.fixture
def thumbs(tmp_path: Path, qtbot):
    from gui.thumbnails import ThumbnailCache

    cache = ThumbnailCache(size=32, disk_dir=tmp_path / "thumbs")
    yield cache
    cache.close()


@pytest.fixture
def browser(qtbot, thumbs):
    from gui.selection import Selection
    from gui.views.image_browser import ImageBrowser

    b = ImageBrowser(AppContext(Selection(), None, None), thumbnails=thumbs)
    qtbot.addWidget(b)
    b.resize(900, 600)
    b.show()
    qtbot.waitExposed(b)
    return b


def shown_rows(b) -> list[int]:
    """Image indices in the grid's order."""
    return [b.proxy.source_row(r) for r in range(b.proxy.rowCount())]


def rels(image_set: ImageSet, rows: list[int]) -> list[str]:
    return [rel(image_set, r) for r in rows]


# -- model, predictions, filters, sorting ----------------------------------------------------


def test_one_row_per_image_with_names_labels_and_count(browser, image_set) -> None:
    from PySide6.QtCore import Qt

    from gui.views.image_browser import Role

    browser.selection.images = image_set
    model = browser.model
    assert model.rowCount() == len(image_set) == 8
    for row, record in enumerate(image_set.records):
        index = model.index(row)
        assert index.data(Qt.ItemDataRole.DisplayRole) == os.path.basename(record.path)
        assert index.data(Role.LABEL) == record.label
        assert index.data(Role.PATH) == record.path
        assert record.path in index.data(Qt.ItemDataRole.ToolTipRole)
        assert index.data(Role.CORRECT) is None and index.data(Role.PREDICTED) is None
    assert browser.count_label.text() == "8 of 8 images"
    labels = [browser.label_filter.itemText(i) for i in range(browser.label_filter.count())]
    assert labels == ["All labels (8)", "(unlabelled) (1)", "cat (4)", "dog (3)"]
    assert not browser.correctness_filter.isEnabled()

    browser.selection.images = None
    assert model.rowCount() == 0 and browser.count_label.text() == "0 of 0 images"


def test_predictions_give_correctness_and_the_incorrect_filter(browser, image_set) -> None:
    from gui.views.image_browser import Role

    browser.selection.images = image_set
    browser.set_predictions(predictions(image_set))
    correct = {rel(image_set, r): browser.model.index(r).data(Role.CORRECT) for r in range(8)}
    assert correct == {
        "g7.png": None,  # unlabelled: neither correct nor wrong
        "cat/a1.png": True,
        "cat/b2.png": False,
        "cat/c3.png": True,
        "cat/zz_broken.png": True,
        "dog/d4.png": True,
        "dog/e5.png": False,
        "dog/f6.png": True,
    }
    b2 = rels(image_set, list(range(8))).index("cat/b2.png")
    assert browser.model.index(b2).data(Role.PREDICTED) == "dog"
    assert browser.model.index(b2).data(Role.CONFIDENCE) == pytest.approx(0.7)

    browser.correctness_filter.setCurrentIndex(browser.correctness_filter.findData("incorrect"))
    assert rels(image_set, shown_rows(browser)) == ["cat/b2.png", "dog/e5.png"]
    assert browser.count_label.text() == "2 of 8 images"
    browser.correctness_filter.setCurrentIndex(browser.correctness_filter.findData("correct"))
    assert len(shown_rows(browser)) == 5

    browser.set_predictions(None)  # back to no predictions: the filter is reset
    assert browser.count_label.text() == "8 of 8 images"
    assert not browser.correctness_filter.isEnabled()


def test_sort_by_confidence_and_label(browser, image_set) -> None:
    from gui.views.image_browser import SortKey

    browser.selection.images = image_set
    preds = predictions(image_set)
    browser.set_predictions(preds)
    conf = preds.confidence

    browser.sort_combo.setCurrentIndex(browser.sort_combo.findData(SortKey.CONFIDENCE_DESC))
    order = shown_rows(browser)
    assert sorted(order) == list(range(8))
    assert np.all(np.diff(conf[order]) <= 0)
    assert rel(image_set, order[0]) == "dog/f6.png"

    browser.sort_combo.setCurrentIndex(browser.sort_combo.findData(SortKey.CONFIDENCE_ASC))
    assert np.all(np.diff(conf[shown_rows(browser)]) >= 0)

    browser.sort_combo.setCurrentIndex(browser.sort_combo.findData(SortKey.LABEL))
    assert [image_set.records[r].label for r in shown_rows(browser)] == (
        ["cat"] * 4 + ["dog"] * 3 + [None]
    )


def test_label_text_prediction_and_confidence_filters(browser, image_set) -> None:
    browser.selection.images = image_set
    browser.set_predictions(predictions(image_set))

    browser.label_filter.setCurrentIndex(browser.label_filter.findText("dog (3)"))
    assert rels(image_set, shown_rows(browser)) == ["dog/d4.png", "dog/e5.png", "dog/f6.png"]
    browser.text_filter.setText("E5")  # case-insensitive file name substring
    assert rels(image_set, shown_rows(browser)) == ["dog/e5.png"]
    assert browser.count_label.text() == "1 of 8 images"
    browser.text_filter.clear()
    browser.label_filter.setCurrentIndex(browser.label_filter.findText("(unlabelled) (1)"))
    assert rels(image_set, shown_rows(browser)) == ["g7.png"]
    browser.label_filter.setCurrentIndex(0)

    browser.prediction_filter.setCurrentIndex(browser.prediction_filter.findText("dog (4)"))
    assert rels(image_set, shown_rows(browser)) == [
        "cat/b2.png",
        "dog/d4.png",
        "dog/f6.png",
        "g7.png",
    ]
    browser.prediction_filter.setCurrentIndex(0)
    browser.min_confidence.setValue(0.85)
    assert rels(image_set, shown_rows(browser)) == ["cat/a1.png", "dog/f6.png"]


# -- selection --------------------------------------------------------------------------------


def test_clicking_and_ctrl_clicking_set_the_selection(browser, image_set, qtbot) -> None:
    from PySide6.QtCore import Qt

    sel = browser.selection
    sel.images = image_set
    view = browser.view
    qtbot.waitUntil(lambda: view.visualRect(browser.proxy.index(3, 0)).isValid())

    no_modifier = Qt.KeyboardModifier(0)

    def click(proxy_row: int, modifier: Qt.KeyboardModifier = no_modifier) -> None:
        center = view.visualRect(browser.proxy.index(proxy_row, 0)).center()
        qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, modifier, center)

    click(2)
    assert sel.current_image == browser.proxy.source_row(2)
    assert sel.selected_images == (browser.proxy.source_row(2),)
    click(5, Qt.KeyboardModifier.ControlModifier)
    assert sel.current_image == browser.proxy.source_row(5)
    assert sel.selected_images == tuple(sorted(browser.proxy.source_row(r) for r in (2, 5)))


def test_selecting_through_the_selection_model_maps_sorted_rows(browser, image_set) -> None:
    from PySide6.QtCore import QItemSelectionModel

    from gui.views.image_browser import SortKey

    sel = browser.selection
    sel.images = image_set
    browser.set_predictions(predictions(image_set))
    browser.sort_combo.setCurrentIndex(browser.sort_combo.findData(SortKey.CONFIDENCE_DESC))
    sm = browser.view.selectionModel()
    flags = QItemSelectionModel.SelectionFlag
    sm.setCurrentIndex(browser.proxy.index(0, 0), flags.ClearAndSelect)
    assert rel(image_set, sel.current_image) == "dog/f6.png"
    sm.select(browser.proxy.index(1, 0), flags.Select)
    assert sel.selected_images == tuple(sorted(shown_rows(browser)[:2]))


def test_current_image_set_elsewhere_is_selected_and_scrolled_to(qtbot, browser, tmp_path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(150):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"img{i:03d}.png")
    sel = browser.selection
    sel.images = open_image_set(folder)
    view = browser.view
    emitted: list[int] = []
    sel.current_image_changed.connect(emitted.append)

    sel.current_image = 140
    index = browser.proxy.index(browser.proxy.proxy_row(140), 0)
    assert view.selectionModel().currentIndex() == index
    assert view.selectionModel().isSelected(index)
    qtbot.waitUntil(lambda: view.viewport().rect().intersects(view.visualRect(index)))
    assert emitted == [140]  # no echo from the view
    assert sel.current_image == 140

    sel.selected_images = (3, 4)  # set elsewhere: mirrored, current item kept
    sm = view.selectionModel()
    assert sorted(browser.proxy.source_rows(sm.selection())) == [3, 4, 140]
    assert sel.selected_images == (3, 4)

    browser.text_filter.setText("img00")  # the current image is filtered out: kept, not shown
    assert sel.current_image == 140 and browser.proxy.rowCount() == 10
    browser.text_filter.clear()  # shown again: selected again
    assert view.selectionModel().currentIndex().row() == browser.proxy.proxy_row(140)


# -- thumbnails -------------------------------------------------------------------------------


def test_thumbnail_is_queued_then_ready_with_the_size_bound(qtbot, thumbs, image_set) -> None:
    paths = [r.path for r in image_set.records]
    thumbs.set_paths(paths)
    row = rels(image_set, list(range(8))).index("cat/a1.png")
    assert thumbs.get(row) is None
    with qtbot.waitSignal(thumbs.ready, timeout=5000, check_params_cb=lambda r: r == row):
        pass
    image = thumbs.get(row)
    assert image is not None and (image.width(), image.height()) == (32, 16)  # 80x40, aspect kept
    assert image.pixelColor(16, 8).getRgb()[:3] == pytest.approx((255, 0, 0), abs=8)


def test_grid_repaints_the_row_when_its_thumbnail_arrives(qtbot, browser, image_set) -> None:
    from PySide6.QtCore import Qt

    browser.selection.images = image_set
    changed: list[int] = []
    browser.proxy.dataChanged.connect(
        lambda a, b, roles: changed.extend(range(a.row(), b.row() + 1))
        if Qt.ItemDataRole.DecorationRole in roles
        else None
    )
    qtbot.waitUntil(lambda: len(set(changed)) == 8, timeout=5000)
    assert all(browser.thumbnails.get(r) is not None for r in range(8))


def test_corrupt_file_gets_the_placeholder_once(qtbot, thumbs, image_set) -> None:
    thumbs.set_paths([r.path for r in image_set.records])
    row = rels(image_set, list(range(8))).index(BROKEN)
    assert thumbs.get(row) is None
    with qtbot.waitSignal(thumbs.ready, timeout=5000, check_params_cb=lambda r: r == row):
        pass
    assert thumbs.get(row) == thumbs.placeholder
    with qtbot.assertNotEmitted(thumbs.ready, wait=200):
        assert thumbs.get(row) == thumbs.placeholder  # not decoded again


def test_disk_cache_is_written_and_reused(qtbot, tmp_path, image_set) -> None:
    from PySide6.QtGui import QColor, QImage

    from gui.thumbnails import ThumbnailCache

    disk = tmp_path / "disk"
    paths = [r.path for r in image_set.records]
    row = rels(image_set, list(range(8))).index("cat/b2.png")
    first = ThumbnailCache(size=32, disk_dir=disk)
    first.set_paths(paths)
    first.get(row)
    with qtbot.waitSignal(first.ready, timeout=5000):
        pass
    first.close()
    files = list(disk.rglob("*.jpg"))
    assert len(files) == 1 and not list(disk.rglob("*.tmp"))

    # Replace the cached file by a distinctly coloured image: a new cache must show it.
    marker = QImage(32, 16, QImage.Format.Format_RGB32)
    marker.fill(QColor(0, 0, 250))
    assert marker.save(str(files[0]), "JPG")
    second = ThumbnailCache(size=32, disk_dir=disk)
    second.set_paths(paths)
    assert second.get(row) is None
    with qtbot.waitSignal(second.ready, timeout=5000):
        pass
    assert second.get(row).pixelColor(16, 8).getRgb()[:3] == pytest.approx((0, 0, 250), abs=8)

    # Touching the source changes the key: decoded again (green), a second file is written.
    st = os.stat(paths[row])
    os.utime(paths[row], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second.set_paths(paths)
    second.get(row)
    with qtbot.waitSignal(second.ready, timeout=5000):
        pass
    assert second.get(row).pixelColor(16, 8).getRgb()[:3] == pytest.approx((0, 255, 0), abs=8)
    assert len(list(disk.rglob("*.jpg"))) == 2
    second.close()


def test_new_paths_drop_results_of_the_old_set(qtbot, thumbs, image_set, tmp_path) -> None:
    thumbs.set_paths([r.path for r in image_set.records])
    for row in range(8):
        thumbs.get(row)
    other = tmp_path / "other.png"
    Image.new("RGB", (10, 10), (1, 2, 3)).save(other)
    thumbs.set_paths([str(other)])
    with qtbot.waitSignal(thumbs.ready, timeout=5000, check_params_cb=lambda r: r == 0):
        assert thumbs.get(0) is None
    assert thumbs.get(0).size().width() == 30  # small images grow by a whole factor (3x), pixels kept
    assert all(thumbs.get(row) is None for row in range(1, 8))  # out of range now


# -- single-image pane ------------------------------------------------------------------------


def test_detail_pane_shows_the_current_image_and_its_top_classes(qtbot, browser, image_set) -> None:
    sel = browser.selection
    sel.images = image_set
    browser.set_predictions(predictions(image_set))
    row = rels(image_set, list(range(8))).index("dog/d4.png")
    sel.current_image = row
    detail = browser.detail
    assert detail.title.text() == "d4.png"
    assert "Label: dog" in detail.info.text() and "Predicted: dog 80%" in detail.info.text()
    assert detail.top_classes() == [("dog", "80.0 %"), ("cat", "20.0 %")]
    assert detail.class_labels[0].font().bold()  # the labelled class
    qtbot.waitUntil(lambda: detail.canvas._image is not None, timeout=5000)
    assert detail.canvas._image.size().toTuple() == (80, 40)

    broken = rels(image_set, list(range(8))).index(BROKEN)
    sel.current_image = broken
    qtbot.waitUntil(lambda: detail.canvas._message.startswith("Cannot read this image:"), timeout=5000)
    # the engine's cause, as the CLI gives it
    assert detail.canvas._message == "Cannot read this image:\nnot a readable image (unknown or invalid image format)"
    sel.current_image = -1
    assert detail.title.text() == "" and detail.top_classes() == []


def test_export_target_is_the_view_and_its_figure(browser) -> None:
    assert browser.export_target() is browser
    assert [k.key for k in browser.figure_kinds()] == ["image", "sheet"]
    assert browser.object_name == "images" and browser.objectName() == "view-images"
    assert browser.title == "Images"


def test_the_view_package_is_discovered_as_one_view() -> None:
    """The browser is a package (gui/views/image_browser/); discovery finds its one view."""
    from gui.views.base import discover_views
    from gui.views.image_browser import ImageBrowser

    found = discover_views()
    assert [c for c in found if c.object_name == "images"] == [ImageBrowser]
    assert ImageBrowser.__module__ == "gui.views.image_browser.view"
    assert len({c.object_name for c in found}) == len(found)


def test_own_cache_uses_the_cache_root_and_closes_with_the_view(
    qtbot, tmp_path, monkeypatch, image_set
) -> None:
    from gui.selection import Selection
    from gui.views.image_browser import ImageBrowser

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache-root"))
    b = ImageBrowser(AppContext(Selection(), None, None))
    b.resize(600, 400)
    b.show()
    b.selection.images = image_set
    thumbs = b.thumbnails
    assert thumbs.disk_dir == tmp_path / "cache-root" / "thumbs"
    qtbot.waitUntil(lambda: all(thumbs.get(r) is not None for r in range(8)), timeout=5000)
    assert len(list(thumbs.disk_dir.rglob("*.jpg"))) == 7  # the broken file is not cached
    with qtbot.waitSignal(b.destroyed):
        b.deleteLater()
    qtbot.wait(50)  # late worker results find their receiver gone: nothing happens
