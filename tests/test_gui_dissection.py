"""The Network Dissection view: a real dissection of the demo RNet on a small built-in concept set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import pytest
from PIL import Image
from PySide6.QtCore import Qt
from pytestqt.wait_signal import SignalBlocker

from engine.concepts import builtin_dir as builtin_concepts_dir
from gui.context import AppContext
from gui.export import export_widget
from gui.views.dissection import DissectionView
from tests.conftest import wait_job

N_IMAGES, SIZE, LAYER = 40, 48, "conv3"  # RNet conv3: 64 units of 3 x 3


def _wait(signal: object, timeout: int = 60000) -> list[object]:
    blocker = SignalBlocker(timeout=timeout, raising=True)
    blocker.connect(signal)
    blocker.wait()
    return blocker.args


@pytest.fixture(scope="module")
def view(ctx: AppContext) -> Iterator[DissectionView]:
    """A shown view after one dissection of LAYER on N_IMAGES generated images of SIZE px."""
    w = DissectionView(ctx)
    w.resize(1200, 800)
    w.show()
    assert w.checked_layers() == ["conv1", "conv2", "conv3"]  # the demo's default layers
    w.set_builtin(N_IMAGES, SIZE)
    w.set_checked_layers([LAYER])
    handle = w.run()
    assert handle is not None and w.progress.isVisibleTo(w) and not w.run_button.isEnabled()
    handle.failed.connect(lambda _e: pytest.fail(handle.traceback))
    _wait(w.result_ready)
    yield w
    w.close()
    w.deleteLater()


def test_run_generates_the_concepts_and_fills_the_results(view: DissectionView) -> None:
    folder = builtin_concepts_dir(N_IMAGES, SIZE)
    assert (folder / "index.csv").is_file()
    assert len(view.concepts) == N_IMAGES and Path(view.concepts.root) == folder
    result = view.result
    assert list(result.layers) == [LAYER] and result.n_images == N_IMAGES
    assert view.model.rowCount() == 64 and view.proxy.rowCount() == 64
    s = result.layers[LAYER].summary
    line = f"{LAYER}: {s.n_detectors}/64 units are detectors covering {s.n_unique_concepts} concepts"
    assert view.summary_lines() == [line] and line in view.summary_label.text()
    bars = [it for it in view.chart.getPlotItem().items if isinstance(it, pg.BarGraphItem)]
    assert len(bars) == 1
    np.testing.assert_array_equal(bars[0].opts["height"], s.detectors_per_category)
    assert not view.progress.isVisibleTo(view) and view.run_button.isEnabled() and view.report_button.isEnabled()
    assert view.analysis_actions() == [("Run Network Dissection", view.run)]


def test_rerun_reuses_the_generated_set_and_the_cached_result(view: DissectionView) -> None:
    stamp = (builtin_concepts_dir(N_IMAGES, SIZE) / "index.csv").stat().st_mtime_ns
    view.run()
    _wait(view.result_ready)
    assert view.result.from_cache and "from the cache" in view.status.text()
    assert (builtin_concepts_dir(N_IMAGES, SIZE) / "index.csv").stat().st_mtime_ns == stamp


def test_sorting_and_filtering(view: DissectionView) -> None:
    view.table.sortByColumn(4, Qt.SortOrder.DescendingOrder)
    ious = [r["iou"] for r in view.visible_rows()]
    assert ious == sorted(ious, reverse=True) and ious[0] == view.result.layers[LAYER].summary.iou.max()
    view.table.sortByColumn(4, Qt.SortOrder.AscendingOrder)
    assert [r["iou"] for r in view.visible_rows()] == sorted(ious)
    view.table.sortByColumn(1, Qt.SortOrder.AscendingOrder)
    assert [r["unit"] for r in view.visible_rows()] == list(range(64))  # numeric, not 0, 1, 10, ...

    view.detectors_check.setChecked(True)
    rows = view.visible_rows()
    assert len(rows) == view.result.layers[LAYER].summary.n_detectors and all(r["detector"] for r in rows)
    view.detectors_check.setChecked(False)
    label = view.visible_rows()[0]["label"]
    view.filter_edit.setText(label.upper())
    rows = view.visible_rows()
    assert rows and all(label in r["label"] or label in r["category"] for r in rows)
    view.filter_edit.clear()
    assert view.proxy.rowCount() == 64
    view.table.sortByColumn(4, Qt.SortOrder.DescendingOrder)


def test_clicking_a_row_selects_the_unit_and_shows_its_concept_images(qtbot, view: DissectionView,
                                                                      ctx: AppContext) -> None:
    row = 2
    expected = view.visible_rows()[row]
    rect = view.table.visualRect(view.proxy.index(row, 0))
    with qtbot.waitSignal(view.unit_images_ready, timeout=60000) as blocker:
        qtbot.mouseClick(view.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert blocker.args == [LAYER, expected["unit"]]
    assert (ctx.selection.layer, ctx.selection.unit) == (LAYER, expected["unit"])
    ld = view.result.layers[LAYER]
    top = [int(i) for i in ld.top_images[expected["unit"]] if i >= 0]
    assert view.unit_images.ids == top and len(top) == view.result.params.top_k
    assert expected["label"] in view.unit_title.text()
    pixels = view.unit_images.image.convertToFormat(view.unit_images.image.Format.Format_RGB888)
    assert not pixels.isNull() and pixels.width() > 96

    # a unit chosen elsewhere (e.g. in the Heatmaps view) selects its row
    with qtbot.waitSignal(view.unit_images_ready, timeout=60000):
        ctx.selection.unit = 5
    current = view.table.currentIndex()
    assert view.model.row_data(view.proxy.mapToSource(current).row())["unit"] == 5


def test_report_export_and_figure(tmp_path: Path, view: DissectionView) -> None:
    handle = view.export_report(tmp_path / "report")
    assert handle is not None
    wait_job(handle)
    assert (tmp_path / "report" / "index.html").is_file()
    assert "Report written" in view.status.text()
    # a folder holding other files is never replaced: the report goes into a subfolder
    keep = tmp_path / "documents"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    wait_job(view.export_report(keep))
    assert (keep / "notes.txt").read_text() == "mine"
    assert (keep / "dissection-report" / "index.html").is_file()
    wait_job(view.export_report(tmp_path / "report"))  # an earlier report is replaced in place
    assert not (tmp_path / "report" / "dissection-report").exists()

    path = export_widget(view.export_target(), tmp_path / "figure.png", dpi=96)
    with Image.open(path) as img:  # the composed result figure (7 in at 96 dpi), not a grab
        assert img.size[0] == 7 * 96
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 20


def test_state_round_trip(view: DissectionView) -> None:
    state = view.save_state()
    assert state["layers"] == [LAYER] and state["n_images"] == N_IMAGES and state["image_size"] == SIZE
    assert state["show_result"] is True  # a project reruns it on opening (tests/test_gui_project.py)
    other = DissectionView(view.ctx)
    try:
        changed = {"quantile": 0.01, "rule": "lite", "detectors_only": True, "filter": "red", "show_result": False}
        other.restore_state({**state, **changed, "unknown": 3})
        assert other.save_state() == {**state, **changed}
        params = other.params()
        assert (params.quantile, params.mask_rule, params.iou_threshold) == (0.01, "lite", 0.04)
    finally:
        other.deleteLater()


def test_result_figure(qtbot, view: DissectionView, tmp_path: Path) -> None:
    from gui.figures import BarChart, FigureOptions, TileGrid
    from tests.figure_checks import check_figure, svg_texts

    qtbot.waitUntil(view.figure_tiles_ready, timeout=60000)
    fig, root = check_figure(view, FigureOptions(kind="result", size="full", dpi=100), tmp_path, "dissection")
    assert fig.title.startswith("Network Dissection of ") and fig.title.endswith(LAYER)
    charts = [e for e in fig.elements if isinstance(e, BarChart)]
    s = view.result.layers[LAYER].summary
    assert charts[0].categories == list(view.result.categories)
    assert charts[0].series[0][1] == [float(v) for v in s.detectors_per_category]
    texts = " ".join(svg_texts(root))
    assert "detectors (units)" in texts and "concept category" in texts  # axis labels
    # the best units' tiles, each with its label and IoU
    best = view.top_units()
    assert len(best) == 4 and best[0] == (LAYER, int(np.argmax(np.where(s.is_detector, s.iou, -1))))
    layer, unit = best[0]
    assert f"{layer} unit {unit}: {s.label_name[unit]} ({s.category_name[unit]}), IoU {s.iou[unit]:.3f}" in texts
    stacks = [e for e in fig.elements if type(e).__name__ in ("Row", "Stack")]
    grids = [p for e in stacks for p in __import__("tests.figure_checks").figure_checks.parts(e)
             if isinstance(p, TileGrid)]
    assert len(grids) >= 4 and all(g.tiles for g in grids)
    assert all(t.native == (SIZE, SIZE) for g in grids for t in g.tiles)  # concept images at their own size


def test_status_says_what_to_do_and_names_the_concepts(ctx: AppContext) -> None:
    fresh = DissectionView(ctx)
    try:
        assert ctx.session.model is not None
        assert fresh.status.text() == "Tick the layers to dissect and press Run Network Dissection."
        fresh.set_builtin(N_IMAGES, SIZE)
        fresh.set_checked_layers([LAYER])
        handle = fresh.run()
        assert fresh.status.text() == f"Dissecting {LAYER} on the built-in concepts ({N_IMAGES} images of {SIZE} px)…"
        assert "None" not in fresh.status.text()
        wait_job(handle)
    finally:
        fresh.deleteLater()


def test_layer_picker_groups_filters_and_shows_shapes(qtbot) -> None:
    from engine.types import LayerInfo
    from gui.widgets.layer_picker import LayerPicker, block_of

    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer1.0", "layer1.0.conv1", "layer1.0.bn1",
             "layer2.0.conv1", "layer2.0.downsample.0", "/backbone/stage3/Conv_output_0", "/backbone/stage3/Relu"]
    layers = [LayerInfo(n, "Conv2d", (64, 56 // (1 + i % 3), 56 // (1 + i % 3))) for i, n in enumerate(names)]
    picker = LayerPicker()
    qtbot.addWidget(picker)
    picker.set_layers(layers, ["layer1.0.conv1", "conv1"])
    tops = [picker.tree.topLevelItem(i).text(0) for i in range(picker.tree.topLevelItemCount())]
    assert tops == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "backbone"]
    assert block_of("layer1.0.conv1") == "layer1" and block_of("conv1") == ""
    layer1 = picker.tree.topLevelItem(4)
    assert [layer1.child(i).text(0) for i in range(layer1.childCount())] == [
        "layer1", "layer1.0", "layer1.0.conv1", "layer1.0.bn1"]
    assert layer1.child(2).text(1) == "64×56×56" and "Conv2d" in layer1.child(2).toolTip(0)
    assert picker.checked_layers() == ["conv1", "layer1.0.conv1"]
    layer1.setCheckState(0, Qt.CheckState.Checked)  # a whole block at once
    assert picker.checked_layers() == ["conv1", "layer1", "layer1.0", "layer1.0.conv1", "layer1.0.bn1"]
    picker.filter_edit.setText("CONV1")
    assert picker.visible_layers() == ["conv1", "layer1.0.conv1", "layer2.0.conv1"]
    assert picker.tree.topLevelItem(6).isHidden()  # the backbone group has no match
    picker.filter_edit.setText("")
    assert len(picker.visible_layers()) == len(names)


def test_defaults_to_the_commands_built_in_set(ctx: AppContext) -> None:
    from engine.concepts import BUILTIN_DEFAULT_IMAGES, BUILTIN_DEFAULT_SIZE

    fresh = DissectionView(ctx)
    try:
        assert (fresh.n_images_spin.value(), fresh.size_spin.value()) == (BUILTIN_DEFAULT_IMAGES, BUILTIN_DEFAULT_SIZE)
        fresh.rule_combo.setCurrentIndex(fresh.rule_combo.findData("lite"))
        assert fresh.params().strict_mask and fresh.params().mask_rule == "lite"  # as --rule lite
        fresh.rule_combo.setCurrentIndex(fresh.rule_combo.findData("paper"))
        assert not fresh.params().strict_mask
    finally:
        fresh.deleteLater()


def _half_size_masks(src: Path, dst: Path) -> Path:
    """A copy of the Broden-layout set ``src`` whose label masks are half the image size, as in
    Broden itself (so masks thresholded at the image size and at the label-mask size differ)."""
    import csv
    import shutil

    shutil.copytree(src, dst)
    with open(dst / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    for r in rows:
        sh, sw = int(r["sh"]) // 2, int(r["sw"]) // 2
        for cat in header[6:]:
            for rel in filter(None, r[cat].split(";")):
                if rel.endswith(".png"):
                    path = dst / "images" / rel
                    with Image.open(path) as im:
                        im.convert("RGB").resize((sw, sh), Image.Resampling.NEAREST).save(path)
        r["sh"], r["sw"] = str(sh), str(sw)
    with open(dst / "index.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return dst


@pytest.fixture(scope="module")
def half_broden(view: DissectionView, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _half_size_masks(builtin_concepts_dir(N_IMAGES, SIZE), tmp_path_factory.mktemp("broden") / "half")


@pytest.mark.parametrize("rule", ["paper", "lite"])
def test_gui_equals_cli(qtbot, ctx: AppContext, half_broden: Path, rnet_spec, tmp_path: Path, monkeypatch,
                        rule: str) -> None:
    """The view's dissection and its side-panel masks are the command's, for both rules: the same
    parameters, thresholds and IoUs (exactly), and masks at the label-mask size that equal the
    report's and a hand computation (the map upsampled with F.interpolate, >= or > T in float64)."""
    import csv

    import torch
    import torch.nn.functional as F

    from engine.backends import open_backend
    from engine.cli import main
    from engine.concepts import open_broden
    from engine.data.images import ImageLoader
    from engine.dissection import load_result
    from engine.dissection.report import top_image_masks
    from engine.dissection.run import concept_image_set, dissection_preprocess
    from engine.models import load_model

    w = DissectionView(ctx)
    try:
        w.resize(1200, 800)
        w.show()
        w.set_broden_folder(str(half_broden))
        w.set_checked_layers([LAYER])
        w.rule_combo.setCurrentIndex(w.rule_combo.findData(rule))
        handle = w.run()
        assert handle is not None
        _wait(w.result_ready)
        gui = w.result

        monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cli-cache"))
        pre = rnet_spec.preprocess
        argv = ["dissect", "--model", rnet_spec.path, "--arch", "rnet", "--input-size", f"{pre.input_size[0]}",
                "--mean", ",".join(map(repr, pre.mean)), "--std", ",".join(map(repr, pre.std)),
                "--concepts", str(half_broden), "--layers", LAYER, "--rule", rule, "--out", str(tmp_path / "out")]
        assert main(argv) == 0
        (entry,) = (tmp_path / "cli-cache" / "dissection").iterdir()
        cli = load_result(entry)
        assert gui.params.result_key() == cli.params.result_key()
        assert gui.params.strict_mask == (rule == "lite")
        g, c = gui.layers[LAYER], cli.layers[LAYER]
        np.testing.assert_array_equal(g.thresholds, c.thresholds)
        np.testing.assert_array_equal(g.iou, c.iou)
        np.testing.assert_array_equal(g.tie_fallback, c.tie_fallback)
        with open(tmp_path / "out" / "thresholds.csv", encoding="utf-8") as f:
            assert [float(r["threshold"]) for r in csv.DictReader(f)] == g.thresholds.tolist()

        concepts = open_broden(str(half_broden))
        assert concepts.sample(0).mask_size == (SIZE // 2, SIZE // 2)
        loaded = load_model(rnet_spec.with_(device="cpu"))
        backend = open_backend(loaded)
        best = int(np.argmax(g.summary.iou))
        for unit in (best, (best + 1) % g.units):
            with qtbot.waitSignal(w.unit_images_ready, timeout=60000,
                                  check_params_cb=lambda layer, u, unit=unit: (layer, u) == (LAYER, unit)):
                w._show_unit(LAYER, unit)  # what clicking its row does
            shown = w.shown_masks[(LAYER, unit)]
            assert [i for i, _ in shown] == [int(i) for i in c.top_images[unit] if i >= 0]
            report = top_image_masks(backend, concepts, cli, LAYER, unit)
            t = float(c.thresholds[unit])
            strict = cli.params.strict_mask or bool(c.tie_fallback[unit])
            with ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess),
                             indices=[i for i, _ in shown]) as loader:
                maps = {i: backend.forward(b.array, capture=[LAYER]).activations[LAYER][row, unit]
                        for b in loader for row, i in enumerate(b.indices.tolist())}
            for (i, mask), (j, theirs) in zip(shown, report, strict=True):
                assert i == j and mask.shape == (SIZE // 2, SIZE // 2) and mask.dtype == bool
                np.testing.assert_array_equal(mask, theirs)
                s = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps[i], dtype=np.float32))[None, None],
                                  size=(SIZE // 2, SIZE // 2), mode="bilinear", align_corners=False)[0, 0].double().numpy()
                np.testing.assert_array_equal(mask, s > t if strict else s >= t)
        assert (">" if rule == "lite" else "≥") in w.legend_label.text()
    finally:
        w.close()
        w.deleteLater()
