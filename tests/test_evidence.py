"""Class evidence maps on real models: Grad-CAM against pytorch-grad-cam, occlusion against a
hand-run loop (torch and ONNX Runtime), saliency against autograd, integrated gradients'
completeness; the causal check, deletion / insertion and Average Drop on a hand-built model
whose answers are known; the cached job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.types import ConvLensError, ModelSpec, Preprocess


@pytest.fixture(scope="module")
def rnet(rnet_spec):
    from engine.backends import open_backend
    from engine.models.loading import load_model

    loaded = load_model(rnet_spec)
    return loaded, open_backend(loaded, device="cpu")


@pytest.fixture(scope="module")
def faces(rnet_spec, demo_images) -> np.ndarray:
    from engine.data.images import ImageLoader, open_image_set

    iset = open_image_set(demo_images)
    idx = [0, 1, 2, 100, 101, 150]  # three faces, three non-faces
    return next(iter(ImageLoader(iset, rnet_spec.preprocess, batch_size=len(idx), indices=idx))).array


def _gradcam_reference(module: nn.Module, layer: nn.Module, x: torch.Tensor, targets: np.ndarray,
                       select: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's map: (ReLU'd, unscaled at the layer's size; its own min-max-scaled,
    cv2-resized output)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class Out(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = module

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            out = self.m(t)
            return out[select] if select is not None else out

    tg = [ClassifierOutputTarget(int(t)) for t in targets]
    with GradCAM(model=Out(), target_layers=[layer]) as cam:
        scaled = cam(input_tensor=x, targets=tg)
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        raw = cam.get_cam_image(x, layer, tg, acts, grads)
    return np.maximum(raw, 0), scaled


@pytest.mark.parametrize("layer", ["conv2", "prelu3"])
def test_gradcam_equals_pytorch_grad_cam_on_rnet(rnet_spec, faces, layer: str) -> None:
    import cv2
    from pytorch_grad_cam.utils.image import scale_cam_image

    from engine.backends.torch_backend import TorchBackend
    from engine.evidence import evidence_maps
    from engine.models.loading import load_model

    mine = load_model(rnet_spec)
    ev = evidence_maps(TorchBackend(mine.module, rnet_spec, "cpu"), faces, "gradcam", layer=layer)
    assert ev.path == "split" and ev.layer == layer
    assert ev.maps.shape == (len(faces), 24, 24) and ev.maps.dtype == np.float32
    ref_model = load_model(rnet_spec).module  # its own copy: pytorch-grad-cam hooks it
    raw, scaled = _gradcam_reference(ref_model, getattr(ref_model, layer), torch.from_numpy(faces), ev.targets, select=0)
    tol = 1e-5 * float(raw.max())
    np.testing.assert_allclose(ev.coarse, raw, rtol=1e-4, atol=tol)
    # its output is min-max scaled, resized with cv2 and min-max scaled again: the same on ours
    np.testing.assert_allclose(scale_cam_image(scale_cam_image(ev.coarse, (24, 24))), scaled, atol=1e-4)
    # our upsampling (bilinear, half-pixel centres) is cv2's
    up = np.stack([cv2.resize(r, (24, 24), interpolation=cv2.INTER_LINEAR) for r in raw])
    np.testing.assert_allclose(ev.maps, up, rtol=1e-4, atol=tol)
    assert (ev.targets[:3] == 1).all() and (ev.targets[3:] == 0).all()  # predicted: faces, then non-faces


@pytest.fixture(scope="module")
def resnet():
    import torchvision

    from engine.backends.torch_backend import TorchBackend

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=5).eval()
    spec = ModelSpec(path="resnet18.pt", arch="resnet18", preprocess=Preprocess(input_size=(64, 64)))
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    return m, TorchBackend(m, spec, "cpu"), x


@pytest.mark.parametrize(("layer", "path"), [("layer4", "split"), ("layer3.0.conv1", "hook")])
def test_gradcam_on_resnet18_through_split_or_hook_equals_pytorch_grad_cam(resnet, layer: str, path: str) -> None:
    import copy

    from engine.evidence import evidence_maps

    m, backend, x = resnet
    ev = evidence_maps(backend, x, "gradcam", layer=layer, target=[0, 3, 4])
    assert ev.path == path  # layer3.0.conv1 has a skip connection around it: no split, a hook
    ref = copy.deepcopy(m)
    raw, _ = _gradcam_reference(ref, ref.get_submodule(layer), torch.from_numpy(x), ev.targets)
    np.testing.assert_allclose(ev.coarse, raw, rtol=1e-4, atol=1e-5 * float(raw.max()))
    assert ev.targets.tolist() == [0, 3, 4]


def test_gradcam_refuses_a_layer_that_is_not_spatial(rnet, faces) -> None:
    from engine.evidence import EvidenceError, evidence_maps

    with pytest.raises(EvidenceError, match="spatial layer.*'dense4'"):
        evidence_maps(rnet[1], faces, "gradcam", layer="dense4")
    with pytest.raises(ConvLensError, match="no layer named 'nope'"):
        evidence_maps(rnet[1], faces, "gradcam", layer="nope")


def test_targets_default_to_prediction_and_are_checked(rnet, faces) -> None:
    from engine.evidence import EvidenceError, evidence_maps

    backend = rnet[1]
    logits = backend.classifier_output(backend.forward(faces))
    ev = evidence_maps(backend, faces, "saliency")
    assert ev.targets.tolist() == logits.argmax(1).tolist()
    np.testing.assert_allclose(ev.scores, logits[np.arange(len(faces)), ev.targets], rtol=1e-6)
    ev0 = evidence_maps(backend, faces, "saliency", target=0)
    assert (ev0.targets == 0).all()
    with pytest.raises(EvidenceError, match="class 2 is out of range: the classifier has 2 classes"):
        evidence_maps(backend, faces, "saliency", target=2)
    with pytest.raises(EvidenceError, match="unknown option"):
        evidence_maps(backend, faces, "saliency", steps=3)
    with pytest.raises(EvidenceError, match="unknown evidence method"):
        evidence_maps(backend, faces, "lime")


def test_saliency_is_the_input_gradient(rnet, faces) -> None:
    from engine.evidence import evidence_maps

    loaded, backend = rnet
    ev = evidence_maps(backend, faces, "saliency")
    x = torch.from_numpy(faces).requires_grad_(True)
    out = loaded.module(x)[0]
    (g,) = torch.autograd.grad(out.gather(1, torch.as_tensor(ev.targets)[:, None]).sum(), [x])
    np.testing.assert_allclose(ev.maps, g.abs().amax(dim=1).numpy(), rtol=1e-5, atol=1e-7)


def test_integrated_gradients_are_complete(rnet, faces) -> None:
    """Completeness (Sundararajan et al.): the attributions sum to f(x) - f(baseline)."""
    from engine.evidence import evidence_maps

    backend = rnet[1]
    ev = evidence_maps(backend, faces, "ig", steps=128)
    f0 = backend.classifier_output(backend.forward(np.zeros_like(faces)))[np.arange(len(faces)), ev.targets]
    np.testing.assert_allclose(ev.maps.sum(axis=(1, 2)), ev.scores - f0, rtol=0.03, atol=0.05)


def _occlusion_by_hand(backend, x: np.ndarray, targets: np.ndarray, w: int) -> np.ndarray:
    """Non-overlapping w x w windows, zero baseline: each pixel's value is its window's drop."""
    full = backend.classifier_output(backend.forward(x))[np.arange(len(x)), targets]
    out = np.zeros((len(x), *x.shape[2:]), np.float32)
    for r in range(0, x.shape[2], w):
        for c in range(0, x.shape[3], w):
            y = x.copy()
            y[:, :, r:r + w, c:c + w] = 0
            drop = full - backend.classifier_output(backend.forward(y))[np.arange(len(x)), targets]
            out[:, r:r + w, c:c + w] = drop[:, None, None]
    return out


def test_occlusion_equals_a_hand_run_on_torch_and_onnx(rnet, faces, tmp_path: Path) -> None:
    from engine.backends import open_backend
    from engine.evidence import evidence_maps

    loaded, backend = rnet
    ev = evidence_maps(backend, faces, "occlusion", window=6, stride=6, batch_size=7)
    np.testing.assert_allclose(ev.maps, _occlusion_by_hand(backend, faces, ev.targets, 6), rtol=1e-4, atol=1e-5)
    onnx = open_backend(loaded, backend="onnx", onnx_dir=tmp_path)
    assert onnx.name == "onnxruntime"
    ev_onnx = evidence_maps(onnx, faces, "occlusion", window=6, stride=6)
    np.testing.assert_allclose(ev_onnx.maps, ev.maps, rtol=1e-3, atol=1e-4)
    dflt = evidence_maps(backend, faces[:1], "occlusion")
    assert dflt.options["window"] == 3 and dflt.options["stride"] == 1


def test_occlusion_on_a_third_party_onnx_and_gradients_refused_there(ocr_onnx: Path, faces) -> None:
    from engine.backends import open_backend
    from engine.evidence import EvidenceError, evidence_maps
    from engine.models.config import build_spec
    from engine.models.loading import load_model

    spec = build_spec(str(ocr_onnx), input_size="48x192")
    backend = open_backend(load_model(spec))
    x = np.random.default_rng(1).standard_normal((2, 3, 48, 192)).astype(np.float32)
    ev = evidence_maps(backend, x, "occlusion", window=12, stride=12)
    assert ev.maps.shape == (2, 48, 192) and np.isfinite(ev.maps).all()
    np.testing.assert_allclose(ev.maps, _occlusion_by_hand(backend, x, ev.targets, 12), rtol=1e-3, atol=1e-5)
    for method in ("gradcam", "ig", "saliency"):
        with pytest.raises(EvidenceError, match="needs gradients.*onnx.*occlusion works on any backend"):
            evidence_maps(backend, x, method)


class _ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.conv2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.fc = nn.Linear(8 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x)))).flatten(1))


def test_guided_backprop_runs_on_a_copy_and_refuses_models_without_relus(rnet, faces) -> None:
    from engine.backends.torch_backend import TorchBackend
    from engine.evidence import EvidenceError, evidence_maps

    with pytest.raises(EvidenceError, match="no.*nn.ReLU|has none"):
        evidence_maps(rnet[1], faces, "guided_backprop")
    torch.manual_seed(0)
    net = _ReluNet().eval()
    backend = TorchBackend(net, ModelSpec(path="relu.pt", preprocess=Preprocess(input_size=(8, 8))), "cpu")
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    gb = evidence_maps(backend, x, "guided_backprop", target=1)
    sal = evidence_maps(backend, x, "saliency", target=1)
    assert gb.maps.shape == (4, 8, 8) and not np.allclose(gb.maps, sal.maps)
    assert net.relu1.inplace and not net.relu1._backward_hooks and not net.relu1._forward_hooks  # the model as it was


# ----------------------------------------------------------------------------- the checks, on a known model


class _LeftHalf(nn.Module):
    """Class 1's logit is 4 x the mean of channel 0 over the left half, minus 2; class 0's is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 4.0 * x[:, 0, :, : x.shape[3] // 2].mean(dim=(1, 2)) - 2.0
        return torch.stack([torch.zeros_like(s), s], dim=1)


@pytest.fixture
def half():
    from engine.backends.torch_backend import TorchBackend

    spec = ModelSpec(path="half.pt", preprocess=Preprocess(input_size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    return TorchBackend(_LeftHalf(), spec, "cpu")


def _sigmoid(z: float) -> float:
    return float(1 / (1 + np.exp(-z)))


def test_causal_check_marks_the_blob_the_model_does_not_use(half) -> None:
    from engine.evidence import causal_check

    x = np.ones((1, 3, 8, 8), np.float32)
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 1:3, 0:3] = 2.0  # 6 px in the left half: the model uses it
    m[0, 5:7, 5:8] = 1.0  # 6 px in the right half: the model ignores it
    cc = causal_check(half, x, m, np.array([1]), top_fraction=0.25, baseline="zero", threshold=0.05)
    assert cc.blobs.area.tolist() == [6, 6] and cc.blobs.blob.tolist() == [1, 2]
    assert cc.blobs.mass.tolist() == pytest.approx([12 / 18, 6 / 18])
    assert cc.base_prob[0] == pytest.approx(_sigmoid(2.0), abs=1e-6)
    # masking 6 of the 32 left-half pixels lowers the logit to 4 * 26/32 - 2
    assert cc.prob_after.tolist() == pytest.approx([_sigmoid(4.0 * 26 / 32 - 2), _sigmoid(2.0)], abs=1e-6)
    assert cc.causal.tolist() == [True, False]
    assert cc.region_prob[0] == pytest.approx(_sigmoid(4.0 * 26 / 32 - 2), abs=1e-6)
    loose = causal_check(half, x, m, np.array([1]), top_fraction=0.25, baseline="zero", threshold=0.9)
    assert loose.causal.tolist() == [False, False]


def test_deletion_insertion_and_average_drop_by_hand(half) -> None:
    from engine.evidence import average_drop_increase, deletion_insertion

    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 1.0, (2, 3, 8, 8)).astype(np.float32)
    m = rng.standard_normal((2, 8, 8)).astype(np.float32)
    t = np.array([1, 0])
    cu = deletion_insertion(half, x, m, t, steps=4, deletion_baseline="zero", insertion_baseline="black")
    assert cu.fractions.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    for i in range(2):
        order = np.argsort(-m[i].ravel(), kind="stable")
        for s, k in enumerate([0, 16, 32, 48, 64]):
            gone = np.zeros(64, bool)
            gone[order[:k]] = True
            y = x[i].copy()
            y[:, gone.reshape(8, 8)] = 0
            p1 = _sigmoid(4.0 * y[0, :, :4].mean() - 2)
            assert cu.deletion[i, s] == pytest.approx(p1 if t[i] == 1 else 1 - p1, abs=1e-5)
            ins = np.zeros_like(x[i])  # black is 0 with mean 0, std 1
            ins[:, gone.reshape(8, 8)] = x[i][:, gone.reshape(8, 8)]
            p1 = _sigmoid(4.0 * ins[0, :, :4].mean() - 2)
            assert cu.insertion[i, s] == pytest.approx(p1 if t[i] == 1 else 1 - p1, abs=1e-5)
        assert cu.deletion_auc[i] == pytest.approx(np.trapezoid(cu.deletion[i], cu.fractions), abs=1e-6)
    di = average_drop_increase(half, x, m, t)
    for i in range(2):
        lm = np.maximum(m[i], 0) / m[i].max()  # the positive part: negative and zero evidence keep nothing
        y = _sigmoid(4.0 * x[i, 0, :, :4].mean() - 2)
        o = _sigmoid(4.0 * (x[i, 0] * lm)[:, :4].mean() - 2)
        y, o = (y, o) if t[i] == 1 else (1 - y, 1 - o)
        assert di.drop[i] == pytest.approx(100 * max(0.0, y - o) / y, abs=1e-3)
        assert bool(di.increase[i]) == (o > y)


def test_blobs_are_8_connected_and_capped() -> None:
    from engine.evidence import find_blobs

    m = np.zeros((1, 6, 6), np.float32)
    m[0, 0, 0] = m[0, 1, 1] = 3.0  # diagonal neighbours: one blob
    m[0, 4, 4] = 1.0
    m[0, 0, 5] = 2.0
    b = find_blobs(m, top_fraction=4 / 36)
    assert b.area.tolist() == [2, 1, 1] and b.mass.tolist() == pytest.approx([6 / 9, 2 / 9, 1 / 9])
    assert find_blobs(m, top_fraction=4 / 36, max_blobs=2).area.tolist() == [2, 1]
    assert len(find_blobs(np.zeros((1, 6, 6), np.float32)).area) == 0  # no positive evidence, no blob


# ----------------------------------------------------------------------------- the cached job


def test_job_caches_cancels_and_recovers(rnet, demo_images, cache) -> None:
    from engine.data.images import open_image_set
    from engine.evidence import EvidenceParams, load_result, run, save_result
    from engine.jobs import run_sync

    loaded, backend = rnet
    iset = open_image_set(demo_images)
    idx = [0, 5, 120]
    params = EvidenceParams(method="gradcam", steps=10, batch_size=2)
    gen = run(backend, loaded.cache_id, iset, params, cache=cache, indices=idx)
    next(gen)
    gen.close()  # cancelled: nothing written
    assert not list((cache.root / "evidence").glob("*/meta.json")) if (cache.root / "evidence").exists() else True
    r = run_sync(run(backend, loaded.cache_id, iset, params, cache=cache, indices=idx))
    assert not r.from_cache and r.n == 3 and r.record_indices.tolist() == idx
    assert r.deletion.shape == (3, 11) and r.layer == "prelu3" and r.classes == ("non-face", "face")
    assert r.targets.tolist() == [1, 1, 0]
    again = run_sync(run(backend, loaded.cache_id, iset, EvidenceParams(method="gradcam", steps=10, batch_size=3),
                         cache=cache, indices=idx))
    assert again.from_cache and np.array_equal(again.maps, r.maps) and again.params.batch_size == 3
    entry = next((cache.root / "evidence").glob("*/meta.json")).parent
    with open(entry / "maps.npy", "r+b") as f:
        f.truncate(100)
    fresh = run_sync(run(backend, loaded.cache_id, iset, params, cache=cache, indices=idx))
    assert not fresh.from_cache and np.allclose(fresh.maps, r.maps)
    save_result(r, entry.parent / "copy")
    back = load_result(entry.parent / "copy")
    assert back.paths == r.paths and np.array_equal(back.blob_labels, r.blob_labels) and back.params == r.params
    assert back.summary()["deletion_auc"] == pytest.approx(r.summary()["deletion_auc"])


def test_a_map_without_positive_evidence_has_no_blobs_and_still_draws(half, tmp_path: Path, cache) -> None:
    """Class 0 of the hand-built model is a constant: its gradient, the saliency map, is zero."""
    from PIL import Image

    from engine.data.images import open_image_set
    from engine.evidence import EvidenceParams, run
    from engine.evidence.figure import curves_image, evidence_image
    from engine.jobs import run_sync

    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 + 100 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    r = run_sync(run(half, "half", open_image_set(tmp_path / "imgs"), EvidenceParams(method="saliency", target=0, steps=4),
                     cache=cache))
    assert r.n == 2 and (r.maps == 0).all() and len(r.blob_image) == 0
    assert r.summary()["blobs"] == 0 and r.classes == ("0", "1")
    assert evidence_image(r, 0).height > 8 and curves_image(r).size == (720, 300)


class _OneLogit(nn.Module):
    """A binary classifier with one output: the logit 4 x the mean of channel 0 over the left half, minus 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (4.0 * x[:, 0, :, : x.shape[3] // 2].mean(dim=(1, 2)) - 2.0)[:, None]


def test_a_one_output_classifier_gets_the_sigmoid_of_its_logit() -> None:
    from engine.backends.torch_backend import TorchBackend
    from engine.evidence import average_drop_increase, causal_check, deletion_insertion
    from engine.evidence.metrics import score_kind

    spec = ModelSpec(path="one.pt", preprocess=Preprocess(input_size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    be = TorchBackend(_OneLogit(), spec, "cpu")
    x = np.full((1, 3, 8, 8), 0.75, np.float32)
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 1:3, 0:3] = 2.0  # in the left half: the model uses it
    m[0, 5:7, 5:8] = 1.0  # in the right half: ignored
    t = np.array([0])
    assert score_kind(be, np.array([[1.0], [-3.0]])) == "sigmoid"
    assert score_kind(be, np.array([[0.2], [0.9]])) == "probs"  # auto: every value in [0, 1]
    assert score_kind(TorchBackend(_OneLogit(), spec.with_(scores="logits"), "cpu"), np.array([[0.2]])) == "sigmoid"
    cc = causal_check(be, x, m, t, top_fraction=0.25, baseline="zero", threshold=0.05, kind="sigmoid")
    assert cc.base_prob[0] == pytest.approx(_sigmoid(1.0), abs=1e-6)
    assert cc.prob_after.tolist() == pytest.approx([_sigmoid(4.0 * 0.75 * 26 / 32 - 2), _sigmoid(1.0)], abs=1e-6)
    assert cc.causal.tolist() == [True, False]
    cu = deletion_insertion(be, x, m, t, steps=4, deletion_baseline="zero", insertion_baseline="black", kind="sigmoid")
    assert cu.deletion[0, 0] == pytest.approx(_sigmoid(1.0), abs=1e-6) and cu.deletion[0, -1] == pytest.approx(_sigmoid(-2.0))
    assert cu.insertion[0, 0] == pytest.approx(_sigmoid(-2.0)) and cu.insertion[0, -1] == pytest.approx(_sigmoid(1.0))
    di = average_drop_increase(be, x, m, t, kind="sigmoid")
    assert 0 < di.drop[0] < 100


def test_the_insertion_blur_is_rise_gkern_11_5_as_a_convolution() -> None:
    """RISE (Petsiuk et al.'s evaluation.py): ``gkern(11, 5)`` is gaussian_filter of an 11x11
    impulse with sigma 5, applied by ``conv2d(x, kern, padding=11 // 2)``."""
    from scipy.ndimage import gaussian_filter

    from engine.evidence.maps import baseline_batch, rise_kernel

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    k = gaussian_filter(delta, 5)
    kern = np.zeros((3, 3, 11, 11))
    for c in range(3):
        kern[c, c] = k
    x = np.random.default_rng(0).standard_normal((2, 3, 24, 20)).astype(np.float32)
    want = nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(kern.astype(np.float32)), padding=5).numpy()
    pre = Preprocess(input_size=(24, 20))
    np.testing.assert_allclose(baseline_batch(x, "blur", pre), want, atol=1e-5)
    r = np.arange(11) - 5
    std = float(np.sqrt((rise_kernel().sum(axis=0) * r**2).sum()))
    assert rise_kernel().sum() == pytest.approx(1.0) and 3.0 < std < 3.2  # nearly a box, not a 1 px (or 5 px) sigma
    relative = baseline_batch(x, "blur", pre, blur="relative")  # the size-relative blur stays available
    np.testing.assert_allclose(relative, gaussian_filter(x, (0, 0, 2.5, 2.5), mode="nearest"), atol=1e-6)
    np.testing.assert_allclose(baseline_batch(x, "blur", pre, 1.5), gaussian_filter(x, (0, 0, 1.5, 1.5), mode="nearest"),
                               atol=1e-6)


class _Sum(nn.Module):
    """Class 0: the sum of the input; class 1: minus it. Occluding k pixels (to 0) of an all-ones
    image lowers class 0 by 3k, wherever they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.sum((1, 2, 3)), -x.sum((1, 2, 3))], 1)


def test_occlusion_default_stride_tiles_the_input_and_a_larger_stride_is_refused() -> None:
    from engine.backends.torch_backend import TorchBackend
    from engine.evidence.maps import evidence_maps, tiling_stride
    from engine.evidence.run import EvidenceParams

    assert tiling_stride(5, (12, 12)) == 1 and tiling_stride(4, (10, 10)) == 2 and tiling_stride(4, (12, 10)) == 2
    assert tiling_stride(28, (224, 224)) == 14 and tiling_stride(6, (6, 6)) == 3
    spec = ModelSpec(path="sum.pt", preprocess=Preprocess(input_size=(12, 12), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    be = TorchBackend(_Sum(), spec, "cpu")
    x = np.ones((1, 3, 12, 12), np.float32)
    # every window occludes 25 pixels: with windows that tile, every pixel's mean drop is 75
    ev = evidence_maps(be, x, "occlusion", target=0, window=5)
    np.testing.assert_allclose(ev.maps[0], 75.0, rtol=1e-6)
    cut = evidence_maps(be, x, "occlusion", target=0, window=5, stride=2)  # (12 - 5) % 2: the last windows are cut
    assert cut.maps[0, -1, -1] == pytest.approx(48.0) and cut.maps[0, 0, 0] == pytest.approx(75.0)  # a 4x4 corner window
    with pytest.raises(ConvLensError, match="stride 4 is larger than the window 2"):
        evidence_maps(be, x, "occlusion", target=0, window=2, stride=4)
    with pytest.raises(ConvLensError, match="stride 4 is larger than the window 2"):
        EvidenceParams(method="occlusion", window=2, stride=4).check()


def test_the_blur_baseline_of_ig_follows_the_blur_setting(half) -> None:
    from engine.evidence.maps import baseline_batch, evidence_maps

    x = np.random.default_rng(3).uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)
    pre = half.spec.preprocess
    for blur in ("rise", "relative"):
        base = baseline_batch(x, "blur", pre, blur=blur)
        ev = evidence_maps(half, x, "ig", target=1, baseline="blur", blur=blur, steps=8)
        # a linear class score: IG's attributions (summed over channels into the map) are exactly f(x) - f(base)
        want = 4.0 * (x[0, 0, :, :4].mean() - base[0, 0, :, :4].mean())
        assert float(ev.maps.sum()) == pytest.approx(want, rel=1e-4, abs=1e-6), blur
