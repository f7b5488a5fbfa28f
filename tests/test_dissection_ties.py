"""Degenerate thresholds (a mass of activations tied with T_k): no whole-image masks.

A hand-made network whose unit 0 is a ReLU unit that is zero everywhere but one position of
each image (T_0 = 0 with P(A >= 0) = 1), unit 1 an ordinary unit and unit 2 a constant one
(T_2 its only value), dissected on the built-in concept images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends import open_backend
from engine.backends.torch_backend import TorchBackend
from engine.cache import Cache
from engine.concepts import ConceptDataset, generate_concepts
from engine.data.images import ImageLoader
from engine.dissection import DissectionParams, IoUTally, dissect, layer_masks, load_result, save_result
from engine.dissection.run import concept_image_set, dissection_preprocess, forward_batch
from engine.jobs import run_sync
from engine.models import build_spec, load_model

SPARSE_NET = """
import torch
from torch import nn

class Spot(nn.Module):
    def forward(self, x):
        keep = torch.zeros_like(x)
        keep[:, 0, 0, 0] = 1.0  # unit 0: one position per image
        keep[:, 1] = 1.0
        out = x * keep
        out[:, 2] = 1.0  # unit 2: constant
        return out

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel_size=1)
        self.act = nn.ReLU()
        self.sparse = Spot()

    def forward(self, x):
        return self.sparse(self.act(self.conv(x)))
"""


def sparse_model(tmp_path: Path, size: int = 32) -> tuple[str, TorchBackend]:
    py = tmp_path / "sparse.py"
    py.write_text(SPARSE_NET)
    pt = tmp_path / "sparse.pt"
    torch.save({"conv.weight": torch.ones(3, 3, 1, 1), "conv.bias": torch.tensor([0.1, 0.01, 0.0])}, pt)
    spec = build_spec(str(pt), arch=f"{py}:Net", input_size=str(size), mean="0,0,0", std="1,1,1")
    loaded = load_model(spec)
    return loaded.cache_id, open_backend(loaded, device="cpu")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def concepts(tmp_path_factory: pytest.TempPathFactory) -> ConceptDataset:
    return run_sync(generate_concepts(tmp_path_factory.mktemp("c") / "set", n_images=24, image_size=32))


def _maps(backend: TorchBackend, concepts: ConceptDataset) -> dict[int, torch.Tensor]:
    out = {}
    with ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess),
                     batch_size=8) as loader:
        for batch in loader:
            acts = forward_batch(backend, batch.array, ["sparse"], torch.device("cpu"))["sparse"]
            out.update(zip(batch.indices.tolist(), acts, strict=True))
    return out


def test_sparse_unit_falls_back_and_no_mask_is_the_whole_image(concepts: ConceptDataset, tmp_path: Path) -> None:
    sha, backend = sparse_model(tmp_path)
    cache = Cache(tmp_path / "cache")
    result = run_sync(dissect(backend, sha, concepts, ["sparse"], cache=cache))
    literal = run_sync(dissect(backend, sha, concepts, ["sparse"], DissectionParams(tie_factor=None), cache=cache))
    ld, lit = result.layers["sparse"], literal.layers["sparse"]
    assert ld.thresholds.tolist()[0::2] == [0.0, 1.0] and ld.thresholds[1] > 0
    assert ld.at_threshold.tolist()[0::2] == [1.0, 1.0] and ld.at_threshold[1] < 2 * 0.005
    assert ld.tie_fallback.tolist() == [True, False, True] and not lit.tie_fallback.any()
    assert any("sparse: 2 units (0, 2) tie" in n for n in result.notes)
    assert not any("tie" in n for n in literal.notes)
    # the constant unit never exceeds T_2: no mask, IoU 0, no label (the paper's rule: whole image)
    assert not ld.iou[2].any() and ld.summary.label_name[2] == "" and not ld.summary.is_detector[2]
    assert lit.iou[2].max() > 0 and lit.summary.label_name[2] != ""
    maps = _maps(backend, concepts)
    cats = np.maximum(concepts.label_categories(), 0)
    index = {c: g for g, c in enumerate(concepts.categories)}
    dense = IoUTally(3, cats, len(concepts.categories))
    some = False
    for i, m in maps.items():
        s = concepts.sample(i)
        masks = layer_masks(result, "sparse", m[None], s.mask_size)[0]  # what report and view draw
        assert not masks[0].all() and not masks[2].any(), f"whole-image mask on image {i}"
        some |= bool(masks[0].any())
        assert layer_masks(literal, "sparse", m[None], s.mask_size)[0, 0::2].all()  # the paper's S >= T
        dense.update(masks, [(index[c], lab) for c, lab in s.pixel_labels],
                     [(index[c], lab) for c, lab in s.image_labels])
    assert some  # the spot itself is still masked
    np.testing.assert_array_equal(ld.iou, dense.result().iou)  # the tally scores those masks
    np.testing.assert_array_equal(ld.iou[1], lit.iou[1])
    assert ld.summary.iou[0] < lit.summary.iou[0]
    # two forward passes (maps not kept): the same thresholds, counts, fallbacks and IoUs
    two = run_sync(dissect(backend, sha, concepts, ["sparse"], DissectionParams(map_budget_mb=0),
                           cache=Cache(tmp_path / "two")))
    assert (result.passes, two.passes) == (1, 2)
    for f in ("thresholds", "iou", "tie_fallback", "at_threshold", "top_images", "top_values"):
        np.testing.assert_array_equal(getattr(two.layers["sparse"], f), getattr(ld, f))
    back = load_result(save_result(result, tmp_path / "saved"))
    np.testing.assert_array_equal(back.layers["sparse"].tie_fallback, ld.tie_fallback)
    np.testing.assert_array_equal(back.layers["sparse"].at_threshold, ld.at_threshold)
    assert (back.notes, back.passes, back.warnings) == (result.notes, result.passes, result.warnings)


def test_a_strict_dissection_needs_no_fallback(concepts: ConceptDataset, tmp_path: Path) -> None:
    sha, backend = sparse_model(tmp_path)
    strict = run_sync(dissect(backend, sha, concepts, ["sparse"], DissectionParams(strict_mask=True),
                              cache=Cache(tmp_path / "cache")))
    paper = run_sync(dissect(backend, sha, concepts, ["sparse"], cache=Cache(tmp_path / "cache")))
    ld = strict.layers["sparse"]
    assert not ld.tie_fallback.any() and ld.at_threshold[0] == 1.0
    # units 0 and 2 get the same S > T masks (unit 1's few ties with T_1 differ by rule)
    np.testing.assert_array_equal(ld.iou[0::2], paper.layers["sparse"].iou[0::2])
