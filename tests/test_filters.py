"""Interpretable CNNs (engine.filters): templates, the MI loss against a direct evaluation, the
mask layer, conversion on a copy, and the filter metrics on the real pretrained demo RNet."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.filters.layer import InterpretableMask, filter_loss
from engine.filters.templates import FilterParams, mi_terms, templates


def direct_mi(maps: np.ndarray, in_cat: np.ndarray | None, tau: float, beta: float, alpha: float) -> dict:
    """The paper's formulas evaluated term by term with plain loops (no log-domain tricks)."""
    n, f, h, w = maps.shape
    p = h * w
    nn_ = max(h, w)
    temps = []
    for mi in range(h):
        for mj in range(w):
            t = np.zeros((h, w))
            for i in range(h):
                for j in range(w):
                    t[i, j] = tau * max(1 - beta * (abs(i - mi) + abs(j - mj)) / nn_, -1)
            temps.append(t)
    temps.append(np.full((h, w), -tau))
    out = {k: np.zeros(f) for k in ("loss", "h_t", "inter", "spatial")}
    for k in range(f):
        allowed = np.ones(n, bool) if in_cat is None else in_cat[:, k]
        prior = [alpha / p] * p + [1 - alpha]
        if not allowed.any():
            continue
        pxt = np.zeros((p + 1, n))
        for t_i, t in enumerate(temps):
            e = np.array([math.exp(float((maps[x, k] * t).sum())) for x in range(n)])
            if t_i < p:
                e = e * allowed
            pxt[t_i] = e / e.sum()
        px = sum(prior[t] * pxt[t] for t in range(p + 1))
        mi = 0.0
        for t in range(p + 1):
            for x in range(n):
                if pxt[t, x] > 0:
                    mi += prior[t] * pxt[t, x] * math.log(pxt[t, x] / px[x])
        h_t = -sum(q * math.log(q) for q in prior)
        inter = spatial = 0.0
        for x in range(n):
            post = [prior[t] * pxt[t, x] / px[x] for t in range(p + 1)]
            pos = sum(post[:p])
            neg = post[p]
            inter -= px[x] * sum(q * math.log(q) for q in (pos, neg) if q > 0)
            if pos > 0:
                spatial -= px[x] * pos * sum((q / pos) * math.log(q / pos) for q in post[:p] if q > 0)
        out["loss"][k], out["h_t"][k], out["inter"][k], out["spatial"][k] = -mi, h_t, inter, spatial
    return out


def test_templates_follow_the_paper() -> None:
    h = w = 5
    t = templates(h, w)
    tau = 0.5 / 25
    assert t.shape == (26, 5, 5)
    np.testing.assert_allclose(t[-1], -tau)
    mu = 2 * 5 + 3  # position (2, 3)
    assert t[mu][2, 3] == pytest.approx(tau)
    assert t[mu][2, 4] == pytest.approx(tau * (1 - 4 * 1 / 5))
    assert t[mu][0, 0] == pytest.approx(-tau)  # clipped at -1
    t2 = templates(3, 3, FilterParams(tau=1.0, beta=2.0))
    assert t2[0][0, 1] == pytest.approx(1 - 2 / 3)


@pytest.mark.parametrize("with_categories", [False, True])
def test_mi_loss_matches_the_direct_formula(with_categories: bool) -> None:
    rng = np.random.default_rng(3)
    maps = np.maximum(rng.normal(size=(6, 3, 3, 3)) * 2.0, 0)
    maps[:, 1] *= 4  # a bigger scale: sharper p(x | T)
    in_cat = None
    if with_categories:
        in_cat = rng.random((6, 3)) > 0.5
        in_cat[:, 2] = False  # a filter with no image of its category: only T-, loss 0
        in_cat[0, :2] = True
    for params in (FilterParams(), FilterParams(tau=0.3, beta=4.0, alpha=0.7)):
        tau, beta, alpha = params.resolved(3, 3)
        want = direct_mi(maps, in_cat, tau, beta, alpha)
        got = mi_terms(maps, in_cat, params)
        for key in ("loss", "h_t", "inter", "spatial"):
            np.testing.assert_allclose(getattr(got, key), want[key], rtol=1e-9, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(got.loss, -got.h_t + got.inter + got.spatial, atol=1e-12)
        x = torch.tensor(maps, requires_grad=True)
        terms = filter_loss(x, None if in_cat is None else torch.tensor(in_cat), params)
        for key in ("loss", "h_t", "inter", "spatial"):
            np.testing.assert_allclose(getattr(terms, key).detach().numpy(), want[key], rtol=1e-9, atol=1e-12)
        terms.loss.sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if with_categories:
        assert got.loss[2] == 0 and got.h_t[2] == 0


def test_filter_loss_prefers_one_place_and_one_category() -> None:
    """A filter firing at one place in each image of its category has a lower loss and spatial
    entropy than the same activation spread over the map, and a lower inter-category entropy
    than the same filter also firing on the other class."""
    rng = np.random.default_rng(0)
    n, h = 12, 4
    labels = np.arange(n) % 2
    peaked = np.zeros((n, 1, h, h))
    for i in np.flatnonzero(labels == 0):
        peaked[i, 0, rng.integers(h), rng.integers(h)] = 4.0
    diffuse = np.where(labels[:, None, None, None] == 0, 4.0 / (h * h), 0.0) * np.ones((n, 1, h, h))
    both = peaked.copy()
    for i in np.flatnonzero(labels == 1):
        both[i, 0, rng.integers(h), rng.integers(h)] = 4.0
    params = FilterParams(tau=1.0)
    inc = (labels == 0)[:, None]
    p, d, b = (mi_terms(m, inc, params) for m in (peaked, diffuse, both))
    assert p.loss[0] < d.loss[0]
    assert p.spatial[0] < d.spatial[0]
    assert p.inter[0] < b.inter[0]


def test_mask_forward_step() -> None:
    x = torch.zeros((2, 2, 4, 4))
    x[0, 0, 1, 2] = 5.0
    x[0, 0, 3, 3] = 1.0  # far from the argmax: masked out by the negative part of T_mu
    x[1, 1] = torch.arange(16.0).reshape(4, 4)
    m = InterpretableMask()
    y = m(x)
    t = torch.tensor(templates(4, 4)[:-1])
    np.testing.assert_allclose(y[0, 0].numpy(), torch.relu(x[0, 0] * t[1 * 4 + 2]).numpy(), rtol=1e-6)
    assert y[0, 0, 3, 3] == 0 and y[0, 0, 1, 2] == pytest.approx(5.0 * 0.5 / 16)
    np.testing.assert_allclose(y[1, 1].numpy(), torch.relu(x[1, 1] * t[15]).numpy(), rtol=1e-6)
    unit = InterpretableMask(FilterParams(mask="unit"))(x)
    assert unit[0, 0, 1, 2] == pytest.approx(5.0)
    off = InterpretableMask(enabled=False)
    assert torch.equal(off(x), x)


def _partnet_backend(seed: int = 0):
    from engine.backends.torch_backend import TorchBackend
    from engine.filters.partnet import PARTNET_ARCH, PartNet
    from engine.types import ModelSpec, Preprocess

    torch.manual_seed(seed)
    net = PartNet().eval()
    spec = ModelSpec(path="partnet.pt", arch=PARTNET_ARCH, classes=("animal", "face", "house"),
                     preprocess=Preprocess(input_size=(48, 48), mean=(0.5,) * 3, std=(0.25,) * 3))
    return net, TorchBackend(net, spec, "cpu")


def test_conversion_on_a_copy() -> None:
    from engine.filters.convert import ConversionSpec, InterpretableBlock, convert_copy, masks_of
    from engine.types import ConvLensError

    net, backend = _partnet_backend()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        ref = net(x)
    plain = convert_copy(backend, ConversionSpec("relu4", interpretable=False, init_noise=0.0)).eval()
    assert isinstance(plain.relu4, InterpretableBlock) and not masks_of(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)  # identity init, masks off
    conv = convert_copy(backend, ConversionSpec("relu4")).eval()
    assert len(masks_of(conv)) == 2
    names = dict(conv.named_modules())
    assert {"relu4.original", "relu4.mask_top", "relu4.conv", "relu4.mask"} <= set(names)
    with torch.no_grad():
        out = conv(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    for k, v in net.state_dict().items():  # the loaded module never changes
        assert torch.equal(v, before[k])
    assert not isinstance(net.relu4, InterpretableBlock)
    with pytest.raises(ConvLensError, match="no spatial"):
        convert_copy(backend, ConversionSpec("fc1"))
    with pytest.raises(ConvLensError, match="no layer"):
        convert_copy(backend, ConversionSpec("nope"))


def test_receptive_field_of_a_converted_layer() -> None:
    from engine.backends.torch_backend import TorchBackend
    from engine.filters.convert import ConversionSpec, convert_copy
    from engine.filters.metrics import layer_field
    from engine.models.receptive import receptive_field

    net, backend = _partnet_backend()
    conv = convert_copy(backend, ConversionSpec("relu4")).eval()
    rf = layer_field(TorchBackend(conv, backend.spec, "cpu"), "relu4.mask")
    base = receptive_field(net, "relu4", (48, 48))
    assert rf.stride == base.stride == (8, 8)
    assert rf.size[0] == base.size[0] + 2 * 8  # the new 3x3 conv at stride 8
    assert rf.centre(0, 0) == base.centre(0, 0)


# ----------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def rnet_metrics(demo, tmp_path_factory):
    import os

    from engine.backends import open_backend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.filters.metrics import filter_metrics
    from engine.jobs import run_sync
    from engine.models.loading import load_model

    spec, images = demo
    cache = Cache(tmp_path_factory.mktemp("fcache"))
    loaded = load_model(spec)
    backend = open_backend(loaded)
    ims = open_image_set(images)
    result = run_sync(filter_metrics(backend, loaded.cache_id, ims, "prelu3", cache=cache))
    _ = os
    return result, backend, loaded, ims, cache


def test_metrics_on_the_pretrained_rnet(rnet_metrics) -> None:
    from engine.filters.metrics import filter_metrics
    from engine.jobs import run_sync

    m, backend, loaded, ims, cache = rnet_metrics
    assert m.shape == (64, 3, 3) and m.classes == ("face", "non-face") and m.n_images == 200
    assert m.category_mode == "labels"
    # the category is the class of highest mean activation, recomputed from the extraction
    acts = next(iter(cache.root.glob("activations/*")))
    assert acts.is_dir()
    assert set(np.unique(m.category)) <= {0, 1}
    np.testing.assert_array_equal(m.category, np.argmax(m.class_means, axis=1))
    np.testing.assert_allclose(m.loss, -m.h_t + m.inter + m.spatial, atol=1e-10)
    assert np.all(m.inter >= 0) and np.all(m.spatial >= 0) and np.all(m.spatial <= math.log(9) + 1e-9)
    s = m.summary()
    assert s["filters_per_category"]["face"] + s["filters_per_category"]["non-face"] == 64
    again = run_sync(filter_metrics(backend, loaded.cache_id, ims, "prelu3", cache=cache))
    assert again.from_cache and np.array_equal(again.inter, m.inter)
    rows = m.rows()
    assert len(rows) == 64 and rows[0]["category"] in ("face", "non-face")


def test_metrics_entropies_equal_the_formula_on_the_maps(rnet_metrics) -> None:
    from engine.activations import extract
    from engine.filters.metrics import class_labels
    from engine.jobs import run_sync

    m, backend, loaded, ims, cache = rnet_metrics
    acts = run_sync(extract(backend, loaded.cache_id, ims, ["prelu3"], cache=cache))
    maps = np.asarray(acts.maps("prelu3"), dtype=np.float64)[:, :5]
    labels = class_labels(ims.records, m.classes)
    want = mi_terms(maps, labels[:, None] == m.category[None, :5])
    np.testing.assert_allclose(m.inter[:5], want.inter, rtol=1e-6)
    np.testing.assert_allclose(m.spatial[:5], want.spatial, rtol=1e-6)


def test_metrics_save_and_load(rnet_metrics, tmp_path: Path) -> None:
    from engine.cache import DamagedEntry
    from engine.filters.metrics import load_result, save_result

    m = rnet_metrics[0]
    save_result(m, tmp_path / "r")
    back = load_result(tmp_path / "r")
    assert back.layer == m.layer and back.classes == m.classes
    np.testing.assert_array_equal(back.spatial, m.spatial)
    (tmp_path / "r" / "inter.npy").write_bytes(b"junk")
    with pytest.raises(DamagedEntry, match="inter"):
        load_result(tmp_path / "r")


def test_randomised_weights_give_other_metrics(demo, rnet_metrics, tmp_path: Path) -> None:
    """Sanity check: the metrics depend on the learned weights."""
    from engine.backends import open_backend
    from engine.filters.metrics import filter_metrics
    from engine.jobs import run_sync
    from engine.models.loading import load_model

    spec, _ = demo
    m, _, _, ims, cache = rnet_metrics
    sd = torch.load(spec.path, weights_only=True)
    g = torch.Generator().manual_seed(0)
    rand = {k: (torch.randn(v.shape, generator=g) * v.std().clamp_min(1e-3)) if v.dim() > 1 else v
            for k, v in sd.items()}
    torch.save(rand, tmp_path / "random.pt")
    loaded = load_model(spec.with_(path=str(tmp_path / "random.pt")))
    r = run_sync(filter_metrics(open_backend(loaded), loaded.cache_id, ims, "prelu3", cache=cache))
    assert not r.from_cache
    assert (r.category != m.category).sum() >= 8
    assert np.abs(r.inter - m.inter).mean() > 1e-4
    assert np.abs(r.class_means - m.class_means).mean() > 1e-2


def test_location_instability_against_a_direct_evaluation(tmp_path: Path) -> None:
    from PIL import Image

    from engine.filters.metrics import location_instability, read_landmarks, to_image_coords
    from engine.models.receptive import ReceptiveField
    from engine.types import ImageRecord, Preprocess

    records = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 20)).save(p)  # width 40, height 20 (model input is 10 x 10: stretch)
        records.append(ImageRecord(str(p)))
    rows = ["image,landmark,x,y"] + [f"{i}.png,eye,{5 + 3 * i},{4 + i}" for i in range(4)] + ["3.png,nose,1,1",
                                                                                             "missing.png,eye,1,1"]
    (tmp_path / "lm.csv").write_text("\n".join(rows) + "\n")
    names, marks = read_landmarks(tmp_path / "lm.csv", records, str(tmp_path))
    assert names == ("eye", "nose") and marks[3]["nose"] == (1.0, 1.0)
    maps = np.zeros((4, 2, 3, 3), dtype=np.float32)
    pos = [(0, 0), (1, 2), (2, 1), (2, 2)]
    for i, (a, b) in enumerate(pos):
        maps[i, 0, a, b] = 1 + i
        maps[i, 1, 1, 1] = 1
    maxes = maps.reshape(4, 2, -1).max(-1)
    rf = ReceptiveField(size=(4, 4), stride=(3, 3), offset=(1.5, 1.5))
    pre = Preprocess(input_size=(10, 10))
    got = location_instability(maps, maxes, np.ones(4, bool), rf, records, marks, names, pre, top_k=4, min_images=3)
    diag = math.hypot(20, 40)
    d = []
    for i, (a, b) in enumerate(pos):
        cy, cx = 1.5 + 3 * a, 1.5 + 3 * b
        y, x = (cy + 0.5) * 20 / 10 - 0.5, (cx + 0.5) * 40 / 10 - 0.5
        assert to_image_coords(cy, cx, (20, 40), pre) == pytest.approx((y, x))
        d.append(math.hypot(5 + 3 * i - x, 4 + i - y) / diag)
    assert got[0, 0] == pytest.approx(np.std(d))
    assert math.isnan(got[0, 1])  # one image with a nose: fewer than min_images
    assert got[1, 0] == pytest.approx(np.std([math.hypot(5 + 3 * i - 19.5, 4 + i - 9.5) / diag for i in range(4)]))


def test_bad_landmark_files_name_the_file_and_row(tmp_path: Path) -> None:
    from engine.filters.metrics import read_landmarks
    from engine.types import ConvLensError, ImageRecord

    rec = [ImageRecord(str(tmp_path / "a.png"))]
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("image,landmark,x,y\na.png,eye,one,2\n")
    with pytest.raises(ConvLensError, match=r"bad.csv: row 2: x and y must be numbers"):
        read_landmarks(tmp_path / "bad.csv", rec, str(tmp_path))
    (tmp_path / "none.csv").write_text("other.png,eye,1,2\n")
    with pytest.raises(ConvLensError, match="none of its images"):
        read_landmarks(tmp_path / "none.csv", rec, str(tmp_path))


def test_package_import_is_light() -> None:
    import subprocess

    code = ("import sys, engine.filters, engine.filters.cli; "
            "bad = [m for m in ('torch', 'engine.filters.metrics', 'engine.filters.train') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr
