"""The built-in part data set: drawn objects with pixel-exact part masks, in the Broden layout.

For Interpretable CNNs (Zhang, Wu, Zhu, CVPR 2018) training and its metrics need images of a
few object classes whose *parts* are labelled (part interpretability) and located (landmarks,
for location instability). This module draws such a set offline, in the style of
:mod:`engine.concepts.generate` (pixel-centre geometry, no antialiasing, so masks are exact):

* ``face``: a head (skin tone) with two ``eye`` s, a ``nose``, a ``mouth`` and two ``ear`` s;
  landmarks ``left_eye``, ``right_eye``, ``nose``, ``mouth``.
* ``animal``: a ``torso`` with a ``head`` at one end (facing left or right), four ``leg`` s and a
  ``tail``; landmarks ``head``, ``tail_tip``, ``front_foot``, ``back_foot``.
* ``house``: a ``wall`` under a ``roof``, a ``door`` and one or two ``window`` s; landmarks
  ``roof_top``, ``door``.

Objects vary in position, size, proportions and colours on a noisy background. Written into
``out_dir`` (built in a temporary sibling, renamed in at the end):

* Broden files: ``index.csv`` (categories ``object`` and ``part``, pixel-level, full
  resolution), ``label.csv``, ``category.csv``, ``c_object.csv``, ``c_part.csv``; images and
  masks under ``images/<class>/`` (mask label = R + 256 * G).
* ``train.csv`` / ``val.csv``: image lists with labels (``path,label``), for training and
  metrics (every fifth image is ``val``; the ``split`` column of ``index.csv`` says the same).
* ``landmarks.csv``: ``image,landmark,x,y`` in pixel coordinates of the image (pixel ``(x, y)``
  has its centre at ``(x, y)``), image paths relative to ``out_dir``.

Everything is deterministic for a seed.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from engine.jobs import Job
from engine.types import Progress

from .broden import Concept, ConceptDataset, ConceptError, open_broden

CLASSES = ("face", "animal", "house")
PARTS: dict[str, tuple[str, ...]] = {
    "face": ("eye", "nose", "mouth", "ear"),
    "animal": ("head", "torso", "leg", "tail"),
    "house": ("roof", "wall", "door", "window"),
}
LANDMARKS: dict[str, tuple[str, ...]] = {
    "face": ("left_eye", "right_eye", "nose", "mouth"),
    "animal": ("head", "tail_tip", "front_foot", "back_foot"),
    "house": ("roof_top", "door"),
}
CATEGORIES = ("object", "part")

LABELS: tuple[Concept, ...] = tuple(
    Concept(i + 1, name, cat)
    for i, (name, cat) in enumerate(
        [(c, "object") for c in CLASSES]
        + [(p, "part") for c in CLASSES for p in PARTS[c]]
    )
)
"""Global label numbers: objects 1-3, then the parts of each class in order (0 is unlabelled)."""

_NUMBER = {(lab.category, lab.name): lab.number for lab in LABELS}

_SKIN = ((224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172), (241, 194, 125))
_FUR = ((120, 80, 40), (90, 90, 90), (200, 160, 90), (60, 45, 35), (230, 210, 180))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _rect(x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def _triangle(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    inside = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1], strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        xs = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xs)
    return inside


def _segment(x: np.ndarray, y: np.ndarray, p: tuple[float, float], q: tuple[float, float],
             width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of the segment ``pq``."""
    (px, py), (qx, qy) = p, q
    dx, dy = qx - px, qy - py
    t = np.clip(((x - px) * dx + (y - py) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
    return (x - px - t * dx) ** 2 + (y - py - t * dy) ** 2 <= (width / 2) ** 2


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 20) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255).astype(np.uint8)


class _Canvas:
    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.x, self.y = _grid(size)
        bg = rng.integers(0, 256, size=3)
        noise = rng.normal(0, 10, size=(size, size, 3))
        self.rgb = np.clip(bg[None, None, :] + noise, 0, 255)
        # a few background blobs so that colour alone does not give the class away
        for _ in range(int(rng.integers(0, 3))):
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(0.05, 0.15) * size
            self.rgb[_ellipse(self.x, self.y, cx, cy, r, r * rng.uniform(0.5, 1.5))] = rng.integers(0, 256, 3)
        self.obj = np.zeros((size, size), dtype=np.int32)
        self.part = np.zeros((size, size), dtype=np.int32)
        self.landmarks: dict[str, tuple[float, float]] = {}

    def paint(self, m: np.ndarray, rgb: np.ndarray, obj: str, part: str | None) -> None:
        self.rgb[m] = rgb
        self.obj[m] = _NUMBER["object", obj]
        self.part[m] = _NUMBER["part", part] if part else 0

    def mark(self, name: str, cx: float, cy: float) -> None:
        """A landmark at continuous coordinate (cx, cy): pixel index coordinates are -0.5."""
        self.landmarks[name] = (cx - 0.5, cy - 0.5)


def _face(c: _Canvas, cx: float, cy: float, s: float) -> None:
    rng, x, y = c.rng, c.x, c.y
    skin = _jitter(_SKIN[int(rng.integers(len(_SKIN)))], rng)
    rx, ry = s * rng.uniform(0.36, 0.42), s * rng.uniform(0.46, 0.52)
    for side in (-1, 1):  # ears first, the head covers their inner half
        c.paint(_ellipse(x, y, cx + side * rx, cy, 0.12 * s, 0.17 * s), skin, "face", "ear")
    c.paint(_ellipse(x, y, cx, cy, rx, ry), skin, "face", None)
    eye_dy, eye_dx = -ry * rng.uniform(0.2, 0.35), rx * rng.uniform(0.38, 0.5)
    er = s * rng.uniform(0.06, 0.085)
    eye = _jitter((30, 30, 60), rng)
    for side, name in ((-1, "left_eye"), (1, "right_eye")):
        ex, ey = cx + side * eye_dx, cy + eye_dy
        c.paint(_ellipse(x, y, ex, ey, er * 1.3, er), eye, "face", "eye")
        c.mark(name, ex, ey)
    ny = cy + ry * rng.uniform(0.0, 0.12)
    nose = _jitter((max(int(skin[0]) - 60, 0), max(int(skin[1]) - 60, 0), max(int(skin[2]) - 40, 0)), rng, 5)
    c.paint(_triangle(x, y, [(cx, ny - 0.14 * s), (cx - 0.07 * s, ny + 0.06 * s), (cx + 0.07 * s, ny + 0.06 * s)]),
            nose, "face", "nose")
    c.mark("nose", cx, ny)
    my = cy + ry * rng.uniform(0.45, 0.6)
    c.paint(_ellipse(x, y, cx, my, rx * rng.uniform(0.35, 0.5), s * 0.05), _jitter((190, 30, 40), rng), "face", "mouth")
    c.mark("mouth", cx, my)


def _animal(c: _Canvas, cx: float, cy: float, s: float) -> None:
    rng, x, y = c.rng, c.x, c.y
    fur = _jitter(_FUR[int(rng.integers(len(_FUR)))], rng)
    face = 1 if rng.integers(2) else -1  # the head's side
    tw, th = s * rng.uniform(0.34, 0.4), s * rng.uniform(0.17, 0.22)
    ty = cy - 0.05 * s
    leg_w, leg_h = 0.07 * s, s * rng.uniform(0.22, 0.3)
    feet = []
    for fx in (-0.7, -0.4, 0.4, 0.7):
        lx = cx + fx * tw
        c.paint(_rect(x, y, lx - leg_w / 2, ty, lx + leg_w / 2, ty + th + leg_h), fur, "animal", "leg")
        feet.append((lx, ty + th + leg_h - 0.5))
    tail_root = (cx - face * tw * 0.95, ty - th * 0.2)
    tail_tip = (tail_root[0] - face * s * rng.uniform(0.12, 0.2), tail_root[1] - s * rng.uniform(0.15, 0.28))
    c.paint(_segment(x, y, tail_root, tail_tip, 0.06 * s), fur, "animal", "tail")
    c.mark("tail_tip", *tail_tip)
    c.paint(_ellipse(x, y, cx, ty, tw, th), fur, "animal", "torso")
    hr = s * rng.uniform(0.14, 0.18)
    hx, hy = cx + face * (tw + 0.4 * hr), ty - th * 0.9
    head_rgb = np.clip(fur.astype(np.int16) + 25, 0, 255).astype(np.uint8)
    c.paint(_ellipse(x, y, hx, hy, hr, hr * 0.9), head_rgb, "animal", "head")
    c.mark("head", hx, hy)
    front, back = (feet[3], feet[0]) if face > 0 else (feet[0], feet[3])
    c.mark("front_foot", *front)
    c.mark("back_foot", *back)


def _house(c: _Canvas, cx: float, cy: float, s: float) -> None:
    rng, x, y = c.rng, c.x, c.y
    ww, wh = s * rng.uniform(0.36, 0.44), s * rng.uniform(0.26, 0.32)
    top = cy - wh * 0.4
    wall = _jitter(((200, 200, 190), (180, 90, 60), (230, 220, 150))[int(rng.integers(3))], rng)
    c.paint(_rect(x, y, cx - ww, top, cx + ww, top + 2 * wh), wall, "house", "wall")
    roof_h = s * rng.uniform(0.22, 0.3)
    peak = (cx + rng.uniform(-0.1, 0.1) * ww, top - roof_h)
    c.paint(_triangle(x, y, [peak, (cx - ww * 1.15, top), (cx + ww * 1.15, top)]),
            _jitter((150, 40, 30), rng), "house", "roof")
    c.mark("roof_top", peak[0], peak[1] + 0.5)
    dw, dh = 0.1 * s, wh * rng.uniform(0.8, 1.0)
    dx = cx + rng.uniform(-0.4, 0.4) * ww
    c.paint(_rect(x, y, dx - dw, top + 2 * wh - dh, dx + dw, top + 2 * wh), _jitter((90, 55, 30), rng),
            "house", "door")
    c.mark("door", dx, top + 2 * wh - dh / 2)
    win = _jitter((120, 180, 230), rng)
    sides = [s_ for s_ in (-1, 1) if abs(dx - (cx + s_ * ww * 0.6)) > dw + 0.1 * s] or [-1 if dx > cx else 1]
    for side in sides[: int(rng.integers(1, 3))]:
        wx = cx + side * ww * 0.6
        c.paint(_rect(x, y, wx - 0.08 * s, top + 0.35 * wh, wx + 0.08 * s, top + 0.35 * wh + 0.16 * s), win,
                "house", "window")


_DRAW: dict[str, Callable[[_Canvas, float, float, float], None]] = {
    "face": _face, "animal": _animal, "house": _house,
}


def render_part_image(i: int, size: int = 48, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray, np.ndarray,
                                                                       dict[str, tuple[float, float]]]:
    """Image ``i``: ``(class, rgb uint8 (S, S, 3), object labels, part labels, landmarks)``.
    Class ``i mod 3``; position and size drawn from its own RNG stream."""
    cls = CLASSES[i % len(CLASSES)]
    rng = np.random.default_rng([seed, i])
    c = _Canvas(size, rng)
    s = size * rng.uniform(0.55, 0.8)
    margin = 0.5 * s
    cx, cy = rng.uniform(margin, size - margin, size=2)
    _DRAW[cls](c, cx, cy, s)
    rgb = np.clip(np.round(c.rgb), 0, 255).astype(np.uint8)
    return cls, rgb, c.obj, c.part, c.landmarks


def _encode(labels: np.ndarray) -> Image.Image:
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[..., 0] = labels % 256
    out[..., 1] = labels // 256
    return Image.fromarray(out, "RGB")


def _write_csv(path: str, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def generate_parts(out_dir: str | os.PathLike[str], *, n_images: int = 900, image_size: int = 48,
                   seed: int = 0) -> Job[ConceptDataset]:
    """Write the built-in part set (see the module docstring) to ``out_dir``; a job returning
    ``open_broden(out_dir)``. ``out_dir`` must not exist or be an empty folder; a failed or
    cancelled run (``gen.close()``) leaves nothing."""
    out = os.path.abspath(os.fspath(out_dir))
    if n_images < 3 or image_size < 24:
        raise ConceptError(f"{out}: need n_images >= 3 and image_size >= 24.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConceptError(f"{out}: already exists and is not an empty folder; choose another place.")
    parent, base = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    done = False
    try:
        for cls in CLASSES:
            os.makedirs(os.path.join(tmp, "images", cls))
        n_labels = len(LABELS) + 1
        frequency = np.zeros(n_labels, dtype=np.int64)
        area = np.zeros(n_labels, dtype=np.int64)
        index: list[list[object]] = []
        lists: dict[str, list[list[object]]] = {"train": [], "val": []}
        marks: list[list[object]] = []
        yield Progress(0.0, f"drawing {n_images} part images")
        for i in range(n_images):
            cls, rgb, obj, part, lms = render_part_image(i, image_size, seed)
            stem = f"{cls}/{i:05d}"
            Image.fromarray(rgb, "RGB").save(os.path.join(tmp, "images", f"{stem}.png"))
            _encode(obj).save(os.path.join(tmp, "images", f"{stem}_object.png"))
            _encode(part).save(os.path.join(tmp, "images", f"{stem}_part.png"))
            for labels in (obj, part):
                counts = np.bincount(labels.ravel(), minlength=n_labels)
                counts[0] = 0
                area += counts
                frequency += counts > 0
            split = "val" if i % 5 == 4 else "train"
            index.append([f"{stem}.png", split, image_size, image_size, image_size, image_size,
                          f"{stem}_object.png", f"{stem}_part.png"])
            rel = f"images/{stem}.png"
            lists[split].append([rel, cls])
            marks += [[rel, name, f"{lx:.3f}", f"{ly:.3f}"] for name, (lx, ly) in lms.items()]
            yield Progress((i + 1) / (n_images + 1), f"drew image {i + 1}/{n_images}")
        _write_csv(os.path.join(tmp, "index.csv"), ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES], index)
        for split, rows in lists.items():
            _write_csv(os.path.join(tmp, f"{split}.csv"), ["path", "label"], rows)
        _write_csv(os.path.join(tmp, "landmarks.csv"), ["image", "landmark", "x", "y"], marks)
        _write_label_files(tmp, frequency, area, image_size * image_size)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_broden(out)


def _write_label_files(root: str, frequency: np.ndarray, area: np.ndarray, pixels: int) -> None:
    rows: list[list[object]] = [[0, "-", "", 0, f"{area[0] / pixels:.6f}", ""]]
    for lab in LABELS:
        f = int(frequency[lab.number])
        rows.append([lab.number, lab.name, f"{lab.category}({f})", f, f"{area[lab.number] / pixels:.6f}", lab.name])
    _write_csv(os.path.join(root, "label.csv"), ["number", "name", "category", "frequency", "coverage", "syns"], rows)
    cats: list[list[object]] = []
    for cat in CATEGORIES:
        members = [lab for lab in LABELS if lab.category == cat]
        cats.append([cat, members[0].number, members[-1].number, len(members),
                     int(sum(frequency[m.number] for m in members))])
        crow: list[list[object]] = [[0, 0, "-", 0, f"{area[0] / pixels:.6f}"]]
        crow += [[code, lab.number, lab.name, int(frequency[lab.number]), f"{area[lab.number] / pixels:.6f}"]
                 for code, lab in enumerate(members, 1)]
        _write_csv(os.path.join(root, f"c_{cat}.csv"), ["code", "number", "name", "frequency", "coverage"], crow)
    _write_csv(os.path.join(root, "category.csv"), ["name", "first", "last", "count", "frequency"], cats)


def builtin_parts_dir(n_images: int = 900, image_size: int = 48, seed: int = 0) -> Path:
    """Where the built-in part set of these settings lives in the user cache."""
    from ..cache import default_cache_root

    return default_cache_root() / "concepts" / f"parts-{n_images}-{image_size}-{seed}"


def builtin_parts(n_images: int = 900, image_size: int = 48, seed: int = 0) -> Job[ConceptDataset]:
    """The built-in part set, generated on first use into the user cache (a job)."""
    folder = builtin_parts_dir(n_images, image_size, seed)
    if (folder / "index.csv").is_file() and (folder / "landmarks.csv").is_file():
        yield Progress(1.0, f"built-in parts from {folder}")
        return open_broden(folder)
    return (yield from generate_parts(folder, n_images=n_images, image_size=image_size, seed=seed))


