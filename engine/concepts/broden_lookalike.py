"""A generated look-alike of the Broden data set (broden1_224 / broden1_227), in its exact layout.

Broden itself (63,305 images, 1,197 concepts) cannot be downloaded here, so tests and benchmarks
write a small (or, for the memory benchmark, a full-count) copy of its *layout* with
:func:`write_broden_lookalike`. What it reproduces, as NetDissect's ``joinseg.py`` writes Broden
and NetDissect-Lite's ``loader/data_loader.py`` reads it:

- ``index.csv`` with the header ``image,split,ih,iw,sh,sw,color,object,part,material,scene,texture``;
  one row per image, in a shuffled order of four sources with Broden's proportions (ADE20K 22,210,
  Pascal 10,103, OpenSurfaces 25,352, DTD 5,640 of 63,305): ``ade20k/ADE_train_%08d.jpg``
  (color, object, part, scene), ``pascal/2008_%06d.jpg`` (color, object, part),
  ``opensurfaces/%d.jpg`` (color, material), ``dtd/<texture>_%04d.jpg`` (color, texture);
- images ``ih x iw`` (224 or 227 for broden1_224/_227) and masks ``sh x sw = ih // 2`` (112/113);
- pixel categories as RGB PNGs named ``<stem>_<category>.png`` (one plane) or
  ``<stem>_part_1.png;<stem>_part_2.png;...`` (several planes of one category, up to 4 for
  parts, overlapping: a pixel may carry two part labels, and sometimes the same one twice),
  each pixel's label number encoded as ``R + 256 * G`` (B = 0);
- image-level categories as decimal label numbers: one scene per ADE image, one or two
  textures per DTD image (``314;194``); empty cells are ``''``;
- ``label.csv`` ``number,name,category,frequency,coverage,syns`` without a row 0, categories
  listed as ``cat(count)`` by descending count (``material(36);object(3)``), coverage in
  whole-mask units (``%f``), synonyms ``;``-separated; label numbers are spread over
  ``1..max_number`` with gaps and categories interleaved (so most are > 255 and use G);
  some labels are listed in two categories (``wheel`` object and part, ``fabric`` material and
  object, ...), with ``wheel`` more frequent as a part but larger in coverage as an object;
- ``category.csv`` ``name,first,last,count,frequency`` and ``c_<category>.csv``
  ``code,number,name,frequency,coverage`` (dense codes from 1 by descending frequency, as
  NetDissect-Lite's ``category_map`` expects).

Everything is drawn from ``seed``, so the same arguments write the same bytes. The folder is
built next to ``out_dir`` and renamed into place, so an interrupted run leaves no half set.

API (also for the NetDissect-Lite side-by-side benchmark)::

    info = write_broden_lookalike(out_dir, n_images=60, image_size=224, seed=0)
    info.root, info.n_images, info.image_size, info.mask_size
    info.labels          # tuple of LookalikeLabel(number, name, counts={category: images})
    info.number("wheel") # the label number of a name
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .broden import ConceptError

BRODEN_CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "part", "material")
IMAGE_CATEGORIES = ("scene", "texture")
INDEX_HEADER = ("image", "split", "ih", "iw", "sh", "sw", *BRODEN_CATEGORIES)

#: images per source in broden1_224 (they add up to 63,305)
BRODEN_SOURCES = {"ade20k": 22210, "pascal": 10103, "opensurfaces": 25352, "dtd": 5640}
BRODEN_IMAGES = sum(BRODEN_SOURCES.values())

_SOURCE_CATEGORIES = {
    "ade20k": ("color", "object", "part", "scene"),
    "pascal": ("color", "object", "part"),
    "opensurfaces": ("color", "material"),
    "dtd": ("color", "texture"),
}

COLORS = ("black-c", "blue-c", "brown-c", "green-c", "grey-c", "orange-c", "pink-c", "purple-c",
          "red-c", "white-c", "yellow-c")
PALETTE = {"black-c": (20, 20, 20), "blue-c": (40, 60, 200), "brown-c": (120, 70, 30),
           "green-c": (40, 160, 40), "grey-c": (128, 128, 128), "orange-c": (240, 140, 20),
           "pink-c": (240, 150, 190), "purple-c": (130, 40, 150), "red-c": (210, 30, 30),
           "white-c": (240, 240, 240), "yellow-c": (240, 220, 30)}
"""The colour of each colour label's pixels in the images (Broden's colour labels name the
pixels' colours, so a colour unit can be dissected on a look-alike)."""
DTD_TEXTURES = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy",
    "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled",
    "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
    "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged")
_OBJECTS = ("wall", "sky", "floor", "tree", "building", "person", "grass", "road", "ceiling",
            "car", "table", "chair", "window", "door", "plant", "mountain", "bed", "water",
            "pot, flowerpot", "sidewalk")
_PARTS = ("head", "leg", "torso", "arm", "hand", "roof", "screen", "drawer", "leaf", "eye")
_MATERIALS = ("wood", "painted", "glass", "tile", "metal", "carpet", "brick", "stone", "paper",
              "plastic")
_SCENES = ("street-s", "bedroom-s", "kitchen-s", "living_room-s", "bathroom-s", "highway-s",
           "forest-s", "office-s")
SHARED = {"wheel": ("object", "part"), "fabric": ("material", "object"),
          "hair": ("part", "material"), "lamp": ("object", "part")}
"""Labels listed in two categories (the first is where :func:`write_broden_lookalike` draws
them more often), as ``fabric,material(36);object(3)`` in Broden."""

_SYNS = {"fabric": "cloth;textile", "person": "individual;someone", "car": "auto;automobile",
         "plant": "flora;plant life"}


@dataclass(frozen=True)
class LookalikeLabel:
    """One label of a look-alike: its number, name and images per category (as label.csv)."""

    number: int
    name: str
    counts: dict[str, int]

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.counts)


@dataclass(frozen=True)
class BrodenLookalike:
    """What :func:`write_broden_lookalike` wrote."""

    root: str
    n_images: int
    image_size: int
    mask_size: int
    labels: tuple[LookalikeLabel, ...]
    _by_name: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def number(self, name: str) -> int:
        """The label number of ``name`` (KeyError if the set has no such label)."""
        return self._by_name[name]


def _names(base: tuple[str, ...], n: int, stem: str) -> list[str]:
    return [base[i] if i < len(base) else f"{stem}{i - len(base) + 1}" for i in range(n)]


def default_concepts(scale: float = 1.0) -> dict[str, int]:
    """Concepts per category (besides :data:`SHARED`): Broden's counts (color 11, object 584,
    part 234, material 32, scene 468, texture 47) times ``scale``, at least 4 each, colours and
    textures never more than Broden has."""
    real = {"color": 11, "object": 584, "part": 234, "material": 32, "scene": 468, "texture": 47}
    out = {c: max(4, round(n * scale)) for c, n in real.items()}
    out["color"] = 11
    out["texture"] = min(out["texture"], 47)
    return out


class _Vocabulary:
    """Label names per category and their (sparse, interleaved) global numbers."""

    def __init__(self, concepts: dict[str, int], max_number: int, rng: np.random.Generator) -> None:
        pools = {
            "color": list(COLORS[: concepts["color"]]),
            "object": _names(_OBJECTS, concepts["object"], "object"),
            "part": _names(_PARTS, concepts["part"], "part"),
            "material": _names(_MATERIALS, concepts["material"], "material"),
            "scene": _names(_SCENES, concepts["scene"], "scene"),
            "texture": list(DTD_TEXTURES[: concepts["texture"]]),
        }
        for name, cats in SHARED.items():
            for c in cats:
                pools[c].append(name)
        names = list(dict.fromkeys(n for c in BRODEN_CATEGORIES for n in pools[c]))
        if len(names) > max_number or max_number > 65535:
            raise ConceptError(f"{len(names)} labels do not fit in 1..{max_number} (at most 65535).")
        numbers = np.sort(rng.choice(np.arange(1, max_number + 1), size=len(names), replace=False))
        rng.shuffle(names)  # categories interleave over the numbers
        self.number = {n: int(k) for n, k in zip(names, numbers, strict=True)}
        self.name = {k: n for n, k in self.number.items()}
        self.pool = {c: np.array([self.number[n] for n in pools[c] if n not in SHARED], dtype=np.int64)
                     for c in BRODEN_CATEGORIES}
        self.max_number = max_number


def _encode(labels: np.ndarray) -> Image.Image:
    """Broden's mask PNG: label = R + 256 * G, B = 0."""
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return Image.fromarray(rgb, "RGB")


class _Drawer:
    """Draws one image's label planes at mask size ``s``."""

    def __init__(self, vocab: _Vocabulary, s: int, rng: np.random.Generator) -> None:
        self.v = vocab
        self.s = s
        self.rng = rng
        self.wheel = vocab.number["wheel"]
        self.drawn: set[str] = set()  # the first objects/parts/material plane has every shared label

    def first(self, what: str) -> bool:
        new = what not in self.drawn
        self.drawn.add(what)
        return new

    def rect(self, out: np.ndarray, label: int, lo: float, hi: float,
             within: np.ndarray | None = None) -> None:
        """Paint a rectangle with sides in [lo, hi] of the mask side (inside ``within``)."""
        s, rng = self.s, self.rng
        h = max(1, int(s * rng.uniform(lo, hi)))
        w = max(1, int(s * rng.uniform(lo, hi)))
        y, x = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
        if within is None:
            out[y:y + h, x:x + w] = label
        else:
            sub = out[y:y + h, x:x + w]
            sub[within[y:y + h, x:x + w]] = label

    def pick(self, cat: str) -> int:
        return int(self.rng.choice(self.v.pool[cat]))

    def color(self) -> np.ndarray:
        grid = self.rng.choice(self.v.pool["color"], size=(4, 4))
        grid[self.rng.random((4, 4)) < 0.1] = 0  # some pixels have no colour name
        idx = np.arange(self.s) * 4 // self.s
        return grid[idx[:, None], idx[None, :]]

    def render(self, color: np.ndarray, size: int) -> np.ndarray:
        """The image: each colour-labelled pixel in its colour (:data:`PALETTE`) +-12 per
        channel, the others grey noise; the mask upsampled to ``size`` by repetition."""
        lut = np.zeros((self.v.max_number + 1, 3), dtype=np.uint8)
        for name, rgb in PALETTE.items():
            if name in self.v.number:
                lut[self.v.number[name]] = rgb
        idx = np.arange(size) * self.s // size
        labels = color[idx[:, None], idx[None, :]]
        out = lut[labels].astype(np.int16) + self.rng.integers(-12, 13, size=(size, size, 3),
                                                                dtype=np.int16)
        blank = labels == 0
        out[blank] = self.rng.integers(70, 130, size=(int(blank.sum()), 3), dtype=np.int16)
        return np.clip(out, 0, 255).astype(np.uint8)

    def objects(self) -> np.ndarray:
        s, rng = self.s, self.rng
        out = np.zeros((s, s), dtype=np.int64)
        every = self.first("objects")
        if rng.random() < 0.8:
            out[: s // 2 + int(rng.integers(-s // 4, s // 4 + 1))] = self.pick("object")  # background
        for _ in range(int(rng.integers(1, 4))):
            self.rect(out, self.pick("object"), 0.2, 0.6)
        if every or rng.random() < 0.12:
            self.rect(out, self.wheel, 0.5, 0.8)  # wheel as a big object, less often
        if every or rng.random() < 0.05:
            self.rect(out, self.v.number["lamp"], 0.1, 0.3)
        if every or rng.random() < 0.08:
            self.rect(out, self.v.number["fabric"], 0.2, 0.4)
        return out

    def parts(self, objects: np.ndarray) -> list[np.ndarray]:
        """1 to 4 overlapping planes of part labels inside the objects."""
        rng = self.rng
        n = int(rng.choice([1, 1, 1, 2, 2, 3, 4]))
        inside = objects > 0
        every = self.first("parts")
        if every:
            n = max(n, 2)
        planes: list[np.ndarray] = []
        for k in range(n):
            p = np.zeros_like(objects)
            for _ in range(int(rng.integers(1, 3))):
                self.rect(p, self.pick("part"), 0.1, 0.4, within=inside)
            if k == 0 and (every or rng.random() < 0.6):
                self.rect(p, self.wheel, 0.05, 0.15)  # wheel as a small part, often
            if k == 0 and (every or rng.random() < 0.3):
                self.rect(p, self.v.number["lamp"], 0.3, 0.5)
            if k == 0 and (every or rng.random() < 0.1):
                self.rect(p, self.v.number["hair"], 0.1, 0.2)
            if k > 0 and rng.random() < 0.5:  # the same label as the plane above, on its pixels
                prev = planes[-1]
                labels = np.unique(prev[prev > 0])
                if labels.size:
                    p[prev == labels[0]] = labels[0]
            planes.append(p)
        return planes

    def material(self) -> np.ndarray:
        out = np.zeros((self.s, self.s), dtype=np.int64)
        every = self.first("material")
        for _ in range(int(self.rng.integers(1, 4))):
            self.rect(out, self.pick("material"), 0.2, 0.7)
        if every or self.rng.random() < 0.3:
            self.rect(out, self.v.number["fabric"], 0.2, 0.5)
        if every or self.rng.random() < 0.2:
            self.rect(out, self.v.number["hair"], 0.1, 0.3)
        return out


class _Stats:
    """Images and coverage (whole-mask units) per (label, category), as joinseg counts them."""

    def __init__(self, max_number: int, pixels: int) -> None:
        self.freq = {c: np.zeros(max_number + 1, dtype=np.int64) for c in BRODEN_CATEGORIES}
        self.area = {c: np.zeros(max_number + 1, dtype=np.float64) for c in BRODEN_CATEGORIES}
        self.images = dict.fromkeys(BRODEN_CATEGORIES, 0)
        self.pixels = pixels

    def planes(self, cat: str, planes: list[np.ndarray]) -> None:
        counts = sum(np.bincount(p.ravel(), minlength=len(self.freq[cat])) for p in planes)
        assert isinstance(counts, np.ndarray)
        counts[0] = 0
        self.freq[cat] += counts > 0
        self.area[cat] += counts / self.pixels
        self.images[cat] += int(counts.any())

    def whole(self, cat: str, numbers: list[int]) -> None:
        for n in numbers:
            self.freq[cat][n] += 1
            self.area[cat][n] += 1.0
        self.images[cat] += 1


def _write_csv(path: str, header: tuple[str, ...] | list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _split(image: str) -> str:
    """joinseg's reproducible split: a hash of the file name (about 80% train)."""
    h = int.from_bytes(hashlib.md5(image.encode(), usedforsecurity=False).digest()[:8], "big")
    return "train" if h / 2.0**64 <= 0.8 else "val"


def write_broden_lookalike(
    out_dir: str | os.PathLike[str],
    *,
    n_images: int = 60,
    image_size: int = 224,
    mask_size: int | None = None,
    concepts: dict[str, int] | None = None,
    max_number: int = 1197,
    seed: int = 0,
    jpeg_quality: int = 90,
    progress: Callable[[int, int], None] | None = None,
) -> BrodenLookalike:
    """Write a Broden look-alike of ``n_images`` images to ``out_dir`` (see the module docstring).

    ``image_size`` is ``ih = iw`` (224: broden1_224, 227: broden1_227) and ``mask_size``
    ``sh = sw`` (default ``image_size // 2``, as Broden). ``concepts`` gives the labels per
    category besides :data:`SHARED` (default :func:`default_concepts` at 1/20 of Broden's);
    their numbers are spread over ``1..max_number``. ``progress(done, total)`` is called every
    1000 images. ``out_dir`` must not exist or be empty. Returns what was written.
    """
    out = os.path.abspath(os.fspath(out_dir))
    s = image_size // 2 if mask_size is None else mask_size
    if n_images < 1 or image_size < 8 or s < 4:
        raise ConceptError(f"{out}: need n_images >= 1, image_size >= 8 and mask_size >= 4.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConceptError(f"{out}: already exists and is not an empty folder.")
    rng = np.random.default_rng(seed)
    vocab = _Vocabulary(concepts or default_concepts(0.05), max_number, rng)
    parent, base = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    done = False
    try:
        for src in BRODEN_SOURCES:
            os.makedirs(os.path.join(tmp, "images", src))
        drawer = _Drawer(vocab, s, rng)
        stats = _Stats(max_number, s * s)
        weights = np.array(list(BRODEN_SOURCES.values()), dtype=np.float64)
        sources = rng.choice(list(BRODEN_SOURCES), size=n_images, p=weights / weights.sum())
        if n_images >= len(BRODEN_SOURCES):
            sources[: len(BRODEN_SOURCES)] = list(BRODEN_SOURCES)  # every source at least once
            rng.shuffle(sources)
        seen = dict.fromkeys(BRODEN_SOURCES, 0)
        with open(os.path.join(tmp, "index.csv"), "w", newline="", encoding="utf-8") as f:
            index = csv.writer(f, lineterminator="\n")
            index.writerow(INDEX_HEADER)
            for i, src in enumerate(sources):
                row = _draw_image(str(src), seen, drawer, stats, tmp, image_size, s, jpeg_quality)
                index.writerow(row)
                if progress is not None and ((i + 1) % 1000 == 0 or i + 1 == n_images):
                    progress(i + 1, n_images)
        labels = _write_label_files(tmp, vocab, stats)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    return BrodenLookalike(out, n_images, image_size, s, labels,
                           {lab.name: lab.number for lab in labels})


def _draw_image(src: str, seen: dict[str, int], d: _Drawer, stats: _Stats, root: str,
                image_size: int, s: int, quality: int) -> list[object]:
    rng = d.rng
    k = seen[src] = seen[src] + 1
    cells = dict.fromkeys(BRODEN_CATEGORIES, "")
    textures: list[int] = []
    if src == "dtd":
        textures = [d.pick("texture")]
        if rng.random() < 0.4:
            other = d.pick("texture")
            if other != textures[0]:
                textures.append(other)
        stem = f"dtd/{d.v.name[textures[0]]}_{k:04d}"
    elif src == "ade20k":
        stem = f"ade20k/ADE_train_{k:08d}"
    elif src == "pascal":
        stem = f"pascal/2008_{k:06d}"
    else:
        stem = f"opensurfaces/{100000 + 37 * k}"
    images = os.path.join(root, "images")
    color = d.color()
    Image.fromarray(d.render(color, image_size), "RGB").save(os.path.join(images, f"{stem}.jpg"),
                                                            quality=quality)

    def plane(cat: str, labels: np.ndarray, layer: int | None = None) -> str:
        name = f"{stem}_{cat}.png" if layer is None else f"{stem}_{cat}_{layer}.png"
        _encode(labels).save(os.path.join(images, name))
        return name

    want = _SOURCE_CATEGORIES[src]
    cells["color"] = plane("color", color)
    stats.planes("color", [color])
    if "object" in want:
        objects = d.objects()
        cells["object"] = plane("object", objects)
        stats.planes("object", [objects])
        parts = d.parts(objects) if rng.random() < 0.7 else []
        if parts:
            cells["part"] = ";".join(plane("part", p, j) for j, p in enumerate(parts, 1))
            stats.planes("part", parts)
    if "material" in want:
        mat = d.material()
        cells["material"] = plane("material", mat)
        stats.planes("material", [mat])
    if "scene" in want:
        scene = d.pick("scene")
        cells["scene"] = str(scene)
        stats.whole("scene", [scene])
    if textures:
        cells["texture"] = ";".join(map(str, textures))
        stats.whole("texture", textures)
    image = f"{stem}.jpg"
    return [image, _split(image), image_size, image_size, s, s, *cells.values()]


def _write_label_files(root: str, vocab: _Vocabulary, stats: _Stats) -> tuple[LookalikeLabel, ...]:
    """label.csv (no row 0), category.csv and c_<category>.csv, as joinseg writes them; only
    labels that occur are listed (more gaps in the numbers)."""
    labels: list[LookalikeLabel] = []
    rows: list[list[object]] = []
    for number in sorted(vocab.name):
        counts = {c: int(stats.freq[c][number]) for c in BRODEN_CATEGORIES if stats.freq[c][number]}
        if not counts:
            continue
        counts = dict(sorted(counts.items(), key=lambda kv: -kv[1]))  # stable: ties keep order
        name = vocab.name[number]
        labels.append(LookalikeLabel(number, name, counts))
        coverage = sum(float(stats.area[c][number]) for c in counts)
        rows.append([number, name, ";".join(f"{c}({n})" for c, n in counts.items()),
                     sum(counts.values()), f"{coverage:f}", _SYNS.get(name, "")])
    _write_csv(os.path.join(root, "label.csv"),
               ["number", "name", "category", "frequency", "coverage", "syns"], rows)
    cats: list[list[object]] = []
    for cat in BRODEN_CATEGORIES:
        members = [lab.number for lab in labels if cat in lab.counts]
        members.sort(key=lambda n: (-int(stats.freq[cat][n]), -float(stats.area[cat][n]), n))
        code_rows: list[list[object]] = [
            [code, n, vocab.name[n], int(stats.freq[cat][n]), f"{float(stats.area[cat][n]):.9f}"]
            for code, n in enumerate(members, 1)]
        _write_csv(os.path.join(root, f"c_{cat}.csv"),
                   ["code", "number", "name", "frequency", "coverage"], code_rows)
        if members:
            cats.append([cat, min(members), max(members), len(members), stats.images[cat]])
    _write_csv(os.path.join(root, "category.csv"), ["name", "first", "last", "count", "frequency"],
               cats)
    return tuple(labels)
