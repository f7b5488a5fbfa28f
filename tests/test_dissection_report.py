"""The dissection report: it draws only what it shows, and shows what the result holds.

Real dissections: the pretrained demo RNet on a small generated concept set, and a hand-made
network with a sparse unit (zero at all but one position per image: ``T = 0``, tie fallback).
"""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.backends import open_backend
from engine.cache import Cache
from engine.concepts import ConceptDataset, generate_concepts
from engine.data.images import ImageLoader
from engine.dissection import DissectionParams, dissect
from engine.dissection.report import (
    REPORT_TOP_UNITS,
    TILE_CELL,
    report_units,
    summary_dict,
    top_image_masks,
    write_report,
)
from engine.dissection.run import concept_image_set, dissection_preprocess
from engine.jobs import run_sync
from engine.models import build_spec, load_model

LAYERS = ["conv2", "conv3"]  # RNet: 48 units of 9x9, 64 units of 3x3 at 24 px

SPARSE_NET = """
import torch
from torch import nn

class Keep(nn.Module):
    def forward(self, x):
        keep = torch.ones_like(x)
        keep[:, 0] = 0.0
        keep[:, 0, 0, 0] = 1.0  # unit 0: one position per image, zero elsewhere (T = 0)
        return x * keep

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1)
        self.act = nn.ReLU()
        self.keep = Keep()

    def forward(self, x):
        return self.keep(self.act(self.conv(x)))
"""


@pytest.fixture(scope="module")
def concepts(tmp_path_factory: pytest.TempPathFactory) -> ConceptDataset:
    return run_sync(generate_concepts(tmp_path_factory.mktemp("c") / "set", n_images=48, image_size=48))


@pytest.fixture(scope="module")
def rnet(rnet_spec):
    loaded = load_model(rnet_spec.with_(device="cpu"))
    return loaded, open_backend(loaded)


@pytest.fixture(scope="module", params=["paper", "lite"])
def dissected(request, rnet, concepts: ConceptDataset, tmp_path_factory: pytest.TempPathFactory):
    loaded, backend = rnet
    rule = request.param
    params = DissectionParams(mask_rule=rule, strict_mask=rule == "lite")
    result = run_sync(dissect(backend, loaded.cache_id, concepts, LAYERS, params,
                              cache=Cache(tmp_path_factory.mktemp("cache"))))
    return result, backend


def _links(out: Path) -> list[str]:
    page = (out / "index.html").read_text(encoding="utf-8")
    return [unquote(s) for s in re.findall(r'(?:src|href)="([^"#]+)"', page)]


def test_report_draws_the_detectors_and_the_best_units_and_its_links_resolve(
        dissected, concepts: ConceptDataset, tmp_path: Path) -> None:
    result, backend = dissected
    out = write_report(result, concepts, tmp_path / "report", backend=backend)
    summary = json.loads((out / "summary.json").read_text())
    drawn = report_units(result)
    for name, ld in result.layers.items():
        s = ld.summary
        want = set(np.flatnonzero(s.is_detector).tolist()) | set(np.argsort(-s.iou, kind="stable")[:REPORT_TOP_UNITS].tolist())
        assert set(drawn[name]) == want and summary["layers"][name]["tiles"] == sorted(want)
        files = {int(p.stem.split("_")[1]) for p in (out / "tiles" / name).glob("unit_*.jpg")}
        assert files == want  # exactly what the page shows, nothing more
        assert len(want) < ld.units
    links = _links(out)
    assert links and all((out / link).is_file() for link in links)  # every link resolves
    assert sum(link.endswith(".jpg") for link in links) == 2 * sum(len(v) for v in drawn.values())  # img + a
    best = next(iter(result.layers))
    k = drawn[best][0]
    with Image.open(out / "tiles" / best / f"unit_{k}.jpg") as im:
        im.load()
        assert im.format == "JPEG" and im.height == TILE_CELL + 16
        assert im.width == result.params.top_k * (TILE_CELL + 2) - 2

    # the summary and the CSV say what the result says
    assert summary == json.loads(json.dumps(summary_dict(result, tiles={n: sorted(v) for n, v in drawn.items()})))
    for name, ld in result.layers.items():
        s, got = ld.summary, summary["layers"][name]
        assert got["summary"] == result.summary_line(name)
        assert (got["units"], got["detectors"], got["unique_concepts"]) == (ld.units, s.n_detectors, s.n_unique_concepts)
        assert list(got["detectors_per_category"].values()) == s.detectors_per_category.tolist()
        assert got["tie_fallback_units"] == np.flatnonzero(ld.tie_fallback).tolist()
    assert summary["params"]["strict_mask"] == result.params.strict_mask and summary["passes"] == result.passes
    with open(out / "dissection.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    iou = np.concatenate([ld.summary.iou for ld in result.layers.values()])
    np.testing.assert_allclose([float(r["iou"]) for r in rows], iou, atol=5e-7)
    with open(out / "thresholds.csv", encoding="utf-8") as f:
        thr = [float(r["threshold"]) for r in csv.DictReader(f)]
    assert thr == np.concatenate([ld.thresholds for ld in result.layers.values()]).tolist()  # exact
    page = (out / "index.html").read_text(encoding="utf-8")
    assert ("S &gt; T" if result.params.strict_mask else "S &ge; T") in page
    assert f"{sum(len(v) for v in drawn.values())} of the {sum(ld.units for ld in result.layers.values())} units" in page


def test_all_units_draws_every_unit(dissected, concepts: ConceptDataset, tmp_path: Path) -> None:
    result, backend = dissected
    out = write_report(result, concepts, tmp_path / "all", backend=backend, all_units=True, workers=2)
    for name, ld in result.layers.items():
        assert len(list((out / "tiles" / name).glob("unit_*.jpg"))) == ld.units
    links = _links(out)
    assert all((out / link).is_file() for link in links)
    assert f"drawn for all {sum(ld.units for ld in result.layers.values())} units" in (out / "index.html").read_text()
    bare = write_report(result, concepts, tmp_path / "bare")  # no model: no tiles, no dangling link
    assert not (bare / "tiles").exists() and all((bare / link).is_file() for link in _links(bare))


def _independent_masks(backend, concepts: ConceptDataset, result, layer: str, unit: int) -> list[tuple[int, np.ndarray]]:
    """The masks by hand: the model's map of the unit, F.interpolate to the label-mask size, the
    float64 threshold with ``>=`` (paper) or ``>`` (NetDissect-Lite's rule or a tied threshold)."""
    ld = result.layers[layer]
    t = float(ld.thresholds[unit])
    strict = result.params.strict_mask or bool(ld.tie_fallback[unit])
    top = [int(i) for i in ld.top_images[unit] if i >= 0]
    out = []
    with ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess), indices=top) as loader:
        for batch in loader:
            acts = backend.forward(batch.array, capture=[layer]).activations[layer]
            for row, i in enumerate(batch.indices.tolist()):
                m = torch.from_numpy(np.ascontiguousarray(acts[row, unit], dtype=np.float32))[None, None]
                s = F.interpolate(m, size=concepts.sample(i).mask_size, mode="bilinear", align_corners=False)[0, 0]
                s64 = s.double().numpy()
                out.append((i, s64 > t if strict else s64 >= t))
    return out


def test_tile_masks_are_the_engines_masks(dissected, concepts: ConceptDataset) -> None:
    result, backend = dissected
    for layer in LAYERS:
        for unit in report_units(result)[layer][:3]:
            got = top_image_masks(backend, concepts, result, layer, unit)
            want = _independent_masks(backend, concepts, result, layer, unit)
            assert [i for i, _ in got] == [i for i, _ in want]
            for (_, a), (_, b) in zip(got, want, strict=True):
                assert a.dtype == bool and a.shape == b.shape
                np.testing.assert_array_equal(a, b)


def test_tied_units_are_named_and_drawn_with_the_strict_mask(concepts: ConceptDataset, tmp_path: Path) -> None:
    py = tmp_path / "sparse.py"
    py.write_text(SPARSE_NET)
    pt = tmp_path / "sparse.pt"
    torch.save({"conv.weight": torch.ones(2, 3, 1, 1), "conv.bias": torch.tensor([0.1, 0.0])}, pt)
    loaded = load_model(build_spec(str(pt), arch=f"{py}:Net", input_size="16", mean="0,0,0", std="1,1,1"))
    backend = open_backend(loaded, device="cpu")
    layer = "keep"
    result = run_sync(dissect(backend, loaded.cache_id, concepts, [layer], cache=Cache(tmp_path / "c")))
    ld = result.layers[layer]
    assert ld.thresholds[0] == 0.0 and ld.tie_fallback[0]
    out = write_report(result, concepts, tmp_path / "report", backend=backend)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"][layer]["tie_fallback_units"] == np.flatnonzero(ld.tie_fallback).tolist()
    assert 0 in summary["layers"][layer]["tiles"]
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Tied thresholds" in page and "tie: S &gt; T" in page
    assert result.notes and all(html.escape(n) in page for n in result.notes)
    masks = top_image_masks(backend, concepts, result, layer, 0)
    assert masks and all(0 < m.mean() < 0.05 for _, m in masks)  # the one spot, never the whole image
    for (_, a), (_, b) in zip(masks, _independent_masks(backend, concepts, result, layer, 0), strict=True):
        np.testing.assert_array_equal(a, b)
