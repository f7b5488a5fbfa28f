"""The weight-randomisation sanity check (Adebayo et al., NeurIPS 2018) on real models: the
similarity metrics against scipy / scikit-image, randomisation on a copy (the loaded model is
never changed), the reference ordering on a small CNN trained here on real faces (Guided
Backprop stays similar to the original under cascading randomisation, gradients and Grad-CAM
do not), the demo RNet's unit heatmaps / Grad-CAM / filter metrics / dissection labels, caching,
cancel and damaged entries."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from engine.backends.torch_backend import TorchBackend, copy_module
from engine.cache import Cache, DamagedEntry
from engine.data.images import ImageLoader, open_image_set
from engine.jobs import run_sync
from engine.models import load_model
from engine.sanity.explanations import supported, unit_heatmaps
from engine.sanity.randomise import randomise_layer, randomised_backends, steps, weight_layers
from engine.sanity.run import CACHE_KIND, SanityParams, load_result, run, sanity_key, save_result
from engine.sanity.similarity import jaccard, map_similarity, rank_correlation, ssim_rows
from engine.types import ConvLensError, ModelSpec, Preprocess


@pytest.fixture
def one_thread():
    """Small CPU models train and run faster on one thread than on a contended pool."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def rnet(demo):
    spec, images = demo
    loaded = load_model(spec)
    return loaded, TorchBackend(loaded.module, spec, "cpu"), open_image_set(images)


def _digest(module: nn.Module) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in module.state_dict().values()]


# ------------------------------------------------------------------------------------ metrics


def test_rank_correlation_and_ssim_match_scipy_and_skimage():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 24, 24))
    b = a + rng.normal(scale=0.7, size=a.shape)
    b[2] = rng.normal(size=(24, 24))
    got = rank_correlation(a, b)
    want = [spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    sims = map_similarity(a, b)
    np.testing.assert_allclose(sims["spearman_abs"], [spearmanr(np.abs(x).ravel(), np.abs(y).ravel()).statistic
                                                      for x, y in zip(a, b, strict=True)], atol=1e-12)
    ssim = ssim_rows(a, b)
    for k in range(5):
        x, y = np.abs(a[k]) / np.abs(a[k]).max(), np.abs(b[k]) / np.abs(b[k]).max()
        assert ssim[k] == pytest.approx(structural_similarity(x, y, data_range=1.0, win_size=7), abs=1e-12)
    assert ssim_rows(a, a) == pytest.approx(np.ones(5))
    assert ssim[2] < ssim[0]


def test_constant_maps_rank_zero_or_undefined():
    a = np.random.default_rng(1).normal(size=(2, 8, 8))
    zero = np.zeros_like(a)
    assert rank_correlation(a, zero).tolist() == [0.0, 0.0]  # a randomised map with no ranks left
    assert np.isnan(rank_correlation(zero, a)).all()  # the original has no ranks: undefined
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(0.5) and jaccard([], []) == 1.0


# ------------------------------------------------------------------------------------ randomisation


def test_randomisation_works_on_copies_top_down(rnet):
    loaded, be, _ = rnet
    before = _digest(loaded.module)
    layers = weight_layers(be)
    assert layers == ["conv1", "conv2", "conv3", "dense4", "dense5_1", "dense5_2"]
    assert steps(["a", "b", "c"], "cascade") == [["c"], ["c", "b"], ["c", "b", "a"]]
    assert steps(["a", "b", "c"], "independent") == [["c"], ["b"], ["a"]]
    seen = {}
    for names, rb in randomised_backends(be, ["conv2", "conv3"], "cascade", seed=3):
        assert rb.module is not loaded.module
        seen[tuple(names)] = rb.module.get_submodule("conv2").weight.detach().clone()
        w3 = rb.module.get_submodule("conv3").weight.detach()
        assert not torch.equal(w3, loaded.module.conv3.weight)  # randomised at every step
        assert torch.equal(rb.module.conv1.weight, loaded.module.conv1.weight)  # never touched
    assert torch.equal(seen[("conv3",)], loaded.module.conv2.weight)
    indep = {tuple(n): rb.module.conv2.weight.detach().clone() for n, rb in randomised_backends(be, ["conv2", "conv3"],
                                                                                                 "independent", seed=3)}
    assert torch.equal(indep[("conv2",)], seen[("conv3", "conv2")])  # a layer's random weights: seed and name only
    assert torch.equal(indep[("conv3",)], loaded.module.conv2.weight)
    w = loaded.module.conv2.weight
    m = copy_module(loaded.module, "cpu")
    randomise_layer(m, "conv2", seed=0, init="permute")
    assert sorted(m.conv2.weight.detach().ravel().tolist()) == sorted(w.detach().ravel().tolist())
    randomise_layer(m, "conv2", seed=0, init="normal")
    assert float(m.conv2.weight.detach().std()) == pytest.approx(float(w.detach().std()), rel=0.1)
    for x, y in zip(before, _digest(loaded.module), strict=True):
        np.testing.assert_array_equal(x, y)


def test_heatmap_sanity_on_rnet_layers_above_change_nothing(rnet, cache):
    loaded, be, iset = rnet
    before = _digest(loaded.module)
    params = SanityParams("heatmap", "cascade", layer="conv2", unit=3, images=12)
    res = run_sync(run(be, loaded.cache_id, iset, params, cache=cache))
    assert res.dropped == ("dense5_2",)  # the box regressor: the class output does not depend on it
    assert res.steps == ("dense5_1", "dense4", "conv3", "conv2", "conv1")
    mean = res.mean()
    # unit 3 of conv2 depends on conv1 and conv2 only: exactly the original above them
    np.testing.assert_allclose(res.values[:3], 1.0)
    assert mean[3, 0] < 0.6 and mean[3, 2] < 0.6 and mean[4, 0] < 0.6
    assert res.drop_step("spearman_abs") == 3
    # the kept maps are the real unit maps of the original model
    batch = next(iter(ImageLoader(iset, be.spec.preprocess, batch_size=64, indices=res.indices.tolist())))
    np.testing.assert_allclose(res.original_maps, unit_heatmaps(be, batch.array, "conv2", 3)[:8], atol=1e-5)
    assert res.step_maps.shape == (5, 8, 24, 24)
    np.testing.assert_array_equal(res.step_maps[0], res.original_maps)
    for x, y in zip(before, _digest(loaded.module), strict=True):
        np.testing.assert_array_equal(x, y)
    # cached: a repeat is a hit; save/load round-trips; a damaged entry is recomputed
    again = run_sync(run(be, loaded.cache_id, iset, params, cache=cache))
    assert again.from_cache and not res.from_cache
    np.testing.assert_array_equal(again.values, res.values)
    key = sanity_key(be, loaded.cache_id, iset, params)
    folder = cache.get(CACHE_KIND, key)
    assert folder is not None
    (folder / "values.npy").write_bytes((folder / "values.npy").read_bytes()[:100])
    with pytest.raises(DamagedEntry):
        load_result(folder)
    fresh = run_sync(run(be, loaded.cache_id, iset, params, cache=cache))
    assert not fresh.from_cache
    np.testing.assert_array_equal(fresh.values, res.values)


def test_independent_mode_and_cancel(rnet, tmp_path):
    loaded, be, iset = rnet
    cache = Cache(tmp_path / "c")
    params = SanityParams("heatmap", "independent", layer="conv3", unit=0, images=6, keep_maps=2)
    gen = run(be, loaded.cache_id, iset, params, cache=cache)
    next(gen)
    next(gen)
    gen.close()
    assert cache.get(CACHE_KIND, sanity_key(be, loaded.cache_id, iset, params)) is None
    res = run_sync(run(be, loaded.cache_id, iset, params, cache=cache))
    assert list(res.randomised) == [("dense5_1",), ("dense4",), ("conv3",), ("conv2",), ("conv1",)]
    np.testing.assert_allclose(res.values[:2], 1.0)
    assert res.mean()[2:, 0].max() < 0.7  # conv3, conv2 or conv1 alone each changes conv3's maps
    save_result(res, tmp_path / "saved")
    back = load_result(tmp_path / "saved")
    np.testing.assert_array_equal(back.values, res.values)
    assert back.params == params and back.steps == res.steps and back.summary() == res.summary()


def test_bad_settings_are_named(rnet):
    loaded, be, iset = rnet
    with pytest.raises(ConvLensError, match="explanation 'nope'"):
        run_sync(run(be, loaded.cache_id, iset, SanityParams("nope")))
    with pytest.raises(ConvLensError, match="needs a layer"):
        run_sync(run(be, loaded.cache_id, iset, SanityParams("heatmap")))
    with pytest.raises(ConvLensError, match="unit 99 is out of range"):
        run_sync(run(be, loaded.cache_id, iset, SanityParams("heatmap", layer="conv1", unit=99, images=2),
                     cache=Cache(Path(iset.root).parent / "bad-cache")))
    # RNet has PReLUs, no nn.ReLU: guided backprop would be plain gradients, so it is not offered
    assert "guided_backprop" not in supported(be) and "heatmap" in supported(be)


def test_onnx_model_is_refused(ocr_onnx, tmp_path):
    from engine.backends import open_backend

    loaded = load_model(ModelSpec(path=str(ocr_onnx)))
    with open_backend(loaded) as be:
        assert supported(be) == []
        with pytest.raises(ConvLensError, match="randomises weights"):
            weight_layers(be)


# ------------------------------------------------------------------------------------ the reference ordering


def _faces(root: Path) -> Path:
    from skimage.data import lfw_subset

    for i, img in enumerate(lfw_subset()):
        d = root / ("face" if i < 100 else "non-face")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def _small_cnn(images, pre: Preprocess, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 2))
    batch = next(iter(ImageLoader(images, pre, batch_size=len(images))))
    x = torch.from_numpy(batch.array)
    y = torch.tensor([0 if images.records[i].label == "face" else 1 for i in batch.indices])
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert float((net(x).argmax(1) == y).float().mean()) > 0.9  # it learnt faces vs non-faces
    return net


@pytest.mark.parametrize("seed", [0, 1])
def test_guided_backprop_fails_gradients_and_gradcam_pass(tmp_path, one_thread, seed):
    """Adebayo et al.'s ordering: under cascading randomisation Guided Backprop's maps stay close
    to the original's; plain gradients' and Grad-CAM's do not."""
    images = open_image_set(_faces(tmp_path / "faces"))
    pre = Preprocess(input_size=(24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), grayscale=True)
    spec = ModelSpec(path="small-cnn.pt", preprocess=pre, classes=("face", "non-face"))
    be = TorchBackend(_small_cnn(images, pre, seed), spec, "cpu")
    assert set(supported(be)) >= {"guided_backprop", "saliency", "gradcam"}
    cache = Cache(tmp_path / "cache")
    res = {m: run_sync(run(be, f"small-{seed}", images, SanityParams(m, "cascade", images=16, seed=seed), cache=cache))
           for m in ("guided_backprop", "saliency", "gradcam")}
    assert res["gradcam"].steps == ("9", "6", "3", "0")
    for metric in ("spearman_abs", "ssim"):
        gbp, grad, cam = (res[m].series(metric) for m in ("guided_backprop", "saliency", "gradcam"))
        # the top layer randomised: guided backprop barely moves, the others drop
        assert gbp[0] > 0.5 and gbp[0] > grad[0] + 0.25 and gbp[0] > cam[0] + 0.25, (metric, gbp, grad, cam)
        # over the whole cascade
        assert gbp.mean() > grad.mean() + 0.15 and gbp.mean() > cam.mean() + 0.15, (metric, gbp, grad, cam)
        assert grad[-1] < 0.3 and cam[-1] < 0.3


# ------------------------------------------------------------------------------------ the other explanations


def test_gradcam_on_rnet_drops_at_the_top_layer(rnet, cache):
    loaded, be, iset = rnet
    res = run_sync(run(be, loaded.cache_id, iset, SanityParams("gradcam", layer="conv3", images=12), cache=cache))
    assert res.series("spearman_abs")[0] < 0.3 and res.drop_step("spearman_abs") == 0


def test_filter_metrics_and_dissection_labels_on_rnet(rnet, cache, one_thread):
    loaded, be, iset = rnet
    res = run_sync(run(be, loaded.cache_id, iset, SanityParams("filters", layer="conv3"), cache=cache))
    assert res.values.shape == (5, 3, 1) and res.item == "filter"
    np.testing.assert_allclose(res.values[:2], 1.0)  # the dense layers do not change conv3's filters
    assert np.nanmax(res.values[2:]) < 0.5
    dis = run_sync(run(be, loaded.cache_id, iset, SanityParams("dissection", layer="conv2"), cache=cache))
    agree = dis.series("label_agreement")
    assert agree[:3].tolist() == [1.0, 1.0, 1.0] and agree[3] < 0.5 and dis.values.shape[2] == 48


def test_graph_nodes_are_matched_by_the_columns_they_cover(rnet, cache, one_thread):
    from engine.sanity.explanations import _compare_graphs

    a = [{"conv3:1": {(0, 0, 0), (0, 0, 1)}, "conv2:4": {(1, 2, 2)}}]
    # the other fit numbers its words differently: matched by columns, within the same layer
    b = [{"conv3:7": {(0, 0, 0), (0, 0, 1), (0, 1, 1)}, "conv1:4": {(1, 2, 2)}}]
    np.testing.assert_allclose(_compare_graphs(a, b)["node_overlap"], [2 / 3, 0.0])
    np.testing.assert_allclose(_compare_graphs(a, a)["node_overlap"], [1.0, 1.0])
    loaded, be, iset = rnet
    res = run_sync(run(be, loaded.cache_id, iset, SanityParams("graphs", layer="conv3", images=2,
                                                                layers=("dense5_1",)), cache=cache))
    # the original graphs of both images have nodes; with the classifier random every image is
    # predicted as one class, the transition tables have no contrast and the graphs no nodes
    assert res.values.shape[2] >= 2 and res.values[0, 0].tolist() == [0.0] * res.values.shape[2]


# ------------------------------------------------------------------------------------ the layers named


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class _Blocks(nn.Module):
    """A torchvision-ResNet-like layout: a stem, a container of blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(_Block(), _Block())
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(torch.relu(self.stem(x))).flatten(1))


def _blocks_backend(model: nn.Module) -> TorchBackend:
    pre = Preprocess(input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return TorchBackend(model.eval(), ModelSpec(path="blocks.pt", preprocess=pre), "cpu")


def _colour_images(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    return root


def test_a_named_container_randomises_its_weight_layers_and_a_weightless_name_is_refused(tmp_path, one_thread):
    from engine.sanity.randomise import expand_layers

    torch.manual_seed(0)
    model = _Blocks()
    be = _blocks_backend(model)
    convs = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert expand_layers(be, ["layer1", "layer1.1", "stem"]) == {"layer1": convs, "layer1.1": convs[2:], "stem": ["stem"]}
    for bad in ("layer1.1.relu", "nope"):
        with pytest.raises(ConvLensError, match=f"layer '{bad}' to randomise.*layer1.0.conv1"):
            expand_layers(be, [bad])
    plan = [(names, {n: rb.module.get_submodule(n).weight.detach().clone() for n in [*convs, "stem", "fc"]})
                for names, rb in randomised_backends(be, ["stem", "layer1"], "cascade",
                                                     members=expand_layers(be, ["stem", "layer1"]))]
    assert [p[0] for p in plan] == [["layer1"], ["layer1", "stem"]]
    first = plan[0][1]
    assert all(not torch.equal(first[n], model.get_submodule(n).weight) for n in convs)  # one step: all four
    assert torch.equal(first["stem"], model.stem.weight) and torch.equal(first["fc"], model.fc.weight)
    images = open_image_set(_colour_images(tmp_path / "img"))
    cache = Cache(tmp_path / "cache")
    res = run_sync(run(be, "blocks", images, SanityParams("saliency", layers=("layer1",), images=3), cache=cache))
    assert res.randomised == (("layer1",),) and res.series("spearman_abs")[0] < 0.9
    with pytest.raises(ConvLensError, match="'layer1.1.relu' to randomise owns no weight"):
        run_sync(run(be, "blocks", images, SanityParams("saliency", layers=("layer1.1.relu",), images=3), cache=cache))


def test_parametrized_weights_are_randomised(one_thread):
    from torch.nn.utils import parametrizations, weight_norm

    torch.manual_seed(0)
    model = _Blocks()
    parametrizations.weight_norm(model.layer1[0].conv1)
    parametrizations.spectral_norm(model.fc)
    with warnings.catch_warnings():  # deprecated in favour of the parametrization, still in use
        warnings.simplefilter("ignore", FutureWarning)
        weight_norm(model.layer1[1].conv2)  # the older hook form: weight_g, weight_v
    be = _blocks_backend(model)
    layers = weight_layers(be)
    assert layers == ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "fc"]
    names = ["layer1.0.conv1", "layer1.1.conv2", "fc"]
    x = torch.randn(2, 3, 8, 8)
    for done, rb in randomised_backends(be, names, "cascade"):
        if len(done) < len(names):
            continue
        with torch.no_grad():
            assert not torch.allclose(rb.module(x), model(x))  # the old hook form recomputes weight in forward
        for n in names:
            old, new = model.get_submodule(n), rb.module.get_submodule(n)
            assert not torch.allclose(new.weight, old.weight), n
            for (k, p), q in zip(old.named_parameters(), new.parameters(), strict=True):
                assert not torch.equal(p, q), (n, k)


def test_named_layers_are_randomised_top_down_whatever_their_order(rnet, tmp_path):
    loaded, be, iset = rnet
    params = SanityParams("heatmap", layer="conv2", unit=1, images=2, layers=("conv3", "dense5_1", "dense5_2"))
    res = run_sync(run(be, loaded.cache_id, iset, params, cache=Cache(tmp_path / "c")))
    assert res.steps == ("dense5_1", "conv3") and res.dropped == ("dense5_2",)  # the box regressor: no effect
