"""Polytope neighbour gallery on real models: the certificate on the pretrained RNet over all 200
demo images, affine-head detection (ResNet-18 layer4 vs layer3), non-piecewise-linear heads named,
a VGG-style head with max-pooling and two ReLU layers, the sanity check, caching and the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from engine.backends.torch_backend import TorchBackend
from engine.cache import Cache, DamagedEntry
from engine.data.images import open_image_set
from engine.jobs import run_sync
from engine.models import load_model
from engine.polytope.head import HeadProgram, NotPiecewiseLinearError, default_layer
from engine.polytope.run import (
    PolytopeParams,
    digest,
    load_result,
    run,
    save_result,
    split_checked,
)
from engine.types import ConvLensError, ModelSpec, Preprocess


def _backend(module: nn.Module, size: int = 32) -> TorchBackend:
    module.eval()
    spec = ModelSpec(path=f"{type(module).__name__}.pt", preprocess=Preprocess(input_size=(size, size)))
    return TorchBackend(module, spec, "cpu")


def _image_folder(root: Path, n: int = 12, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "a" if i % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (size, size, 3)) if cls == "a" else np.tile(
            np.linspace(0, 255, size)[None, :, None], (size, 1, 3)) + rng.normal(0, 40, (size, size, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def demo_result(demo, tmp_path_factory: pytest.TempPathFactory):
    spec, images = demo
    loaded = load_model(spec)
    be = TorchBackend(loaded.module, spec, "cpu")
    cache = Cache(tmp_path_factory.mktemp("polytope-cache"))
    iset = open_image_set(images)
    res = run_sync(run(be, loaded.cache_id, iset, PolytopeParams(candidates=200, sanity=True), cache=cache))
    return be, loaded, iset, cache, res


def test_certificate_below_1e4_on_every_demo_image(demo_result) -> None:
    be, _loaded, _iset, _cache, res = demo_result
    assert res.layer == "prelu3" and res.n == 200
    assert not res.head["affine"] and res.head["piecewise_linear"]
    assert [(d["module"], d["op"], d["units"]) for d in res.head["nonlinear"]] == [("prelu4", "PReLU", 128)]
    assert res.certificate.shape == (200,) and float(res.certificate.max()) < 1e-10
    # against the model's own float32 logits (what a user sees) too
    assert float((res.certificate + res.float32_gap).max()) < 1e-4
    assert res.boundary_certificate < 1e-8
    # the logits are the model's own: compare with a plain forward pass of 8 images
    from engine.data.images import ImageLoader

    batch = next(iter(ImageLoader(open_image_set(res.image_source), be.spec.preprocess, batch_size=8)))
    ref = be.classifier_output(be.forward(batch.array))
    np.testing.assert_allclose(res.logits[:8], ref, atol=1e-5)
    # decision boundaries and hidden units were both sampled, with distinct boundaries only
    assert set(res.q_kind.tolist()) == {0, 1}
    hidden = res.q_kind == 0
    assert np.all(res.q_image[hidden] == -1)  # prelu4's units: the same hyperplane for every image
    assert len(set(res.q_b[hidden].tolist())) == int(hidden.sum())


def test_local_affine_map_of_one_image_reproduces_its_logits_and_hidden_units(demo_result) -> None:
    be, *_ = demo_result
    sp, prog = split_checked(be, "prelu3")
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 3, 24, 24)).astype(np.float32))
    with torch.no_grad():
        psi = sp.psi(x).double()
    # the full Jacobian A (2 x 576) by jacrev, c from the frozen head at 0
    a = torch.func.jacrev(lambda p: prog.run(p.reshape(psi.shape)).output[0])(psi.reshape(-1))
    rec = prog.run(psi)
    zero = prog.run(torch.zeros_like(psi), rec.pattern)
    assert a.shape == (2, 576)
    torch.testing.assert_close(a @ psi.reshape(-1) + zero.output[0], rec.output[0], atol=1e-10, rtol=0)
    w = torch.func.jacrev(lambda p: prog.run(p.reshape(psi.shape)).z["prelu4"][0])(psi.reshape(-1))
    torch.testing.assert_close(w @ psi.reshape(-1) + zero.z["prelu4"][0], rec.z["prelu4"][0], atol=1e-10, rtol=0)


def test_galleries_respect_their_boundaries_and_beat_nothing_by_construction(demo_result) -> None:
    *_, res = demo_result
    for j in range(0, res.n, 7):
        chosen = res.boundaries(j)
        idx, dist = res.gallery(j)
        same_side = np.all((res.margins[:, chosen] > 0) == (res.margins[j, chosen] > 0), axis=1)
        assert set(np.flatnonzero(same_side).tolist()) - {j} == set(idx.tolist())
        assert int((res.pred[idx] != res.pred[j]).sum()) <= res.delta[j]
        assert res.delta[j] == res.feasible[j]
        assert np.all(np.diff(dist) >= 0)
    m = res.metrics()
    assert set(m) >= {"gallery", "knn_euclidean", "knn_cosine", "exact_region"}
    assert m["knn_euclidean"]["mean_size"] == m["gallery"]["mean_size"]
    assert m["gallery"]["precision"] >= m["knn_euclidean"]["precision"]


def test_sanity_check_randomised_head_changes_the_galleries(demo_result) -> None:
    *_, res = demo_result
    s = res.sanity
    assert s is not None and s["images"] == 200
    assert s["mean_jaccard"] < 0.9 and s["identical_galleries"] < 20


def test_cached_and_saved_results_round_trip(demo_result, tmp_path: Path) -> None:
    be, loaded, iset, cache, res = demo_result
    again = run_sync(run(be, loaded.cache_id, iset, PolytopeParams(candidates=200, sanity=True), cache=cache))
    assert again.from_cache and digest(again) == digest(res)
    np.testing.assert_array_equal(again.margins, res.margins)
    other = run_sync(run(be, loaded.cache_id, iset, PolytopeParams(candidates=200, seed=1), cache=cache))
    assert not other.from_cache
    save_result(res, tmp_path / "r")
    back = load_result(tmp_path / "r")
    assert back.image_summary(3) == res.image_summary(3)
    (tmp_path / "r" / "covers.npy").write_bytes((tmp_path / "r" / "covers.npy").read_bytes()[:-9])
    with pytest.raises(DamagedEntry, match=r"covers\.npy"):
        load_result(tmp_path / "r")


def test_resnet18_layer4_head_is_affine_and_layer3_is_not(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=3)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
    be = _backend(m)
    assert default_layer(be) == "layer4"
    iset = open_image_set(_image_folder(tmp_path / "img"))
    cache = Cache(tmp_path / "cache")
    r4 = run_sync(run(be, "r18", iset, PolytopeParams(layer="layer4"), cache=cache))
    assert r4.head["affine"] and r4.head["hidden_units"] == 0 and "affine" in r4.head["note"]
    assert r4.head["suggested_layers"][:2] == ["layer4.0", "layer3"]
    assert np.all(r4.q_kind == 1) and np.all(r4.q_image == -1)  # class-pair hyperplanes only, one per pair
    assert len(r4.q_kind) <= 3
    assert float(r4.certificate.max()) < 1e-4
    r3 = run_sync(run(be, "r18", iset, PolytopeParams(layer="layer3", candidates=100), cache=cache))
    assert not r3.head["affine"] and r3.head["hidden_units"] > 0
    assert any(d["op"] == "ReLU" for d in r3.head["nonlinear"])
    assert float(r3.certificate.max()) < 1e-4 and r3.boundary_certificate < 1e-6
    assert len(np.unique(r3.region_id)) == r3.n  # random images: every one in its own region


class _VGGish(nn.Module):
    """VGG-style: conv blocks, then a head of max-pool, two ReLU layers and a classifier."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(nn.Linear(256, 64), act(), nn.Dropout(), nn.Linear(64, 32), nn.ReLU(),
                                        nn.Dropout(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_vgg_style_head_with_maxpool_and_two_relu_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    be = _backend(_VGGish())
    assert default_layer(be) == "features.4"  # the last conv's ReLU; the max-pool starts the head
    iset = open_image_set(_image_folder(tmp_path / "img", n=16))
    res = run_sync(run(be, "vgg", iset, PolytopeParams(candidates=300), cache=Cache(tmp_path / "c")))
    kinds = [(d["module"], d["kind"], d["image_independent"]) for d in res.head["nonlinear"]]
    assert kinds == [("features.5", "maxpool", True), ("classifier.1", "elementwise", False),
                     ("classifier.4", "elementwise", False)]
    assert float(res.certificate.max()) < 1e-4 and res.boundary_certificate < 1e-6
    assert np.any(res.q_image[res.q_kind == 0] >= 0)  # past the max-pool, W depends on the image
    s = res.image_summary(0)
    assert s["covered_different_class"] <= s["delta"] == s["smallest_feasible_delta"]


@pytest.mark.parametrize(("act", "name"), [(nn.GELU, "GELU"), (nn.Sigmoid, "Sigmoid")])
def test_a_non_piecewise_linear_head_is_refused_naming_the_op(act: type[nn.Module], name: str,
                                                              tmp_path: Path) -> None:
    be = _backend(_VGGish(act))
    with pytest.raises(NotPiecewiseLinearError) as e:
        split_checked(be, "features.4")
    msg = str(e.value)
    assert f"'classifier.1' ({name})" in msg and "not piecewise linear" in msg
    assert "The head is piecewise linear when split at: classifier.1," in msg  # after the op
    with pytest.raises(ConvLensError, match=name):
        run_sync(run(be, "x", open_image_set(_image_folder(tmp_path / "i", n=4)),
                     PolytopeParams(layer="features.4"), cache=Cache(tmp_path / "c")))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return self.out(torch.relu(h * self.fc(h)))  # a product of two psi-dependent tensors


def test_a_product_of_two_features_is_named() -> None:
    with pytest.raises(NotPiecewiseLinearError, match="multiplies or divides two tensors"):
        HeadProgram(_backend(_Gated(), 16).split("conv").head)


def _parser() -> argparse.ArgumentParser:
    from engine.polytope.cli import register

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    register(sub)
    return p


def test_cli_gallery_of_one_image_and_metric_table(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    spec, images = demo
    p = _parser()
    base = ["polytope", "--model", spec.path, "--arch", "rnet", "--input-size", "24", "--mean", "0.5,0.5,0.5",
            "--std", "0.50196,0.50196,0.50196", "--classes", "non-face,face", "--images", str(images)]
    a = p.parse_args([*base, "--out", str(tmp_path / "all")])
    assert a.func(a) == 0
    out = capsys.readouterr().out
    assert "gallery" in out and "knn_euclidean" in out and "exact_region" in out
    m = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert m["images"] == 200 and m["certificate_max"] < 1e-4 and m["layer"] == "prelu3"
    rows = (tmp_path / "all" / "images.csv").read_text().splitlines()
    assert len(rows) == 201 and rows[0].startswith("image,predicted,certificate_error")
    first = rows[1].split(",")[0]
    a = p.parse_args([*base, "--out", str(tmp_path / "one"), "--image", first, "--candidates", "50"])
    assert a.func(a) == 0
    js = json.loads((tmp_path / "one" / "polytope.json").read_text())
    assert js["image"] == first and js["certificate_error"] < 1e-4 and js["n_boundaries"] >= 1
    assert js["covered"] == len(js["neighbours"]) and js["predicted"] in ("face", "non-face")
    assert all(n["distance"] >= 0 for n in js["neighbours"])
    assert [n["distance"] for n in js["neighbours"]] == sorted(n["distance"] for n in js["neighbours"])
    lm = js["local_map"]
    assert lm["A_shape"] == [2, 576] and lm["hidden_boundaries"] == 128 and lm["certificate_error"] < 1e-10
    with np.load(tmp_path / "one" / "local_map.npz", allow_pickle=False) as z:
        assert z["A"].shape == (2, 576) and z["W"].shape == (128, 576) and z["b"].shape == (128,)
    png = Image.open(tmp_path / "one" / "gallery.png")
    assert png.size[0] > 400 and png.size[1] > 150
    a = p.parse_args([*base, "--out", str(tmp_path / "bad"), "--image", str(tmp_path / "nope.png")])
    with pytest.raises(ConvLensError, match=r"nope\.png: not among the 200 images"):
        a.func(a)


def test_cli_through_convlens_main(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import engine.cli

    if not hasattr(engine.cli, "discover_commands"):
        pytest.skip("the command registry (engine.cli.discover_commands) has not landed")
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    spec, images = demo
    rc = engine.cli.main(["-q", "polytope", "--model", spec.path, "--images", str(images), "--layer", "conv3",
                          "--out", str(tmp_path / "o"), "--candidates", "20"])
    assert rc == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["layer"] == "conv3" and m["candidates"] == 20 and m["certificate_max"] < 1e-4
    rc = engine.cli.main(["polytope", "--model", spec.path, "--images", str(images), "--layer", "nosuch",
                          "--out", str(tmp_path / "o2")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "convlens: error:" in err and "nosuch" in err and "Traceback" not in err


def test_closing_the_job_mid_way_writes_no_cache_entry(tmp_path: Path) -> None:
    torch.manual_seed(0)
    be = _backend(_VGGish())
    iset = open_image_set(_image_folder(tmp_path / "img", n=10))
    cache = Cache(tmp_path / "c")
    job = run(be, "vgg", iset, PolytopeParams(candidates=20, batch_size=2), cache=cache)
    first = next(job)
    assert first.fraction is not None and first.fraction < 0.5
    next(job)
    job.close()
    kind = tmp_path / "c" / "polytope"
    assert not kind.exists() or not [p for p in kind.iterdir() if not p.name.startswith(".")]
    res = run_sync(run(be, "vgg", iset, PolytopeParams(candidates=20, batch_size=2), cache=cache))
    assert not res.from_cache and res.n == 10
    same = run_sync(run(be, "vgg", iset, PolytopeParams(candidates=20, batch_size=5), cache=cache))
    assert same.from_cache  # the batch size does not change the result


def test_full_local_map_of_one_image_on_the_vgg_style_head() -> None:
    from engine.polytope.head import local_affine_map

    torch.manual_seed(0)
    be = _backend(_VGGish())
    sp, prog = split_checked(be, "features.4")
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        psi = sp.psi(x)
        ref = sp.head(psi)
    lm = local_affine_map(prog, psi)
    assert lm.a.shape == (4, 16 * 16 * 16) and lm.w.shape == (64 + 32, 16 * 16 * 16) and len(lm.units) == 96
    assert lm.certificate < 1e-12
    torch.testing.assert_close(lm.a @ psi.double().reshape(-1) + lm.c, ref[0].double(), atol=1e-5, rtol=0)
    # each hidden unit's hyperplane gives its pre-activation at psi
    rec = prog.run(psi.double())
    z = torch.cat([rec.z["classifier_1"][0], rec.z["classifier_4"][0]])
    torch.testing.assert_close(lm.w @ psi.double().reshape(-1) + lm.b, z, atol=1e-10, rtol=0)
    assert set(lm.pattern) == {"classifier_1", "classifier_4"} and 0 < lm.pattern["classifier_1"] <= 64
    # moving psi a little inside the region: the same affine map still gives the logits
    step = 1e-6 * torch.randn_like(psi)
    with torch.no_grad():
        moved = sp.head(psi + step)[0].double()
    torch.testing.assert_close(lm.a @ (psi + step).double().reshape(-1) + lm.c, moved, atol=1e-5, rtol=0)
    with pytest.raises(ConvLensError, match="full local map"):
        local_affine_map(prog, psi, max_elements=1000)


class _Clamped(nn.Module):
    """A head with ReLU6, clamp(min, max), clamp(max=) and LeakyReLU: several thresholds per unit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.act1 = nn.ReLU6()
        self.fc2 = nn.Linear(16, 16)
        self.act2 = nn.LeakyReLU(0.1)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(3 * self.fc1(self.conv(x).flatten(1)))
        h = torch.clamp(self.act2(self.fc2(h)), -0.5, 2.0)
        return self.fc3(torch.clamp(h, max=1.5))


def test_clamps_and_leaky_relu_certified(tmp_path: Path) -> None:
    torch.manual_seed(0)
    be = _backend(_Clamped(), 8)
    iset = open_image_set(_image_folder(tmp_path / "img", n=10, size=12))
    res = run_sync(run(be, "clamped", iset, PolytopeParams(layer="conv", candidates=200), cache=Cache(tmp_path / "c")))
    ops = [(d["op"], tuple(d["thresholds"])) for d in res.head["nonlinear"]]
    assert ops == [("ReLU6", (0.0, 6.0)), ("LeakyReLU", (0.0,)), ("clamp", (-0.5, 2.0)), ("clamp_max", (1.5,))]
    assert res.head["hidden_units"] == 16 * 2 + 16 + 16 * 2 + 16
    assert float(res.certificate.max()) < 1e-10 and res.boundary_certificate < 1e-10


def test_an_onnx_model_is_refused_saying_what_to_load(ocr_onnx: Path, demo_images: Path, tmp_path: Path) -> None:
    from engine.backends import open_backend
    from engine.models import build_spec

    be = open_backend(load_model(build_spec(str(ocr_onnx))), "onnx", "cpu")
    with pytest.raises(ConvLensError, match=r"needs an eager PyTorch model .* runs on onnxruntime"):
        run_sync(run(be, "ocr", open_image_set(demo_images), PolytopeParams(), cache=Cache(tmp_path / "c")))


def test_knn_table_is_as_wide_as_the_largest_gallery(demo_result) -> None:
    from engine.polytope import scsc
    from engine.polytope.run import KNN_MAX_ENTRIES, KNN_MIN, knn_width

    _, _, _, _, res = demo_result
    largest = max(len(res.gallery(j)[0]) for j in range(res.n))
    assert largest > KNN_MIN  # the demo's galleries are whole classes (~100 images)
    assert res.knn.shape == (res.n, largest)
    j = int(np.argmax([len(res.gallery(j)[0]) for j in range(res.n)]))
    assert j not in res.knn[j] and len(set(res.knn[j].tolist())) == largest
    assert scsc.popcount(res.covers[j]) - 1 == largest
    # the memory bound: N x k stays within KNN_MAX_ENTRIES, never below KNN_MIN, never past N - 1
    assert knn_width(50_000, 25_000) == KNN_MAX_ENTRIES // 50_000 and knn_width(1_000_000, 10) == KNN_MIN
    assert knn_width(10, 3) == 9 and knn_width(300, 250) == 250


def test_split_after_the_flatten_suggests_the_nearest_earlier_spatial_layers(demo_result) -> None:
    from engine.polytope.run import suggest_earlier

    be = demo_result[0]
    assert "prelu4" not in be.split_candidates(spatial_only=True)
    sug = suggest_earlier(be, "prelu4")
    assert sug[0] == "prelu3" and all(s in be.split_candidates(spatial_only=True) for s in sug)
    assert suggest_earlier(be, "prelu3")[0] == "conv3"  # a spatial layer: the ones before it, as before
