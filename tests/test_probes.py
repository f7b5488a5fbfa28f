"""The transformation probe: hand-built models where the answer is known (exactly rotation
invariant by construction; a circular convolution, where a cyclic shift is an exact linear map
that composes), the pretrained RNet on real faces, the ridge fit against scikit-learn, the
transformations themselves, caching, cancellation and damaged entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from engine.backends.torch_backend import TorchBackend
from engine.cache import Cache, DamagedEntry
from engine.data.images import load_image, open_image_set, preprocess
from engine.jobs import run_sync
from engine.models import load_model
from engine.probes import transforms as tf
from engine.probes.run import (
    ProbeParams,
    composition_pairs,
    fit_map,
    load_result,
    run,
    save_result,
    single_image_set,
    sweep_views,
)
from engine.types import ConvLensError, ModelSpec, Preprocess

# ------------------------------------------------------------------------------ hand-built models


class _Invariant(nn.Module):
    """A 1x1 convolution + ReLU (``feat``), then the global spatial mean (``pool``) and a linear
    classifier: rotating the input by 90 degrees permutes ``feat``'s positions and leaves ``pool``
    unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.feat(x)))


class _Circular(nn.Module):
    """A 3x3 convolution with circular padding and no nonlinearity (``conv``): shift-equivariant
    on the torus, so a cyclic shift of the input is a cyclic shift of the map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular")
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def _backend(module: nn.Module, size: int) -> TorchBackend:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, 0, 0.5)
    module.eval()
    spec = ModelSpec(path=f"{type(module).__name__}.pt", classes=("a", "b"),
                     preprocess=Preprocess(input_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    return TorchBackend(module, spec, "cpu")


def _folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_rotation_invariant_model_by_construction(tmp_path: Path) -> None:
    """Quarter turns of square images at the input size: the pooled layer does not move at all,
    the spatial layer moves (its map rotates) by an exact permutation: the linear map on its
    flattened features is exact on held-out images and M_90 M_90 = M_180."""
    be = _backend(_Invariant(), 4)
    iset = open_image_set(_folder(tmp_path / "img", 60, 4))
    params = ProbeParams(transform="rotate", values=(0.0, 90.0, 180.0, 270.0), layers=("feat", "pool"),
                         features="flat", ridge=0.0)
    res = run_sync(run(be, "invariant", iset, params, cache=Cache(tmp_path / "c")))
    inv = res.invariance()
    assert res.n == 60 and res.layers == ("feat", "pool")
    assert inv[0, 0] == 0 and np.all(inv[0, 1:] > 0.1)  # feat rotates with the image
    assert np.all(inv[1] < 1e-5)  # pool is invariant
    assert np.all(res.agreement() == 1.0) and np.allclose(res.prob, res.ref_prob, atol=1e-5)
    assert res.feature_dims.tolist() == [2 * 4 * 4, 2] and "random projection" not in res.feature_note
    assert res.lin_test is not None and res.lin_identity is not None
    assert np.all(res.lin_test < 1e-5)  # exact permutations (feat) and the identity (pool)
    assert np.all(res.lin_identity[0, 1:] > 0.1)  # while "no change" is far off for feat
    pairs = {tuple(res.values[p].tolist()) for p in res.comp_pairs}
    assert pairs == {(90.0, 90.0, 180.0), (90.0, 180.0, 270.0)}
    assert np.all(res.comp_frob < 1e-5) and np.all(res.comp_test < 1e-5)
    # per-unit responses of the pooled units are flat along the sweep
    r = res.responses("pool")
    assert r.shape == (4, 2) and np.allclose(r, r[0], atol=1e-5)


def test_circular_convolution_translation_is_linear_and_composes(tmp_path: Path) -> None:
    """Whole-pixel shifts with the periodic fill on a circular convolution: psi(T_s x) is a cyclic
    shift of psi(x), so M_s is exact and M_1 M_2 = M_3 (the composition must hold), while a
    shift of the reflected image (another fill) is not a linear map of psi(x)."""
    be = _backend(_Circular(), 5)
    iset = open_image_set(_folder(tmp_path / "img", 80, 5, seed=1))
    common = {"transform": "translate-x", "values": (-1.0, 1.0, 2.0, 3.0), "layers": ("conv",), "features": "flat",
              "ridge": 0.0, "affine": True}
    res = run_sync(run(be, "circ", iset, ProbeParams(fill="wrap", **common), cache=Cache(tmp_path / "c")))
    assert res.lin_test is not None and res.lin_identity is not None
    assert np.all(res.lin_test < 1e-5) and np.all(res.lin_identity > 0.3)
    pairs = {tuple(res.values[p].tolist()) for p in res.comp_pairs}
    assert pairs == {(1.0, 1.0, 2.0), (1.0, 2.0, 3.0), (-1.0, 2.0, 1.0), (-1.0, 3.0, 2.0)}
    assert np.all(res.comp_frob < 1e-5) and np.all(res.comp_test < 1e-5)
    other = run_sync(run(be, "circ", iset, ProbeParams(fill="reflect", **common), cache=Cache(tmp_path / "c")))
    assert other.lin_test is not None and np.all(other.lin_test > 1e-3)


# ------------------------------------------------------------------------------ the ridge fit


def test_ridge_fit_matches_scikit_learn() -> None:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7))
    y = x @ rng.normal(size=(7, 7)) + 0.1 * rng.normal(size=(50, 7))
    ridge = 0.05
    m = fit_map(x, y, ridge)
    lam = ridge * float((x ** 2).sum()) / 7
    ref = Ridge(alpha=lam, fit_intercept=False).fit(x, y)
    np.testing.assert_allclose(m, ref.coef_, rtol=1e-8, atol=1e-10)
    ma = fit_map(x, y, 0.0, affine=True)
    ref_a = Ridge(alpha=0.0, fit_intercept=True).fit(x, y)
    np.testing.assert_allclose(ma[:-1, :-1], ref_a.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ma[:-1, -1], ref_a.intercept_, rtol=1e-6, atol=1e-8)
    assert ma[-1].tolist() == [0.0] * 7 + [1.0]


# ------------------------------------------------------------------------------ transformations


def test_transformations() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    # the general (interpolating) path agrees with the exact quarter turn
    near = tf.apply(img, "rotate", 90.0 + 1e-9, "black")
    np.testing.assert_array_equal(near, np.rot90(img, 1, axes=(0, 1)))
    np.testing.assert_array_equal(tf.apply(img, "rotate", 90.0), np.rot90(img, 1, axes=(0, 1)))
    np.testing.assert_array_equal(tf.apply(img, "translate-x", 2.0, "wrap"), np.roll(img, 2, axis=1))
    np.testing.assert_array_equal(tf.apply(img, "translate-y", -3.0, "wrap"), np.roll(img, -3, axis=0))
    # translations are in model-input pixels: 2 input pixels of a 4 px input are 4 image pixels
    np.testing.assert_array_equal(tf.apply(img, "translate-x", 2.0, "wrap", (4, 4)), np.roll(img, 4, axis=1))
    shifted = tf.apply(img, "translate-x", 3.0, "mean")
    np.testing.assert_allclose(shifted[:, :3].astype(float), np.broadcast_to(img.mean(axis=(0, 1)), (8, 3, 3)), atol=0.51)
    assert tf.apply(img, "rotate", 0.0) is img and tf.apply(img, "scale", 1.0) is img
    bright = tf.apply(img, "brightness", 0.2)
    np.testing.assert_array_equal(bright, np.clip(img.astype(int) + 51, 0, 255))
    zoom = tf.apply(np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3)), "scale", 2.0, "edge")
    assert zoom[0, 0, 0] > 0 and zoom[0, -1, 0] < 210  # the middle of the ramp, enlarged
    assert tf.parse_range("-45:45:5") == tuple(float(v) for v in range(-45, 50, 5))
    assert tf.parse_range("0.7:1.3:0.1") == (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
    assert tf.parse_range("-10, 0,10") == (-10.0, 0.0, 10.0)
    for bad in ("1:2", "0:10:-1", "a:b:c", "1,1", "0:1:0"):
        with pytest.raises(ConvLensError, match="range"):
            tf.parse_range(bad)
    assert composition_pairs("scale", (0.5, 1.0, 2.0, 4.0)).tolist() == [[0, 2, 1], [0, 3, 2], [2, 2, 3]]


def test_bad_settings_are_refused() -> None:
    for params, what in ((ProbeParams(transform="shear"), "shear"), (ProbeParams(fill="magic"), "magic"),
                         (ProbeParams(transform="scale", values=(0.0, 1.0)), "positive"),
                         (ProbeParams(features="pixels"), "features"), (ProbeParams(train_fraction=1.0), "train"),
                         (ProbeParams(ridge=-1.0), "ridge")):
        with pytest.raises(ConvLensError, match=what):
            params.check()


# ------------------------------------------------------------------------------ the demo RNet


@pytest.fixture(scope="module")
def rnet(demo, tmp_path_factory: pytest.TempPathFactory):
    spec, images = demo
    loaded = load_model(spec)
    be = TorchBackend(loaded.module, spec, "cpu")
    cache = Cache(tmp_path_factory.mktemp("probe-cache"))
    iset = open_image_set(images)
    params = ProbeParams(values=tf.parse_range("-30:30:10"))
    res = run_sync(run(be, loaded.cache_id, iset, params, cache=cache))
    return be, loaded, iset, cache, params, res


def test_rnet_rotation_probe_on_real_faces(rnet) -> None:
    be, _loaded, iset, _cache, _params, res = rnet
    assert res.layers == ("conv1", "conv2", "conv3") and res.n == 200
    assert res.n_train == 140 and res.n_test == 60
    inv = res.invariance()
    zero = res.value_index(0.0)
    assert np.all(inv[:, zero] == 0)
    for li in range(3):  # features move more the further the face turns, both ways
        for a, b in ((10, 20), (20, 30), (-10, -20), (-20, -30)):
            assert inv[li, res.value_index(b)] > inv[li, res.value_index(a)] > 0
    assert res.lin_test is not None and res.lin_identity is not None
    moved = np.arange(len(res.values)) != zero
    # the fitted linear map predicts the rotated features better than "they do not move"
    assert np.all(res.lin_test[:, moved] < res.lin_identity[:, moved])
    assert np.all(res.lin_test[:, zero] < 0.05)
    assert res.agreement()[zero] == 1.0 and res.agreement().min() < 1.0
    assert len(res.comp_pairs) and np.all(np.isfinite(res.comp_frob)) and np.all(res.comp_test > 0)
    # the normalised distance of one image at 30 degrees, recomputed here from the model's own output
    j, t = 5, res.value_index(30.0)
    img = load_image(iset.records[int(res.record_indices[j])].path)
    pre = be.spec.preprocess
    x = np.stack([preprocess(img, pre), preprocess(tf.apply(img, "rotate", 30.0, "reflect", pre.input_size), pre)])
    a = be.forward(x, ["conv2"]).activations["conv2"].reshape(2, -1).astype(np.float64)
    want = np.linalg.norm(a[1] - a[0]) / np.linalg.norm(a[0])
    assert res.distance[1, j, t] == pytest.approx(want, rel=1e-4)
    assert res.pooled[1].shape == (200, len(res.values), 48)
    np.testing.assert_allclose(res.pooled[1][j, t], a[1].reshape(48, -1).mean(axis=1), rtol=1e-4, atol=1e-5)


def test_rnet_cache_save_load_and_damage(rnet, tmp_path: Path) -> None:
    be, loaded, iset, cache, params, res = rnet
    again = run_sync(run(be, loaded.cache_id, iset, ProbeParams(**{**params.__dict__, "batch_size": 7}), cache=cache))
    assert again.from_cache and again.params.batch_size == 7
    np.testing.assert_array_equal(again.distance, res.distance)
    assert again.summary()["layers"] == res.summary()["layers"]
    save_result(res, tmp_path / "r")
    back = load_result(tmp_path / "r")
    np.testing.assert_array_equal(back.pooled[2], res.pooled[2])
    assert back.params == res.params and back.summary() == res.summary()
    f = tmp_path / "r" / "distance.npy"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(DamagedEntry, match=r"distance\.npy"):
        load_result(tmp_path / "r")
    # a damaged cache entry is recomputed
    kind = Path(cache.root) / "probe"
    entry = next(p for p in kind.iterdir() if not p.name.startswith("."))
    (entry / "pred.npy").write_bytes(b"junk")
    fresh = run_sync(run(be, loaded.cache_id, iset, params, cache=cache))
    assert not fresh.from_cache
    np.testing.assert_array_equal(fresh.pred, res.pred)


def test_cancel_leaves_no_entry_and_one_image_has_no_linear_map(rnet, tmp_path: Path) -> None:
    be, loaded, iset, _cache, _params, _res = rnet
    cache = Cache(tmp_path / "c")
    job = run(be, loaded.cache_id, iset, ProbeParams(values=(-10.0, 10.0), batch_size=6), cache=cache)
    next(job)
    next(job)
    job.close()
    kind = tmp_path / "c" / "probe"
    assert not kind.exists() or not [p for p in kind.iterdir() if not p.name.startswith(".")]
    one = single_image_set(iset.records[3].path)
    res = run_sync(run(be, loaded.cache_id, one, ProbeParams(values=(-10.0, 0.0, 10.0)), cache=cache))
    assert res.n == 1 and res.lin_test is None and len(res.comp_pairs) == 0
    assert res.invariance()[:, 1].tolist() == [0.0, 0.0, 0.0] and np.all(res.invariance()[:, 0] > 0)
    with pytest.raises(ConvLensError, match="nosuch"):
        run_sync(run(be, loaded.cache_id, one, ProbeParams(layers=("nosuch",)), cache=cache))


class _OneLogit(nn.Module):
    """A binary classifier with one output (a single logit) on a spatial feature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def test_a_one_output_classifier_gets_two_classes_from_the_sigmoid(tmp_path: Path) -> None:
    from engine.probes.run import class_probabilities

    p, kind = class_probabilities(np.array([[0.0], [2.0], [-1.0]]))
    assert kind == "sigmoid" and np.allclose(p[:, 1], [0.5, 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(1))])
    assert np.allclose(p.sum(axis=1), 1.0)
    assert class_probabilities(np.array([[0.2], [0.7]]))[1] == "probs"
    be = _backend(_OneLogit(), 6)
    iset = open_image_set(_folder(tmp_path / "img", 12, 6, seed=2))
    res = run_sync(run(be, "one", iset, ProbeParams(transform="rotate", values=(0.0, 90.0), layers=("conv",)),
                       cache=Cache(tmp_path / "c")))
    assert res.score_kind == "sigmoid"
    with torch.no_grad():
        from engine.data.images import ImageLoader

        batch = next(iter(ImageLoader(iset, be.spec.preprocess, batch_size=12, indices=res.record_indices.tolist())))
        logit = be.module(torch.from_numpy(batch.array))[:, 0].numpy()
    assert res.ref_pred.tolist() == (logit > 0).astype(int).tolist()
    sig = 1 / (1 + np.exp(-logit))
    assert np.allclose(res.ref_prob[:, 0], np.where(logit > 0, sig, 1 - sig), atol=1e-5)
    assert 0.5 <= res.prob.min() < 0.9  # not the constant 1.0 of a one-column softmax
    assert load_result_and_kind(res, tmp_path) == "sigmoid"


def load_result_and_kind(res, tmp_path: Path) -> str:
    from engine.probes.run import save_result

    save_result(res, tmp_path / "saved")
    return load_result(tmp_path / "saved").score_kind


@pytest.mark.parametrize("resize", ["shorter_side_crop", "stretch"])
def test_translation_moves_the_model_input_by_the_pixels_asked(resize: str) -> None:
    """On a wide image (40 x 60) at a 16 x 16 input, a shift of 10 model-input pixels moves a
    blob's centroid 10 pixels in the preprocessed input, right or down, under either resize."""
    h, w, ih, iw = 40, 60, 16, 16
    pre = Preprocess(input_size=(ih, iw), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=resize)
    sy, sx = (h * 0.875 / ih, h * 0.875 / ih) if resize == "shorter_side_crop" else (h / ih, w / iw)
    rows, cols = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2 - 4.5 * sy, (w - 1) / 2 - 4.5 * sx  # at about (3, 3) of the model input
    blob = np.exp(-(((rows - cy) / (1.5 * sy)) ** 2 + ((cols - cx) / (1.5 * sx)) ** 2) / 2)
    img = np.repeat((255 * blob).round().astype(np.uint8)[:, :, None], 3, axis=2)

    def centroid(x: np.ndarray) -> np.ndarray:
        m = preprocess(x, pre)[0].astype(np.float64)
        r, c = np.mgrid[0:ih, 0:iw]
        return np.array([(m * r).sum(), (m * c).sum()]) / m.sum()

    ref = centroid(img)
    assert np.abs(ref - 3.0).max() < 0.6
    right = centroid(tf.apply(img, "translate-x", 10.0, "black", (ih, iw), resize=resize))
    down = centroid(tf.apply(img, "translate-y", 10.0, "black", (ih, iw), resize=resize))
    np.testing.assert_allclose(right - ref, [0.0, 10.0], atol=0.3)
    np.testing.assert_allclose(down - ref, [10.0, 0.0], atol=0.3)
    views = sweep_views(img, "translate-x", [0.0, 10.0], "black", pre)
    assert np.argmax(views[1][:, :, 0].max(axis=0)) - np.argmax(views[0][:, :, 0].max(axis=0)) == 10
