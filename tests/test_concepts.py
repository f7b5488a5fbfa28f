"""Concept data sets: the Broden-layout reader and the built-in synthetic generator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.concepts import ConceptError, generate_concepts, open_broden
from engine.concepts.broden import parse_label_categories, primary_category
from engine.concepts.generate import COLOR_JITTER, COLORS, OBJECTS, TEXTURES
from engine.jobs import run_sync

# ---------------------------------------------------------------- a hand-written Broden folder

LABEL_CSV = """number,name,category,frequency,coverage,syns
0,-,,0,0.0,
1,red,color(2),2,0.5,red
2,person,object(3),1,0.2,person;human
300,wheel,object(5);part(9),1,0.1,wheel
301,door,part(4);object(4),1,0.1,door
400,beach,scene(2),2,2.0,beach
401,striped,texture(1),1,1.0,striped
"""


def _mask(path: Path, labels: np.ndarray) -> None:
    """Write a Broden mask PNG: label = R + 256 * G."""
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb, "RGB").save(path)


A_COLOR = np.array([[1, 1, 0], [0, 1, 0]])
A_OBJ1 = np.array([[2, 0, 0], [2, 2, 0]])
A_OBJ2 = np.array([[0, 300, 300], [0, 0, 300]])
A_PART = np.array([[301, 0, 0], [0, 0, 0]])
B_OBJ = np.array([[0, 0], [2, 2], [2, 0]])


@pytest.fixture
def broden(tmp_path: Path) -> Path:
    root = tmp_path / "broden"
    (root / "images" / "sub").mkdir(parents=True)
    Image.new("RGB", (6, 4), "red").save(root / "images" / "sub" / "a.jpg")  # ih=4, iw=6
    Image.new("RGB", (4, 6), "blue").save(root / "images" / "b.jpg")  # ih=6, iw=4
    Image.new("RGB", (4, 4), "green").save(root / "images" / "c.jpg")
    _mask(root / "images" / "sub" / "a_color.png", A_COLOR)
    _mask(root / "images" / "sub" / "a_obj1.png", A_OBJ1)
    _mask(root / "images" / "sub" / "a_obj2.png", A_OBJ2)
    _mask(root / "images" / "sub" / "a_part.png", A_PART)
    _mask(root / "images" / "b_obj.png", B_OBJ)
    (root / "label.csv").write_text(LABEL_CSV)
    (root / "category.csv").write_text(
        "name,first,last,count,frequency\ncolor,1,1,1,1\nobject,2,300,2,2\n"
        "part,300,301,2,1\nscene,400,400,1,2\ntexture,401,401,1,1\n"
    )
    (root / "index.csv").write_text(
        "image,split,ih,iw,sh,sw,color,object,part,scene,texture\n"
        "sub/a.jpg,train,4,6,2,3,sub/a_color.png,sub/a_obj1.png;sub/a_obj2.png,sub/a_part.png,400,\n"
        "b.jpg,val,6,4,3,2,,b_obj.png,,400,401\n"
        "c.jpg,train,4,4,2,2,,,,,\n"
    )
    return root


def test_reads_exact_label_maps_and_image_labels(broden: Path) -> None:
    ds = open_broden(broden)
    assert ds.root == str(broden)
    assert ds.categories == ("color", "object", "part", "scene", "texture")
    assert len(ds) == 2  # c.jpg has no label at all and is left out, as in NetDissect
    assert ds.image_path(0) == str(broden / "images" / "sub" / "a.jpg")

    a = ds.sample(0)
    assert a.image == str(broden / "images" / "sub" / "a.jpg")
    assert (a.size, a.mask_size) == ((4, 6), (2, 3))
    assert [cat for cat, _ in a.pixel_labels] == ["color", "object", "object", "part"]
    for (_, got), want in zip(a.pixel_labels, [A_COLOR, A_OBJ1, A_OBJ2, A_PART], strict=True):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    assert a.image_labels == (("scene", 400),)
    assert a.categories == {"color", "object", "part", "scene"}

    b = ds.sample(1)
    assert (b.size, b.mask_size) == ((6, 4), (3, 2))
    assert len(b.pixel_labels) == 1
    np.testing.assert_array_equal(b.pixel_labels[0][1], B_OBJ)
    assert b.image_labels == (("scene", 400), ("texture", 401))
    assert b.categories == {"object", "scene", "texture"}


def test_concepts_and_primary_categories(broden: Path) -> None:
    ds = open_broden(broden)
    assert [c.number for c in ds.concepts] == [1, 2, 300, 301, 400, 401]
    assert ds.concept(2).name == "person"
    assert ds.concept(300).category == "part"  # object(5);part(9): the larger count wins
    assert ds.concept(301).category == "part"  # part(4);object(4): a tie goes to the first
    assert ds.n_labels == 402
    cats = ds.label_categories()
    assert cats.shape == (402,)
    assert cats[[0, 1, 2, 300, 301, 400, 401, 5]].tolist() == [-1, 0, 1, 2, 2, 3, 4, -1]

    assert parse_label_categories("object(5);part(9)") == {"object": 5, "part": 9}
    assert primary_category({"object": 5, "part": 9}) == "part"
    assert primary_category({"object": 4, "part": 4}) == "object"
    with pytest.raises(ValueError):
        parse_label_categories("object5")


def test_split_categories_and_limit(broden: Path) -> None:
    assert len(open_broden(broden, split="val")) == 1
    assert open_broden(broden).split("val").sample(0).image.endswith("b.jpg")
    assert open_broden(broden).splits == ("train", "val")
    assert len(open_broden(broden, limit=1)) == 1

    ds = open_broden(broden, categories=["color"])
    assert ds.categories == ("color",)
    assert len(ds) == 1  # only a.jpg has a colour label
    assert [c.number for c in ds.concepts] == [1]
    s = ds.sample(0)
    assert [cat for cat, _ in s.pixel_labels] == ["color"] and s.image_labels == ()

    ds = open_broden(broden, categories=["object"])
    assert [c.number for c in ds.concepts] == [2, 300, 301]
    assert ds.label_categories()[[2, 300]].tolist() == [0, -1]  # 300's primary is part

    with pytest.raises(ConceptError, match="index.csv.*material"):
        open_broden(broden, categories=["material"])


def test_fingerprint_follows_files(broden: Path) -> None:
    fp = open_broden(broden).fingerprint()
    assert len(fp) == 64 and fp == open_broden(broden).fingerprint()
    assert open_broden(broden, split="val").fingerprint() != fp
    _mask(broden / "images" / "b_obj.png", np.zeros((3, 2), dtype=np.int64))
    os.utime(broden / "images" / "b_obj.png", ns=(1, 1))
    assert open_broden(broden).fingerprint() != fp


def test_missing_index(broden: Path) -> None:
    (broden / "index.csv").unlink()
    with pytest.raises(ConceptError, match=r"index\.csv.*not found"):
        open_broden(broden)


def test_bad_header(broden: Path) -> None:
    (broden / "index.csv").write_text("image,ih,iw,color\nx.jpg,1,1,\n")
    with pytest.raises(ConceptError, match=r"index\.csv.*split"):
        open_broden(broden)


def test_missing_mask(broden: Path) -> None:
    (broden / "images" / "sub" / "a_obj2.png").unlink()
    ds = open_broden(broden)  # masks are read lazily
    with pytest.raises(
        ConceptError, match=r"a_obj2\.png \(index\.csv row 2\): mask file not found"
    ):
        ds.sample(0)


def test_corrupt_mask(broden: Path) -> None:
    (broden / "images" / "b_obj.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConceptError, match=r"b_obj\.png.*cannot decode"):
        open_broden(broden).sample(1)


def test_mask_of_wrong_size(broden: Path) -> None:
    _mask(broden / "images" / "b_obj.png", np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ConceptError, match=r"b_obj\.png.*2x3.*3x2"):
        open_broden(broden).sample(1)


def test_unknown_label_in_mask(broden: Path) -> None:
    _mask(broden / "images" / "b_obj.png", np.full((3, 2), 777))
    with pytest.raises(ConceptError, match=r"b_obj\.png.*\[777\].*label\.csv"):
        open_broden(broden).sample(1)


def test_unknown_image_level_label(broden: Path) -> None:
    text = (broden / "index.csv").read_text().replace(",400,401", ",400,402")
    (broden / "index.csv").write_text(text)
    with pytest.raises(ConceptError, match=r"index\.csv, row 3: texture label number 402"):
        open_broden(broden)


def test_bad_label_csv(broden: Path) -> None:
    (broden / "label.csv").write_text(LABEL_CSV.replace("color(2)", "color"))
    with pytest.raises(ConceptError, match=r"label\.csv, row 3"):
        open_broden(broden)


# ---------------------------------------------------------------- the built-in generator

N, SIZE = 30, 64


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "set"
    progress = []
    ds = run_sync(generate_concepts(out, n_images=N, image_size=SIZE, seed=3), progress.append)
    assert len(ds) == N and len(progress) >= N
    assert progress[-1].fraction is not None and progress[-1].fraction <= 1
    return out


def test_generated_set_round_trips(generated: Path) -> None:
    ds = open_broden(generated)
    assert ds.categories == ("color", "object", "texture")
    assert [c.name for c in ds.concepts] == list(COLORS) + list(OBJECTS) + list(TEXTURES)
    assert {c.category for c in ds.concepts[:11]} == {"color"}
    assert ds.splits == ("train", "val")
    for name in (
        "index.csv",
        "label.csv",
        "category.csv",
        "c_color.csv",
        "c_object.csv",
        "c_texture.csv",
    ):
        assert (generated / name).is_file()

    seen: dict[str, set[int]] = {"color": set(), "object": set(), "texture": set()}
    for i in range(len(ds)):
        s = ds.sample(i)
        assert s.size == s.mask_size == (SIZE, SIZE)
        assert [cat for cat, _ in s.pixel_labels] == ["color", "object"]
        assert all(cat == "texture" for cat, _ in s.image_labels)  # textures are image-level
        rgb = np.asarray(Image.open(s.image).convert("RGB")).astype(np.int16)
        color, objects = (m for _, m in s.pixel_labels)
        assert (color[objects > 0] > 0).all()  # every object pixel has its colour label
        for n in np.unique(color[color > 0]):  # ... and that colour, within the jitter
            base = np.array(COLORS[ds.concept(int(n)).name], dtype=np.int16)
            assert (np.abs(rgb[color == n] - base) <= COLOR_JITTER).all()
        if not s.image_labels:
            assert (color > 0).all()  # flat backgrounds: every pixel carries a colour
        seen["color"].update(np.unique(color).tolist())
        seen["object"].update(np.unique(objects).tolist())
        seen["texture"].update(n for _, n in s.image_labels)
    for cat, numbers in seen.items():
        assert {c.number for c in ds.concepts if c.category == cat} <= numbers, cat


def test_photo_texture_pixels_have_no_colour(generated: Path) -> None:
    ds = open_broden(generated)
    gravel = next(c.number for c in ds.concepts if c.name == "gravel")
    i = next(i for i in range(len(ds)) if ds.sample(i).image_labels == (("texture", gravel),))
    color, objects = (m for _, m in ds.sample(i).pixel_labels)
    assert ((color == 0) == (objects == 0)).all()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_deterministic_for_a_seed(generated: Path, tmp_path: Path) -> None:
    run_sync(generate_concepts(tmp_path / "again", n_images=N, image_size=SIZE, seed=3))
    assert _tree(tmp_path / "again") == _tree(generated)
    run_sync(generate_concepts(tmp_path / "other", n_images=N, image_size=SIZE, seed=4))
    assert (
        _tree(tmp_path / "other")["images/synthetic/00000.png"]
        != _tree(generated)["images/synthetic/00000.png"]
    )


def test_half_resolution_masks(generated: Path, tmp_path: Path) -> None:
    half = run_sync(
        generate_concepts(tmp_path / "half", n_images=4, image_size=SIZE, mask_scale=2, seed=3)
    )
    full = open_broden(generated)
    for i in range(4):
        h, f = half.sample(i), full.sample(i)
        assert h.size == (SIZE, SIZE) and h.mask_size == (SIZE // 2, SIZE // 2)
        for (_, hm), (_, fm) in zip(h.pixel_labels, f.pixel_labels, strict=True):
            np.testing.assert_array_equal(hm, fm[::2, ::2])


def test_cancel_leaves_nothing(tmp_path: Path) -> None:
    job = generate_concepts(tmp_path / "set", n_images=50, image_size=32)
    for _ in range(10):
        next(job)
    assert any(p.name.startswith(".set.tmp-") for p in tmp_path.iterdir())  # work in progress
    job.close()
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "keep.txt").write_text("mine")
    with pytest.raises(ConceptError, match="not an empty folder"):
        run_sync(generate_concepts(tmp_path / "set", n_images=2, image_size=32))
    assert (tmp_path / "set" / "keep.txt").read_text() == "mine"
    (tmp_path / "set" / "keep.txt").unlink()
    assert len(run_sync(generate_concepts(tmp_path / "set", n_images=2, image_size=32))) == 2
