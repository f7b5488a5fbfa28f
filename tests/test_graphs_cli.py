"""``convlens graph fit`` / ``graph explain`` on the real demo RNet, through a parser built here
and through ``engine.cli.main`` (the command registry)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from PIL import Image

from engine.graphs.cli import register


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    register(sub)
    return p


def _call(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    return a.func(a)


@pytest.fixture(scope="module")
def fitted(demo, tmp_path_factory: pytest.TempPathFactory):
    spec, images = demo
    root = tmp_path_factory.mktemp("graph-cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("CONVLENS_CACHE", str(root / "cache"))
    code = _call(["graph", "fit", "--model", spec.path, "--images", str(images), "--layers", "conv1,conv2,conv3",
                  "--k", "6,8,10", "--max-iter", "15", "--tol", "0.01", "--em-device", "cpu",
                  "--out", str(root / "fit")])
    yield code, root, spec, images
    mp.undo()


def test_fit_then_explain_a_class(fitted, capsys) -> None:
    code, root, _spec, _images = fitted
    assert code == 0
    summary = json.loads((root / "fit" / "summary.json").read_text())
    assert [m["k"] for m in summary["layers"]] == [6, 8, 10] and summary["valid"] == 200
    assert (root / "fit" / "model.toml").is_file()
    assert _call(["graph", "explain", "--fit", str(root / "fit"), "--class", "face", "--top", "2",
                  "--out", str(root / "face")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["kind"] == "class" and line["class"] == "face"
    g = nx.read_graphml(root / "face" / "graph.graphml")
    layers = nx.get_node_attributes(g, "layer")
    assert len(layers) == g.number_of_nodes() == line["nodes"]
    assert sorted(set(layers.values())) == ["class", "conv1", "conv2", "conv3"]
    assert all(sum(1 for v in layers.values() if v == name) <= 2 for name in ("conv1", "conv2", "conv3"))
    data = json.loads((root / "face" / "graph.json").read_text())
    h = nx.node_link_graph(data, edges="edges")
    assert set(h) == set(g) and h.number_of_edges() == g.number_of_edges() == line["edges"]
    assert all(isinstance(d["patches"], list) for _n, d in h.nodes(data=True))
    img = Image.open(root / "face" / "graph.png")
    assert img.width > 300 and np.asarray(img.convert("L")).std() > 10


def test_explain_an_image_in_and_outside_the_set(fitted, tmp_path: Path, capsys) -> None:
    _code, root, _spec, images = fitted
    face = images / "face" / "000.png"
    assert _call(["graph", "explain", "--fit", str(root / "fit"), "--image", str(face), "--out",
                  str(tmp_path / "a")]) == 0
    inside = json.loads((tmp_path / "a" / "graph.json").read_text())
    # the same pixels under another name: the model is rerun and gives the same graph
    copy = tmp_path / "copy.png"
    copy.write_bytes(face.read_bytes())
    assert _call(["graph", "explain", "--fit", str(root / "fit"), "--image", str(copy), "--no-figure",
                  "--out", str(tmp_path / "b")]) == 0
    outside = json.loads((tmp_path / "b" / "graph.json").read_text())
    assert not (tmp_path / "b" / "graph.png").exists()
    key = [(n["id"], n["score"]) for n in inside["nodes"]]
    assert [(n["id"], n["score"]) for n in outside["nodes"]] == key
    assert inside["graph"]["kind"] == "image"


def test_bad_input_is_a_clear_error_through_main(fitted, tmp_path: Path, capsys, monkeypatch) -> None:
    import engine.cli as cli

    if not hasattr(cli, "discover_commands"):
        pytest.skip("the command registry (engine.cli discovering engine.<method>.cli) has not landed")
    _code, root, spec, images = fitted
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    assert cli.main(["graph", "explain", "--fit", str(tmp_path / "nope"), "--class", "face",
                     "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "convlens: error:" in err and "nope: no such folder" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # the output folder made for it is removed again
    assert cli.main(["graph", "explain", "--fit", str(root / "fit"), "--class", "cat",
                     "--out", str(tmp_path / "o")]) == 1
    assert "no class 'cat' (classes: non-face, face)" in capsys.readouterr().err
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "meta.json").write_text("{")
    assert cli.main(["graph", "explain", "--fit", str(bogus), "--class", "face", "--out", str(tmp_path / "o")]) == 1
    assert "not an inference-graph fit" in capsys.readouterr().err
    assert cli.main(["graph", "fit", "--model", spec.path, "--images", str(images), "--layers", "conv1,dense4",
                     "--out", str(tmp_path / "f")]) == 1
    assert "layer 'dense4' has shape (128,)" in capsys.readouterr().err
    assert cli.main(["graph", "fit", "--model", spec.path, "--images", str(images), "--k", "0",
                     "--out", str(tmp_path / "f")]) == 2  # a usage error, before any work
    assert "every K must be a positive whole number" in capsys.readouterr().err
    # the class graph through main is the one of the parser built here
    assert cli.main(["-q", "graph", "explain", "--fit", str(root / "fit"), "--class", "non-face", "--top", "2",
                     "--out", str(tmp_path / "nf")]) == 0
    assert _call(["graph", "explain", "--fit", str(root / "fit"), "--class", "non-face", "--top", "2",
                  "--out", str(tmp_path / "nf2")]) == 0
    a = json.loads((tmp_path / "nf" / "graph.json").read_text())
    b = json.loads((tmp_path / "nf2" / "graph.json").read_text())
    assert a == b


def test_fit_and_explain_on_a_torchvision_resnet(demo, tmp_path: Path, monkeypatch, capsys) -> None:
    """A torchvision ResNet-18 state dict (seeded random start, two classes) on a few demo crops at
    32 px: fit at its residual stages, explain a class and an image, GraphML layers and a figure."""
    import shutil

    import torch
    import torchvision

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "imgs"
    for cls in ("face", "non-face"):
        (images / cls).mkdir(parents=True)
        for p in sorted((demo[1] / cls).iterdir())[:6]:
            shutil.copy(p, images / cls / p.name)
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    model = ["--model", str(weights), "--arch", "resnet18", "--num-classes", "2", "--classes", "face,non-face",
             "--input-size", "32", "--resize", "stretch"]
    assert _call(["graph", "fit", *model, "--images", str(images), "--layers", "layer1,layer2,layer3", "--k", "4",
                  "--max-iter", "5", "--em-device", "cpu", "--out", str(tmp_path / "fit")]) == 0
    summary = json.loads((tmp_path / "fit" / "summary.json").read_text())
    assert [m["name"] for m in summary["layers"]] == ["layer1", "layer2", "layer3"] and summary["valid"] == 12
    assert [m["shape"] for m in summary["layers"]] == [[64, 8, 8], [128, 4, 4], [256, 2, 2]]
    pred = np.load(tmp_path / "fit" / "predicted.npy")
    cls = ["face", "non-face"][int(np.bincount(pred[pred >= 0]).argmax())]  # a class some image is predicted as
    capsys.readouterr()
    assert _call(["graph", "explain", "--fit", str(tmp_path / "fit"), "--class", cls, "--out", str(tmp_path / "c")]) == 0
    g = nx.read_graphml(tmp_path / "c" / "graph.graphml")
    assert set(nx.get_node_attributes(g, "layer").values()) <= {"class", "layer1", "layer2", "layer3"}
    assert "class" in nx.get_node_attributes(g, "layer").values() and g.number_of_nodes() > 1
    with Image.open(tmp_path / "c" / "graph.png") as im:
        assert im.size[0] > 200
    one = sorted((images / "face").iterdir())[0]
    assert _call(["graph", "explain", "--fit", str(tmp_path / "fit"), "--image", str(one),
                  "--out", str(tmp_path / "i")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kind"] == "image"
