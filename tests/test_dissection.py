"""Network Dissection pipeline (Bau et al., CVPR 2017): dissect, cache, report and CLI.

Real models and real concept images throughout: a hand-built colour network, a hand-built
Broden folder whose IoUs are computed by hand below, and the pretrained demo RNet.
"""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.backends import open_backend
from engine.backends.torch_backend import TorchBackend
from engine.cache import Cache
from engine.concepts import ConceptDataset, generate_concepts, open_broden
from engine.data.images import ImageLoader
from engine.dissection import (
    DissectionParams,
    DissectionResult,
    IoUTally,
    dissect,
    load_result,
    save_result,
    unit_masks,
    write_report,
)
from engine.dissection.passes import Pass1, compute_device, partial_pass1, pass2
from engine.dissection.run import (
    DissectionInputs,
    concept_image_set,
    dissection_preprocess,
    float32_cut,
    forward_batch,
)
from engine.dissection.timing import Clock
from engine.jobs import run_sync
from engine.models import build_spec, load_model
from engine.models.zoo import RNet
from engine.types import Progress

RNET_LAYERS = ["conv1", "conv2", "conv3"]


@pytest.fixture(scope="module")
def concepts(tmp_path_factory: pytest.TempPathFactory) -> ConceptDataset:
    """The built-in synthetic concept set, 60 images at 64 px."""
    return run_sync(generate_concepts(tmp_path_factory.mktemp("c") / "set", n_images=60,
                                      image_size=64))


@pytest.fixture(scope="module")
def rnet(rnet_spec):
    loaded = load_model(rnet_spec.with_(device="cpu"))
    return loaded, open_backend(loaded)


@pytest.fixture(scope="module")
def rnet_result(rnet, concepts: ConceptDataset, tmp_path_factory: pytest.TempPathFactory):
    loaded, backend = rnet
    cache = Cache(tmp_path_factory.mktemp("cache"))
    return run_sync(dissect(backend, loaded.cache_id, concepts, RNET_LAYERS, cache=cache)), cache


def _model(tmp_path: Path, name: str, source: str, weights: dict[str, torch.Tensor],
           size: int) -> tuple[str, TorchBackend]:
    """Save a hand-built architecture file and state dict; load them like a user's model."""
    py = tmp_path / f"{name}.py"
    py.write_text(source)
    pt = tmp_path / f"{name}.pt"
    torch.save(weights, pt)
    spec = build_spec(str(pt), arch=f"{py}:Net", input_size=str(size), mean="0,0,0", std="1,1,1")
    loaded = load_model(spec)
    return loaded.cache_id, open_backend(loaded, device="cpu")  # type: ignore[return-value]


COLOUR_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1)
        self.act = nn.Hardtanh(0.0, 0.5)

    def forward(self, x):
        return self.act(self.conv(x))
"""


def test_colour_units_are_labelled_with_their_colour(concepts: ConceptDataset,
                                                     tmp_path: Path) -> None:
    # Pixels in [0, 1]. Unit 0 "redness" R - G - B, unit 1 "greenness" 2G - 2R - B, both
    # saturating at 0.5. Over the palette with its +-12 jitter, every red pixel has
    # R - G - B >= (203 - 37 - 37) / 255 = 0.506 and no other flat colour exceeds 0.498
    # (orange); every green pixel has 2G - 2R - B >= (296 - 104 - 62) / 255 = 0.51, every
    # other colour is negative. So the saturated top activations are the red (green) pixels,
    # plus bright pixels of red- (green-) tinted photographs, which carry no colour label.
    weight = torch.tensor([[1.0, -1.0, -1.0], [-2.0, 2.0, -1.0]])[:, :, None, None]
    sha, backend = _model(tmp_path, "colour", COLOUR_NET,
                          {"conv.weight": weight, "conv.bias": torch.zeros(2)}, 64)
    result = run_sync(dissect(backend, sha, concepts, ["act"], cache=Cache(tmp_path / "c")))
    s = result.layers["act"].summary
    assert (s.label_name[0], s.category_name[0]) == ("red", "color")
    assert (s.label_name[1], s.category_name[1]) == ("green", "color")
    assert s.iou[0] > 0.3 and s.iou[1] > 0.3 and s.is_detector.all()
    assert result.layers["act"].thresholds.tolist() == [np.float32(0.5), np.float32(0.5)]
    assert result.summary_line("act") == "act: 2/2 units are detectors covering 2 concepts"


IDENTITY_NET = """
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1)

    def forward(self, x):
        return self.conv(x)
"""


def _broden(root: Path) -> None:
    """Three 8x8 images; category color (pixel masks) and scene (image-level labels).

    Labels: 1 red, 2 blue (color); 3 beach, 4 forest (scene).
    A: R = 200 on rows 0-1 x cols 0-3 (8 px), G = 255 everywhere; red mask rows 0-3 x cols 0-3
       (16 px); scene beach.
    B: R = 200 on rows 0-2 x cols 0-3 (12 px); blue mask rows 0-1 x cols 0-2 (6 px); no scene.
    C: R = 100 on rows 0-4 (40 px); red mask rows 6-7 x cols 0-4 (10 px); scene forest.
    """
    (root / "images").mkdir(parents=True)
    rgb = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    rgb[0, 0:2, 0:4, 0] = 200
    rgb[0, :, :, 1] = 255
    rgb[1, 0:3, 0:4, 0] = 200
    rgb[2, 0:5, :, 0] = 100
    color = np.zeros((3, 8, 8), dtype=np.uint8)
    color[0, 0:4, 0:4] = 1
    color[1, 0:2, 0:3] = 2
    color[2, 6:8, 0:5] = 1
    rows = []
    for i, (name, scene) in enumerate(zip("ABC", ["3", "", "4"], strict=True)):
        Image.fromarray(rgb[i]).save(root / "images" / f"{name}.png")
        mask = np.zeros((8, 8, 3), dtype=np.uint8)
        mask[:, :, 0] = color[i]
        Image.fromarray(mask).save(root / "images" / f"{name}_color.png")
        rows.append(f"{name}.png,train,8,8,8,8,{name}_color.png,{scene}")
    (root / "index.csv").write_text("image,split,ih,iw,sh,sw,color,scene\n" + "\n".join(rows) + "\n")
    (root / "label.csv").write_text(
        "number,name,category\n0,-,\n1,red,color(2)\n2,blue,color(1)\n3,beach,scene(1)\n"
        "4,forest,scene(1)\n")


def test_iou_matches_hand_computation(tmp_path: Path) -> None:
    _broden(tmp_path / "broden")
    concepts = open_broden(tmp_path / "broden")
    weight = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None]  # unit 0 = R, unit 1 = G
    sha, backend = _model(tmp_path, "identity", IDENTITY_NET,
                          {"conv.weight": weight, "conv.bias": torch.zeros(2)}, 8)
    params = DissectionParams(quantile=0.1)
    result = run_sync(dissect(backend, sha, concepts, ["conv"], params, cache=Cache(tmp_path / "c")))
    ld = result.layers["conv"]
    # Thresholds, 192 values per unit, numpy's linear quantile 0.9: index 191 * 0.9 = 171.9.
    # Unit 0 ascending: 132 zeros, 40 x 100/255 (ranks 132-171), 20 x 200/255 (172-191):
    #   T0 = 100/255 + 0.9 (200/255 - 100/255) = 190/255, so M0 = the 200-pixels:
    #   A rows 0-1 x cols 0-3 (8 px), B rows 0-2 x cols 0-3 (12 px), C empty.
    # Unit 1 ascending: 128 zeros, 64 ones (ranks 128-191): T1 = 1, M1 = all of A (64 px).
    r = np.float32(np.array([200, 100], dtype=np.float32) / np.float32(255))
    values0 = np.concatenate([np.zeros(132), np.full(40, r[1]), np.full(20, r[0])])
    assert ld.thresholds[0] == np.quantile(values0, 0.9)
    assert ld.thresholds[1] == 1.0
    # IoU = sum |M & L| / sum |M | L| over images carrying the label's category
    # (color: A, B, C; scene: A, C).
    # Unit 0: red    inter A 8;           union A 8+16-8=16, B 12, C 0+10=10     -> 8/38
    #         blue   inter B 6;           union A 8, B 12+6-6=12, C 0            -> 6/20
    #         beach  inter A 8;           union A 8+64-8=64, C 0                 -> 8/64
    #         forest inter 0;             union A 8+0, C 0+64                    -> 0/72
    # Unit 1: red    inter A 16;          union A 64+16-16=64, B 0, C 10         -> 16/74
    #         blue   inter 0;             union A 64, B 6                        -> 0/70
    #         beach  inter A 64;          union A 64, C 0                        -> 64/64
    #         forest inter 0;             union A 64, C 64                       -> 0/128
    expected = np.array([[0, 8 / 38, 6 / 20, 8 / 64, 0], [0, 16 / 74, 0, 1, 0]])
    np.testing.assert_array_equal(ld.iou, expected)
    s = ld.summary
    assert s.label_name == ("blue", "beach") and s.category_name == ("color", "scene")
    assert s.category_label.tolist() == [[2, 3], [1, 3]]
    # NetDissect-Lite's strict mask S > T empties unit 1 (its top value equals T1 = 1).
    strict = run_sync(dissect(backend, sha, concepts, ["conv"],
                              DissectionParams(quantile=0.1, strict_mask=True),
                              cache=Cache(tmp_path / "c")))
    np.testing.assert_array_equal(strict.layers["conv"].iou[0], expected[0])
    assert not strict.layers["conv"].iou[1].any()


def _drive(job, on_message=None) -> tuple[DissectionResult, list[str]]:
    """Run a job by hand, calling ``on_message(message)`` at each progress report."""
    messages = []
    try:
        while True:
            messages.append(next(job).message)
            if on_message is not None:
                on_message(messages[-1])
    except StopIteration as stop:
        return stop.value, messages


def test_unreadable_image_is_skipped(tmp_path: Path) -> None:
    _broden(tmp_path / "broden")
    (tmp_path / "broden" / "images" / "B.png").write_bytes(b"not a png")
    concepts = open_broden(tmp_path / "broden")
    weight = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None]
    sha, backend = _model(tmp_path, "identity", IDENTITY_NET,
                          {"conv.weight": weight, "conv.bias": torch.zeros(2)}, 8)
    for budget in (1024, 0):  # one forward pass and two
        result, messages = _drive(dissect(backend, sha, concepts, ["conv"],
                                          DissectionParams(quantile=0.1, map_budget_mb=budget),
                                          cache=Cache(tmp_path / f"c{budget}")))
        assert result.passes == (1 if budget else 2)
        assert result.n_images == 2 and [Path(p).name for p, _ in result.skipped] == ["B.png"]
        assert sum(m.startswith("pass 1/2: thresholds") for m in messages) == 1  # pass 1 not restarted
        # Unit 1 over A and C only (128 values, 64 ones): T1 = 1, M1 = all of A; beach IoU 64/64.
        assert result.layers["conv"].thresholds[1] == 1.0
        assert result.layers["conv"].iou[1, 3] == 1.0
        assert -1 not in result.layers["conv"].top_images[:, :2] and \
            1 not in result.layers["conv"].top_images


@pytest.mark.parametrize("budget", [0, 1024])
def test_image_unreadable_in_the_second_pass_leaves_both_passes(tmp_path: Path, budget: int) -> None:
    """B.png is corrupted once pass 1 is done: with two forward passes it fails to load in pass 2
    and the result counts A and C in both passes (as if B had been unreadable from the start);
    with one (maps kept) pass 2 never reads it and the result is the clean one."""
    _broden(tmp_path / "broden")
    concepts = open_broden(tmp_path / "broden")
    weight = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None]
    sha, backend = _model(tmp_path, "identity", IDENTITY_NET,
                          {"conv.weight": weight, "conv.bias": torch.zeros(2)}, 8)
    params = DissectionParams(quantile=0.1, map_budget_mb=budget)
    clean = run_sync(dissect(backend, sha, concepts, ["conv"], params, cache=Cache(tmp_path / "clean")))
    image_b = tmp_path / "broden" / "images" / "B.png"
    good_b = image_b.read_bytes()

    def corrupt(message: str) -> None:
        if message.startswith("pass 2/2: IoU"):
            image_b.write_bytes(b"not a png")

    result, _messages = _drive(dissect(backend, sha, concepts, ["conv"], params, cache=Cache(tmp_path / "c")),
                              corrupt)
    ld = result.layers["conv"]
    if budget:
        assert result.passes == 1 and result.n_images == 3 and result.skipped == ()
        np.testing.assert_array_equal(ld.thresholds, clean.layers["conv"].thresholds)
        np.testing.assert_array_equal(ld.iou, clean.layers["conv"].iou)
        return
    assert result.n_images == 2 and [Path(p).name for p, _ in result.skipped] == ["B.png"]
    image_b.write_bytes(b"not a png")
    from_start = run_sync(dissect(backend, sha, concepts, ["conv"], params, cache=Cache(tmp_path / "start")))
    image_b.write_bytes(good_b)
    for f in ("thresholds", "iou", "top_images", "top_values"):
        np.testing.assert_array_equal(getattr(ld, f), getattr(from_start.layers["conv"], f))
    assert not np.array_equal(ld.thresholds, clean.layers["conv"].thresholds)
    assert ld.iou[1, 3] == 1.0  # beach over A and C: the IoUs count the same images as the thresholds


def test_equals_dense_tally_of_every_mask(rnet, rnet_result, concepts: ConceptDataset,
                                         tmp_path: Path) -> None:
    """Skipping (image, unit) pairs whose max is below T_k and counting the masked pixels only
    changes nothing: compare with IoUTally fed every upsampled mask of every unit, for both
    union rules."""
    loaded, backend = rnet
    results = {"paper": rnet_result[0],
               "lite": run_sync(dissect(backend, loaded.cache_id, concepts, RNET_LAYERS,
                                        DissectionParams(mask_rule="lite"),
                                        cache=Cache(tmp_path / "c")))}
    cats = np.maximum(concepts.label_categories(), 0)
    tallies = {(rule, n): IoUTally(results[rule].layers[n].units, cats, len(concepts.categories),
                                   mode=rule) for rule in results for n in RNET_LAYERS}
    index = {c: g for g, c in enumerate(concepts.categories)}
    with ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess),
                     batch_size=32) as loader:
        for batch in loader:
            acts = forward_batch(backend, batch.array, RNET_LAYERS, torch.device("cpu"))
            for row, i in enumerate(batch.indices.tolist()):
                s = concepts.sample(i)
                for n in RNET_LAYERS:
                    t = results["paper"].layers[n].thresholds
                    # One map per call: PyTorch's CPU bilinear kernel rounds multi-channel
                    # inputs differently by an ulp, which flips pixels tied with T_k.
                    masks = torch.cat([unit_masks(acts[n][row:row + 1, k:k + 1], t[k:k + 1],
                                                  s.mask_size)[0] for k in range(len(t))])
                    for rule in results:
                        tallies[(rule, n)].update(
                            masks, [(index[c], m) for c, m in s.pixel_labels],
                            [(index[c], lab) for c, lab in s.image_labels])
    for (rule, n), tally in tallies.items():
        np.testing.assert_array_equal(results[rule].layers[n].iou, tally.result().iou)
    assert not all(np.array_equal(results["paper"].layers[n].iou, results["lite"].layers[n].iou)
                   for n in RNET_LAYERS)
    result = results["paper"]
    assert result.n_images == 60 and result.skipped == ()
    assert {"forward", "quantile", "masks", "tally", "total"} <= set(result.seconds)


def _labels(result: DissectionResult) -> dict[tuple[str, int], str]:
    return {(n, k): ld.summary.label_name[k]
            for n, ld in result.layers.items() for k in range(ld.units)}


def test_random_weights_change_the_dissection(rnet, rnet_result, concepts: ConceptDataset,
                                              tmp_path: Path) -> None:
    loaded, _ = rnet
    trained = rnet_result[0]
    torch.manual_seed(0)
    random = TorchBackend(RNet(), loaded.spec, "cpu")
    shuffled = run_sync(dissect(random, "rnet-random-seed0", concepts, RNET_LAYERS,
                                cache=Cache(tmp_path / "c")))
    a, b = _labels(trained), _labels(shuffled)
    assert a.keys() == b.keys()
    differ = sum(a[k] != b[k] for k in a)
    assert differ > len(a) // 4
    assert [trained.layers[n].summary.n_detectors for n in RNET_LAYERS] != \
        [shuffled.layers[n].summary.n_detectors for n in RNET_LAYERS]


def _same(a: DissectionResult, b: DissectionResult) -> None:
    assert a.layers.keys() == b.layers.keys() and a.concept_names == b.concept_names
    assert (a.model_sha256, a.n_images, a.categories, a.params) == \
        (b.model_sha256, b.n_images, b.categories, b.params)
    for n in a.layers:
        x, y = a.layers[n], b.layers[n]
        for f in ("thresholds", "iou", "top_images", "top_values", "tie_fallback", "at_threshold"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
        assert x.summary.label_name == y.summary.label_name
        np.testing.assert_array_equal(x.summary.is_detector, y.summary.is_detector)


def test_repeat_comes_from_cache_and_cancel_leaves_nothing(rnet, rnet_result, concepts,
                                                           tmp_path: Path, monkeypatch) -> None:
    loaded, backend = rnet
    first, cache = rnet_result
    again = run_sync(dissect(backend, loaded.cache_id, concepts, RNET_LAYERS, cache=cache))
    assert again.from_cache and not first.from_cache
    _same(first, again)
    _same(first, load_result(save_result(first, tmp_path / "saved")))

    # Pass 2 running the model again (activations not kept in memory) gives the same result.
    rerun = run_sync(dissect(backend, loaded.cache_id, concepts, RNET_LAYERS,
                             DissectionParams(batch_size=7, map_budget_mb=0), cache=Cache(tmp_path / "rerun")))
    assert (first.passes, rerun.passes) == (1, 2)
    _same(first, replace(rerun, params=first.params))

    fresh = Cache(tmp_path / "fresh")
    job = dissect(backend, loaded.cache_id, concepts, RNET_LAYERS,
                  DissectionParams(batch_size=8), cache=fresh)
    messages = [next(job).message for _ in range(6)]
    job.close()
    assert any("pass 1/2" in m for m in messages)
    assert not (fresh.root / "dissection").exists() or not any((fresh.root / "dissection").iterdir())


class _BlockPasses:
    """A :class:`PassStrategy` built on the public pass API alone, as a distributed driver
    builds one: both passes over blocks of ``block`` images in this process, pass 1 as
    mergeable partials (:func:`partial_pass1`), pass 2 as one :func:`pass2` per block, the
    partials merged."""

    passes = 2

    def __init__(self, inputs: DissectionInputs, block: int) -> None:
        self.inputs, self.block = inputs, block
        self.device = compute_device(inputs.backend, inputs.params)
        self.clock = Clock(self.device)
        self.blocks = 0

    def describe(self) -> str:
        return f"blocks of {self.block}"

    def begin(self):
        yield Progress(0.0, "starting the blocks")

    def _split(self, order: list[int]) -> list[list[int]]:
        return [order[s:s + self.block] for s in range(0, len(order), self.block)]

    def pass1(self, order: list[int]):
        i = self.inputs
        quantiles: dict = {}
        tops: dict = {}
        skipped: list[tuple[str, str]] = []
        for block in self._split(order):
            part, bad = partial_pass1(i.backend, i.image_set, i.pre, block, i.info, i.params, self.device, len(order))
            for name, (q, top) in part.items():
                quantiles[name] = q if name not in quantiles else quantiles[name].merge(q)
                tops[name] = top if name not in tops else tops[name].merge(top)
            skipped += bad
            self.blocks += 1
            yield Progress(0.1, f"pass 1 block {self.blocks}")
        failed = {path for path, _ in skipped}
        loaded = [j for j in order if i.image_set.records[j].path not in failed]
        if loaded and len(loaded) < len(order):
            for name, li in i.info.items():
                quantiles[name].shrink_total(len(loaded) * li.shape[1] * li.shape[2])
        return Pass1(quantiles, tops, None, skipped, loaded)

    def pass2(self, p1: Pass1, thresholds, ties):
        i = self.inputs
        tallies: dict = {}
        failed: list[tuple[str, str]] = []
        for block in self._split(p1.loaded):
            part, bad = yield from pass2(i.backend, i.concepts, i.image_set, i.pre, block, i.info, thresholds, ties,
                                         None, i.labels, i.params, self.device, self.clock)
            for name, t in part.items():
                tallies[name] = t if name not in tallies else tallies[name].merge(t)
            failed += bad
        return tallies, failed

    def notes(self, n_images: int) -> list[str]:
        return [f"{n_images} images in blocks of {self.block}"]

    def seconds(self, layers) -> dict[str, float]:
        return {k: v for k, v in self.clock.seconds.items() if k in ("pass1", "pass2")}


def test_a_pass_strategy_of_blocks_gives_the_in_process_result(rnet, rnet_result, concepts: ConceptDataset,
                                                                 tmp_path: Path) -> None:
    # dissect() with another PassStrategy (what engine.cluster's Ray driver plugs in): the
    # merged block partials give the in-process result bit for bit, in the same cache entry
    loaded, backend = rnet
    first, _ = rnet_result
    made: list[_BlockPasses] = []

    def blocks(inputs: DissectionInputs) -> _BlockPasses:
        made.append(_BlockPasses(inputs, block=16))
        return made[-1]

    cache = Cache(tmp_path / "c")
    job = dissect(backend, loaded.cache_id, concepts, RNET_LAYERS, DissectionParams(batch_size=8), cache=cache,
                  passes=blocks)
    messages: list[str] = []
    while True:
        try:
            messages.append(next(job).message)
        except StopIteration as stop:
            got = stop.value
            break
    assert len(made) == 1 and made[0].blocks == 4  # 60 images: 16 + 16 + 16 + 12
    assert "starting the blocks" in messages and any("(blocks of 16)" in m for m in messages)
    assert (got.passes, got.notes[0], sorted(got.seconds)) == (2, "60 images in blocks of 16", ["pass1", "pass2", "total"])
    _same(first, replace(got, params=first.params))
    again = run_sync(dissect(backend, loaded.cache_id, concepts, RNET_LAYERS, cache=cache))
    assert again.from_cache and again.passes == 2
    _same(first, again)


def test_report_files(rnet, rnet_result, concepts: ConceptDataset, tmp_path: Path) -> None:
    _loaded, backend = rnet
    result = rnet_result[0]
    out = write_report(result, concepts, tmp_path / "report", backend=backend)
    with open(out / "dissection.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cats = ("color", "object", "texture")
    assert list(rows[0]) == ["layer", "unit", "category", "label", "iou", "detector"] + [
        f"{p}_{c}" for c in cats for p in ("best", "iou")]
    assert len(rows) == sum(ld.units for ld in result.layers.values()) == 28 + 48 + 64
    page = (out / "index.html").read_text(encoding="utf-8")
    assert all(n in page for n in RNET_LAYERS) and "<svg" in page
    sources = re.findall(r'src="([^"]+)"', page)
    # tiles of the units the report draws (detectors and the top units; the rest on demand)
    assert 0 < len(sources) <= len(rows) and all((out / s).is_file() for s in sources)
    ET.parse(out / "layers.svg")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"]["conv3"]["summary"] == result.summary_line("conv3")
    with Image.open(out / sources[0]) as im:
        im.load()
        assert im.width > 10 * 64  # top_k images side by side


def _cli(argv: list[str]) -> int:
    """``convlens dissect`` through the real command line."""
    from engine.cli import main

    return main(argv)


def test_cli_dissect(rnet_spec, concepts: ConceptDataset, tmp_path: Path, monkeypatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    base = ["dissect", "--model", rnet_spec.path, "--concepts", concepts.root, "--out", str(out)]
    assert _cli([*base, "--layers", "conv2,conv3", "--rule", "lite"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"conv2: \d+/48 units are detectors covering \d+ concepts?", err)
    assert "one forward pass: the maps of 60 images" in err
    assert all((out / f).is_file() for f in ("dissection.csv", "summary.json", "layers.svg", "index.html"))
    assert any((out / "tiles" / "conv3").iterdir())
    assert json.loads((out / "summary.json").read_text())["params"]["mask_rule"] == "lite"
    assert _cli([*base, "--layers", "conv2", "--map-budget-mb", "0", "--no-tiles"]) == 0
    assert "two forward passes" in capsys.readouterr().err
    assert _cli([*base, "--layers", "conv2,nope"]) == 1
    assert "'nope'" in capsys.readouterr().err


def test_cli_dissect_never_replaces_a_folder_of_the_users(rnet_spec, concepts: ConceptDataset, tmp_path: Path,
                                                          monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    mine = tmp_path / "Documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    argv = ["dissect", "--model", rnet_spec.path, "--concepts", concepts.root, "--layers", "conv3", "--no-tiles"]
    assert _cli([*argv, "--out", str(mine)]) == 1
    err = capsys.readouterr().err
    assert str(mine) in err and "did not write" in err and "Traceback" not in err
    assert (mine / "thesis.txt").read_text() == "three years of work" and len(list(mine.iterdir())) == 1
    # its own earlier report is replaced on a re-run
    out = tmp_path / "report"
    assert _cli([*argv, "--out", str(out)]) == 0 and _cli([*argv, "--out", str(out)]) == 0
    assert (out / "index.html").is_file()


def test_float32_cut_matches_float64_comparison() -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal(20000).astype(np.float32)
    t = np.concatenate([s[:50].astype(np.float64), s[50:100] + 1e-9, rng.standard_normal(50)])
    for strict in (False, True):
        cut = float32_cut(t, strict=strict)
        want = s[None] > t[:, None] if strict else s[None] >= t[:, None]
        got = s[None] > cut[:, None] if strict else s[None] >= cut[:, None]
        np.testing.assert_array_equal(got, want)
