"""What the methods need from the torch backend without changing the user's model: gradients
with no side effects, training on a copy, no in-place device moves, static-batch .pt2 archives."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision

from engine.backends import BackendError, open_backend
from engine.backends.torch_backend import copy_module, flatten_outputs, module_device
from engine.models import build_spec, load_model


@pytest.fixture(scope="module")
def resnet_loaded(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(2)
    m = torchvision.models.resnet18(num_classes=10)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("r18cap") / "resnet18.pt"
    torch.save(m.state_dict(), path)
    return load_model(build_spec(str(path), arch="resnet18", input_size="32"))


def _reference_gradients(module: torch.nn.Module, x: np.ndarray, layer: str, target: int,
                         output_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The previous implementation (``.backward()`` with a retained gradient), on a deep copy."""
    m = copy.deepcopy(module)
    store: dict[str, torch.Tensor] = {}

    def keep(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
        kept = out.clone()
        kept.retain_grad()
        store["a"] = kept
        return kept.clone()

    h = dict(m.named_modules())[layer].register_forward_hook(keep)
    out = flatten_outputs(m(torch.from_numpy(x)))[output_index]
    out.reshape(len(x), -1)[:, target].sum().backward()
    h.remove()
    return store["a"].detach().numpy(), store["a"].grad.numpy()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert set(now) == set(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k  # bit-identical


def test_layer_gradients_leave_every_parameter_untouched_and_match_backward(demo, resnet_loaded) -> None:
    rnet = load_model(demo[0])
    x24 = np.random.default_rng(0).normal(size=(3, 3, 24, 24)).astype(np.float32)
    x32 = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    r18 = resnet_loaded.module
    # a frozen parameter and one carrying a gradient from the user's own training loop
    r18.conv1.weight.requires_grad_(False)
    r18.fc.weight.grad = torch.full_like(r18.fc.weight, 0.25)
    flags = {id(p): p.requires_grad for m in (rnet.module, r18) for p in m.parameters()}
    try:
        for loaded, x, cases in ((rnet, x24, [("conv3", 1), ("dense4", 0), ("prelu1", 1)]),
                                 (resnet_loaded, x32, [("bn1", 4), ("layer3", 7), ("layer4.1.bn2", 2)])):
            be = open_backend(loaded, "torch", "cpu")
            for layer, target in cases:
                act, grad = be.layer_gradients(x, layer, target)
                ref_act, ref_grad = _reference_gradients(loaded.module, x, layer, target)
                np.testing.assert_allclose(act, ref_act, rtol=1e-6, atol=1e-6, err_msg=layer)
                np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7, err_msg=layer)
                assert np.abs(grad).sum() > 0, layer
        for m in (rnet.module, r18):
            for name, p in m.named_parameters():
                assert p.requires_grad == flags[id(p)], name
                if p is r18.fc.weight:
                    assert torch.equal(p.grad, torch.full_like(p, 0.25))  # unchanged
                else:
                    assert p.grad is None, name
    finally:
        r18.conv1.weight.requires_grad_(True)
        r18.fc.weight.grad = None


def test_layer_gradients_work_inside_inference_mode(demo) -> None:
    be = open_backend(load_model(demo[0]), "torch", "cpu")
    x = np.random.default_rng(2).normal(size=(2, 3, 24, 24)).astype(np.float32)
    want = be.layer_gradients(x, "conv2", 1)
    with torch.inference_mode():  # a caller's context must not break the gradient
        got = be.layer_gradients(x, "conv2", 1)
    np.testing.assert_array_equal(want[1], got[1])


@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_training_a_copy_leaves_the_loaded_model_bit_identical_and_in_eval(kind: str, resnet_loaded, tmp_path: Path) -> None:
    loaded = resnet_loaded
    if kind == "torchscript":
        path = tmp_path / "r18_ts.pt"
        torch.jit.script(resnet_loaded.module).save(str(path))
        loaded = load_model(build_spec(str(path), input_size="32"))
    be = open_backend(loaded, "torch", "cpu")
    original = loaded.module
    before = _state(original)
    x = np.random.default_rng(3).normal(size=(4, 3, 32, 32)).astype(np.float32)
    logits_before = be.forward(x).outputs[0]
    model = be.trainable_copy()
    assert model is not original and model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())
    assert module_device(model) == be.torch_device
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(3):
            xb = torch.randn(8, 3, 32, 32, generator=gen)
            yb = torch.randint(0, 10, (8,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    trained = model.state_dict()
    assert not torch.equal(trained["conv1.weight"], before["conv1.weight"])  # the copy learned
    assert not torch.equal(trained["bn1.running_mean"], before["bn1.running_mean"])  # BN in train mode
    assert int(trained["bn1.num_batches_tracked"]) == 3
    _same_state(original, before)
    assert not original.training and not any(m.training for m in original.modules())
    assert all(p.grad is None for p in original.parameters())
    np.testing.assert_array_equal(be.forward(x).outputs[0], logits_before)


def test_trainable_copy_of_a_torch_export_program_is_refused(demo, tmp_path: Path) -> None:
    path = tmp_path / "rnet.pt2"
    torch.export.save(torch.export.export(load_model(demo[0]).module, (torch.zeros(2, 3, 24, 24),)), str(path))
    be = open_backend(load_model(build_spec(str(path), input_size="24")), "torch", "cpu")
    with pytest.raises(BackendError, match="fixed in the mode it was exported in"):
        be.trainable_copy()


def test_closing_one_backend_leaves_the_shared_module_and_the_other_backend_working(demo, tmp_path: Path) -> None:
    loaded = load_model(demo[0])
    module = loaded.module
    weights = {n: p.data_ptr() for n, p in module.named_parameters()}
    x = np.random.default_rng(4).normal(size=(3, 3, 24, 24)).astype(np.float32)
    a = open_backend(loaded, "torch", "cpu")
    b = open_backend(loaded, "torch", "cpu")
    ref = b.forward(x, ["conv2"])
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    others = [open_backend(loaded, "torch", d) for d in devices]
    onnx = open_backend(loaded, "onnx", "cpu", onnx_dir=tmp_path)  # exports from a copy
    a.close()
    for be in others:
        be.close()
    onnx.close()
    got = b.forward(x, ["conv2"])
    np.testing.assert_array_equal(got.outputs[0], ref.outputs[0])
    np.testing.assert_array_equal(got.activations["conv2"], ref.activations["conv2"])
    assert loaded.module is module and module_device(module) == torch.device("cpu")
    assert {n: p.data_ptr() for n, p in module.named_parameters()} == weights  # never moved or copied over
    assert not module.training
    with pytest.raises(BackendError, match="this backend was closed"):
        a.forward(x)


def test_a_backend_on_another_device_works_on_a_copy(demo, tmp_path: Path) -> None:
    loaded = load_model(demo[0])
    for module in (loaded.module, torch.export.unflatten(torch.export.export(loaded.module, (torch.zeros(1, 3, 24, 24),)))):
        before = _state(module)
        moved = copy_module(module, "meta")  # any device other than the module's
        assert module_device(moved) == torch.device("meta") and module_device(module) == torch.device("cpu")
        assert all(p.requires_grad for p in moved.parameters())
        _same_state(module, before)
    if torch.cuda.is_available():
        be = open_backend(loaded, "torch", "cuda")
        assert be.module is not loaded.module and module_device(be.module).type == "cuda"
        assert module_device(loaded.module) == torch.device("cpu")
        x = np.random.default_rng(5).normal(size=(2, 3, 24, 24)).astype(np.float32)
        cpu = open_backend(loaded, "torch", "cpu").forward(x).outputs[0]
        np.testing.assert_allclose(be.forward(x).outputs[0], cpu, atol=1e-4)
        cuda_module = copy_module(loaded.module, "cuda")  # ONNX export from a module on the GPU
        gpu_loaded = copy.copy(loaded)
        gpu_loaded.module = cuda_module
        from engine.backends import export_onnx

        export_onnx(gpu_loaded, tmp_path / "from_gpu.onnx")
        assert module_device(cuda_module).type == "cuda"


@pytest.fixture(scope="module")
def pt2_batch1(demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "rnet_b1.pt2"
    torch.export.save(torch.export.export(load_model(demo[0]).module, (torch.zeros(1, 3, 24, 24),)), str(path))
    return path


def test_torch_export_with_a_static_batch_runs_any_batch(demo, pt2_batch1: Path) -> None:
    be = open_backend(load_model(build_spec(str(pt2_batch1), input_size="24")), "torch", "cpu")
    assert be.fixed_batch == 1
    kinds = {li.name: (li.kind, li.shape) for li in be.layers()}  # a dry run of one image, padded
    assert kinds["conv1"] == ("Conv2d", (28, 22, 22)) and kinds["prelu4"] == ("PReLU", (128,))
    eager = open_backend(load_model(demo[0]), "torch", "cpu")
    x = np.random.default_rng(6).normal(size=(3, 3, 24, 24)).astype(np.float32)
    got, ref = be.forward(x, ["conv2", "dense4"]), eager.forward(x, ["conv2", "dense4"])
    for i in range(2):
        np.testing.assert_allclose(got.outputs[i], ref.outputs[i], atol=1e-5)
    for n in ("conv2", "dense4"):
        np.testing.assert_allclose(got.activations[n], ref.activations[n], atol=1e-5)
    out, summ = be.forward_summaries(x, ["conv2"])
    np.testing.assert_allclose(out, ref.outputs[0], atol=1e-5)
    assert summ["conv2"].max.shape == (3, 48)
    np.testing.assert_allclose(summ["conv2"].max, ref.activations["conv2"].max(axis=(2, 3)), atol=1e-5)
    act, grad = be.layer_gradients(x, "conv3", [0, 1, 1])
    ref_act, ref_grad = eager.layer_gradients(x, "conv3", [0, 1, 1])
    np.testing.assert_allclose(act, ref_act, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5)
    # a program with a dynamic batch runs whole batches, as before
    dyn = torch.export.export(load_model(demo[0]).module, (torch.zeros(2, 3, 24, 24),),
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    from engine.backends.torch_backend import TorchBackend

    assert TorchBackend(torch.export.unflatten(dyn), be.spec, "cpu").fixed_batch is None


def test_predict_command_on_a_static_batch_pt2(demo, pt2_batch1: Path, tmp_path: Path, monkeypatch) -> None:
    from engine.cli import main

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    images = demo[1]
    out = tmp_path / "out"
    rc = main(["-q", "predict", "--model", str(pt2_batch1), "--input-size", "24", "--mean", "0.5,0.5,0.5",
               "--std", "0.50196,0.50196,0.50196", "--images", str(images), "--out", str(out),
               "--batch-size", "3"])
    assert rc == 0
    with open(out / "predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200
