"""Training an interpretable CNN, and the ordinary baseline from the same start.

Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018. :func:`train_filters`
fine-tunes a converted copy of a loaded torch model (:mod:`engine.filters.convert`; the loaded
module never changes) on a labelled image set with

    loss = cross-entropy(task) + lambda_t * mean over masked layers and filters of Loss_f

where ``Loss_f = -MI(X; T)`` over the batch (:func:`engine.filters.layer.filter_loss`) and each
filter's category is re-assigned at the start of every epoch as the class whose images activated
it most (mean activation) during the previous epoch (epoch 1: a pass over the training images
before training). The weight follows the paper's schedule, proportional to ``1/t`` and to the
mean max activation of the filters: ``lambda_t = weight * mean_max_{t-1} / t``.
``interpretable=False`` is the ordinary baseline: the same converted tree (new conv included)
with the masks disabled and no filter loss, the same initial weights, data order and budget.

The job yields progress after every batch (cancel between batches with ``gen.close()``) as an
:class:`engine.jobs.DataProgress` whose ``data`` is typed: ``{"kind": "batch", "epoch", "epochs",
"batch", "batches", "task_loss", "filter_loss", "lambda"}`` per batch, ``{"kind": "epoch", **row}``
after each epoch (the ``history`` row: task and filter loss means, lambda, train and validation
accuracy, mean max) and ``{"kind": "resume", "epoch", "history", "batches"}`` when it resumes. It writes
``checkpoint.pt`` atomically after every epoch and resumes from it when run again with the same
settings. At the end the output folder holds

* ``model.pt`` (state dict) with ``model.toml`` whose ``arch`` is ``interpretable_net.py:
  InterpretableNet``, a class file written beside it that rebuilds the converted architecture
  (open it with ``--model-config model.toml``);
* ``model_torchscript.pt`` (TorchScript, opens with nothing else) and its ``.toml``;
* ``history.csv`` (per epoch), ``batches.csv`` (per batch), ``curves.png``, ``result.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.cache import atomic_write_bytes, atomic_write_text, make_key
from engine.jobs import DataProgress, Job
from engine.types import ConvLensError, ModelSpec, Progress

from .convert import ConversionSpec, InterpretableBlock, convert_copy, layer_channels
from .layer import InterpretableMask, filter_loss
from .templates import FilterParams

CLASS_FILE = "interpretable_net.py"
CLASS_NAME = "InterpretableNet"


@dataclass(frozen=True)
class TrainParams:
    """Settings of one training run (see the module docstring).

    ``weight``: the filter loss weight before the schedule. ``loss_scale``: ``"normalised"``
    (default) evaluates ``Loss_f`` on each filter's maps divided by their mean max over the
    batch (differentiable), so the loss cannot be lowered by scaling activations up;
    ``"paper"`` evaluates it on the raw maps. On the built-in part data the raw form with the
    schedule's ``mean_max`` factor feeds back on itself (mean max 1 -> 4000 and validation
    accuracy 0.98 -> 0.48 in 8 epochs; see docs/filters.md), hence the default. ``optimizer``: ``"adam"`` (default;
    converges in CPU minutes) or ``"sgd"`` (momentum 0.9, as the paper). ``resume``: continue
    from ``checkpoint.pt`` when its settings match (not part of the key)."""

    layer: str
    interpretable: bool = True
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    weight: float = 1.0
    seed: int = 0
    new_conv: bool = True
    mask_top: bool = True
    filter_params: FilterParams = field(default_factory=FilterParams)
    init_noise: float = 0.01
    loss_scale: Literal["normalised", "paper"] = "normalised"
    resume: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filter_params"] = self.filter_params.to_dict()
        return d

    def result_key(self) -> dict[str, Any]:
        d = self.to_dict()
        del d["resume"]
        return d

    def check(self) -> None:
        self.filter_params.check()
        if self.epochs < 1 or self.batch_size < 1:
            raise ConvLensError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConvLensError(f"lr must be a positive number, got {self.lr}.")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ConvLensError(f"weight must be a number >= 0, got {self.weight}.")
        if self.loss_scale not in ("normalised", "paper"):
            raise ConvLensError(f'loss_scale must be "normalised" or "paper", got {self.loss_scale!r}.')
        if self.optimizer not in ("adam", "sgd"):
            raise ConvLensError(f'optimizer must be "adam" or "sgd", got {self.optimizer!r}.')

    def conversion(self) -> ConversionSpec:
        return ConversionSpec(layer=self.layer, interpretable=self.interpretable, new_conv=self.new_conv,
                              mask_top=self.mask_top, filter_params=self.filter_params,
                              init_noise=self.init_noise, seed=self.seed)

    def baseline(self) -> TrainParams:
        """The ordinary run from the same start: no masks, no filter loss."""
        return replace(self, interpretable=False)


@dataclass
class TrainResult:
    """Plain data about a finished run."""

    out_dir: str
    interpretable: bool
    classes: tuple[str, ...]
    history: list[dict[str, Any]]
    categories: list[int]
    measured_layer: str
    files: dict[str, str]
    epochs_done: int
    resumed_from: int
    seconds: float

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- data


def label_indices(images: Any, classes: tuple[str, ...]) -> np.ndarray:
    """Each image's class index; ConvLensError naming unlabelled or unknown labels."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.array([index.get(r.label, -1) if r.label is not None else -1 for r in images.records], dtype=np.int64)
    if (out < 0).any():
        bad = sorted({str(r.label) for r, v in zip(images.records, out, strict=True) if v < 0})
        raise ConvLensError(f"{images.source}: {int((out < 0).sum())} images have no label among the model's "
                            f"classes ({', '.join(classes)}): {', '.join(bad[:5])}; training needs a labelled "
                            "image folder (class subfolders) or CSV")
    return out


def model_classes(spec: ModelSpec, images: Any) -> tuple[str, ...]:
    if spec.classes:
        return tuple(spec.classes)
    if not images.has_labels:
        raise ConvLensError(f"{images.source}: the images have no labels; training needs class subfolders or a "
                            "CSV with a label column")
    return images.labels


def load_arrays(images: Any, spec: ModelSpec, batch_size: int = 64) -> Job[tuple[np.ndarray, np.ndarray]]:
    """Every image preprocessed, in memory: (float32 (N, C, H, W), indices of the images read)."""
    from engine.data.images import ImageLoader

    pre = spec.preprocess
    n = len(images)
    need = n * pre.n_channels * pre.input_size[0] * pre.input_size[1] * 4
    if need > 2 * 2**30:
        raise ConvLensError(f"{images.source}: {n} images at {pre.input_size} need {need / 2**30:.1f} GiB in "
                            "memory; the training job holds the training set in memory (use fewer or smaller images)")
    arrays: list[np.ndarray] = []
    idx: list[int] = []
    with ImageLoader(images, pre, batch_size=batch_size) as loader:
        for b in loader:
            arrays.append(b.array)
            idx.extend(b.indices)
            yield Progress(len(idx) / max(n, 1), f"loaded {len(idx)}/{n} images")
    if not arrays:
        raise ConvLensError(f"{images.source}: none of the {n} images could be read")
    return np.concatenate(arrays), np.asarray(idx, dtype=np.int64)


def _logits(model: torch.nn.Module, x: torch.Tensor, output_index: int) -> torch.Tensor:
    from engine.backends.torch_backend import flatten_outputs

    outs = flatten_outputs(model(x))
    if output_index >= len(outs):
        raise ConvLensError(f"the model has {len(outs)} outputs; output index {output_index} does not exist")
    return outs[output_index].flatten(1)


def _blocks(model: torch.nn.Module) -> list[InterpretableBlock]:
    return [m for m in model.modules() if isinstance(m, InterpretableBlock)]


def _loss_masks(model: torch.nn.Module) -> list[InterpretableMask]:
    """The masks whose input the filter loss sees: the enabled ones; for the baseline (all
    disabled) the same positions, for statistics only."""
    out = []
    for b in _blocks(model):
        out += [m for m in (b.mask_top, b.mask) if m.enabled or not b.mask.enabled]
    return out


def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, output_index: int, device: torch.device,
             batch_size: int = 128) -> float:
    """Accuracy of ``model`` on arrays ``x`` with labels ``y``."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[lo:lo + batch_size]).to(device)
            pred = _logits(model, xb, output_index).argmax(1).cpu().numpy()
            correct += int((pred == y[lo:lo + batch_size]).sum())
    model.train(was)
    return correct / max(len(x), 1)


class _Stats:
    """Per mask, per filter and class: sum of mean activations and counts; mean of max."""

    def __init__(self, n_masks: int, channels: list[int], n_classes: int) -> None:
        self.sums = [np.zeros((c, n_classes)) for c in channels]
        self.counts = np.zeros(n_classes)
        self.max_sum = 0.0
        self.max_n = 0

    def add(self, masks: list[InterpretableMask], y: np.ndarray) -> None:
        for s, m in zip(self.sums, masks, strict=True):
            x = m.last_input
            if x is None:
                continue
            means = x.detach().float().mean((2, 3)).cpu().numpy()  # (N, C)
            np.add.at(s.T, y, means)
            mx = x.detach().float().amax((2, 3))
            self.max_sum += float(mx.sum())
            self.max_n += mx.numel()
        np.add.at(self.counts, y, 1)

    def categories(self) -> list[np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return [np.argmax(np.where(self.counts > 0, s / np.maximum(self.counts, 1), -np.inf), axis=1)
                    for s in self.sums]

    def mean_max(self) -> float:
        return self.max_sum / max(self.max_n, 1)


# ----------------------------------------------------------------------------- the job


def run_key(model_sha: str, spec: ModelSpec, images: Any, params: TrainParams) -> str:
    return make_key("filters-train", 1, model_sha, spec.arch, spec.preprocess, spec.output_index,
                    images.fingerprint(), params.result_key())


def _save_torch(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def train_filters(backend: Any, model_sha: str, images: Any, params: TrainParams, out_dir: str | os.PathLike[str],
                  *, val_images: Any = None, source_format: str = "state_dict") -> Job[TrainResult]:
    """Train (a job; see the module docstring). ``backend``: a TorchBackend of the start model;
    ``images``: labelled training images; ``val_images``: optional images for accuracy per epoch."""
    params.check()
    t0 = time.perf_counter()
    spec: ModelSpec = backend.spec
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = model_classes(spec, images)
    conv = params.conversion()
    device = backend.torch_device
    model = convert_copy(backend, conv)
    masks = _loss_masks(model)
    for m in masks:
        m.keep_input = True
    pre = spec.preprocess
    channels = [layer_channels(model, params.layer, (pre.n_channels, *pre.input_size))[0]] * len(masks)

    x_all, read = yield from load_arrays(images, spec, params.batch_size)
    y_all = label_indices(images, classes)[read]
    xv: np.ndarray | None = None
    yv: np.ndarray | None = None
    if val_images is not None:
        xv, rv = yield from load_arrays(val_images, spec, params.batch_size)
        yv = label_indices(val_images, classes)[rv]

    torch.manual_seed(params.seed)
    opt: torch.optim.Optimizer
    if params.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=params.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=0.9)
    key = run_key(model_sha, spec, images, params)
    ckpt = out / "checkpoint.pt"
    history: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    start_epoch = 1
    categories: list[np.ndarray] | None = None
    mean_max = 0.0
    if params.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            history, batches = list(state["history"]), list(state["batches"])
            categories = [np.asarray(c, dtype=np.int64) for c in state["categories"]]
            mean_max = float(state["mean_max"])
            start_epoch = int(state["epoch"]) + 1
            yield DataProgress(None, f"resuming after epoch {start_epoch - 1}",
                               data={"kind": "resume", "epoch": start_epoch - 1, "history": [dict(h) for h in history],
                                     "batches": [dict(b) for b in batches]})
    resumed_from = start_epoch - 1
    n = len(x_all)
    steps = math.ceil(n / params.batch_size)
    n_classes = len(classes)
    output_index = spec.output_index

    if categories is None:  # epoch 1 needs categories and the mean max: one pass, no training
        model.eval()
        st = _Stats(len(masks), channels, n_classes)
        with torch.no_grad():
            for lo in range(0, n, params.batch_size):
                model(torch.from_numpy(x_all[lo:lo + params.batch_size]).to(device))
                st.add(masks, y_all[lo:lo + params.batch_size])
                yield Progress(0.0, f"assigning filter categories {min(lo + params.batch_size, n)}/{n}")
        categories, mean_max = st.categories(), st.mean_max()

    total = params.epochs * steps
    for epoch in range(start_epoch, params.epochs + 1):
        model.train()
        torch.manual_seed(params.seed * 100003 + epoch)
        order = np.random.default_rng([params.seed, epoch]).permutation(n)
        lam = params.weight * mean_max / epoch if params.interpretable else 0.0
        st = _Stats(len(masks), channels, n_classes)
        cat_t = [torch.as_tensor(c, device=device) for c in categories]
        sums = {"task": 0.0, "filter": 0.0, "correct": 0}
        for b in range(steps):
            idx = order[b * params.batch_size:(b + 1) * params.batch_size]
            xb = torch.from_numpy(x_all[idx]).to(device)
            yb = torch.from_numpy(y_all[idx]).to(device)
            with torch.enable_grad():
                logits = _logits(model, xb, output_index)
                task = torch.nn.functional.cross_entropy(logits, yb)
                floss = torch.zeros((), device=device)
                if params.interpretable and lam > 0:
                    parts = []
                    for m, c in zip(masks, cat_t, strict=True):
                        inc = (yb[:, None] == c[None, :]) if params.filter_params.category_mode == "labels" else None
                        xm = m.last_input
                        assert xm is not None  # the forward pass above set it
                        if params.loss_scale == "normalised":
                            scale = xm.amax((2, 3)).mean(0).clamp_min(1e-6)
                            xm = xm / scale[None, :, None, None]
                        parts.append(filter_loss(xm, inc, params.filter_params).loss.mean())
                    floss = torch.stack(parts).mean()
                loss = task + lam * floss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if not math.isfinite(loss.item()):
                raise ConvLensError(f"training diverged at epoch {epoch}, batch {b + 1} (loss {loss.item()}); "
                                    "lower --lr or --weight")
            st.add(masks, y_all[idx])
            for m in masks:
                m.last_input = None
            task_v, floss_v = task.item(), floss.item()
            sums["task"] += task_v * len(idx)
            sums["filter"] += floss_v * len(idx)
            sums["correct"] += int((logits.argmax(1) == yb).sum())
            batches.append({"epoch": epoch, "batch": b + 1, "task_loss": task_v, "filter_loss": floss_v,
                            "lambda": lam})
            done = (epoch - 1) * steps + b + 1
            yield DataProgress(done / total, f"epoch {epoch}/{params.epochs}, batch {b + 1}/{steps}, "
                                             f"task loss {task_v:.4f}",
                               data={"kind": "batch", "epoch": epoch, "epochs": params.epochs, "batch": b + 1,
                                     "batches": steps, "task_loss": task_v, "filter_loss": floss_v, "lambda": lam})
        categories, mean_max = st.categories(), st.mean_max()
        row = {"epoch": epoch, "task_loss": sums["task"] / n, "filter_loss": sums["filter"] / n, "lambda": lam,
               "train_accuracy": sums["correct"] / n, "mean_max": mean_max}
        if xv is not None and yv is not None:
            for m in masks:
                m.keep_input = False
            row["val_accuracy"] = evaluate(model, xv, yv, output_index, device)
            for m in masks:
                m.keep_input = True
        history.append(row)
        _save_torch({"key": key, "epoch": epoch, "model": model.state_dict(), "optim": opt.state_dict(),
                     "history": history, "batches": batches, "categories": [c.tolist() for c in categories],
                     "mean_max": mean_max, "params": json.dumps(params.to_dict())}, ckpt)
        # after the checkpoint: a job closed here resumes after this epoch
        yield DataProgress((epoch * steps) / total, f"epoch {epoch}/{params.epochs} done", data={"kind": "epoch", **row})

    for m in masks:
        m.keep_input = False
        m.last_input = None
    model.eval()
    yield Progress(1.0, "writing the trained model")
    files = write_outputs(model, spec, conv, classes, history, batches, out, source_format)
    result = TrainResult(out_dir=str(out), interpretable=params.interpretable, classes=classes, history=history,
                         categories=[int(v) for v in categories[-1]], measured_layer=conv.measured_layer,
                         files=files, epochs_done=params.epochs, resumed_from=resumed_from,
                         seconds=time.perf_counter() - t0)
    atomic_write_text(out / "result.json",
                      json.dumps({**result.to_dict(), "params": params.to_dict()}, indent=2) + "\n")
    files["result"] = str(out / "result.json")
    return result


# ----------------------------------------------------------------------------- outputs


_CLASS_FILE = '''"""The converted architecture of this checkpoint (written by ConvLens ``filters train``).

Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018. Calling
``InterpretableNet()`` builds {arch!r} and converts it at layer {layer!r} exactly as the
training run did (untrained weights; ConvLens loads ``model.pt`` into it).
"""

from engine.filters.convert import rebuild

SETTINGS = {settings}


class InterpretableNet:
    """Factory: ``InterpretableNet()`` returns the converted ``torch.nn.Module``."""

    def __new__(cls):  # noqa: D102
        return rebuild(SETTINGS)
'''


def write_outputs(model: torch.nn.Module, spec: ModelSpec, conv: ConversionSpec, classes: tuple[str, ...],
                  history: list[dict[str, Any]], batches: list[dict[str, Any]], out: Path,
                  source_format: str = "state_dict") -> dict[str, str]:
    from engine.models.config import write_config

    files: dict[str, str] = {}
    pre = spec.preprocess
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save_torch(sd, out / "model.pt")
    files["state_dict"] = str(out / "model.pt")
    measured = (conv.measured_layer,)
    if spec.arch and source_format in ("state_dict", "safetensors"):
        arch = spec.arch
        target, _, cls = arch.rpartition(":")
        if target.endswith(".py"):
            arch = f"{Path(target).expanduser().resolve()}:{cls}"
        settings = {"arch": arch, "num_classes": spec.num_classes, "input_shape": [pre.n_channels, *pre.input_size],
                    "conversion": conv.to_dict()}
        import pprint

        text = _CLASS_FILE.format(arch=arch, layer=conv.layer, settings=pprint.pformat(settings, sort_dicts=False))
        atomic_write_text(out / CLASS_FILE, text)
        write_config(ModelSpec(path="model.pt", arch=f"{CLASS_FILE}:{CLASS_NAME}", preprocess=pre,
                               classes=classes, layers=measured, output_index=spec.output_index,
                               scores=spec.scores), out / "model.toml")
        files["class_file"] = str(out / CLASS_FILE)
        files["model_toml"] = str(out / "model.toml")
    try:
        example = torch.zeros((1, pre.n_channels, *pre.input_size), device=next(model.parameters()).device)
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation and tracer notes: the map size is fixed
            traced = torch.jit.trace(model, example, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
        atomic_write_bytes(out / "model_torchscript.pt", buf.getvalue())
        write_config(ModelSpec(path="model_torchscript.pt", preprocess=pre, classes=classes, layers=measured,
                               output_index=spec.output_index, scores=spec.scores), out / "model_torchscript.toml")
        files["torchscript"] = str(out / "model_torchscript.pt")
    except Exception as e:  # noqa: BLE001 - a model trace cannot follow: the state dict still stands
        files["torchscript_error"] = f"{type(e).__name__}: {e}"[:300]
    files.update(write_curves(history, batches, out))
    return files


def _csv_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def write_curves(history: list[dict[str, Any]], batches: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """history.csv, batches.csv and curves.png (losses per batch, accuracies per epoch)."""
    atomic_write_text(out / "history.csv", _csv_text(history))
    atomic_write_text(out / "batches.csv", _csv_text(batches))
    png = plot_curves({"task loss": [b["task_loss"] for b in batches],
                       "filter loss": [b["filter_loss"] for b in batches]},
                      {k: [h.get(k, float("nan")) for h in history] for k in ("train_accuracy", "val_accuracy")
                       if any(k in h for h in history)})
    atomic_write_bytes(out / "curves.png", png)
    return {"history": str(out / "history.csv"), "batches": str(out / "batches.csv"), "curves": str(out / "curves.png")}


def plot_curves(left: dict[str, list[float]], right: dict[str, list[float]],
                size: tuple[int, int] = (900, 360)) -> bytes:
    """A PNG of two line-chart panels (PIL only): ``left`` series per batch, ``right`` per epoch."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for p, (title, series) in enumerate((("losses per batch", left), ("accuracy per epoch", right))):
        x0, x1, y0, y1 = p * w // 2 + 50, (p + 1) * w // 2 - 15, 30, h - 40
        d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        d.text((x0, 8), title, fill=(0, 0, 0))
        vals = [v for s in series.values() for v in s if math.isfinite(v)]
        if not vals:
            continue
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        d.text((5, y0), f"{hi:.3g}", fill=(0, 0, 0)) if p == 0 else d.text((x0 - 45, y0), f"{hi:.3g}", fill=(0, 0, 0))
        d.text((x0 - 45, y1 - 10), f"{lo:.3g}", fill=(0, 0, 0))
        for k, (name, s) in enumerate(series.items()):
            pts = [(x0 + (x1 - x0) * i / max(len(s) - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for i, v in enumerate(s) if math.isfinite(v)]
            col = colours[k % len(colours)]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            elif pts:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=col)
            d.text((x0 + 8, y0 + 6 + 12 * k), name, fill=col)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
