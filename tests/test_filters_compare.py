"""engine.filters.compare: one filter of several real models (the demo RNet, a perturbed copy saved
as a state dict, the RNet converted at conv3 saved as TorchScript) on the same real faces, each
equal to that model's own activation computed directly through a backend; cache, cancel, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine.cache import Cache
from engine.data.images import load_image, open_image_set, preprocess
from engine.filters.compare import FilterMaps, MapSource, filter_maps, load_result, save_result
from engine.jobs import run_sync
from engine.types import ConvLensError

LAYER = "conv3"
UNIT = 5
IMAGES = [3, 0, 17]


@pytest.fixture(scope="module")
def models(demo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, MapSource]:
    """Three checkpoints made here: the start RNet, a perturbed state dict, a converted TorchScript."""
    import torch

    from engine.backends import open_backend
    from engine.filters.convert import ConversionSpec, convert_copy
    from engine.models import load_model

    spec, _images = demo
    folder = tmp_path_factory.mktemp("ckpt")
    sd = torch.load(spec.path, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(other, folder / "other.pt")
    loaded = load_model(spec)
    with open_backend(loaded, device="cpu") as backend:
        module = convert_copy(backend, ConversionSpec(LAYER)).eval()
    pre = spec.preprocess
    with torch.no_grad():
        traced = torch.jit.trace(module, torch.zeros(1, pre.n_channels, *pre.input_size), check_trace=False)
    torch.jit.save(traced, str(folder / "converted.pt"))
    return {"original": MapSource("original", spec, LAYER),
            "ordinary": MapSource("ordinary", dataclasses.replace(spec, path=str(folder / "other.pt")), LAYER),
            "interpretable": MapSource("interpretable", type(spec)(path=str(folder / "converted.pt"), preprocess=pre),
                                       f"{LAYER}.mask")}


def _direct(source: MapSource, images, idx: list[int]) -> np.ndarray:
    from engine.backends import open_backend
    from engine.models import load_model

    batch = np.stack([preprocess(load_image(images.records[i].path), source.spec.preprocess) for i in idx])
    with open_backend(load_model(source.spec), device="cpu") as b:
        return b.forward(batch, [source.layer]).activations[source.layer][:, UNIT]


def test_maps_equal_each_models_own_activation(models, demo, tmp_path: Path) -> None:
    images = open_image_set(str(demo[1]))
    sources = list(models.values())
    res = run_sync(filter_maps(sources, images, IMAGES, UNIT, device="cpu", cache=Cache(tmp_path / "c")))
    assert isinstance(res, FilterMaps) and not res.from_cache
    assert res.names == ("original", "ordinary", "interpretable") and res.unit == UNIT
    assert res.layers["interpretable"] == "conv3.mask" and res.paths == tuple(images.records[i].path for i in IMAGES)
    for s in sources:
        expected = _direct(s, images, IMAGES)
        assert res.maps[s.name].shape == expected.shape == (3, 3, 3)
        np.testing.assert_allclose(res.maps[s.name], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.image_max[s.name], expected.reshape(3, -1).max(axis=1), rtol=1e-5)
    # the three models really differ on this filter, and the mask keeps at most its template's support
    assert not np.allclose(res.maps["original"], res.maps["ordinary"])
    assert not np.allclose(res.maps["original"], res.maps["interpretable"])
    assert res.shared_max(0) == max(float(res.image_max[n][0]) for n in res.names)
    # the same request again comes from the cache, with the same numbers
    again = run_sync(filter_maps(sources, images, IMAGES, UNIT, device="cpu", cache=Cache(tmp_path / "c")))
    assert again.from_cache
    for n in res.names:
        np.testing.assert_array_equal(again.maps[n], res.maps[n])
    # another filter is another entry
    other = run_sync(filter_maps(sources[:1], images, IMAGES, UNIT + 1, device="cpu", cache=Cache(tmp_path / "c")))
    assert not other.from_cache and not np.allclose(other.maps["original"], res.maps["original"])


def test_save_load_round_trip_and_damage(models, demo, tmp_path: Path) -> None:
    from engine.cache import DamagedEntry

    images = open_image_set(str(demo[1]))
    res = run_sync(filter_maps([models["original"]], images, [1], UNIT, device="cpu", cache=Cache(tmp_path / "c")))
    folder = save_result(res, tmp_path / "r")
    back = load_result(folder)
    np.testing.assert_array_equal(back.maps["original"], res.maps["original"])
    assert back.layers == res.layers and back.paths == res.paths
    (folder / "map_0.npy").write_bytes(b"broken")
    with pytest.raises(DamagedEntry, match="map_0"):
        load_result(folder)


def test_a_closed_job_leaves_no_entry(models, demo, tmp_path: Path) -> None:
    images = open_image_set(str(demo[1]))
    cache = Cache(tmp_path / "c")
    job = filter_maps(list(models.values()), images, list(range(40)), UNIT, device="cpu", cache=cache)
    seen = 0
    for p in job:
        seen += 1
        if p.message.startswith("ordinary"):
            break  # the first model done, the second under way
    job.close()
    assert seen >= 2
    res = run_sync(filter_maps(list(models.values()), images, list(range(40)), UNIT, device="cpu", cache=cache))
    assert not res.from_cache and res.maps["ordinary"].shape[0] == 40


def test_bad_requests_name_the_cause(models, demo, tmp_path: Path) -> None:
    images = open_image_set(str(demo[1]))
    c = Cache(tmp_path / "c")
    with pytest.raises(ConvLensError, match="no layer named 'conv3.mask'"):
        run_sync(filter_maps([MapSource("x", models["original"].spec, "conv3.mask")], images, [0], UNIT, cache=c))
    with pytest.raises(ConvLensError, match="has 64 filters, no filter 64"):
        run_sync(filter_maps([models["original"]], images, [0], 64, device="cpu", cache=c))
    with pytest.raises(ConvLensError, match="no image 500"):
        run_sync(filter_maps([models["original"]], images, [500], UNIT, cache=c))
    missing = MapSource("gone", dataclasses.replace(models["original"].spec, path=str(tmp_path / "gone.pt")), LAYER)
    with pytest.raises(ConvLensError, match="gone.pt"):
        run_sync(filter_maps([missing], images, [0], UNIT, cache=c))
