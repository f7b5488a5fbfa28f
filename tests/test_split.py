"""Splitting a model at a layer: psi (input -> activation) and a head G with G(psi(x)) = f(x)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from engine.backends import BackendError, open_backend
from engine.models import build_spec, load_model


def _state_dict(tmp: Path, arch: str, **kw: object) -> Path:
    torch.manual_seed(0)
    m = torchvision.models.get_model(arch, weights=None, num_classes=10, **kw)
    for mod in m.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    path = tmp / f"{arch}.pt"
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory):
    path = _state_dict(tmp_path_factory.mktemp("r18"), "resnet18")
    return open_backend(load_model(build_spec(str(path), arch="resnet18", input_size="32")), "torch", "cpu")


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


def _check_split(be, layer: str, x: np.ndarray) -> torch.Tensor:
    sp = be.split(layer)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        a = sp.psi(xt)
        got = sp.head(a)
    ref = be.forward(x, [layer])
    np.testing.assert_allclose(a.numpy(), ref.activations[layer], atol=1e-5, rtol=0)  # psi = the layer's activation
    np.testing.assert_allclose(got.numpy(), ref.outputs[be.spec.output_index], atol=1e-5, rtol=0)
    assert sp.activation_shape == ref.activations[layer].shape[1:] and sp.layer == layer
    return a


@pytest.mark.parametrize("layer", ["layer3", "layer4", "layer2.1", "maxpool"])
def test_resnet18_splits_at_block_outputs(resnet, layer: str) -> None:
    _check_split(resnet, layer, _images(3, 32))


def test_a_split_inside_a_residual_block_names_the_skip_and_the_valid_points(resnet) -> None:
    with pytest.raises(BackendError) as e:
        resnet.split("layer3.0.conv1")
    msg = str(e.value)
    assert "cannot split at 'layer3.0.conv1'" in msg and "skip connection" in msg
    assert "in 'layer3.0'" in msg and "the output of 'layer3.0.downsample'" in msg  # the add and what it adds
    assert "nearest layers where it can be split" in msg and "layer3.0" in msg.split("nearest")[1]
    with pytest.raises(BackendError, match="runs 2 times in one forward pass"):  # a reused module
        resnet.split("layer1.0.relu")
    cands = resnet.split_candidates()
    assert {"layer1", "layer2", "layer3", "layer4", "layer3.0", "conv1", "fc"} <= set(cands)
    assert not {"layer3.0.conv1", "layer3.0.bn2", "layer1.0.relu"} & set(cands)
    assert cands.index("layer2") < cands.index("layer3") < cands.index("layer4")  # execution order
    assert "fc" not in resnet.split_candidates(spatial_only=True)
    for layer in cands:  # every candidate really splits
        resnet.split(layer)


def test_vgg11_splits_at_every_feature_layer_and_the_head_leaves_its_input_alone(tmp_path: Path) -> None:
    from engine.backends.torch_backend import TorchBackend

    torch.manual_seed(0)  # built in memory: its 130M-weight classifier is slow to save and load
    vgg = torchvision.models.vgg11(num_classes=10).eval()
    be = TorchBackend(vgg, build_spec(str(tmp_path / "vgg11.pt"), arch="vgg11", input_size="32"), "cpu")
    x = _images(2, 32, 1)
    assert {f"features.{i}" for i in range(21)} <= set(be.split_candidates())
    for n in (0, 3, 4, 10, 19):
        sp = be.split(f"features.{n}")
        a = sp.psi(torch.from_numpy(x)).detach()
        kept = a.clone()
        _check_split(be, f"features.{n}", x)
        sp.head(a)  # features.N is followed by ReLU(inplace=True): the head must work on a copy
        assert torch.equal(a, kept)


def test_pretrained_rnet_split_and_head_jacobian_match_finite_differences(demo) -> None:
    be = open_backend(load_model(demo[0]), "torch", "cpu")
    x = _images(4, 24, 2)
    for layer in ("conv3", "prelu3", "pool2"):
        _check_split(be, layer, x)
    sp = be.split("prelu3")
    params = {n: p.detach().clone() for n, p in be.module.named_parameters()}
    a = sp.psi(torch.from_numpy(x[:1])).detach()
    jac = torch.func.jacrev(sp.head)(a)  # d logits / d activation
    assert jac.shape == (1, 2, 1, 64, 3, 3)
    jac = jac.detach().reshape(2, -1)
    # central differences on a float64 copy of the head (float32 rounding would swamp them)
    import copy

    head64 = copy.deepcopy(sp.head).double()
    a64, eps = a.double(), 1e-5
    rng = np.random.default_rng(3)
    for _ in range(6):
        v = torch.from_numpy(rng.normal(size=a.shape))
        v /= v.norm()
        with torch.no_grad():
            fd = (head64(a64 + eps * v) - head64(a64 - eps * v)) / (2 * eps)
        np.testing.assert_allclose((jac.double() @ v.reshape(-1)).numpy(), fd[0].numpy(), rtol=1e-4, atol=1e-5)
    # autograd through the head gives the same rows; nothing of the model changed
    a.requires_grad_(True)
    (g,) = torch.autograd.grad(sp.head(a)[0, 1], a)
    np.testing.assert_allclose(g.reshape(-1).numpy(), jac[1].numpy(), rtol=1e-5, atol=1e-6)
    for n, p in be.module.named_parameters():
        assert p.grad is None and torch.equal(p.detach(), params[n]), n


def test_torch_export_archive_with_a_static_batch_splits_and_runs_any_batch(demo, tmp_path: Path) -> None:
    loaded = load_model(demo[0])
    path = tmp_path / "rnet_b1.pt2"
    torch.export.save(torch.export.export(loaded.module, (torch.zeros(1, 3, 24, 24),)), str(path))
    be = open_backend(load_model(build_spec(str(path), input_size="24")), "torch", "cpu")
    assert be.fixed_batch == 1
    eager = open_backend(loaded, "torch", "cpu")
    x = _images(3, 24, 4)
    sp = be.split("conv3")
    with torch.no_grad():
        got = sp.head(sp.psi(torch.from_numpy(x)))
    np.testing.assert_allclose(got.numpy(), eager.forward(x).outputs[0], atol=1e-5, rtol=0)
    assert "conv3" in be.split_candidates(spatial_only=True)
    # the head's Jacobian on a batch of 3, one chunk at a time, is the eager head's
    a = sp.psi(torch.from_numpy(x)).detach()
    ref = eager.split("conv3")
    np.testing.assert_allclose(torch.func.jacrev(sp.head)(a).detach().numpy(),
                               torch.func.jacrev(ref.head)(a).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_models_that_cannot_be_split_say_why(demo, tmp_path: Path, ocr_onnx: Path) -> None:
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if y.mean() > 0:  # control flow on a tensor value: torch.fx cannot trace it
                y = -y
            return self.fc(y.mean((2, 3)))

    from engine.backends.torch_backend import TorchBackend

    be = TorchBackend(Branchy().eval(), build_spec(str(tmp_path / "branchy.pt"), input_size="16"), "cpu")
    with pytest.raises(BackendError, match="torch.fx cannot trace its forward"):
        be.split("conv")
    loaded = load_model(demo[0])
    ts = tmp_path / "rnet_ts.pt"
    torch.jit.script(loaded.module).save(str(ts))
    script = open_backend(load_model(build_spec(str(ts), input_size="24")), "torch", "cpu")
    assert not script.supports_split
    with pytest.raises(BackendError, match="TorchScript model cannot be split"):
        script.split("conv3")
    onnx = open_backend(load_model(build_spec(str(ocr_onnx))), device="cpu")
    assert not onnx.supports_split
    with pytest.raises(BackendError, match="needs a PyTorch model.*--backend torch"):
        onnx.split(onnx.layer_names()[0])
    with pytest.raises(BackendError, match="needs a PyTorch model"):
        onnx.trainable_copy()
    eager = open_backend(loaded, "torch", "cpu")
    with pytest.raises(BackendError, match="no layer named 'conv9'"):
        eager.split("conv9")
    with pytest.raises(BackendError, match="output 0 does not depend on 'dense5_2'"):
        eager.split("dense5_2")  # the box regression output, not the classifier


def test_optional_forward_arguments_are_traced_at_their_defaults(tmp_path: Path) -> None:
    class WithFlag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            if features:  # Python control flow on an argument, not on a tensor
                return y
            return self.fc(y.mean((2, 3)))

    from engine.backends.torch_backend import TorchBackend

    be = TorchBackend(WithFlag().eval(), build_spec(str(tmp_path / "flag.pt"), input_size="16"), "cpu")
    assert be.split_candidates() == ["conv", "fc"]
    _check_split(be, "conv", _images(2, 16, 5))
