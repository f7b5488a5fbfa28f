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
    ``number,name,category[,frequency,coverage,syns]``; ``category`` reads ``object(2109);part(3)``
    (images per category). Broden has no row 0 and leaves gaps nowhere, but neither is assumed.
``c_<category>.csv``
    ``code,number,name,frequency,coverage``: category-local codes, and per label its coverage
    (pixels, in whole-mask units) within that category. Read only for the primary category.
``category.csv``
    Category summaries; not read (it counts towards :meth:`ConceptDataset.fingerprint`).

Every label is scored in one *primary* category. When every category in use has its
``c_<category>.csv`` (Broden and the built-in set do), it is NetDissect's rule
(``primary_categories_per_index`` of NetDissect-Lite's ``loader/data_loader.py``): among the
categories **in use**, the one where the label has the largest coverage, the later one in
``index.csv`` order on a tie; a label with no coverage in any of them takes the rule below
restricted to the categories in use. Without those files: the category with the largest count in
``label.csv`` (the first one listed on ties), which may be a category not in use (the label is then
not scored).

:func:`open_broden` parses the CSV files only, streaming ``index.csv`` (one compact record per
row, about 0.5 KB for a Broden row); masks are decoded image by image in
:meth:`ConceptDataset.sample`, so a data set of any size can be streamed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

from engine.types import ConvLensError

META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
"""The fixed columns of ``index.csv``; every other column is a label category."""

_CATEGORY_COUNT = re.compile(r"^\s*([^()]+?)\s*\(\s*(\d+)\s*\)\s*$")
_NUMBER = re.compile(r"[0-9]+")
"""An ``index.csv`` entry that is a label number (ASCII digits, as NetDissect writes them)."""


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

    def labels(self) -> frozenset[int]:
        """Every label number the image carries, pixel-level or image-level (0 excluded)."""
        out = {n for _, n in self.image_labels}
        for _, m in self.pixel_labels:
            out.update(int(v) for v in np.unique(m))
        out.discard(0)
        return frozenset(out)

    def mask(self, number: int) -> np.ndarray:
        """bool ``(sh, sw)``: the pixels that carry label ``number`` in any of the image's
        planes (the union over the PNGs of every category cell), all of them when it is one of
        the image's image-level labels. ``number`` must be positive."""
        if number <= 0:
            raise ValueError(f"label numbers of concepts are positive, got {number}")
        if any(n == number for _, n in self.image_labels):
            return np.ones(self.mask_size, dtype=bool)
        out = np.zeros(self.mask_size, dtype=bool)
        for _, m in self.pixel_labels:
            out |= m == number
        return out


@dataclass(frozen=True, slots=True)
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

        -1 for label 0, for numbers that are no concept of this data set, and, only in a folder
        without ``c_<category>.csv`` files, for concepts whose primary category is not in use (a
        label filed under ``object(5);part(9)`` when only ``object`` is). With those files (Broden)
        the primary category is always one in use (see the module docstring).
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


def _read_labels(root: str) -> dict[int, tuple[str, dict[str, int]]]:
    """label.csv as ``number -> (name, {category: count})``; label 0 maps to ``("-", {})``."""
    path = os.path.join(root, "label.csv")
    header, rows = _read_csv(path)
    missing = [c for c in ("number", "name", "category") if c not in header]
    if missing:
        raise ConceptError(f"{path}: header lacks column(s) {', '.join(missing)}.")
    labels: dict[int, tuple[str, dict[str, int]]] = {}
    for line, row in rows:
        try:
            number = int(row["number"])
            counts = parse_label_categories(row["category"] or "")
        except (TypeError, ValueError) as e:
            raise ConceptError(f"{path}, row {line}: {e}.") from None
        if number < 0 or number in labels:
            raise ConceptError(
                f"{path}, row {line}: label number {number} is negative or repeated."
            )
        if number == 0:
            labels[0] = (row["name"] or "-", {})
            continue
        if not counts:
            raise ConceptError(f"{path}, row {line}: label {number} lists no category.")
        labels[number] = (row["name"] or "", counts)
    return labels


def _read_coverage(root: str, categories: Sequence[str]) -> dict[str, dict[int, float]] | None:
    """Per category in use, ``number -> coverage`` from ``c_<category>.csv``; None when one
    of those files is absent (the primary category then follows label.csv's counts)."""
    paths = {c: os.path.join(root, f"c_{c}.csv") for c in categories}
    if not categories or not all(os.path.isfile(p) for p in paths.values()):
        return None
    out: dict[str, dict[int, float]] = {}
    for cat, path in paths.items():
        header, rows = _read_csv(path)
        missing = [c for c in ("number", "coverage") if c not in header]
        if missing:
            raise ConceptError(f"{path}: header lacks column(s) {', '.join(missing)}.")
        cov: dict[int, float] = {}
        for line, row in rows:
            try:
                number = int(row["number"])
                value = float(row["coverage"] or 0.0)
            except (TypeError, ValueError):
                raise ConceptError(
                    f"{path}, row {line}: number must be an integer and coverage a number."
                ) from None
            if number > 0:
                cov[number] = value
        out[cat] = cov
    return out


def ndl_primary_category(number: int, categories: Sequence[str],
                         coverage: dict[str, dict[int, float]]) -> str | None:
    """NetDissect's primary category of label ``number`` among ``categories`` (in order): the
    largest coverage, the later category on a tie; None when its coverage is 0 in all."""
    best, at = max((coverage[c].get(number, 0.0), i) for i, c in enumerate(categories))
    return categories[at] if best > 0 else None


def _iter_index(path: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of index.csv, the header first (line 1), streamed; blank lines
    are skipped. ConceptError if the file is missing or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            for fields in reader:
                if fields:
                    yield reader.line_num, fields
    except FileNotFoundError:
        raise ConceptError(
            f"{path}: file not found (not a Broden-layout concept data set?)."
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConceptError(f"{path}: cannot read the CSV file ({e}).") from e


def _parse_index(
    root: str, categories: Sequence[str] | None, known: Collection[int]
) -> tuple[tuple[str, ...], list[_Row]]:
    path = os.path.join(root, "index.csv")
    rows = _iter_index(path)
    _, header = next(rows, (0, []))
    missing = [c for c in META_COLUMNS if c not in header]
    if missing:
        raise ConceptError(
            f"{path}: header lacks column(s) {', '.join(missing)}; expected "
            f"{','.join(META_COLUMNS)},<category>..."
        )
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise ConceptError(f"{path}: header repeats column(s) {', '.join(repeated)}.")
    all_cats = tuple(c for c in header if c not in META_COLUMNS)
    if categories is None:
        cats = all_cats
    else:
        unknown = [c for c in categories if c not in all_cats]
        if unknown:
            has = ", ".join(all_cats) or "none"
            raise ConceptError(f"{path}: no category column {', '.join(unknown)} (has {has}).")
        cats = tuple(c for c in all_cats if c in categories)
    col = {c: header.index(c) for c in header}
    i_image, i_split = col["image"], col["split"]
    i_sizes = [col[c] for c in ("ih", "iw", "sh", "sw")]
    i_cats = [col[c] for c in cats]
    splits: dict[str, str] = {}  # one string per distinct split name,
    sizes: dict[tuple[int, int], tuple[int, int]] = {}  # one tuple per distinct size

    out: list[_Row] = []
    for line, fields in rows:
        where = f"{path}, row {line}"
        if len(fields) != len(header):
            raise ConceptError(f"{where}: {len(header)} columns expected, found {len(fields)}.")
        try:
            ih, iw, sh, sw = (int(fields[i]) for i in i_sizes)
        except ValueError:
            raise ConceptError(f"{where}: ih, iw, sh, sw must be integers.") from None
        if min(ih, iw, sh, sw) <= 0:
            raise ConceptError(f"{where}: image and mask sizes must be positive.")
        if not fields[i_image]:
            raise ConceptError(f"{where}: empty image column.")
        entries: list[tuple[int | str, ...]] = []
        for cat, i in zip(cats, i_cats, strict=True):
            raw = fields[i]
            if not raw:
                entries.append(())
                continue
            cell: list[int | str] = []
            for part in raw.split(";"):
                item = part.strip()
                if not item:
                    continue
                if _NUMBER.fullmatch(item):
                    n = int(item)
                    if n and n not in known:
                        raise ConceptError(f"{where}: {cat} label number {n} is not in label.csv.")
                    cell.append(n)
                else:
                    cell.append(item)
            entries.append(tuple(cell))
        if any(entries):
            split = splits.setdefault(fields[i_split], fields[i_split])
            size = sizes.setdefault((ih, iw), (ih, iw))
            mask_size = sizes.setdefault((sh, sw), (sh, sw))
            out.append(_Row(line, fields[i_image], split, size, mask_size, tuple(entries)))
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
    labels = _read_labels(root)
    cats, rows = _parse_index(root, categories, labels)
    if split is not None:
        rows = [r for r in rows if r.split == split]
    if limit is not None:
        rows = rows[: max(limit, 0)]
    coverage = _read_coverage(root, cats)
    concepts = []
    for n in sorted(labels):
        name, counts = labels[n]
        in_use = {c: k for c, k in counts.items() if c in cats}
        if n == 0 or not in_use:
            continue
        if coverage is None:
            primary = primary_category(counts)
        else:
            primary = ndl_primary_category(n, cats, coverage) or primary_category(in_use)
        concepts.append(Concept(n, name, primary))
    known = np.zeros(max(labels, default=0) + 1, dtype=bool)
    known[list(labels)] = True
    known[0] = True
    return ConceptDataset(root, cats, tuple(concepts), tuple(rows), known)
