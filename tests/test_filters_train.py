"""Interpretable CNNs: the built-in part data set, part IoU, the training job (cancel, resume,
checkpoints ConvLens opens), the ``convlens filters`` commands, and the direction of the
ordinary-vs-interpretable comparison on a small fixed-seed configuration."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.jobs import run_sync

PRE = {"input_size": (48, 48), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
CLASSES = ("animal", "face", "house")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from engine.concepts.parts import generate_parts

    return run_sync(generate_parts(tmp_path_factory.mktemp("p") / "parts", n_images=90))


def test_part_set_layout_and_exact_masks(parts) -> None:
    from PIL import Image

    from engine.concepts.parts import CLASSES as KINDS
    from engine.concepts.parts import render_part_image
    from engine.data.images import open_image_set

    root = Path(parts.root)
    assert parts.categories == ("object", "part") and len(parts) == 90
    names = {c.name for c in parts.concepts if c.category == "part"}
    assert {"eye", "nose", "mouth", "head", "leg", "tail", "roof", "door"} <= names
    train, val = open_image_set(root / "train.csv"), open_image_set(root / "val.csv")
    assert len(train) == 72 and len(val) == 18 and train.labels == tuple(sorted(KINDS))
    s = parts.sample(0)
    cls, rgb, obj, part, lms = render_part_image(0, 48, 0)
    assert cls == "face"
    np.testing.assert_array_equal(np.asarray(Image.open(parts.image_path(0))), rgb)
    got = dict(s.pixel_labels)
    np.testing.assert_array_equal(got["part"], part)
    np.testing.assert_array_equal(got["object"], obj)
    eye = parts.concepts[[c.name for c in parts.concepts].index("eye")].number
    ly, lx = lms["left_eye"][1], lms["left_eye"][0]
    assert part[round(ly), round(lx)] == eye  # the landmark lies on its part
    rows = (root / "landmarks.csv").read_text().splitlines()
    assert rows[0] == "image,landmark,x,y" and len(rows) > 90


def test_part_set_refuses_a_full_folder(tmp_path: Path) -> None:
    from engine.concepts.broden import ConceptError
    from engine.concepts.parts import generate_parts

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(ConceptError, match="not an empty folder"):
        run_sync(generate_parts(tmp_path / "x", n_images=6))
    assert (tmp_path / "x" / "mine.txt").read_text() == "keep"


def _start(tmp_path: Path, seed: int = 0):
    from engine.backends.torch_backend import TorchBackend
    from engine.filters.partnet import PARTNET_ARCH, PartNet
    from engine.models.loading import load_model
    from engine.types import ModelSpec, Preprocess

    torch.manual_seed(seed)
    torch.save(PartNet().state_dict(), tmp_path / "start.pt")
    spec = ModelSpec(path=str(tmp_path / "start.pt"), arch=PARTNET_ARCH, classes=CLASSES, preprocess=Preprocess(**PRE))
    loaded = load_model(spec)
    return loaded, TorchBackend(loaded.module, spec, "cpu")


def test_part_iou_equals_a_direct_evaluation(parts, tmp_path: Path, cache) -> None:
    from torch.nn import functional

    from engine.activations import extract
    from engine.dissection.run import concept_image_set
    from engine.filters.metrics import MetricsParams, part_ious

    loaded, backend = _start(tmp_path)
    params = MetricsParams(quantile=0.05)
    names, iou, thr, counted = run_sync(part_ious(backend, loaded.cache_id, parts, "relu3", params, cache))
    assert counted == 90 and iou.shape == (64, len(names))
    acts = run_sync(extract(backend, loaded.cache_id, concept_image_set(parts), ["relu3"], cache=cache))
    maps = np.asarray(acts.maps("relu3"), dtype=np.float32)
    labels = np.stack([dict(parts.sample(i).pixel_labels)["part"] for i in range(len(parts))])

    def fallback(f: int, t: float) -> bool:
        # dissection's tie rule: S > T where a mass of activations ties with T (T = 0 on sparse units)
        at, n = int((maps[:, f] >= t).sum()), maps[:, f].size
        return at > 2 * 0.05 * n and (bool((maps[:, f] > t).any()) or at > 0.5 * n)

    tied = [f for f in range(64) if fallback(f, float(np.quantile(maps[:, f].astype(np.float64), 0.95)))]
    assert tied, "the start model has sparse relu3 units whose threshold ties at 0"
    for f in (0, 7, tied[0]):
        t = np.quantile(maps[:, f].astype(np.float64), 1 - 0.05)
        assert thr[f] == pytest.approx(t)
        up = functional.interpolate(torch.from_numpy(maps[:, f:f + 1]), size=(48, 48), mode="bilinear",
                           align_corners=False)[:, 0].numpy()
        m = up > t if fallback(f, t) else up >= t
        for k, name in enumerate(names):
            num = next(c.number for c in parts.concepts if c.name == name)
            lab = labels == num
            want = (m & lab).sum() / max((m | lab).sum(), 1)
            assert iou[f, k] == pytest.approx(want, abs=1e-12), (f, name)


def test_training_job_cancel_resume_and_outputs(parts, tmp_path: Path, monkeypatch) -> None:
    from engine.backends.torch_backend import TorchBackend
    from engine.data.images import open_image_set
    from engine.filters.train import TrainParams, train_filters
    from engine.models.loading import load_model
    from engine.types import ModelSpec

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    loaded, backend = _start(tmp_path)
    root = Path(parts.root)
    train, val = open_image_set(root / "train.csv"), open_image_set(root / "val.csv")
    params = TrainParams(layer="relu4", epochs=2, batch_size=24)
    steps = 3  # 72 images / 24
    # an uninterrupted run
    reports: list = []
    full = run_sync(train_filters(backend, loaded.cache_id, train, params, tmp_path / "full", val_images=val),
                    reports.append)
    assert [h["epoch"] for h in full.history] == [1, 2] and full.resumed_from == 0
    # the typed progress payload (engine.jobs.DataProgress): one per batch, one per epoch, as recorded
    from engine.jobs import DataProgress

    data = [dict(p.data) for p in reports if isinstance(p, DataProgress)]
    per_batch = [d for d in data if d["kind"] == "batch"]
    assert [(d["epoch"], d["batch"]) for d in per_batch] == [(e, b) for e in (1, 2) for b in (1, 2, 3)]
    assert all(d["epochs"] == 2 and d["batches"] == steps for d in per_batch)
    with open(tmp_path / "full" / "batches.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # (the CSV holds 6 significant digits)
    np.testing.assert_allclose([d["task_loss"] for d in per_batch], [float(r["task_loss"]) for r in rows], rtol=1e-5)
    np.testing.assert_allclose([d["filter_loss"] for d in per_batch], [float(r["filter_loss"]) for r in rows],
                               rtol=1e-5, atol=1e-9)
    per_epoch = [d for d in data if d["kind"] == "epoch"]
    assert [{k: v for k, v in d.items() if k != "kind"} for d in per_epoch] == full.history
    assert full.history[0]["lambda"] > 0 and full.history[1]["filter_loss"] < 0
    # cancelled in epoch 2: progress came per batch; the checkpoint of epoch 1 stays, nothing else
    job = train_filters(backend, loaded.cache_id, train, params, tmp_path / "cut", val_images=val)
    seen = []
    for p in job:
        seen.append(p.message)
        if "epoch 2/2, batch 2/3" in p.message:
            break
    job.close()
    assert sum("epoch 1/2, batch" in m for m in seen) == steps
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "model.pt").exists()
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.endswith(".tmp")]
    reports = []
    resumed = run_sync(train_filters(backend, loaded.cache_id, train, params, tmp_path / "cut", val_images=val),
                       reports.append)
    assert resumed.resumed_from == 1
    resume = [p.data for p in reports if isinstance(p, DataProgress) and p.data["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["epoch"] == 1 and len(resume[0]["history"]) == 1
    assert len(resume[0]["batches"]) == steps
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # the checkpoint opens through its TOML's class file and as TorchScript, with the same outputs
    files = full.files
    assert {"state_dict", "class_file", "model_toml", "torchscript", "history", "curves"} <= set(files)
    from engine.models.config import build_spec

    spec = build_spec(files["state_dict"], config=files["model_toml"])
    assert spec.layers == ("relu4.mask",) and spec.classes == CLASSES
    by_class = load_model(spec)
    script = load_model(ModelSpec(path=files["torchscript"]))
    assert script.format == "torchscript"
    x = torch.randn(5, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(by_class.module(x), script.module(x), rtol=1e-5, atol=1e-5)
    be = TorchBackend(by_class.module, spec, "cpu")
    assert "relu4.mask" in be.layer_names()
    assert backend.module is loaded.module and not hasattr(loaded.module.relu4, "mask")  # start untouched
    hist = (tmp_path / "full" / "history.csv").read_text().splitlines()
    assert hist[0].startswith("epoch,task_loss,filter_loss,lambda") and len(hist) == 3
    assert (tmp_path / "full" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_training_refuses_unlabelled_images(parts, tmp_path: Path) -> None:
    from PIL import Image

    from engine.data.images import open_image_set
    from engine.filters.train import TrainParams, train_filters
    from engine.types import ConvLensError

    loaded, backend = _start(tmp_path)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (48, 48)).save(tmp_path / "flat" / "a.png")
    (tmp_path / "flat" / "dog").mkdir()
    Image.new("RGB", (48, 48)).save(tmp_path / "flat" / "dog" / "b.png")
    with pytest.raises(ConvLensError, match="no label among the model's classes"):
        run_sync(train_filters(backend, loaded.cache_id, open_image_set(tmp_path / "flat"),
                               TrainParams(layer="relu4", epochs=1), tmp_path / "o"))


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from engine.filters.cli import register

    p = argparse.ArgumentParser()
    p.add_argument("-q", "--quiet", action="store_true")
    register(p.add_subparsers())
    return p


def test_cli_metrics_on_the_demo(demo, tmp_path: Path, monkeypatch, capsys) -> None:
    spec, images = demo
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    a = _parser().parse_args(["filters", "metrics", "--model", spec.path, "--arch", "rnet", "--images", str(images),
                              "--layer", "prelu3", "--out", str(tmp_path / "out")])
    assert a.func(a) == 0
    rows = (tmp_path / "out" / "filters.csv").read_text().splitlines()
    assert rows[0] == "filter,category,inter_category_entropy,spatial_entropy,loss" and len(rows) == 65
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["filters"] == 64 and s["classes"] == ["face", "non-face"]
    assert "prelu3: 64 filters on 200 images" in capsys.readouterr().err
    from engine.cli import main

    code = main(["filters", "metrics", "--model", spec.path, "--arch", "rnet", "--images", str(images),
                 "--layer", "dense4", "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 1 and "convlens: error:" in err and "'dense4' has no spatial map" in err
    assert "Traceback" not in err
    assert main(["filters", "metrics", "--model", spec.path, "--arch", "rnet", "--images", str(images),
                 "--layer", "prelu3", "--quantile", "2", "--out", str(tmp_path / "o3")]) == 2


def test_cli_train_on_the_builtin_parts(tmp_path: Path, monkeypatch, capsys) -> None:
    from engine.cli import main
    from engine.filters.partnet import PartNet

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    torch.save(PartNet().state_dict(), tmp_path / "start.pt")
    args = ["filters", "train", "--model", str(tmp_path / "start.pt"), "--arch", "engine.filters.partnet:PartNet",
            "--input-size", "48", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--classes",
            ",".join(CLASSES), "--images", "builtin", "--builtin-images", "60", "--layer", "relu4", "--epochs", "1",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0, capsys.readouterr().err
    comp = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert set(comp["runs"]) == {"interpretable", "ordinary"}
    for run in comp["runs"].values():
        m = run["metrics"]
        assert m["layer"] == "relu4.mask" and m["filters"] == 64
        assert m["mean_location_instability"] is not None and 0 <= m["part_interpretability"] <= 1
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| interpretable |" in md and "| ordinary |" in md
    assert (tmp_path / "out" / "interpretable" / "model.toml").is_file()
    # a rerun resumes from the finished checkpoints instead of training again
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert again["runs"]["interpretable"]["resumed_from"] == 1


# ----------------------------------------------------------------------------- evidence


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "filters.py"
    spec = importlib.util.spec_from_file_location("bench_filters", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interpretable_filters_are_more_stable_than_ordinary(tmp_path: Path, monkeypatch) -> None:
    """The paper's direction (location instability falls, VGG-16 0.139 -> 0.096), pinned on a
    small fixed-seed configuration of bench/filters.py (the peak-1 mask: the tau-scaled one of
    the paper sometimes collapses in so short a fine-tuning, see docs/filters.md)."""
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    out = _bench().run(epochs=4, start_epochs=4, n_images=600, seed=0, mask="unit", out=str(tmp_path / "w"),
                       quiet=True)
    rows = out["rows"]
    o, i = rows["ordinary"], rows["interpretable"]
    assert i["location_instability"] < o["location_instability"]
    assert o["val_accuracy"] > 0.9 and i["val_accuracy"] > 0.9  # a small accuracy cost at most
    assert math.isfinite(i["part_interpretability"])
