"""The built-in concept set: synthetic scenes in the Broden layout, made offline.

Network Dissection (Bau, Zhou, Khosla, Oliva, Torralba, CVPR 2017) needs images whose pixels are
labelled with concepts. Broden cannot be downloaded here, so this module draws a small,
exactly-labelled stand-in with the same file layout (read back by
:func:`engine.concepts.broden.open_broden`):

* ``color`` (pixel-level): the 11 Broden colour names. Every flat-coloured pixel (flat
  backgrounds, procedural textures, objects) is labelled with its colour; the pixels of the
  tinted photographic textures carry no colour label.
* ``object`` (pixel-level): 10 geometric shapes, 1 to 4 per scene, later ones occluding earlier
  ones; masks are pixel-exact (no antialiasing).
* ``texture`` (image-level): 5 procedural textures and 3 photographs bundled with scikit-image
  (``brick``, ``grass``, ``gravel``), on about half of the backgrounds.

See ``docs/concepts.md`` for the tables. Everything is deterministic for a seed.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.jobs import Job
from engine.types import Progress

from .broden import Concept, ConceptDataset, ConceptError, open_broden

COLORS: dict[str, tuple[int, int, int]] = {
    "black": (16, 16, 16),
    "blue": (30, 70, 220),
    "brown": (130, 75, 30),
    "green": (40, 160, 50),
    "grey": (128, 128, 128),
    "orange": (250, 140, 10),
    "pink": (250, 150, 200),
    "purple": (130, 40, 170),
    "red": (215, 25, 25),
    "white": (240, 240, 240),
    "yellow": (245, 220, 20),
}
"""Base sRGB value of each colour concept."""

COLOR_JITTER = 12
"""Each flat-coloured region adds one uniform integer offset in [-12, 12] per channel."""

OBJECTS = (
    "circle",
    "ellipse",
    "ring",
    "square",
    "diamond",
    "triangle",
    "hexagon",
    "star",
    "cross",
    "bar",
)
PROCEDURAL_TEXTURES = ("striped", "chequered", "dotted", "grid", "zigzagged")
PHOTO_TEXTURES = ("brick", "grass", "gravel")  # skimage.data functions that load offline
TEXTURES = PROCEDURAL_TEXTURES + PHOTO_TEXTURES
CATEGORIES = ("color", "object", "texture")

_COLOR_NAMES = tuple(COLORS)
_COLOR_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.int16)
_TINTS = tuple(i for i, c in enumerate(_COLOR_NAMES) if c != "black")


LABELS: tuple[Concept, ...] = tuple(
    Concept(i + 1, name, cat)
    for i, (name, cat) in enumerate(
        [(c, "color") for c in _COLOR_NAMES]
        + [(o, "object") for o in OBJECTS]
        + [(t, "texture") for t in TEXTURES]
    )
)
"""Global label numbers: colours 1-11, objects 12-21, textures 22-29 (0 is unlabelled)."""

_NUMBER = {(lab.category, lab.name): lab.number for lab in LABELS}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each (size, size) float64."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    ca, sa = math.cos(angle), math.sin(angle)
    return x * ca + y * sa, -x * sa + y * ca


def _polygon(x: np.ndarray, y: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres ``(x, y)`` against vertices ``pts``."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1], strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        xs = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xs)
    return inside


def _regular(n: int, radii: tuple[float, ...], angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular ``n``-gon (or star: alternating ``radii``) centred on the origin."""
    k = n * len(radii)
    return [
        (
            radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / k),
            radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / k),
        )
        for i in range(k)
    ]


def _shape_mask(
    kind: str, x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator
) -> np.ndarray:
    """Mask of shape ``kind`` with half-extent ``r`` around the origin of ``(x, y)``."""
    small = math.radians(15)
    if kind == "circle":
        return x * x + y * y <= r * r
    if kind == "ring":
        d2 = x * x + y * y
        return (d2 <= r * r) & (d2 > (rng.uniform(0.5, 0.65) * r) ** 2)
    if kind == "ellipse":
        u, v = _rotate(x, y, rng.uniform(0, math.pi))
        return (u / r) ** 2 + (v / (r * rng.uniform(0.45, 0.65))) ** 2 <= 1
    if kind == "bar":
        u, v = _rotate(x, y, rng.uniform(0, math.pi))
        return (np.abs(u) <= r) & (np.abs(v) <= r * rng.uniform(0.14, 0.22))
    if kind == "square":
        u, v = _rotate(x, y, rng.uniform(-small, small))
        s = 0.82 * r
        return (np.abs(u) <= s) & (np.abs(v) <= s)
    if kind == "diamond":  # a rhombus taller than wide, nearly upright
        u, v = _rotate(x, y, rng.uniform(-small, small) * 2 / 3)
        return np.abs(u) / (0.62 * r) + np.abs(v) / r <= 1
    if kind == "cross":  # an upright plus sign
        u, v = _rotate(x, y, rng.uniform(-small, small))
        t = r * rng.uniform(0.25, 0.33)
        au, av = np.abs(u), np.abs(v)
        return ((au <= r) & (av <= t)) | ((au <= t) & (av <= r))
    if kind == "triangle":
        return _polygon(x, y, _regular(3, (r,), rng.uniform(0, 2 * math.pi)))
    if kind == "hexagon":
        return _polygon(x, y, _regular(6, (r,), rng.uniform(0, 2 * math.pi)))
    if kind == "star":
        return _polygon(x, y, _regular(5, (r, 0.45 * r), rng.uniform(0, 2 * math.pi)))
    raise ValueError(kind)


def _procedural(
    kind: str, x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Two-tone procedural texture: bool map of the pixels in the second colour."""
    scale = size / 112
    u, v = _rotate(x, y, rng.uniform(0, math.pi))
    period = rng.uniform(7, 16) * scale
    if kind == "striped":
        return (u / period) % 1 < rng.uniform(0.35, 0.65)
    if kind == "chequered":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    if kind == "dotted":
        du, dv = u % period - period / 2, v % period - period / 2
        return du * du + dv * dv <= (rng.uniform(0.22, 0.36) * period) ** 2
    if kind == "grid":
        w = max(1.5 * scale, rng.uniform(0.15, 0.25) * period)
        return (u % period < w) | (v % period < w)
    if kind == "zigzagged":
        wavelength = rng.uniform(1.0, 2.0) * period
        phase = (u / wavelength) % 1
        shift = np.abs(phase - 0.5) * rng.uniform(0.6, 1.2) * wavelength  # triangle wave
        return ((v + shift) / period) % 1 < 0.5
    raise ValueError(kind)


def _load_photos() -> dict[str, np.ndarray]:
    """The grey-level texture photographs bundled with scikit-image (no download)."""
    import skimage.data

    out: dict[str, np.ndarray] = {}
    for name in PHOTO_TEXTURES:
        try:
            out[name] = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
        except Exception as e:  # a broken scikit-image install: say which image is missing
            raise ConceptError(
                f"scikit-image's bundled image {name!r} cannot be loaded ({e})."
            ) from e
    return out


def _photo(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` resized to ``size`` squared, rotated/flipped: float [0, 1]."""
    h, w = photo.shape
    side = int(rng.integers(min(size, h, w), min(h, w, 3 * size) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    if side != size:
        crop = crop.resize((size, size), Image.Resampling.BILINEAR)
    a = np.rot90(np.asarray(crop), int(rng.integers(4)))
    if rng.integers(2):
        a = a[:, ::-1]
    return a.astype(np.float64) / 255


def _jittered(color: int, rng: np.random.Generator) -> np.ndarray:
    rgb = _COLOR_RGB[color] + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Scene:
    rgb: np.ndarray  # uint8 (S, S, 3)
    color: np.ndarray  # int32 (S, S) global label numbers
    objects: np.ndarray  # int32 (S, S) global label numbers
    texture: int  # global label number, 0 for a flat background


def _render(i: int, size: int, seed: int, photos: dict[str, np.ndarray]) -> _Scene:
    """Scene ``i``: its own RNG stream, plus cycling so every concept appears early on.

    The last (unoccluded) object is shape ``i mod 10`` in colour ``i mod 11``; even scenes have
    texture ``(i // 2) mod 8`` as background. All colours in one scene are distinct.
    """
    rng = np.random.default_rng([seed, i])
    x, y = _grid(size)
    n_obj = int(rng.integers(1, 5))
    kinds = [OBJECTS[int(k)] for k in rng.integers(len(OBJECTS), size=n_obj - 1)]
    kinds.append(OBJECTS[i % len(OBJECTS)])
    last = i % len(_COLOR_RGB)
    others = [c for c in rng.permutation(len(_COLOR_RGB)).tolist() if c != last]
    obj_colors = [*others[:n_obj - 1], last]
    free = others[n_obj - 1 :]  # colours no object uses: the background picks from these

    rgb = np.empty((size, size, 3), dtype=np.uint8)
    color = np.zeros((size, size), dtype=np.int32)
    texture = 0
    if i % 2 == 0:
        name = TEXTURES[(i // 2) % len(TEXTURES)]
        texture = _NUMBER["texture", name]
        if name in photos:
            tint = int(rng.choice([c for c in free if c in _TINTS]))
            g = _photo(photos[name], size, rng)
            rgb[:] = np.round(_jittered(tint, rng) * (0.3 + 0.7 * g)[..., None]).astype(np.uint8)
        else:
            a, b = free[0], free[1]
            second = _procedural(name, x, y, size, rng)
            rgb[:] = _jittered(a, rng)
            rgb[second] = _jittered(b, rng)
            color[:] = _NUMBER["color", _COLOR_NAMES[a]]
            color[second] = _NUMBER["color", _COLOR_NAMES[b]]
    else:
        bg = free[0]
        rgb[:] = _jittered(bg, rng)
        color[:] = _NUMBER["color", _COLOR_NAMES[bg]]

    objects = np.zeros((size, size), dtype=np.int32)
    for kind, c in zip(kinds, obj_colors, strict=True):
        r = rng.uniform(0.12, 0.28) * size
        cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, size=2)
        m = _shape_mask(kind, x - cx, y - cy, r, rng)
        rgb[m] = _jittered(c, rng)
        color[m] = _NUMBER["color", _COLOR_NAMES[c]]
        objects[m] = _NUMBER["object", kind]
    return _Scene(rgb, color, objects, texture)


def _encode(labels: np.ndarray) -> Image.Image:
    """Broden mask PNG: label number = R + 256 * G."""
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    out[..., 0] = labels % 256
    out[..., 1] = labels // 256
    return Image.fromarray(out, "RGB")


def _write_csv(path: str, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def generate_concepts(
    out_dir: str | os.PathLike[str],
    *,
    n_images: int = 2000,
    image_size: int = 112,
    mask_scale: int = 1,
    seed: int = 0,
) -> Job[ConceptDataset]:
    """Write the built-in synthetic concept set to ``out_dir`` in the Broden layout.

    A job (see :mod:`engine.jobs`): yields :class:`Progress` after every image and returns
    ``open_broden(out_dir)``. Images are lossless PNGs of ``image_size`` squared pixels; masks
    are full resolution for ``mask_scale=1`` (pixel-exact) or sampled every ``mask_scale``
    pixels (``mask_scale=2`` gives Broden's half-resolution masks). The folder is built in a
    temporary sibling and renamed into place at the end, so a failed or cancelled run
    (``gen.close()``) leaves neither. ``out_dir`` must not exist or be an empty folder.
    ``n_images >= 16`` shows every concept at least once.
    """
    out = os.path.abspath(os.fspath(out_dir))
    if n_images < 1 or image_size < 16 or mask_scale < 1:
        raise ConceptError(f"{out}: need n_images >= 1, image_size >= 16 and mask_scale >= 1.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConceptError(
            f"{out}: already exists and is not an empty folder; choose another place."
        )
    parent, base = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    done = False
    try:
        yield Progress(0.0, "Loading texture photographs")
        photos = _load_photos()
        images = os.path.join(tmp, "images", "synthetic")
        os.makedirs(images)
        sh = sw = len(range(0, image_size, mask_scale))
        stats = _Stats(sh * sw)
        index: list[list[object]] = []
        for i in range(n_images):
            scene = _render(i, image_size, seed, photos)
            stem = f"synthetic/{i:05d}"
            Image.fromarray(scene.rgb, "RGB").save(os.path.join(tmp, "images", f"{stem}.png"))
            color = scene.color[::mask_scale, ::mask_scale]
            objects = scene.objects[::mask_scale, ::mask_scale]
            _encode(color).save(os.path.join(tmp, "images", f"{stem}_color.png"))
            _encode(objects).save(os.path.join(tmp, "images", f"{stem}_object.png"))
            stats.add("color", color)
            stats.add("object", objects)
            if scene.texture:
                stats.add_whole("texture", scene.texture)
            split = "val" if i % 10 == 9 else "train"
            index.append(
                [
                    f"{stem}.png",
                    split,
                    image_size,
                    image_size,
                    sh,
                    sw,
                    f"{stem}_color.png",
                    f"{stem}_object.png",
                    scene.texture or "",
                ]
            )
            yield Progress((i + 1) / (n_images + 1), f"Drew image {i + 1}/{n_images}")
        _write_csv(os.path.join(tmp, "index.csv"), list(_INDEX_HEADER), index)
        stats.write(tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above): os.replace onto a folder fails on Windows
        os.replace(tmp, out)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_broden(out)


_INDEX_HEADER = ("image", "split", "ih", "iw", "sh", "sw", *CATEGORIES)


class _Stats:
    """Per-label image frequency and coverage (in whole-mask units), as Broden's CSV files list."""

    def __init__(self, mask_pixels: int) -> None:
        n = len(LABELS) + 1
        self._pixels = mask_pixels
        self.frequency = np.zeros(n, dtype=np.int64)
        self.area = np.zeros(n, dtype=np.int64)
        self.category_frequency = dict.fromkeys(CATEGORIES, 0)

    def add(self, category: str, labels: np.ndarray) -> None:
        counts = np.bincount(labels.ravel(), minlength=len(self.area))
        counts[0] = 0
        self.area += counts
        self.frequency += counts > 0
        self.category_frequency[category] += int(counts.any())

    def add_whole(self, category: str, number: int) -> None:
        self.area[number] += self._pixels
        self.frequency[number] += 1
        self.category_frequency[category] += 1

    def _coverage(self, number: int) -> str:
        return f"{self.area[number] / self._pixels:.6f}"

    def write(self, root: str) -> None:
        """label.csv, category.csv (first/last: label number range) and c_<category>.csv."""
        labels: list[list[object]] = [[0, "-", "", 0, self._coverage(0), ""]]
        for lab in LABELS:
            f = int(self.frequency[lab.number])
            labels.append(
                [
                    lab.number,
                    lab.name,
                    f"{lab.category}({f})",
                    f,
                    self._coverage(lab.number),
                    lab.name,
                ]
            )
        header = ["number", "name", "category", "frequency", "coverage", "syns"]
        _write_csv(os.path.join(root, "label.csv"), header, labels)
        cats: list[list[object]] = []
        for cat in CATEGORIES:
            members = [lab for lab in LABELS if lab.category == cat]
            first, last = members[0].number, members[-1].number
            cats.append([cat, first, last, len(members), self.category_frequency[cat]])
            rows: list[list[object]] = [[0, 0, "-", 0, self._coverage(0)]]
            rows += [
                [
                    code,
                    lab.number,
                    lab.name,
                    int(self.frequency[lab.number]),
                    self._coverage(lab.number),
                ]
                for code, lab in enumerate(members, 1)
            ]
            header = ["code", "number", "name", "frequency", "coverage"]
            _write_csv(os.path.join(root, f"c_{cat}.csv"), header, rows)
        header = ["name", "first", "last", "count", "frequency"]
        _write_csv(os.path.join(root, "category.csv"), header, cats)


def builtin_dir(n_images: int, image_size: int) -> Path:
    """Where the built-in set of ``n_images`` images of ``image_size`` px lives in the user cache."""
    from ..cache import default_cache_root

    return default_cache_root() / "concepts" / f"builtin-{n_images}-{image_size}"


def builtin_concepts(n_images: int = 2000, image_size: int = 112) -> Job[ConceptDataset]:
    """The built-in concept set, generated on first use into the user cache (a job)."""
    folder = builtin_dir(n_images, image_size)
    if (folder / "index.csv").is_file():
        yield Progress(1.0, f"built-in concepts from {folder}")
        return open_broden(folder)
    return (yield from generate_concepts(folder, n_images=n_images, image_size=image_size))
