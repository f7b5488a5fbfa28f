"""PyTorch and ONNX Runtime backends: same layers, same activations, capture by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from engine.backends import BackendError, open_backend
from engine.models import build_spec, load_model


@pytest.fixture(scope="module")
def resnet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    m = torchvision.models.resnet18(num_classes=10)
    for mod in m.modules():  # non-trivial BatchNorm statistics, so folding errors would show
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("r18") / "resnet18.pt"
    torch.save(m.state_dict(), path)
    return path


def test_torch_and_onnxruntime_agree_on_logits_and_activations(resnet_path: Path, tmp_path: Path) -> None:
    loaded = load_model(build_spec(str(resnet_path), arch="resnet18", input_size="64"))
    tb = open_backend(loaded, "torch", "cpu")
    ob = open_backend(loaded, "onnx", "cpu", onnx_dir=tmp_path)
    assert set(tb.layer_names()) == set(ob.layer_names())  # one naming on both backends
    x = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    layers = ["conv1", "bn1", "layer1.0.bn1", "layer1.0.relu", "layer2.0.downsample.0", "layer3", "layer4", "fc"]
    a, b = tb.forward(x, layers), ob.forward(x, layers)
    for n in layers:
        assert a.activations[n].shape == b.activations[n].shape, n
        np.testing.assert_allclose(a.activations[n], b.activations[n], atol=1e-4, rtol=0, err_msg=n)
    np.testing.assert_allclose(a.outputs[0], b.outputs[0], atol=1e-4, rtol=0)
    # conv1 is the convolution alone, not convolution + folded BatchNorm
    assert not np.allclose(a.activations["conv1"], a.activations["bn1"], atol=1e-3)
    assert tb.supports_gradients and not ob.supports_gradients


def test_layer_discovery_lists_kinds_and_shapes(demo) -> None:
    be = open_backend(load_model(demo[0]), device="cpu")
    layers = {li.name: li for li in be.layers()}
    assert layers["conv1"].kind == "Conv2d" and layers["conv1"].shape == (28, 22, 22)
    assert layers["pool2"].shape == (48, 4, 4) and layers["conv3"].shape == (64, 3, 3)
    assert layers["dense4"].shape == (128,) and not layers["dense4"].is_spatial
    assert list(layers)[:3] == ["conv1", "prelu1", "pool1"]  # execution order


def test_torchscript_capture_matches_eager_hooks_with_inplace_relu(resnet_path: Path, tmp_path: Path) -> None:
    loaded = load_model(build_spec(str(resnet_path), arch="resnet18", input_size="64"))
    ts = tmp_path / "r18_ts.pt"
    torch.jit.script(loaded.module).save(str(ts))
    eager = open_backend(loaded, "torch", "cpu")
    script = open_backend(load_model(build_spec(str(ts), input_size="64")), "torch", "cpu")
    assert set(script.layer_names()) == set(eager.layer_names())
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    layers = ["bn1", "layer1.0.bn2", "layer2", "layer4.1.conv2"]
    a, b = eager.forward(x, layers), script.forward(x, layers)
    for n in layers:
        np.testing.assert_array_equal(a.activations[n], b.activations[n])
    assert (a.activations["bn1"] < 0).any()  # captured before the in-place ReLU, as it should be
    assert not script.supports_gradients


def test_layer_gradients_are_torch_only_and_correct(demo) -> None:
    loaded = load_model(demo[0])
    be = open_backend(loaded, "torch", "cpu")
    x = np.random.default_rng(2).normal(size=(2, 3, 24, 24)).astype(np.float32)
    act, grad = be.layer_gradients(x, "dense4", 1)
    # dense4 -> prelu4 -> dense5_1: d logit_1 / d dense4 = W5[1] * prelu'(z)
    w = loaded.module.dense5_1.weight[1].detach().numpy()
    a = loaded.module.prelu4.weight.detach().numpy()
    np.testing.assert_allclose(grad, w * np.where(act > 0, 1.0, a), rtol=1e-5, atol=1e-6)


def test_unknown_layer_and_wrong_shape_are_clear(demo) -> None:
    be = open_backend(load_model(demo[0]), device="cpu")
    with pytest.raises(BackendError, match="no layer named 'conv9'"):
        be.forward(be.dummy_batch(1), ["conv9"])
    with pytest.raises(BackendError, match=r"expected a batch of shape \(N, 3, H, W\)"):
        be.forward(np.zeros((1, 1, 24, 24), np.float32))
    with pytest.raises(BackendError, match="failed on a batch of shape"):
        be.forward(np.zeros((1, 3, 48, 48), np.float32))  # dense4 expects 576 features
    if torch.cuda.is_available():  # then asking for CUDA simply works
        gpu = open_backend(load_model(demo[0]), "torch", "cuda")
        assert gpu.device.startswith("cuda")
        np.testing.assert_allclose(gpu.forward(be.dummy_batch(2)).outputs[0], be.forward(be.dummy_batch(2)).outputs[0],
                                   atol=1e-4)
    else:
        with pytest.raises(BackendError, match="CUDA is not available"):
            open_backend(load_model(demo[0]), "torch", "cuda")
    with pytest.raises(BackendError, match="device 'cuda:x'"):
        open_backend(load_model(demo[0]), "torch", "cuda:x")


def test_layer_gradients_see_values_before_an_inplace_relu(resnet_path: Path) -> None:
    loaded = load_model(build_spec(str(resnet_path), arch="resnet18", input_size="64"))
    be = open_backend(loaded, "torch", "cpu")
    x = np.random.default_rng(3).normal(size=(2, 3, 64, 64)).astype(np.float32)
    act, grad = be.layer_gradients(x, "bn1", 4)
    np.testing.assert_allclose(act, be.forward(x, ["bn1"]).activations["bn1"], rtol=1e-5, atol=1e-5)
    assert (act < 0).any()  # bn1 is followed by ReLU(inplace=True): the kept value is pre-ReLU
    # the gradient through the ReLU is zero exactly where bn1 is negative
    assert np.all(grad[act < 0] == 0) and np.abs(grad[act > 0]).sum() > 0
    # and the model's output is unchanged by the capture
    np.testing.assert_allclose(be.forward(x).outputs[0], be.forward(x, ["bn1"]).outputs[0], rtol=1e-6)


@pytest.mark.parametrize("fixed", [1, 2])
def test_onnx_exported_for_a_fixed_batch_runs_any_batch(fixed: int, demo, tmp_path: Path) -> None:
    loaded = load_model(demo[0])
    path = tmp_path / f"rnet_b{fixed}.onnx"
    torch.onnx.export(loaded.module, (torch.zeros(fixed, 3, 24, 24),), str(path), dynamo=False)  # no dynamic axes
    be = open_backend(load_model(build_spec(str(path))), device="cpu")
    assert be.fixed_batch == fixed  # 5 images: chunks of `fixed`, the last one padded
    x = np.random.default_rng(4).normal(size=(5, 3, 24, 24)).astype(np.float32)
    ref = open_backend(loaded, "torch", "cpu").forward(x, ["conv2"])
    got = be.forward(x, ["conv2"])
    np.testing.assert_allclose(got.outputs[0], ref.outputs[0], atol=1e-4)
    np.testing.assert_allclose(got.activations["conv2"], ref.activations["conv2"], atol=1e-4)


def test_deeply_nested_modules_keep_their_torch_names_on_onnx(tmp_path: Path) -> None:
    """MobileNet's 'features.1.conv.0.0' is three numbered scopes deep: the ONNX exporter writes
    '/features/features.1/conv/conv.0/conv.0.0/Conv', which must map back to the torch name."""
    torch.manual_seed(0)
    path = tmp_path / "mnv2.pt"
    torch.save(torchvision.models.mobilenet_v2(num_classes=4).state_dict(), path)
    loaded = load_model(build_spec(str(path), arch="mobilenet_v2", input_size="64"))
    tb = open_backend(loaded, "torch", "cpu")
    ob = open_backend(loaded, "onnx", "cpu", onnx_dir=tmp_path)
    layers = ["features.1.conv.0.0", "features.3.conv.1.1", "features.17.conv.2"]
    assert set(layers) <= set(ob.layer_names()) and set(layers) <= set(tb.layer_names())
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    a, b = tb.forward(x, layers), ob.forward(x, layers)
    for n in layers:
        np.testing.assert_allclose(a.activations[n], b.activations[n], atol=1e-4, rtol=0, err_msg=n)
