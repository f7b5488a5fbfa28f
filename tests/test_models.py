"""Loading every supported checkpoint format, safely, with precise errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from engine.backends import export_onnx, open_backend
from engine.models import ModelLoadError, build_spec, detect_format, load_model, write_config
from engine.models.config import ConfigError, read_config
from engine.models.zoo import RNet


def _logits(spec, batch):
    loaded = load_model(spec)
    be = open_backend(loaded, device="cpu")
    return loaded, be.classifier_output(be.forward(batch))


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    from skimage.data import lfw_subset

    faces = lfw_subset()[[0, 1, 150, 151]]  # two faces, two non-faces
    x = torch.nn.functional.interpolate(torch.tensor(faces)[:, None], size=(24, 24), mode="bilinear")
    x = (x.repeat(1, 3, 1, 1) - 0.5) / (128 / 255)
    return x.numpy().astype(np.float32)


@pytest.fixture(scope="module")
def rnet_module(demo) -> RNet:
    m = RNet().eval()
    m.load_state_dict(torch.load(demo[0].path, weights_only=True))
    return m


def test_state_dict_with_class_file_is_the_pretrained_rnet(rnet_spec, batch, tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("non-face\nface\n")
    spec = build_spec(rnet_spec.path, arch="rnet", classes=str(classes))
    assert spec.classes == ("non-face", "face")
    assert spec.preprocess.input_size == (24, 24)  # known for rnet without asking
    loaded, logits = _logits(spec, batch)
    assert loaded.format == "state_dict"
    assert list(logits.argmax(1)) == [1, 1, 0, 0]  # the real pretrained weights: faces are faces


@pytest.mark.parametrize("fmt", ["torchscript", "export", "onnx", "safetensors"])
def test_each_format_round_trips_to_identical_logits(fmt: str, rnet_spec, rnet_module, batch, tmp_path: Path) -> None:
    ref = rnet_module(torch.from_numpy(batch))[0].detach().numpy()
    if fmt == "torchscript":
        path = tmp_path / "rnet_scripted.pt"
        torch.jit.script(rnet_module).save(str(path))
        spec = build_spec(str(path), input_size="24")
    elif fmt == "export":
        path = tmp_path / "rnet.pt2"
        ep = torch.export.export(rnet_module, (torch.from_numpy(batch),))
        torch.export.save(ep, str(path))
        spec = build_spec(str(path), input_size="24")
    elif fmt == "onnx":
        loaded = load_model(build_spec(rnet_spec.path, arch="rnet"))
        path = export_onnx(loaded, tmp_path / "rnet.onnx")
        spec = build_spec(str(path))
        assert spec.preprocess.input_size == (24, 24)  # read from the ONNX input shape
    else:
        from safetensors.torch import save_file

        path = tmp_path / "rnet.safetensors"
        save_file(rnet_module.state_dict(), str(path))
        spec = build_spec(str(path), arch="rnet")
    assert detect_format(path) == fmt
    loaded, logits = _logits(spec, batch)
    tol = 1e-5 if fmt == "onnx" else 0.0
    np.testing.assert_allclose(logits, ref, atol=tol, rtol=0)


def test_third_party_onnx_cnn_loads_and_runs(ocr_onnx: Path) -> None:
    spec = build_spec(str(ocr_onnx), input_size="48x192", mean="0.5", std="0.5", classes="0,180")
    loaded = load_model(spec)
    be = open_backend(loaded)
    layers = be.layers()
    convs = [li for li in layers if li.kind == "Conv"]
    assert len(convs) > 20 and all(li.is_spatial for li in convs)
    # a real text line, upright vs rotated by 180 degrees: the classifier tells them apart
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (192, 48), "white")
    ImageDraw.Draw(img).text((8, 14), "ConvLens reads text 2026", fill="black", font_size=20)
    up = (np.asarray(img, np.float32) / 255 - 0.5) / 0.5
    x = np.stack([up, up[::-1, ::-1]]).transpose(0, 3, 1, 2).copy()
    probs = be.classifier_output(be.forward(x))
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)  # it ends in a softmax
    assert probs.argmax(1).tolist() == [0, 1]


def test_torchvision_architecture_by_name_with_random_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in torchvision.models.resnet18(num_classes=5).state_dict().items()}}, path)
    spec = build_spec(str(path), arch="resnet18", input_size="64")
    loaded = load_model(spec)
    assert any("5 classes" in n for n in loaded.notes)  # inferred from the checkpoint, unwrapped, prefix stripped
    be = open_backend(loaded, device="cpu")
    assert be.classifier_output(be.forward(np.zeros((2, 3, 64, 64), np.float32))).shape == (2, 5)
    assert {"layer3", "layer4", "fc"} <= set(be.layer_names())


def test_state_dict_mismatch_is_reported_precisely(rnet_spec, tmp_path: Path) -> None:
    sd = torch.load(rnet_spec.path, weights_only=True)
    sd.pop("dense5_2.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["conv1.weight"] = torch.zeros(28, 3, 5, 5)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError) as e:
        load_model(build_spec(str(path), arch="rnet"))
    msg = str(e.value)
    assert str(path) in msg and "missing keys: dense5_2.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "conv1.weight: checkpoint (28, 3, 5, 5) vs model (28, 3, 3, 3)" in msg and "--no-strict" in msg
    loaded = load_model(build_spec(str(path), arch="rnet", strict=False))
    assert "loaded non-strictly" in loaded.notes[0]
    assert torch.equal(loaded.module.dense4.weight, sd["dense4.weight"])


class _CreatesFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(container: str, tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    payload = {"state_dict": _CreatesFile(target)}
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert not target.exists()
    with pytest.raises(ModelLoadError) as e:
        load_model(build_spec(str(path), arch="rnet"))
    assert str(path) in str(e.value) and "--allow-pickle" in str(e.value) and "runs code" in str(e.value)
    assert not target.exists()


def test_pickled_module_needs_the_explicit_opt_in(rnet_module, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(rnet_module, path)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_model(build_spec(str(path), input_size="24"))
    loaded = load_model(build_spec(str(path), input_size="24", allow_pickle=True))
    assert loaded.format == "pickled_module"


def test_weights_only_file_without_arch_asks_for_it(rnet_spec, tmp_path: Path) -> None:
    import shutil

    path = Path(shutil.copy(rnet_spec.path, tmp_path / "weights.pt"))  # no .toml beside it
    with pytest.raises(ModelLoadError, match="--arch") as e:
        load_model(build_spec(str(path)))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "random_onnx", "empty", "text"])
def test_damaged_files_give_one_clear_error(damage: str, rnet_spec, tmp_path: Path) -> None:
    good = Path(rnet_spec.path).read_bytes()
    name = {"random_onnx": "model.onnx", "text": "notes.pt"}.get(damage, "model.pt")
    path = tmp_path / name
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "corrupt":
        path.write_bytes(good[:2000] + bytes(5000) + good[7000:])
    elif damage == "random_onnx":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("these are not weights\n")
    with pytest.raises(ModelLoadError) as e:
        load_model(build_spec(str(path), arch="rnet"))
    msg = str(e.value)
    assert msg.startswith(str(path)) and "Traceback" not in msg
    expected = {"truncated": "damaged or truncated", "corrupt": "damaged", "random_onnx": "not a valid ONNX model",
                "empty": "empty", "text": "not a recognised model file"}[damage]
    assert expected in msg


def test_toml_model_config_round_trip_and_precedence(rnet_spec, tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "face.pt"
    shutil.copy(rnet_spec.path, ckpt)
    write_config(rnet_spec.with_(path="face.pt", layers=("conv2",)), tmp_path / "face.toml")
    spec = build_spec(str(ckpt))  # picks up face.toml beside the checkpoint
    assert spec.arch == "rnet" and spec.classes == ("non-face", "face") and spec.layers == ("conv2",)
    assert spec.preprocess == rnet_spec.preprocess
    spec2 = build_spec(str(ckpt), channels="bgr", input_size="30x20")  # flags win
    assert spec2.preprocess.channels == "bgr" and spec2.preprocess.input_size == (30, 20)
    assert read_config(tmp_path / "face.toml")["path"] == str(ckpt.resolve())
    (tmp_path / "bad.toml").write_text("[model]\narch = 'rnet'\ncolour = 'red'\n")
    with pytest.raises(ConfigError, match="colour"):
        build_spec(str(ckpt), config=str(tmp_path / "bad.toml"))
    with pytest.raises(ConfigError, match="0, 1"):
        build_spec(str(ckpt), mean="127.5")


def test_cache_identity_follows_the_users_architecture_code(tmp_path: Path) -> None:
    code = tmp_path / "mynet.py"
    code.write_text("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                    "        self.conv = torch.nn.Conv2d(3, 4, 3)\n    def forward(self, x):\n        return self.conv(x).mean((2, 3))\n")
    weights = tmp_path / "net.pt"
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("mynet_t", code)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)  # type: ignore[union-attr]
    torch.save(mod.Net().state_dict(), weights)
    spec = build_spec(str(weights), arch=f"{code}:Net", input_size="16")
    first = load_model(spec).cache_id
    assert load_model(spec).cache_id == first
    code.write_text(code.read_text().replace(".mean((2, 3))", ".amax((2, 3))"))  # the user edits forward()
    assert load_model(spec).cache_id != first


def test_static_architecture_list_matches_torchvision() -> None:
    from engine.models.names import BUILTIN, TORCHVISION_CLASSIFIERS
    from engine.models.zoo import BUILTIN_ARCHS

    assert list(TORCHVISION_CLASSIFIERS) == sorted(torchvision.models.list_models(module=torchvision.models))
    assert set(BUILTIN) == set(BUILTIN_ARCHS)
