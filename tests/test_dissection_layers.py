"""1x1 layers: never default layers; dissected only when chosen, with an image-level warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends import open_backend
from engine.cache import Cache
from engine.concepts import ConceptDataset, generate_concepts
from engine.data.images import ImageLoader
from engine.dissection import dissect, layer_masks
from engine.dissection.run import concept_image_set, dissection_preprocess, forward_batch
from engine.jobs import run_sync
from engine.models import build_spec, load_model
from engine.models.layers import default_layers, has_extent
from engine.types import LayerInfo


@pytest.fixture(scope="module")
def concepts(tmp_path_factory: pytest.TempPathFactory) -> ConceptDataset:
    return run_sync(generate_concepts(tmp_path_factory.mktemp("c") / "set", n_images=12, image_size=32))


@pytest.fixture(scope="module")
def ocr(ocr_onnx: Path):
    loaded = load_model(build_spec(str(ocr_onnx), input_size="48x192"))
    return loaded, open_backend(loaded, device="cpu")


def test_default_layers_of_the_onnx_classifier_have_spatial_extent(ocr) -> None:
    layers = ocr[1].layers()
    flat = [li for li in layers if li.is_spatial and not has_extent(li)]
    assert flat and any(li.kind == "Conv" for li in flat)  # the squeeze-excitation 1x1 convs
    for n in (1, 3, 12, 20, 40):
        picks = default_layers(layers, n)
        assert picks and not {li.name for li in flat} & set(picks)


def test_default_layers_skip_a_stage_pooled_to_1x1(rnet_spec) -> None:
    rnet = open_backend(load_model(rnet_spec.with_(device="cpu")))
    assert default_layers(rnet.layers()) == ["conv1", "conv2", "conv3"]
    # ResNet-18 stages at a 32 px input: layer4 is (512, 1, 1)
    resnet = [LayerInfo(f"layer{i}", "Sequential", (c, s, s))
              for i, (c, s) in enumerate([(64, 8), (128, 4), (256, 2), (512, 1)], start=1)]
    assert default_layers(resnet) == ["layer1", "layer2", "layer3"]
    assert default_layers(resnet, 1) == ["layer3"]


def test_an_explicit_1x1_layer_is_dissected_with_a_warning(ocr, concepts: ConceptDataset, tmp_path: Path) -> None:
    loaded, backend = ocr
    flat = next(li.name for li in backend.layers() if li.kind == "Conv" and li.is_spatial and not has_extent(li))
    spatial = default_layers(backend.layers(), 1)[0]
    result = run_sync(dissect(backend, loaded.cache_id, concepts, [flat, spatial], cache=Cache(tmp_path / "c")))
    assert len(result.warnings) == 1
    assert repr(flat) in result.warnings[0] and "image-level" in result.warnings[0]
    with ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess), batch_size=12) as loader:
        batch = next(iter(loader))
    acts = forward_batch(backend, batch.array, [flat], torch.device("cpu"))[flat]
    for row, i in enumerate(batch.indices.tolist()):
        masks = layer_masks(result, flat, acts[row:row + 1], concepts.sample(i).mask_size)[0]
        whole = masks.flatten(1)
        assert (whole.all(dim=1) | ~whole.any(dim=1)).all()  # each mask is all or nothing
    assert np.isfinite(result.layers[flat].iou).all()


def test_cli_prints_the_1x1_warning(ocr_onnx: Path, concepts: ConceptDataset, tmp_path: Path, monkeypatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    backend = open_backend(load_model(build_spec(str(ocr_onnx), input_size="48x192")), device="cpu")
    flat = next(li.name for li in backend.layers() if li.kind == "Conv" and li.is_spatial and not has_extent(li))
    code = main(["dissect", "--model", str(ocr_onnx), "--input-size", "48x192", "--concepts", concepts.root,
                 "--layers", flat, "--out", str(tmp_path / "out"), "--no-tiles"])
    err = capsys.readouterr().err
    assert code == 0
    assert f"convlens: warning: layer {flat!r} has 1x1 maps" in err and "image-level" in err
