"""The real Broden layout (broden1_224 / broden1_227), on a generated look-alike.

The look-alike (:mod:`engine.concepts.broden_lookalike`) has Broden's header, file naming,
multi-plane part cells, ``;``-separated image-level labels, sparse label numbers above 255 and
the ``c_<category>.csv`` files. Every field ConvLens's loader reads is checked against the files
themselves and against NetDissect-Lite's own decoding (``loader/data_loader.py``:
``decode_index_dict``, ``resolve_segmentation``, ``primary_categories_per_index``), whose few
lines are re-implemented below as the reference (NetDissect-Lite is not imported).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cache import Cache
from engine.concepts import ConceptDataset, ConceptError, open_broden
from engine.concepts.broden_lookalike import (
    BRODEN_CATEGORIES,
    INDEX_HEADER,
    BrodenLookalike,
    write_broden_lookalike,
)
from engine.jobs import run_sync

NDL_META = ("image", "split", "ih", "iw", "sh", "sw")
NDL_DEFAULT_CATEGORIES = ("object", "part", "scene", "texture", "color")  # its settings.py


# ------------------------------------------------- NetDissect-Lite's decoding, re-implemented


def ndl_decode_index_dict(row: dict[str, str]) -> dict[str, object]:
    """``decode_index_dict``: sizes to int, other cells split on ';', digit entries to int."""
    result: dict[str, object] = {}
    for key, val in row.items():
        if key in ("image", "split"):
            result[key] = val
        elif key in ("sw", "sh", "iw", "ih"):
            result[key] = int(val)
        else:
            item: list[int | str] = [s for s in val.split(";") if s]
            for i, v in enumerate(item):
                if re.match(r"^\d+$", str(v)):
                    item[i] = int(v)
            result[key] = item
    return result


def ndl_index(root: Path, categories: tuple[str, ...]) -> list[dict[str, object]]:
    """``SegmentationData.image`` after ``index_has_any_data`` filtering."""
    with open(root / "index.csv") as f:
        rows = [ndl_decode_index_dict(r) for r in csv.DictReader(f)]
    return [r for r in rows if any(d for c in categories for d in r[c])]  # type: ignore[attr-defined]


def ndl_label_sets(root: Path, row: dict[str, object], categories: tuple[str, ...]
                   ) -> tuple[list[int], np.ndarray | None]:
    """``resolve_segmentation`` then ``tally_job``'s split into scalars and pixel planes:
    (image-level labels, int planes (n, sh, sw) or None)."""
    scalars: list[int] = []
    planes = []
    for cat in categories:
        d = row[cat]
        assert isinstance(d, list)
        if all(isinstance(x, int) for x in d):
            scalars += d
            continue
        out = np.empty((len(d), row["sh"], row["sw"]), dtype=np.int16)  # type: ignore[misc]
        for i, channel in enumerate(d):
            if isinstance(channel, int):
                out[i] = channel
            else:
                rgb = np.array(Image.open(root / "images" / channel))
                out[i] = rgb[:, :, 0].astype(np.int64) + rgb[:, :, 1].astype(np.int64) * 256
        planes.append(out)
    return scalars, (np.concatenate(planes) if planes else None)


def ndl_primary_categories(root: Path, categories: tuple[str, ...], n_labels: int) -> np.ndarray:
    """``primary_categories_per_index``: per label, the category (index into ``categories``) of
    largest coverage in c_<category>.csv, ``max((coverage, index))`` so ties go to the later."""
    coverage: dict[str, dict[int, float]] = {}
    for cat in categories:
        with open(root / f"c_{cat}.csv") as f:
            coverage[cat] = {int(r["number"]): float(r["coverage"]) for r in csv.DictReader(f)}
    return np.array([max((coverage[c].get(i, 0.0), ic) for ic, c in enumerate(categories))[1]
                     for i in range(n_labels)])


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def la224(tmp_path_factory: pytest.TempPathFactory) -> BrodenLookalike:
    """broden1_224's sizes: 224 px images, 112 px masks."""
    return write_broden_lookalike(tmp_path_factory.mktemp("b") / "broden1_224", n_images=40,
                                  image_size=224, seed=1)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A small look-alike to break (32 px images, 16 px masks)."""
    return Path(write_broden_lookalike(tmp_path / "small", n_images=12, image_size=32, seed=2).root)


def _cells(root: Path) -> list[dict[str, str]]:
    with open(root / "index.csv") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the layout


def test_index_header_file_names_and_sizes(la224: BrodenLookalike) -> None:
    root = Path(la224.root)
    assert (root / "index.csv").read_text().splitlines()[0] == \
        "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture"
    assert (*NDL_META, *BRODEN_CATEGORIES) == INDEX_HEADER
    ds = open_broden(root)
    assert ds.categories == BRODEN_CATEGORIES
    assert len(ds) == la224.n_images == len(_cells(root))
    for i, cells in enumerate(_cells(root)):
        assert ds.image_path(i) == str(root / "images" / cells["image"])
        assert ds.split_of(i) == cells["split"]
        assert re.fullmatch(r"(ade20k/ADE_train_\d{8}|pascal/2008_\d{6}|opensurfaces/\d+|"
                            r"dtd/[a-z-]+_\d{4})\.jpg", cells["image"])
        stem = cells["image"][:-4]
        for cat in ("color", "object", "material"):
            assert cells[cat] in ("", f"{stem}_{cat}.png")
        parts = cells["part"].split(";") if cells["part"] else []
        assert parts == [f"{stem}_part_{k}.png" for k in range(1, len(parts) + 1)]
        s = ds.sample(i)
        assert (s.size, s.mask_size) == ((224, 224), (112, 112))
        for _, m in s.pixel_labels:
            assert m.shape == (112, 112) and m.dtype == np.int32
    assert set(ds.splits) == {"train", "val"}
    assert len(open_broden(root, split="val")) == sum(c["split"] == "val" for c in _cells(root))


def test_227_images_have_113_px_masks(tmp_path: Path) -> None:
    info = write_broden_lookalike(tmp_path / "broden1_227", n_images=6, image_size=227, seed=3)
    ds = open_broden(info.root)
    for i in range(len(ds)):
        s = ds.sample(i)
        assert (s.size, s.mask_size) == ((227, 227), (113, 113))
        assert Image.open(s.image).size == (227, 227)
        assert all(m.shape == (113, 113) for _, m in s.pixel_labels)


def test_label_names_numbers_and_categories(la224: BrodenLookalike) -> None:
    root = Path(la224.root)
    with open(root / "label.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["number", "name", "category", "frequency", "coverage", "syns"]
    numbers = [int(r["number"]) for r in rows]
    assert 0 not in numbers  # Broden's label.csv has no row 0
    assert max(numbers) > 255 and numbers != list(range(1, len(numbers) + 1))  # sparse, uses G
    ds = open_broden(root)
    assert [c.number for c in ds.concepts] == numbers
    assert ds.n_labels == max(numbers) + 1
    for r in rows:
        c = ds.concept(int(r["number"]))
        assert c.name == r["name"]
        listed = [e.split("(")[0] for e in r["category"].split(";")]
        assert c.category in listed
    assert ds.concept(la224.number("pot, flowerpot")).name == "pot, flowerpot"  # quoted in CSV
    multi = [r for r in rows if ";" in r["category"]]
    assert {r["name"] for r in multi} >= {"wheel", "fabric"}


def test_primary_category_is_netdissect_lites(la224: BrodenLookalike) -> None:
    root = Path(la224.root)
    wheel = la224.number("wheel")
    counts = next(lab.counts for lab in la224.labels if lab.number == wheel)
    assert max(counts, key=counts.__getitem__) == "part"  # more images list wheel as a part
    for cats in (BRODEN_CATEGORIES, NDL_DEFAULT_CATEGORIES):
        ds = open_broden(root, categories=cats)
        ref = ndl_primary_categories(root, ds.categories, ds.n_labels)
        got = ds.label_categories()
        for c in ds.concepts:
            assert got[c.number] == ref[c.number], (c, cats)
            assert c.category == ds.categories[got[c.number]]
        assert ds.concept(wheel).category == "object"  # ... but covers more pixels as an object
    # without material, fabric (material mostly) is scored as the object it also is, as in NDL
    ds = open_broden(root, categories=NDL_DEFAULT_CATEGORIES)
    assert ds.concept(la224.number("fabric")).category == "object"
    assert ds.concept(la224.number("hair")).category == "part"
    assert open_broden(root).concept(la224.number("fabric")).category == "material"


# ---------------------------------------------------- pixel and image labels, against NDL


def test_pixel_label_sets_equal_netdissect_lites(la224: BrodenLookalike) -> None:
    root = Path(la224.root)
    for cats in (BRODEN_CATEGORIES, ("part", "texture")):
        ds = open_broden(root, categories=cats)
        ndl = ndl_index(root, ds.categories)
        assert [ds.image_path(i) for i in range(len(ds))] == \
            [str(root / "images" / str(r["image"])) for r in ndl]
        for i, row in enumerate(ndl):
            scalars, planes = ndl_label_sets(root, row, ds.categories)
            s = ds.sample(i)
            ref = set(scalars)
            if planes is not None:
                ref.update(int(v) for v in np.unique(planes))
            ref.discard(0)
            assert s.labels() == ref
            for n in ref:
                want = np.zeros(s.mask_size, dtype=bool) if planes is None else (planes == n).any(0)
                if n in scalars:
                    want[:] = True
                np.testing.assert_array_equal(s.mask(n), want, err_msg=f"{row['image']} label {n}")


def test_multi_entry_cells(la224: BrodenLookalike) -> None:
    root = Path(la224.root)
    ds = open_broden(root)
    cells = _cells(root)
    overlap = duplicate = two_textures = False
    for i, c in enumerate(cells):
        s = ds.sample(i)
        files = c["part"].split(";") if c["part"] else []
        parts = [m for cat, m in s.pixel_labels if cat == "part"]
        assert len(parts) == len(files)
        for m, f in zip(parts, files, strict=True):  # each plane decoded as R + 256 G
            rgb = np.asarray(Image.open(root / "images" / f)).astype(np.int32)
            np.testing.assert_array_equal(m, rgb[..., 0] + 256 * rgb[..., 1])
        if len(parts) >= 2:
            stack = np.stack(parts)
            labelled = (stack > 0).sum(0)
            overlap |= bool((labelled >= 2).any())
            every = np.stack([m for _, m in s.pixel_labels])
            for n in np.unique(stack[stack > 0]):
                duplicate |= bool(((stack == n).sum(0) >= 2).any())
                np.testing.assert_array_equal(s.mask(int(n)), (every == n).any(0))  # the union
        textures = [int(t) for t in c["texture"].split(";")] if c["texture"] else []
        assert [n for cat, n in s.image_labels if cat == "texture"] == textures
        two_textures |= len(textures) == 2
    assert overlap and duplicate and two_textures  # the look-alike exercises all three


def test_image_level_categories(la224: BrodenLookalike) -> None:
    root = Path(la224.root)
    ds = open_broden(root)
    scenes = 0
    for i, c in enumerate(_cells(root)):
        s = ds.sample(i)
        assert [cat for cat, _ in s.pixel_labels if cat in ("scene", "texture")] == []
        want = [("scene", int(c["scene"]))] if c["scene"] else []
        want += [("texture", int(t)) for t in c["texture"].split(";") if t]
        assert list(s.image_labels) == want
        for _, n in want:
            assert s.mask(n).all() and s.mask(n).shape == (112, 112)
        scenes += bool(c["scene"])
    assert scenes > 0
    only = open_broden(root, categories=["scene", "texture"])
    assert len(only) == sum(bool(c["scene"] or c["texture"]) for c in _cells(root))


# ----------------------------------------------------------------------------- bad files


def _row_of(root: Path, pred) -> tuple[int, int, dict[str, str]]:  # type: ignore[no-untyped-def]
    """(data set index, index.csv line, cells) of the first row matching ``pred``."""
    for i, c in enumerate(_cells(root)):
        if pred(c):
            return i, i + 2, c
    raise AssertionError("no such row")


def test_missing_and_bad_masks_are_named(small: Path) -> None:
    i, line, c = _row_of(small, lambda c: c["object"])
    mask = small / "images" / c["object"]
    mask.unlink()
    with pytest.raises(ConceptError, match=rf"{re.escape(str(mask))} \(index.csv row {line}\): mask file not found"):
        open_broden(small).sample(i)
    mask.write_bytes(b"not a png")
    with pytest.raises(ConceptError, match=rf"{re.escape(str(mask))}.*cannot decode"):
        open_broden(small).sample(i)
    Image.new("RGB", (15, 16)).save(mask, format="PNG")
    with pytest.raises(ConceptError, match=r"mask is 16x15 \(h x w\), index.csv says sh x sw = 16x16"):
        open_broden(small).sample(i)
    Image.new("L", (16, 16)).save(mask, format="PNG")
    with pytest.raises(ConceptError, match="must be RGB PNGs"):
        open_broden(small).sample(i)
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[0, 0] = (0, 200, 0)  # label 51200
    Image.fromarray(rgb, "RGB").save(mask, format="PNG")
    with pytest.raises(ConceptError, match=r"label number\(s\) \[51200\] are not in label.csv"):
        open_broden(small).sample(i)


def test_missing_image_and_second_part_plane(small: Path) -> None:
    i, line, c = _row_of(small, lambda c: c["part"].count(";") >= 1)
    plane = small / "images" / c["part"].split(";")[1]
    plane.unlink()
    with pytest.raises(ConceptError, match=rf"{re.escape(str(plane))} \(index.csv row {line}\)"):
        open_broden(small).sample(i)
    image = small / "images" / c["image"]
    image.unlink()
    with pytest.raises(ConceptError, match=rf"{re.escape(str(image))} \(index.csv row {line}\): image file not found"):
        open_broden(small).sample(i)


def test_bad_csv_files_are_named(small: Path) -> None:
    index = small / "index.csv"
    good = index.read_text()
    lines = good.splitlines(keepends=True)
    index.write_text("".join(lines[:3]) + lines[3].rstrip("\n") + ",extra\n" + "".join(lines[4:]))
    with pytest.raises(ConceptError, match=r"index.csv, row 4: 12 columns expected, found 13"):
        open_broden(small)
    index.write_text("".join(lines[:2]) + lines[2].replace(",train,", ",train,x", 1)
                     .replace(",val,", ",val,x", 1) + "".join(lines[3:]))
    with pytest.raises(ConceptError, match=r"index.csv, row 3: ih, iw, sh, sw must be integers"):
        open_broden(small)
    row = lines[1].rstrip("\n").split(",")
    row[-2] = "99999"  # a scene number label.csv does not have
    index.write_text(lines[0] + ",".join(row) + "\n" + "".join(lines[2:]))
    with pytest.raises(ConceptError, match=r"index.csv, row 2: scene label number 99999 is not in label.csv"):
        open_broden(small)
    index.write_text(lines[0].replace("material", "object") + "".join(lines[1:]))
    with pytest.raises(ConceptError, match=r"index.csv: header repeats column\(s\) object"):
        open_broden(small)
    index.write_text(good)
    cobj = small / "c_object.csv"
    clines = cobj.read_text().splitlines(keepends=True)
    cobj.write_text(clines[0] + clines[1].rsplit(",", 1)[0] + ",lots\n" + "".join(clines[2:]))
    with pytest.raises(ConceptError, match=rf"{re.escape(str(cobj))}, row 2: number must be an integer"):
        open_broden(small)
    (small / "label.csv").unlink()
    with pytest.raises(ConceptError, match=r"label.csv: file not found"):
        open_broden(small)


def test_without_c_files_label_csv_counts_decide(small: Path) -> None:
    for cat in BRODEN_CATEGORIES:
        os.remove(small / f"c_{cat}.csv")
    ds = open_broden(small)
    with open(small / "label.csv") as f:
        first = {int(r["number"]): r["category"].split("(")[0] for r in csv.DictReader(f)}
    assert {c.number: c.category for c in ds.concepts} == first  # listed by descending count


# ------------------------------------------------------------------ dissection end to end


COLOUR_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, kernel_size=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))
"""


def test_dissection_finds_the_red_unit_on_the_lookalike(tmp_path: Path) -> None:
    """A "redness" unit (R - 0.8 G - 1.1 B, few ties) dissected over a look-alike (64 px images, 32 px masks,
    every category, multi-plane parts): its label is red-c, in the colour category."""
    from engine.backends import open_backend
    from engine.dissection import DissectionParams, dissect
    from engine.models import build_spec, load_model

    info = write_broden_lookalike(tmp_path / "b", n_images=40, image_size=64, seed=4)
    concepts: ConceptDataset = open_broden(info.root)
    (tmp_path / "net.py").write_text(COLOUR_NET)
    torch.save({"conv.weight": torch.tensor([[1.0, -0.8, -1.1]])[:, :, None, None],
                "conv.bias": torch.zeros(1)}, tmp_path / "net.pt")
    spec = build_spec(str(tmp_path / "net.pt"), arch=f"{tmp_path / 'net.py'}:Net", input_size="64",
                      mean="0,0,0", std="1,1,1")
    loaded = load_model(spec)
    backend = open_backend(loaded, device="cpu")
    result = run_sync(dissect(backend, loaded.cache_id, concepts, ["act"],
                              DissectionParams(quantile=0.03), cache=Cache(tmp_path / "c")))
    s = result.layers["act"].summary
    assert result.n_images == len(concepts) == 40
    assert (s.label_name[0], s.category_name[0]) == ("red-c", "color")
    assert s.iou[0] > 0.2
    assert result.concept_categories[info.number("wheel")] == "object"
    shutil.rmtree(tmp_path / "c")
