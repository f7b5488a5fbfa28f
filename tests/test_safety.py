"""No file a user opens runs code: crafted models, configs and projects, through the engine and the CLI.

The corpus (tests/corpus.py) is generated here; each crafted file is first shown to be genuinely
dangerous (torch's own loader runs its payload), so that ConvLens refusing it means something.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from engine.cli import main as cli
from engine.models import ModelLoadError, build_spec, load_model
from engine.models.config import CodeOptInRequired, ConfigError
from engine.models.safety import UnsafeModelError, check_script_module

from . import corpus


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- torch.export


@pytest.mark.parametrize("vector", ["sample_inputs", "pickled_weight", "sympy_expression"])
def test_crafted_pt2_is_dangerous_for_plain_torch(vector: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = corpus.PT2_MAKERS[vector](tmp_path, marker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):
            torch.export.load(str(path))
    assert marker.exists(), "the crafted archive no longer runs code in torch: the corpus needs a new vector"


@pytest.mark.parametrize("vector", sorted(corpus.PT2_MAKERS))
@pytest.mark.parametrize("command", ["info", "predict"])
def test_crafted_pt2_runs_nothing_through_the_cli(vector: str, command: str, tmp_path: Path, images: Path,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    path = corpus.PT2_MAKERS[vector](tmp_path, marker)
    argv = [command, "--model", str(path), "--input-size", "12"]
    if command == "predict":
        argv += ["--images", str(images), "--out", str(tmp_path / "out")]
    assert cli(argv) == 1
    err = capfd.readouterr().err
    assert not marker.exists()
    assert f"{path}: refused to open" in err and "--allow-pickle" in err
    assert "Traceback" not in err and "Warning" not in err and len(err.strip().splitlines()) == 1


def test_genuine_pt2_archives_open(tmp_path: Path) -> None:
    for dynamic in (True, False):
        loaded = load_model(build_spec(str(corpus.exported_tiny(tmp_path, dynamic)), input_size="12"))
        assert loaded.format == "export"


def test_pt2_opt_in_skips_the_inspection(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = corpus.pt2_pickled_sample_inputs(tmp_path, marker)
    load_model(build_spec(str(path), input_size="12", allow_pickle=True))
    assert marker.exists()  # the user asked for it, for this file


# ----------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("where", ["setstate", "forward"])
def test_crafted_torchscript_overwrites_a_file_in_plain_torch(where: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    path = corpus.torchscript_writes_file(tmp_path, victim, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.load(str(path))
        m(torch.zeros(1, 3, 8, 8))
    assert victim.read_bytes() == b"BBBB"


@pytest.mark.parametrize("where", ["setstate", "forward"])
@pytest.mark.parametrize("command", ["info", "predict"])
def test_crafted_torchscript_runs_nothing_through_the_cli(where: str, command: str, tmp_path: Path, images: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    path = corpus.torchscript_writes_file(tmp_path, victim, where)
    argv = [command, "--model", str(path), "--input-size", "8"]
    if command == "predict":
        argv += ["--images", str(images), "--out", str(tmp_path / "out")]
    assert cli(argv) == 1
    err = capfd.readouterr().err
    assert victim.read_bytes() == b"keep"
    assert "aten::from_file" in err and str(path) in err and "Traceback" not in err


def test_compiled_graphs_are_checked_too(tmp_path: Path) -> None:
    class Reads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.from_file("/nonexistent", False, 1).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(Reads())
    with pytest.raises(UnsafeModelError, match=r"method forward: operator aten::from_file"):
        check_script_module(scripted, tmp_path / "x.pt")


def test_scripted_and_traced_torchvision_models_open(tmp_path: Path) -> None:
    import torchvision

    m = torchvision.models.resnet18().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(m).save(str(tmp_path / "s.pt"))
        torch.jit.trace(m, torch.zeros(1, 3, 64, 64)).save(str(tmp_path / "t.pt"))
    for name in ("s.pt", "t.pt"):
        assert load_model(build_spec(str(tmp_path / name))).format == "torchscript"


# ----------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("command", ["info", "predict"])
def test_malicious_pickle_runs_nothing_through_the_cli(command: str, tmp_path: Path, images: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    path = corpus.malicious_pickle(tmp_path, marker)
    argv = [command, "--model", str(path), "--arch", "rnet"]
    if command == "predict":
        argv += ["--images", str(images), "--out", str(tmp_path / "out")]
    assert cli(argv) == 1
    err = capfd.readouterr().err
    assert not marker.exists()
    assert "pickled Python objects" in err and "UserWarning" not in err and len(err.strip().splitlines()) == 1


def test_state_dict_wrapper_with_a_step_count_loads(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {**corpus.TinyNet().state_dict(), "epoch": 7}, "optimizer_step": 3}, path)
    (tmp_path / "net.py").write_text(corpus.EVIL_ARCH.format(marker=str(tmp_path / "imported")))
    loaded = load_model(build_spec(str(path), arch=f"{tmp_path / 'net.py'}:Net", input_size="12"))
    assert any("epoch" in n for n in loaded.notes)


# ----------------------------------------------------------------------------- a TOML beside the model


def test_toml_beside_the_model_does_not_run_its_class_file(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    model = corpus.state_dict_with_code_toml(tmp_path / "m", marker)
    monkeypatch.chdir(tmp_path)  # the arch path is relative to the TOML, not to the working directory
    with pytest.raises(CodeOptInRequired):
        build_spec(str(model))
    assert cli(["info", "--model", str(model)]) == 1
    err = capfd.readouterr().err
    assert "model.pt.toml" in err and "arch/net.py:Net" in err and "--arch" in err
    assert not marker.exists()
    # asking for it: the TOML named explicitly (its relative path resolves against its folder) ...
    assert cli(["info", "--model", str(model), "--model-config", str(model) + ".toml", "--out",
                str(tmp_path / "info.json")]) == 0
    assert marker.exists()
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["classes"] == ["a", "b"] and info["format"] == "state_dict"


def test_explicit_arch_overrides_the_toml_and_runs_only_what_was_named(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    model = corpus.state_dict_with_code_toml(tmp_path / "m", marker)
    spec = build_spec(str(model), arch="rnet")
    assert spec.arch == "rnet" and not marker.exists()


def test_cache_identity_follows_module_and_home_relative_class_code(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    pkg = tmp_path / "pkgs" / "userpkg_cl"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(corpus.EVIL_ARCH.format(marker=str(tmp_path / "m1")))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    weights = tmp_path / "w.pt"
    torch.save(corpus.TinyNet().state_dict(), weights)
    first = load_model(build_spec(str(weights), arch="userpkg_cl.nets:Net", input_size="12")).cache_id
    (pkg / "nets.py").write_text(corpus.EVIL_ARCH.format(marker=str(tmp_path / "m1")) + "\n# edited\n")
    sys.modules.pop("userpkg_cl.nets", None)
    importlib.invalidate_caches()
    second = load_model(build_spec(str(weights), arch="userpkg_cl.nets:Net", input_size="12")).cache_id
    assert first != second

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "homenet.py").write_text(corpus.EVIL_ARCH.format(marker=str(tmp_path / "m2")))
    a = load_model(build_spec(str(weights), arch="~/homenet.py:Net", input_size="12")).cache_id
    (tmp_path / "homenet.py").write_text(corpus.EVIL_ARCH.format(marker=str(tmp_path / "m2")) + "\n# edited\n")
    b = load_model(build_spec(str(weights), arch="~/homenet.py:Net", input_size="12")).cache_id
    assert a != b


# ----------------------------------------------------------------------------- TOML types


@pytest.mark.parametrize(("body", "needle"), [
    ("[model]\nmean = 5\n", "mean = '5': give it in [0, 1]"),
    ("[model]\nclasses = 3\n", "'classes' must be a list of class names"),
    ("[model]\nlayers = 1\n", "'layers' must be a list of layer names"),
    ("model = 1\n", "'model' must be a table"),
    ("[model]\noutput_index = \"x\"\n", "'output_index' must be a whole number"),
    ("[model]\ncrop_fraction = \"0.8\"\n", "'crop_fraction' must be a number"),
    ("[model]\ninput_size = [1, 2, 3]\n", "input_size"),
    ("[model]\nstrict = 1\n", "'strict' must be true or false"),
    ("[model]\nmean = nan\n", "'mean' must be a finite number"),
    ("[model]\nchannels = \"rbg\"\n", "expected rgb or bgr"),
])
def test_wrong_toml_types_name_file_and_key(body: str, needle: str, tmp_path: Path, rnet_spec,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "model.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as e:
        build_spec(rnet_spec.path, config=str(cfg), arch="rnet")
    assert str(cfg) in str(e.value) and needle in str(e.value)
    assert cli(["info", "--model", rnet_spec.path, "--model-config", str(cfg), "--arch", "rnet"]) == 1
    err = capfd.readouterr().err
    assert str(cfg) in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [("--mean", "nan"), ("--std", "inf"), ("--output-index", "-1"),
                                             ("--num-classes", "0")])
def test_non_finite_or_negative_options_are_refused(flag: str, value: str, rnet_spec,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    assert cli(["info", "--model", rnet_spec.path, "--arch", "rnet", flag, value]) in (1, 2)  # usage or input
    err = capfd.readouterr().err
    assert flag in err and "Traceback" not in err


# ----------------------------------------------------------------------------- special files


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_model_is_refused_without_reading(kind: str, tmp_path: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    if kind == "fifo":
        path = tmp_path / "model.pt"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    assert cli(["info", "--model", str(path)]) == 1  # returns at once: a FIFO would block an open()
    err = capfd.readouterr().err
    assert str(path) in err and ("named pipe" in err or "a device" in err)


# ----------------------------------------------------------------------------- ONNX


def _onnx(path: Path, *, domain: str = "", opset: int = 17, dangling: bool = False,
          external: str | None = None) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], np.ones(6, np.float32).tolist())
    if external is not None:
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 3, 1, 1])
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=external)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", domain=domain)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])]
    nodes = [node]
    if dangling:
        nodes.append(helper.make_node("Relu", ["nowhere"], ["z"], name="relu"))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(("kind", "needle"), [
    ("custom_domain", "custom domain 'com.evil.ops'"),
    ("external_outside", "outside the model's folder"),
    ("external_absolute", "outside the model's folder"),
    ("opset_999", "opset 999"),
    ("opset_1", "declares ONNX opset 1"),
    ("dangling_input", "not a valid ONNX model"),
])
def test_unsafe_or_broken_onnx_fails_at_info(kind: str, needle: str, tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.onnx"
    secret = tmp_path.parent / f"{tmp_path.name}-secret.bin"
    secret.write_bytes(np.ones(6, np.float32).tobytes())
    opts = {"custom_domain": {"domain": "com.evil.ops"}, "external_outside": {"external": f"../{secret.name}"},
            "external_absolute": {"external": str(secret)}, "opset_999": {"opset": 999}, "opset_1": {"opset": 1},
            "dangling_input": {"dangling": True}}[kind]
    _onnx(path, **opts)
    assert cli(["info", "--model", str(path)]) == 1
    err = capfd.readouterr().err
    assert str(path) in err and needle in err and "Traceback" not in err


def test_a_valid_hand_made_onnx_passes_info(tmp_path: Path) -> None:
    path = _onnx(tmp_path / "ok.onnx")
    assert cli(["info", "--model", str(path), "--out", str(tmp_path / "i.json")]) == 0
    onnx.checker.check_model(onnx.load(str(path)))


def test_damaged_pt2_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    good = corpus.exported_tiny(tmp_path)
    bad = tmp_path / "damaged.pt2"
    corpus._rewrite_zip(good, bad, lambda rel, d: d[: len(d) // 2] if rel.startswith("models/") else None)
    assert cli(["info", "--model", str(bad), "--input-size", "12"]) == 1
    err = capfd.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ModelLoadError):
        load_model(build_spec(str(bad)))


def test_weights_that_fit_nothing_say_so_before_suggesting_no_strict(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelLoadError) as e:
        load_model(build_spec(str(path), arch="rnet"))  # strict: the default
    assert "none of its" in str(e.value) and "--no-strict" not in str(e.value)
    partial = tmp_path / "partial.pt"
    sd = corpus.TinyNet().state_dict()
    sd.pop("fc.bias")
    torch.save(sd, partial)
    (tmp_path / "net.py").write_text(corpus.EVIL_ARCH.format(marker=str(tmp_path / "imported")))
    with pytest.raises(ModelLoadError) as e:
        load_model(build_spec(str(partial), arch=f"{tmp_path / 'net.py'}:Net"))
    assert "3 of the architecture's 4 weights fit" in str(e.value) and "--no-strict" in str(e.value)
