"""The image transformations a probe sweeps, applied to the decoded image before the model's
preprocessing (numpy and scipy.ndimage only; no torch).

Every transformation takes a ``uint8`` (H, W, 3) RGB image and one parameter value and returns a
``uint8`` image of the same size (bilinear interpolation, rounded to the nearest integer):

* ``rotate``: in-plane rotation by ``theta`` degrees, counter-clockwise as displayed, about the
  image centre. Multiples of 90 degrees on a square image are exact pixel permutations
  (``np.rot90``).
* ``translate-x`` / ``translate-y``: a shift by ``theta`` pixels of the *model input* (right /
  down positive); on the original image that is ``theta * width / input_width`` pixels, so
  ``--range -4:4:1`` means one model-input pixel per step whatever the file's resolution.
* ``scale``: a zoom by the factor ``theta`` about the centre (above 1 enlarges).
* ``brightness``: ``theta`` added to every pixel as a fraction of the full range
  (``pixel + 255 * theta``), clipped to [0, 255].

Geometric transformations need a **fill** for the pixels that come from outside the image:
``reflect`` (mirror at the border, scipy's half-sample symmetric ``reflect``; the default),
``mean`` (the image's mean colour), ``black``, ``edge`` (the nearest border pixel) or ``wrap``
(periodic: translations by whole pixels are then exact cyclic shifts).

Composition (:func:`compose`): rotation, translation and brightness compose by adding their
parameters, scale by multiplying them (brightness exactly only where nothing is clipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine.types import ConvLensError

TRANSFORMS = ("rotate", "translate-x", "translate-y", "scale", "brightness")
FILLS = ("reflect", "mean", "black", "edge", "wrap")
UNITS = {"rotate": "degrees", "translate-x": "input pixels", "translate-y": "input pixels", "scale": "factor",
         "brightness": "fraction of full range"}
DEFAULT_RANGES = {"rotate": "-45:45:5", "translate-x": "-6:6:1", "translate-y": "-6:6:1", "scale": "0.7:1.3:0.05",
                  "brightness": "-0.4:0.4:0.05"}
GEOMETRIC = ("rotate", "translate-x", "translate-y", "scale")

_SCIPY_MODE = {"reflect": "reflect", "mean": "grid-constant", "black": "grid-constant", "edge": "nearest",
               "wrap": "grid-wrap"}


def identity(transform: str) -> float:
    """The parameter value that leaves the image as it is (1 for scale, else 0)."""
    check_transform(transform)
    return 1.0 if transform == "scale" else 0.0


def check_transform(transform: str) -> None:
    if transform not in TRANSFORMS:
        raise ConvLensError(f"unknown transformation {transform!r} (choose from {', '.join(TRANSFORMS)})")


def check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise ConvLensError(f"unknown fill {fill!r} (choose from {', '.join(FILLS)})")


def compose(transform: str, a: float, b: float) -> float:
    """The parameter of ``T_a`` after ``T_b`` (``T_a(T_b(x))``)."""
    return a * b if transform == "scale" else a + b


def parse_range(text: str) -> tuple[float, ...]:
    """``"start:stop:step"`` (stop included when the steps reach it) or a comma-separated list of
    values, e.g. ``"-45:45:5"`` or ``"-10,0,10"``. Values are rounded to 10 decimals (so
    ``0.1 * 3`` is 0.3) and must be distinct."""
    t = text.strip()
    try:
        if ":" in t:
            parts = [float(p) for p in t.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not all(math.isfinite(v) for v in parts) or step == 0 or (stop - start) * step < 0:
                raise ConvLensError(f"range {text!r}: the step must be non-zero and lead from start to stop")
            n = math.floor((stop - start) / step + 1e-9) + 1
            if n > 1000:
                raise ConvLensError(f"range {text!r}: {n} values (at most 1000)")
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [round(float(p), 10) for p in t.split(",") if p.strip()]
    except ValueError:
        raise ConvLensError(f"range {text!r}: expected start:stop:step (e.g. -45:45:5) or a list (e.g. -10,0,10)") from None
    if not values:
        raise ConvLensError(f"range {text!r}: no values")
    if len(set(values)) != len(values):
        raise ConvLensError(f"range {text!r}: repeated values")
    if not all(math.isfinite(v) for v in values):
        raise ConvLensError(f"range {text!r}: values must be finite numbers")
    return tuple(values)


def check_values(transform: str, values: Sequence[float]) -> None:
    if not values:
        raise ConvLensError("the sweep has no values")
    if transform == "scale" and min(values) <= 0:
        raise ConvLensError(f"scale factors must be positive, got {min(values):g}")
    if transform == "brightness" and max(abs(v) for v in values) > 1:
        raise ConvLensError("brightness offsets are fractions of the full range, from -1 to 1")


def _warp(img: np.ndarray, matrix: np.ndarray, offset: np.ndarray, fill: str) -> np.ndarray:
    """out[o] = img[matrix @ o + offset] per channel, bilinear, in float32, rounded to uint8."""
    from scipy import ndimage

    mode = _SCIPY_MODE[fill]
    src = img.astype(np.float32)
    out = np.empty_like(src)
    for c in range(src.shape[2]):
        cval = float(src[..., c].mean()) if fill == "mean" else 0.0
        out[..., c] = ndimage.affine_transform(src[..., c], matrix, offset=offset, order=1, mode=mode, cval=cval,
                                               prefilter=False)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _about_centre(img: np.ndarray, inverse: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) for scipy of the map ``input = inverse @ (output - c - shift) + c`` in
    (row, column) coordinates, c the image centre."""
    h, w = img.shape[:2]
    c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    s = np.asarray(shift, dtype=np.float64)
    return inverse, c - inverse @ (c + s)


def image_pixels_per_input_pixel(h: int, w: int, input_size: tuple[int, int], resize: str = "stretch",
                                 crop_fraction: float = 0.875) -> tuple[float, float]:
    """(rows, columns): how many pixels of an ``h`` x ``w`` image one model-input pixel spans
    under the preprocessing's resize policy (as :func:`engine.data.images.preprocess` resizes:
    ``stretch`` to ``input_size``, or ``shorter_side_crop``: scaled to cover
    ``input_size / crop_fraction``, sizes floored, then centre-cropped)."""
    ih, iw = input_size
    if resize == "shorter_side_crop":
        scale = max(ih / crop_fraction / h, iw / crop_fraction / w)
        new_h, new_w = max(ih, int(h * scale + 1e-6)), max(iw, int(w * scale + 1e-6))
        return h / new_h, w / new_w
    return h / ih, w / iw


def apply(img: np.ndarray, transform: str, theta: float, fill: str = "reflect",
          input_size: tuple[int, int] | None = None, *, resize: str = "stretch",
          crop_fraction: float = 0.875) -> np.ndarray:
    """``img`` (uint8, (H, W, 3)) transformed by ``transform`` with parameter ``theta``.

    ``input_size`` (height, width) is the model's input size, the unit of translations (None:
    the image's own pixels), with ``resize`` / ``crop_fraction`` the preprocessing's policy (a
    shift of ``theta`` model-input pixels is ``theta`` pixels of what the model sees). The
    identity value returns ``img`` itself.
    """
    check_transform(transform)
    check_fill(fill)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"expected a (H, W, C) uint8 image, got {img.shape} {img.dtype}")
    theta = float(theta)
    if theta == identity(transform):
        return img
    h, w = img.shape[:2]
    if transform == "brightness":
        return np.clip(img.astype(np.float32) + np.float32(255.0 * theta), 0, 255).round().astype(np.uint8)
    if transform == "rotate":
        quarter = theta / 90.0
        if h == w and quarter == round(quarter):
            return np.ascontiguousarray(np.rot90(img, k=round(quarter) % 4, axes=(0, 1)))
        r = math.radians(theta)
        cos, sin = math.cos(r), math.sin(r)
        # displayed counter-clockwise (rows point down): input = [[cos, sin], [-sin, cos]] @ output
        matrix, offset = _about_centre(img, np.array([[cos, sin], [-sin, cos]]))
    elif transform == "scale":
        matrix, offset = _about_centre(img, np.eye(2) / theta)
    else:
        sy, sx = (1.0, 1.0) if input_size is None else image_pixels_per_input_pixel(h, w, input_size, resize,
                                                                                    crop_fraction)
        shift = (0.0, theta * sx) if transform == "translate-x" else (theta * sy, 0.0)
        matrix, offset = _about_centre(img, np.eye(2), shift)
    return _warp(img, matrix, offset, fill)
