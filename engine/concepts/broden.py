"""Reader for concept data sets in the Broden layout.

Network Dissection (Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying
Interpretability of Deep Visual Representations", CVPR 2017) scores units against the Broden
data set: images with pixel-level labels (colour, object, part, material) and image-level labels
(scene, texture). This module reads that layout, as written by CSAILVision/NetDissect and read by
NetDissect-Lite:

``index.csv``
    ``image,split,ih,iw,sh,sw,<category>...``; ``image`` is relative to ``<root>/images/``;
    ``(ih, iw)`` is the image size and ``(sh, sw)`` the label-mask size. Each category cell holds
    ``;``-separated entries: an integer is an image-level label (a global label number covering
    the whole image), anything else is a PNG file (relative to ``images/``) whose pixel label is
    ``R + 256 * G`` (0 = unlabelled). A category cell may list several PNGs.
``label.csv``
    ``number,name,category[,frequency,coverage,syns]``; ``category`` reads ``object(2109);part(3)``.
    A label's *primary* category is the one with the largest count (the first one on ties).
``category.csv``, ``c_<category>.csv``
    Category summaries and category-local codes. They are not needed to read global label numbers,
    so this reader does not parse them; they count towards :meth:`ConceptDataset.fingerprint`.

:func:`open_broden` parses the CSV files only; masks are decoded image by image in
:meth:`ConceptDataset.sample`, so a data set of any size can be streamed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from engine.types import ConvLensError

META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
"""The fixed columns of ``index.csv``; every other column is a label category."""

_CATEGORY_COUNT = re.compile(r"^\s*([^()]+?)\s*\(\s*(\d+)\s*\)\s*$")


class ConceptError(ConvLensError):
    """A concept data set is missing a file or holds malformed data; the message names the file."""


@dataclass(frozen=True)
class Concept:
    """One label of the data set: global label number, name and primary category."""

    number: int
    name: str
    category: str


@dataclass(frozen=True)
class ConceptSample:
    """The labels of one image, decoded.

    ``pixel_labels`` holds one ``(category, map)`` pair per mask PNG listed in ``index.csv``
    (a category may have several), each map int32 ``(sh, sw)`` of global label numbers with 0 for
    unlabelled pixels. ``image_labels`` holds the image-level labels, which cover the whole mask.
    """

    image: str
    size: tuple[int, int]
    mask_size: tuple[int, int]
    pixel_labels: tuple[tuple[str, np.ndarray], ...]
    image_labels: tuple[tuple[str, int], ...]

    @property
    def categories(self) -> frozenset[str]:
        """The categories this image carries at least one label of."""
        cats = {cat for cat, _ in self.image_labels}
        cats.update(cat for cat, m in self.pixel_labels if m.any())
        return frozenset(cats)


@dataclass(frozen=True)
class _Row:
    """One parsed ``index.csv`` row; ``entries`` is aligned with the data set's categories."""

    line: int
    image: str
    split: str
    size: tuple[int, int]
    mask_size: tuple[int, int]
    entries: tuple[tuple[int | str, ...], ...]


class ConceptDataset:
    """A Broden-layout concept data set (or a subset of one), read lazily.

    ``categories`` are the category columns in use, in ``index.csv`` order. ``concepts`` are the
    labels of ``label.csv`` listed under at least one of those categories, sorted by number
    (label 0, "unlabelled", is never a concept); :meth:`concept` looks one up by its global label
    number. Rows without any entry in the categories in use are left out, as in NetDissect.
    """

    def __init__(
        self,
        root: str,
        categories: tuple[str, ...],
        concepts: tuple[Concept, ...],
        rows: tuple[_Row, ...],
        known: np.ndarray,
    ) -> None:
        self.root = root
        self.categories = categories
        self.concepts = concepts
        self._rows = rows
        self._known = known  # bool (n_labels,): label numbers listed in label.csv, 0 included
        self._by_number = {c.number: c for c in concepts}

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (
            f"ConceptDataset({self.root!r}, {len(self)} images, "
            f"categories={list(self.categories)}, {len(self.concepts)} concepts)"
        )

    @property
    def n_labels(self) -> int:
        """One more than the largest number in label.csv: the length of per-label arrays."""
        return len(self._known)

    @property
    def splits(self) -> tuple[str, ...]:
        """The distinct values of the ``split`` column, in order of first appearance."""
        return tuple(dict.fromkeys(r.split for r in self._rows))

    def concept(self, number: int) -> Concept:
        """The concept with global label number ``number`` (KeyError if there is none)."""
        return self._by_number[number]

    def label_categories(self) -> np.ndarray:
        """int64 ``(n_labels,)``: index into :attr:`categories` of each label's primary category.

        -1 for label 0, for numbers that are no concept of this data set, and for concepts whose
        primary category is not in use (a label filed under ``object(5);part(9)`` when only
        ``object`` is).
        """
        out = np.full(self.n_labels, -1, dtype=np.int64)
        for c in self.concepts:
            if c.category in self.categories:
                out[c.number] = self.categories.index(c.category)
        return out

    def image_path(self, i: int) -> str:
        """Absolute path of image ``i``."""
        return os.path.join(self.root, "images", self._rows[i].image)

    def split_of(self, i: int) -> str:
        """The ``split`` column of image ``i``."""
        return self._rows[i].split

    def sample(self, i: int) -> ConceptSample:
        """Decode the labels of image ``i`` (reads its mask PNGs)."""
        row = self._rows[i]
        image = self.image_path(i)
        if not os.path.isfile(image):
            raise ConceptError(f"{image} (index.csv row {row.line}): image file not found.")
        pixel: list[tuple[str, np.ndarray]] = []
        whole: list[tuple[str, int]] = []
        for cat, entries in zip(self.categories, row.entries, strict=True):
            for e in entries:
                if isinstance(e, int):
                    if e:
                        whole.append((cat, e))
                else:
                    pixel.append((cat, self._read_mask(e, row)))
        return ConceptSample(image, row.size, row.mask_size, tuple(pixel), tuple(whole))

    def _read_mask(self, rel: str, row: _Row) -> np.ndarray:
        path = os.path.join(self.root, "images", rel)
        where = f"{path} (index.csv row {row.line})"
        try:
            with Image.open(path) as opened:
                opened.load()
                im: Image.Image = opened
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                if im.mode not in ("RGB", "RGBA"):
                    raise ConceptError(
                        f"{where}: label masks must be RGB PNGs (label = R + 256*G), "
                        f"this one is mode {im.mode}."
                    )
                rgb = np.asarray(im)
        except FileNotFoundError:
            raise ConceptError(f"{where}: mask file not found.") from None
        except ConceptError:
            raise
        except (OSError, ValueError, SyntaxError) as e:
            raise ConceptError(f"{where}: cannot decode the mask PNG ({e}).") from e
        sh, sw = row.mask_size
        if rgb.shape[:2] != (sh, sw):
            raise ConceptError(
                f"{where}: mask is {rgb.shape[0]}x{rgb.shape[1]} (h x w), "
                f"index.csv says sh x sw = {sh}x{sw}."
            )
        labels = rgb[:, :, 0].astype(np.int32) + 256 * rgb[:, :, 1].astype(np.int32)
        top = int(labels.max())
        if top >= len(self._known) or not self._known[labels].all():
            unknown = [
                int(v) for v in np.unique(labels) if v >= len(self._known) or not self._known[v]
            ]
            raise ConceptError(f"{where}: label number(s) {unknown[:10]} are not in label.csv.")
        return labels

    def split(self, name: str) -> ConceptDataset:
        """The images whose ``split`` column is ``name``."""
        return self.subset([i for i, r in enumerate(self._rows) if r.split == name])

    def subset(self, indices: Sequence[int]) -> ConceptDataset:
        """The images at ``indices``, in that order."""
        rows = tuple(self._rows[i] for i in indices)
        return ConceptDataset(self.root, self.categories, self.concepts, rows, self._known)

    def fingerprint(self) -> str:
        """SHA-256 of what determines this data set's content, for cache keys.

        Covers the bytes of the CSV files at the root (index, label, category and ``c_*``
        files), the categories and rows in use, and ``(relative path, size, mtime_ns)`` of every
        image and mask file those rows name. Mask contents are not read. Computed once per
        instance; open the folder again to see later changes.
        """
        return self._fingerprint

    def content_files(self) -> list[str]:
        """Absolute paths of every file the rows in use read (each image, then its masks), in
        row order: what the content digests of a cached result cover."""
        images = os.path.join(self.root, "images")
        return [os.path.join(images, rel) for row in self._rows for rel in _row_files(row)]

    @cached_property
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".csv"):
                h.update(f"csv {name}\n".encode())
                with open(os.path.join(self.root, name), "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
        h.update(("categories " + ",".join(self.categories) + "\n").encode())
        images = os.path.join(self.root, "images")
        for row in self._rows:
            h.update(f"row {row.line}\n".encode())
            for rel in _row_files(row):
                try:
                    st = os.stat(os.path.join(images, rel))
                except OSError as e:
                    raise ConceptError(
                        f"{os.path.join(images, rel)} (index.csv row {row.line}): {e.strerror}."
                    ) from e
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _row_files(row: _Row) -> list[str]:
    """The image and mask files of an index row, relative to ``images/``."""
    return [row.image] + [e for es in row.entries for e in es if isinstance(e, str)]


def _read_csv(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs of a CSV file; ConceptError if unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            header = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise ConceptError(
            f"{path}: file not found (not a Broden-layout concept data set?)."
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConceptError(f"{path}: cannot read the CSV file ({e}).") from e
    return header, rows


def parse_label_categories(cell: str) -> dict[str, int]:
    """``"object(2109);part(3)"`` -> ``{"object": 2109, "part": 3}`` (ValueError if malformed)."""
    out: dict[str, int] = {}
    for part in cell.split(";"):
        if not part.strip():
            continue
        m = _CATEGORY_COUNT.match(part)
        if m is None:
            raise ValueError(f"category entry {part!r} is not of the form name(count)")
        out[m.group(1)] = int(m.group(2))
    return out


def primary_category(counts: dict[str, int]) -> str:
    """The category with the largest count; the first one listed on ties."""
    best = max(counts.values())
    return next(c for c, n in counts.items() if n == best)


def _read_labels(root: str) -> tuple[dict[int, Concept], dict[int, frozenset[str]]]:
    """label.csv as ``number -> Concept`` and ``number -> all categories listed``."""
    path = os.path.join(root, "label.csv")
    header, rows = _read_csv(path)
    missing = [c for c in ("number", "name", "category") if c not in header]
    if missing:
        raise ConceptError(f"{path}: header lacks column(s) {', '.join(missing)}.")
    concepts: dict[int, Concept] = {}
    listed: dict[int, frozenset[str]] = {}
    for line, row in rows:
        try:
            number = int(row["number"])
            counts = parse_label_categories(row["category"] or "")
        except (TypeError, ValueError) as e:
            raise ConceptError(f"{path}, row {line}: {e}.") from None
        if number < 0 or number in concepts or number in listed:
            raise ConceptError(
                f"{path}, row {line}: label number {number} is negative or repeated."
            )
        if number == 0:
            listed[0] = frozenset()
            continue
        if not counts:
            raise ConceptError(f"{path}, row {line}: label {number} lists no category.")
        concepts[number] = Concept(number, row["name"] or "", primary_category(counts))
        listed[number] = frozenset(counts)
    return concepts, listed


def _parse_index(
    root: str, categories: Sequence[str] | None, known: dict[int, Concept]
) -> tuple[tuple[str, ...], list[_Row]]:
    path = os.path.join(root, "index.csv")
    header, rows = _read_csv(path)
    missing = [c for c in META_COLUMNS if c not in header]
    if missing:
        raise ConceptError(
            f"{path}: header lacks column(s) {', '.join(missing)}; expected "
            f"{','.join(META_COLUMNS)},<category>..."
        )
    all_cats = tuple(c for c in header if c not in META_COLUMNS)
    if categories is None:
        cats = all_cats
    else:
        unknown = [c for c in categories if c not in all_cats]
        if unknown:
            has = ", ".join(all_cats) or "none"
            raise ConceptError(f"{path}: no category column {', '.join(unknown)} (has {has}).")
        cats = tuple(c for c in all_cats if c in categories)
    out: list[_Row] = []
    for line, row in rows:
        where = f"{path}, row {line}"
        if None in row or any(row.get(c) is None for c in header):
            raise ConceptError(f"{where}: {len(header)} columns expected.")
        try:
            ih, iw, sh, sw = (int(row[c]) for c in ("ih", "iw", "sh", "sw"))
        except ValueError:
            raise ConceptError(f"{where}: ih, iw, sh, sw must be integers.") from None
        if min(ih, iw, sh, sw) <= 0:
            raise ConceptError(f"{where}: image and mask sizes must be positive.")
        if not row["image"]:
            raise ConceptError(f"{where}: empty image column.")
        entries: list[tuple[int | str, ...]] = []
        for cat in cats:
            cell: list[int | str] = []
            for raw in row[cat].split(";"):
                item = raw.strip()
                if not item:
                    continue
                if item.isdigit():
                    n = int(item)
                    if n and n not in known:
                        raise ConceptError(f"{where}: {cat} label number {n} is not in label.csv.")
                    cell.append(n)
                else:
                    cell.append(item)
            entries.append(tuple(cell))
        if any(entries):
            out.append(_Row(line, row["image"], row["split"], (ih, iw), (sh, sw), tuple(entries)))
    return cats, out


def open_broden(
    root: str | os.PathLike[str],
    *,
    split: str | None = None,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
) -> ConceptDataset:
    """Open a Broden-layout folder (see the module docstring). Reads the CSV files only.

    ``split`` keeps the rows whose ``split`` column equals it; ``categories`` restricts the
    category columns (default: all of ``index.csv``); ``limit`` keeps the first rows only.
    Raises :class:`ConceptError` naming the file and row for any malformed input.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise ConceptError(f"{root}: not a folder.")
    labels, listed = _read_labels(root)
    cats, rows = _parse_index(root, categories, labels)
    if split is not None:
        rows = [r for r in rows if r.split == split]
    if limit is not None:
        rows = rows[: max(limit, 0)]
    in_use = set(cats)
    concepts = tuple(labels[n] for n in sorted(labels) if listed[n] & in_use)
    known = np.zeros(max(listed, default=0) + 1, dtype=bool)
    known[list(listed)] = True
    known[0] = True
    return ConceptDataset(root, cats, concepts, tuple(rows), known)
