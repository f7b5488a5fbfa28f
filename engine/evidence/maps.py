"""Class evidence maps: where in an image the evidence for a class lies.

:func:`evidence_maps` is the one entry point (the sanity check and the GUI call it too)::

    ev = evidence_maps(backend, batch, "gradcam", layer="layer4", target=None)
    ev.maps      # float32 (N, H, W) at the input size
    ev.targets   # int64 (N,): the class each map explains (None asked: the predicted one)
    ev.scores    # float32 (N,): that class's value in the classifier output (logit or probability)

Methods (``batch`` is float32 (N, C, H, W), preprocessed as the backend takes it):

* ``gradcam`` (Selvaraju et al. 2017), torch: at a spatial layer L with activation A,
  ``alpha_k = mean over positions of d y_c / d A_k`` and ``map = ReLU(sum_k alpha_k A_k)``,
  upsampled bilinearly (half-pixel centres) to the input size; ``coarse`` keeps the map at the
  layer's resolution. The gradient is taken through the platform's split of the model at L
  (``backend.split(L)``: ``y = head(psi(x))``), and through a forward hook on L
  (``backend.layer_gradients``) at layers with no clean cut (inside a residual block);
  both are the same gradient.
* ``occlusion`` (Zeiler & Fergus 2014), any backend (ONNX included): Captum's ``Occlusion`` with a
  forward function that runs the backend on numpy batches; a ``window`` x ``window`` patch
  (all channels) slides with ``stride``, replaced by a baseline; the map is the drop of the
  class score averaged over the windows that cover each pixel. The occluded copies are
  evaluated ``batch_size`` at a time.
* ``ig`` (integrated gradients, Sundararajan et al. 2017), torch: Captum's
  ``IntegratedGradients`` from a baseline (``zero``: the all-zero model input, the mean colour of
  a normalised model; ``black``; ``blur``), ``steps`` Gauss-Legendre points; the map is the
  attribution summed over channels (signed).
* ``saliency`` (Simonyan et al. 2014), torch: Captum's ``Saliency``: max over channels of the
  absolute input gradient.
* ``guided_backprop`` (Springenberg et al. 2015), torch: Captum's ``GuidedBackprop`` (it
  overrides the backward pass of every ``nn.ReLU`` module, on a private copy of the model with
  in-place ReLUs turned off); max over channels of the absolute attribution. The sanity check's
  reference failure (Adebayo et al. 2018). A model without ``nn.ReLU`` modules is refused: the
  method would silently be plain gradients.

Class scores come from the output the platform chose as the classifier
(``backend.spec.output_index``; see :func:`engine.predict.choose_output`), flattened to (N, K),
as the model gives them (logits, or probabilities when the model outputs those).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..types import ConvLensError

METHODS = ("gradcam", "occlusion", "ig", "saliency", "guided_backprop")
GRADIENT_METHODS = ("gradcam", "ig", "saliency", "guided_backprop")
METHOD_TITLES = {"gradcam": "Grad-CAM", "occlusion": "occlusion", "ig": "integrated gradients",
                 "saliency": "saliency (gradient)", "guided_backprop": "guided backprop"}

#: every method's options and their defaults (None: chosen from the input size)
OPTIONS: dict[str, dict[str, Any]] = {
    "gradcam": {},
    "occlusion": {"window": None, "stride": None, "baseline": "zero", "blur": "rise", "batch_size": 256},
    "ig": {"steps": 32, "baseline": "zero", "blur": "rise", "internal_batch_size": 64},
    "saliency": {},
    "guided_backprop": {},
}
BASELINES = ("zero", "black", "mean", "blur")


log = logging.getLogger("convlens.evidence")


class EvidenceError(ConvLensError):
    """A method that cannot run as asked (unknown method or option, a layer that is not spatial,
    gradients on a backend without them)."""


@dataclass
class EvidenceMaps:
    """Evidence maps for one batch; plain numpy data."""

    maps: np.ndarray  # float32 (N, H, W), at the input size
    targets: np.ndarray  # int64 (N,)
    scores: np.ndarray  # float32 (N,): the target's classifier output on the unchanged image
    method: str
    layer: str | None  # Grad-CAM's layer (None for the pixel methods)
    coarse: np.ndarray | None = None  # Grad-CAM: float32 (N, h, w) at the layer's resolution
    options: dict[str, Any] = field(default_factory=dict)  # the options used, defaults filled in
    path: str = ""  # "split" or "hook" for Grad-CAM: how the layer gradient was taken


# ----------------------------------------------------------------------------- helpers


def tiling_stride(window: int, input_size: tuple[int, int]) -> int:
    """The default occlusion stride: the largest one up to half the window (at least 1) that
    tiles the input exactly, ``(H - window)`` and ``(W - window)`` both multiples of it. (Captum
    starts windows at multiples of the stride and cuts the last one at the edge; cut windows
    occlude fewer pixels, so the edge of the map would be weaker. Captum averages each pixel
    over the windows covering it, so the number of windows alone does not weaken it.)"""
    import math

    cap = max(1, window // 2)
    g = math.gcd(input_size[0] - window, input_size[1] - window)
    if g == 0:
        return cap
    return max(d for d in range(1, cap + 1) if g % d == 0)


def resolve_options(method: str, options: dict[str, Any], input_size: tuple[int, int]) -> dict[str, Any]:
    """``options`` checked against the method's (an unknown one is an error naming the known),
    with the defaults filled in."""
    if method not in OPTIONS:
        raise EvidenceError(f"unknown evidence method {method!r} (known: {', '.join(METHODS)})")
    known = OPTIONS[method]
    bad = sorted(set(options) - set(known))
    if bad:
        allowed = ", ".join(known) if known else "none"
        raise EvidenceError(f"{method}: unknown option{'s' if len(bad) > 1 else ''} {', '.join(bad)} (options: {allowed})")
    out = {**known, **{k: v for k, v in options.items() if v is not None}}
    h, w = input_size
    if method == "occlusion":
        if out["window"] is None:
            out["window"] = max(2, min(h, w) // 8)
        for k in ("window", "stride", "batch_size"):
            if out[k] is not None and (not isinstance(out[k], (int, np.integer)) or int(out[k]) < 1):
                raise EvidenceError(f"occlusion: {k} must be a positive whole number, got {out[k]!r}")
        out["window"] = int(out["window"])
        if out["window"] > min(h, w):
            raise EvidenceError(f"occlusion: window {out['window']} is larger than the input ({h}x{w})")
        if out["stride"] is None:
            out["stride"] = tiling_stride(out["window"], (h, w))
        out["stride"] = int(out["stride"])
        if out["stride"] > out["window"]:
            raise EvidenceError(f"occlusion: stride {out['stride']} is larger than the window {out['window']} "
                                "(pixels between the windows would never be occluded); give a stride <= the window")
        if (h - out["window"]) % out["stride"] or (w - out["window"]) % out["stride"]:
            log.warning("occlusion: window %d with stride %d does not tile the %dx%d input: the last windows are cut "
                        "at the bottom/right edge and occlude fewer pixels, so the map is weaker there (stride %d tiles "
                        "it)", out["window"], out["stride"], h, w, tiling_stride(out["window"], (h, w)))
    if method == "ig":
        for k in ("steps", "internal_batch_size"):
            if not isinstance(out[k], (int, np.integer)) or int(out[k]) < 1:
                raise EvidenceError(f"ig: {k} must be a positive whole number, got {out[k]!r}")
            out[k] = int(out[k])
    if "blur" in out and out["blur"] not in BLURS:
        raise EvidenceError(f"{method}: blur {out['blur']!r} (known: {', '.join(BLURS)})")
    if "baseline" in out and out["baseline"] not in BASELINES:
        raise EvidenceError(f"{method}: baseline {out['baseline']!r} (known: {', '.join(BASELINES)})")
    return out


BLURS = ("rise", "relative")


def blur_sigma(input_size: tuple[int, int], sigma: float | None = None) -> float:
    """The ``relative`` Gaussian blur's sigma in pixels: given, or an eighth of the shorter side
    (at least 1 px): 3 px at 24 px, 28 px at 224 px."""
    if sigma is not None:
        if not sigma > 0:
            raise EvidenceError(f"blur sigma must be positive, got {sigma}")
        return float(sigma)
    return max(1.0, min(input_size) / 8.0)


def rise_kernel(size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """RISE's insertion blur kernel (Petsiuk et al. 2018, ``gkern(11, 5)``): a unit impulse on
    an 11 x 11 grid filtered by ``scipy.ndimage.gaussian_filter(sigma=5)`` (reflecting edges, so
    it sums to 1). Cut to 11 taps, a sigma of 5 is nearly a box: its standard deviation is about
    3.1 px, not 5 (and not 1)."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    return gaussian_filter(delta, sigma).astype(np.float32)


def blurred(batch: np.ndarray, blur: str = "rise", sigma: float | None = None) -> np.ndarray:
    """A blurred copy of ``batch`` (N, C, H, W), per channel. ``rise``: RISE's 11 x 11 kernel
    applied like its ``conv2d(x, kern, padding=5)`` (zero padding: the model input 0 beyond the
    edges); ``relative``: a Gaussian of an eighth of the shorter side (nearest-pixel edges). A
    given ``sigma`` is a Gaussian of that sigma (nearest-pixel edges) whatever ``blur`` says."""
    from scipy.ndimage import correlate, gaussian_filter

    if blur not in BLURS:
        raise EvidenceError(f"blur {blur!r} (known: {', '.join(BLURS)})")
    x = batch.astype(np.float32)
    if blur == "rise" and sigma is None:
        return correlate(x, rise_kernel()[None, None], mode="constant", cval=0.0).astype(np.float32)
    s = blur_sigma((batch.shape[2], batch.shape[3]), sigma)
    return gaussian_filter(x, sigma=(0, 0, s, s), mode="nearest").astype(np.float32)


def black_input(preprocess: Any) -> np.ndarray:
    """A black image (pixel 0) as the model sees it: float32 (C, 1, 1) (mean and std are given
    in the model's channel order)."""
    c = preprocess.n_channels
    mean = np.asarray(preprocess.mean[:c], dtype=np.float32)
    std = np.asarray(preprocess.std[:c], dtype=np.float32)
    return (-mean / std).astype(np.float32)[:, None, None]


def baseline_batch(batch: np.ndarray, kind: str, preprocess: Any, sigma: float | None = None,
                   blur: str = "rise") -> np.ndarray:
    """What replaces removed pixels, float32 like ``batch``: ``zero`` (the all-zero model input:
    the normalisation's mean colour), ``black`` (pixel value 0), ``mean`` (each image's own
    mean colour per channel), ``blur`` (a blur of the image, per channel: :func:`blurred`)."""
    if kind == "zero":
        return np.zeros_like(batch, dtype=np.float32)
    if kind == "black":
        return np.broadcast_to(black_input(preprocess), batch.shape).astype(np.float32)
    if kind == "mean":
        return np.broadcast_to(batch.mean(axis=(2, 3), keepdims=True), batch.shape).astype(np.float32)
    if kind == "blur":
        return blurred(batch, blur, sigma)
    raise EvidenceError(f"baseline {kind!r} (known: {', '.join(BASELINES)})")


def classifier_scores(backend: Any, batch: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The classifier output (N, K) of ``batch``, ``batch_size`` images per forward pass."""
    parts = [backend.classifier_output(backend.forward(batch[i:i + batch_size]))
             for i in range(0, len(batch), batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)


def resolve_targets(target: int | Sequence[int] | np.ndarray | None, scores: np.ndarray, path: str = "") -> np.ndarray:
    """Per image the class to explain: ``None`` the predicted one (argmax of the scores), an int
    for all, or one per image; out of range is an error naming the class count."""
    n, k = scores.shape
    if target is None:
        return scores.argmax(axis=1).astype(np.int64)
    t = np.asarray(target)
    if t.ndim == 0:
        t = np.full(n, int(t), dtype=np.int64)
    elif t.shape != (n,):
        raise EvidenceError(f"{path}: {len(t)} targets for {n} images")
    t = t.astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= k):
        bad = int(t[(t < 0) | (t >= k)][0])
        raise EvidenceError(f"{path}: class {bad} is out of range: the classifier has {k} classes (0 to {k - 1})")
    return t


def _need_gradients(backend: Any, method: str) -> None:
    if getattr(backend, "supports_gradients", False):
        return
    what = "a TorchScript model" if getattr(backend, "is_script", False) else f"a model running on {backend.name}"
    raise EvidenceError(
        f"{backend.spec.path}: {METHOD_TITLES[method]} needs gradients, which ConvLens takes on eager PyTorch "
        f"models and torch.export programs only, and this is {what}; occlusion works on any backend "
        "(--method occlusion), or load the PyTorch checkpoint (a state dict with --arch, or a .pt2 archive)")


def torch_classifier(backend: Any) -> Callable[[Any], Any]:
    """A differentiable function (N, C, H, W) tensor -> (N, K) classifier output on the
    backend's own module (chunked for a torch.export program of fixed batch size)."""
    from ..backends.split import run_chunked
    from ..backends.torch_backend import flatten_outputs

    module, oi, k = backend.module, backend.spec.output_index, backend.fixed_batch

    def f(x: Any) -> Any:
        out = run_chunked(lambda c: flatten_outputs(module(c))[oi], x, k)
        return out.reshape(out.shape[0], -1)

    return f


def spatial_layers(backend: Any) -> list[str]:
    """Layers whose output is (C, H, W) with more than one position, in execution order."""
    return [li.name for li in backend.layers() if len(li.shape) == 3 and li.shape[1] * li.shape[2] > 1]


def default_layer(backend: Any) -> str:
    """Grad-CAM's default layer: the last spatial layer (the usual choice, the last
    convolutional block)."""
    names = spatial_layers(backend)
    if not names:
        raise EvidenceError(f"{backend.spec.path}: no layer with a spatial output (C, H, W) for Grad-CAM")
    return names[-1]


# ----------------------------------------------------------------------------- the methods


def _gradcam(backend: Any, batch: np.ndarray, layer: str, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    import torch
    import torch.nn.functional as F

    from ..backends.base import BackendError

    backend.check_capture([layer])
    shape = next((li.shape for li in backend.layers() if li.name == layer), ())
    if len(shape) != 3:
        sample = ", ".join(spatial_layers(backend)[-6:])
        raise EvidenceError(f"{backend.spec.path}: Grad-CAM needs a spatial layer (output C x H x W), and '{layer}' "
                            f"outputs {tuple(shape)}; spatial layers include {sample}")
    how = "split"
    try:
        sp = backend.split(layer)
    except BackendError:
        sp = None  # no clean cut at this layer (a skip connection around it): a hook on it instead
    if sp is not None:
        with torch.inference_mode(False), torch.enable_grad():
            x = backend.to_tensor(batch)
            with torch.no_grad():
                a = sp.psi(x)
            a = a.detach().requires_grad_(True)
            out = sp.head(a)
            idx = torch.as_tensor(targets, device=out.device)
            (g,) = torch.autograd.grad(out.gather(1, idx[:, None]).sum(), [a])
            a, g = a.detach(), g.detach()
    else:
        how = "hook"
        an, gn = backend.layer_gradients(batch, layer, targets)
        a, g = torch.from_numpy(an), torch.from_numpy(gn)
    with torch.no_grad():
        alpha = g.float().mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((alpha * a.float()).sum(dim=1))
        full = F.interpolate(cam[:, None], size=tuple(batch.shape[2:]), mode="bilinear", align_corners=False)[:, 0]
    return full.cpu().numpy().astype(np.float32), cam.cpu().numpy().astype(np.float32), how


def _occlusion(backend: Any, batch: np.ndarray, targets: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    import torch
    from captum.attr import Occlusion

    def forward(xt: torch.Tensor) -> torch.Tensor:
        arr = xt.detach().cpu().numpy().astype(np.float32, copy=False)
        return torch.from_numpy(classifier_scores(backend, arr, opts["batch_size"]))

    c = batch.shape[1]
    base = baseline_batch(batch, opts["baseline"], backend.spec.preprocess, blur=opts["blur"])
    w, s = opts["window"], opts["stride"]
    per_eval = max(1, opts["batch_size"] // max(1, len(batch)))
    with torch.no_grad():
        attr = Occlusion(forward).attribute(
            torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)), sliding_window_shapes=(c, w, w),
            strides=(c, s, s), baselines=torch.from_numpy(base), target=torch.as_tensor(targets),
            perturbations_per_eval=per_eval)
    return attr.float().mean(dim=1).numpy().astype(np.float32)


def _ig(backend: Any, batch: np.ndarray, targets: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    import torch
    from captum.attr import IntegratedGradients

    base = baseline_batch(batch, opts["baseline"], backend.spec.preprocess, blur=opts["blur"])
    with torch.inference_mode(False), torch.enable_grad():
        x = backend.to_tensor(batch).requires_grad_(True)
        b = torch.from_numpy(base).to(x.device)
        attr = IntegratedGradients(torch_classifier(backend)).attribute(
            x, baselines=b, target=torch.as_tensor(targets, device=x.device), n_steps=opts["steps"],
            internal_batch_size=max(len(batch), opts["internal_batch_size"]))
    return attr.detach().float().sum(dim=1).cpu().numpy().astype(np.float32)


def _saliency(backend: Any, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
    import torch
    from captum.attr import Saliency

    with torch.inference_mode(False), torch.enable_grad():
        x = backend.to_tensor(batch).requires_grad_(True)
        attr = Saliency(torch_classifier(backend)).attribute(x, target=torch.as_tensor(targets, device=x.device),
                                                             abs=True)
    return attr.detach().float().amax(dim=1).cpu().numpy().astype(np.float32)


class _Selected:
    """The model's classifier output as one tensor (what Captum's module-based methods need)."""

    @staticmethod
    def wrap(module: Any, output_index: int) -> Any:
        import torch

        from ..backends.torch_backend import flatten_outputs

        class Selected(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = flatten_outputs(self.inner(x))[output_index]
                return out.reshape(out.shape[0], -1)

        return Selected()


#: per backend: its model copy with in-place ReLUs turned off (guided backprop hooks ReLU modules)
_relu_copies: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _guided_model(backend: Any) -> Any:
    import torch

    from ..backends.torch_backend import copy_module

    if backend.is_export or backend.is_script:
        raise EvidenceError(f"{backend.spec.path}: guided backprop needs an eager PyTorch model (its nn.ReLU modules); "
                            "load the state dict with --arch")
    got = _relu_copies.get(backend)
    if got is not None and got[0] is backend.module:
        return got[1]
    relus = [m for m in backend.module.modules() if isinstance(m, torch.nn.ReLU)]
    if not relus:
        raise EvidenceError(
            f"{backend.spec.path}: guided backprop changes the backward pass of nn.ReLU modules, and this model has "
            "none (it uses other activations or functional ReLUs), so it would be plain gradients: use --method saliency")
    model = copy_module(backend.module, backend.torch_device).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    wrapped = _Selected.wrap(model, backend.spec.output_index)
    _relu_copies[backend] = (backend.module, wrapped)
    return wrapped


def _guided_backprop(backend: Any, batch: np.ndarray, targets: np.ndarray) -> np.ndarray:
    import warnings

    import torch
    from captum.attr import GuidedBackprop

    model = _guided_model(backend)
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum: "Setting backward hooks on ReLU activations"
        x = backend.to_tensor(batch).requires_grad_(True)
        attr = GuidedBackprop(model).attribute(x, target=torch.as_tensor(targets, device=x.device))
    return attr.detach().float().abs().amax(dim=1).cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------- entry point


def evidence_maps(backend: Any, batch: np.ndarray, method: str, *, layer: str | None = None,
                  target: int | Sequence[int] | np.ndarray | None = None, **options: Any) -> EvidenceMaps:
    """Evidence maps of ``method`` for ``batch`` (float32 (N, C, H, W), preprocessed as the
    backend takes it) and ``target`` (None: each image's predicted class; an int for all; one
    per image). ``layer``: Grad-CAM's layer (None: the last spatial layer; ignored by the pixel
    methods). ``options``: the method's (see :data:`OPTIONS`). Raises :class:`EvidenceError`
    (a :class:`~engine.types.ConvLensError`) for an unknown method or option, a layer that is not
    spatial, or a gradient method on a backend without gradients."""
    if method not in METHODS:
        raise EvidenceError(f"unknown evidence method {method!r} (known: {', '.join(METHODS)})")
    backend.check_batch(batch)
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    opts = resolve_options(method, options, (batch.shape[2], batch.shape[3]))
    if method in GRADIENT_METHODS:
        _need_gradients(backend, method)
    scores_all = classifier_scores(backend, batch)
    targets = resolve_targets(target, scores_all, backend.spec.path)
    scores = scores_all[np.arange(len(batch)), targets].astype(np.float32)
    coarse, how, used_layer = None, "", None
    if method == "gradcam":
        used_layer = layer or default_layer(backend)
        maps, coarse, how = _gradcam(backend, batch, used_layer, targets)
    elif method == "occlusion":
        maps = _occlusion(backend, batch, targets, opts)
    elif method == "ig":
        maps = _ig(backend, batch, targets, opts)
    elif method == "saliency":
        maps = _saliency(backend, batch, targets)
    else:
        maps = _guided_backprop(backend, batch, targets)
    return EvidenceMaps(maps.astype(np.float32), targets, scores, method, used_layer, coarse, opts, how)
