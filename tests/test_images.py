"""Tests for engine.data.images, on real files written with PIL in tmp_path."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import (
    Batch,
    ImageError,
    ImageLoader,
    ImageSet,
    load_image,
    open_image_set,
    preprocess,
)
from engine.types import ImageRecord, Preprocess

skimage_data = pytest.importorskip("skimage.data")

PLAIN = Preprocess(input_size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))



@pytest.fixture
def engine_log():
    """Records the engine logs under ``convlens`` (WARNING and up), captured by a handler of its
    own: unaffected by filters a CLI run put on the root logger's handlers."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("convlens")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)

def save_rgb(
    path: Path, color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 8)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_png16(path: Path, arr: np.ndarray) -> None:
    """Write a 16-bit-per-channel RGB or RGBA PNG by hand (PIL cannot write one)."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("convlens-data")]


def wait_no_loader_threads(timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while loader_threads() and time.monotonic() < end:
        time.sleep(0.02)
    return not loader_threads()


# --------------------------------------------------------------------------------------------
# open_image_set: folders
# --------------------------------------------------------------------------------------------


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    save_rgb(tmp_path / "dog" / "b.png")
    save_rgb(tmp_path / "dog" / "a.jpg")
    save_rgb(tmp_path / "cat" / "nested" / "deep" / "x.PNG")
    save_rgb(tmp_path / "cat" / "z.bmp")
    save_rgb(tmp_path / "root.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "cat" / "readme.md").write_text("hello")
    save_rgb(tmp_path / ".hidden.png")
    save_rgb(tmp_path / ".cache" / "thumb.png")
    save_rgb(tmp_path / "dog" / ".DS_Store.png")

    s = open_image_set(tmp_path)
    assert s.source == str(tmp_path.resolve())
    rel = [(s.relative_path(r), r.label) for r in s.records]
    assert rel == [
        ("root.png", None),
        ("cat/nested/deep/x.PNG", "cat"),
        ("cat/z.bmp", "cat"),
        ("dog/a.jpg", "dog"),
        ("dog/b.png", "dog"),
    ]
    assert all(os.path.isabs(r.path) for r in s.records)
    assert s.labels == ("cat", "dog")
    assert s.has_labels
    assert len(s) == 5
    assert s.ignored == ("cat/readme.md", "notes.txt")


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for name in ("c.png", "a.png", "b.tif"):
        save_rgb(tmp_path / name)
    s = open_image_set(str(tmp_path))
    assert [Path(r.path).name for r in s.records] == ["a.png", "b.tif", "c.png"]
    assert all(r.label is None for r in s.records)
    assert s.labels == ()
    assert not s.has_labels


def test_empty_folder_missing_path_and_no_images_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="empty") as err:
        open_image_set(empty)
    assert str(empty) in str(err.value)

    missing = tmp_path / "nope"
    with pytest.raises(ImageError, match="no such") as err:
        open_image_set(missing)
    assert str(missing) in str(err.value)

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    (texts / ".hidden.png").write_text("x")
    with pytest.raises(ImageError, match="no image files") as err:
        open_image_set(texts)
    assert str(texts) in str(err.value)

    other = tmp_path / "list.json"
    other.write_text("[]")
    with pytest.raises(ImageError, match=r"not a folder or a \.csv") as err:
        open_image_set(other)
    assert str(other) in str(err.value)


# --------------------------------------------------------------------------------------------
# open_image_set: CSV files
# --------------------------------------------------------------------------------------------


def test_csv_with_header_relative_paths_and_missing_rows(tmp_path: Path, engine_log) -> None:
    save_rgb(tmp_path / "imgs" / "one.png")
    save_rgb(tmp_path / "imgs" / "two.png")
    outside = save_rgb(tmp_path / "elsewhere" / "three.png")
    csv_dir = tmp_path / "lists"
    csv_dir.mkdir()
    csv_path = csv_dir / "set.csv"
    csv_path.write_text(
        "\ufeffClass, Filename ,extra\n"
        "zebra,../imgs/two.png,1\n"
        ",../imgs/one.png,2\n"
        f"horse,{outside},3\n"
        "lion,../imgs/ghost.png,4\n"
        "\n"
        "zebra,../imgs/two.png,5\n",
        encoding="utf-8",
    )
    s = open_image_set(csv_path)
    assert s.source == str(csv_path.resolve())
    assert s.records == (
        ImageRecord(str(tmp_path / "imgs" / "two.png"), "zebra"),
        ImageRecord(str(tmp_path / "imgs" / "one.png"), None),
        ImageRecord(str(outside), "horse"),
    )
    assert s.labels == ("horse", "zebra")
    assert s.relative_path(s.records[0]) == "../imgs/two.png"
    assert s.missing == ((str(tmp_path / "imgs" / "ghost.png"), "does not exist"),)
    messages = [r.getMessage() for r in engine_log]
    assert any(str(csv_path) in m and "row 5" in m and "ghost.png" in m for m in messages)
    assert any("row 7" in m and "repeats" in m for m in messages)


def test_csv_without_header(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "sub" / "b.png")
    (tmp_path / "two_cols.csv").write_text("a.png,cat\nsub/b.png,\n")
    s = open_image_set(tmp_path / "two_cols.csv")
    assert [(Path(r.path).name, r.label) for r in s.records] == [("a.png", "cat"), ("b.png", None)]

    (tmp_path / "one_col.csv").write_text("sub/b.png\na.png\n")
    s = open_image_set(tmp_path / "one_col.csv")
    assert [(Path(r.path).name, r.label) for r in s.records] == [("b.png", None), ("a.png", None)]
    assert not s.has_labels


def test_csv_errors_name_the_csv(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("id,label\n1,cat\n")
    with pytest.raises(ImageError, match="no path column") as err:
        open_image_set(bad_header)
    assert str(bad_header) in str(err.value)

    none_exist = tmp_path / "ghosts.csv"
    none_exist.write_text("path\nx.png\ny.png\n")
    with pytest.raises(ImageError, match="no existing image") as err:
        open_image_set(none_exist)
    assert str(none_exist) in str(err.value)

    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ImageError, match="cannot read the CSV") as err:
        open_image_set(binary)
    assert str(binary) in str(err.value)

    missing = tmp_path / "missing.csv"
    with pytest.raises(ImageError) as err:
        open_image_set(missing)
    assert str(missing) in str(err.value)


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------


def test_fingerprint_tracks_content_changes(tmp_path: Path) -> None:
    a = save_rgb(tmp_path / "cat" / "a.png")
    save_rgb(tmp_path / "dog" / "b.png")
    fp = open_image_set(tmp_path).fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert open_image_set(tmp_path).fingerprint() == fp  # stable

    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = open_image_set(tmp_path).fingerprint()
    assert touched != fp

    extra = save_rgb(tmp_path / "dog" / "c.png")
    added = open_image_set(tmp_path).fingerprint()
    assert added != touched
    extra.unlink()
    assert open_image_set(tmp_path).fingerprint() == touched  # removed again


def test_fingerprint_changes_on_relabel(tmp_path: Path) -> None:
    save_rgb(tmp_path / "a.png")
    csv_path = tmp_path / "set.csv"
    csv_path.write_text("path,label\na.png,cat\n")
    s = open_image_set(csv_path)
    csv_path.write_text("path,label\na.png,dog\n")
    relabelled = open_image_set(csv_path)
    assert s.fingerprint() != relabelled.fingerprint()
    assert s.fingerprint() == ImageSet(s.source, s.records).fingerprint()


# --------------------------------------------------------------------------------------------
# load_image: mode conversions
# --------------------------------------------------------------------------------------------


def test_rgb_roundtrip_with_skimage_astronaut(tmp_path: Path) -> None:
    astro = skimage_data.astronaut()
    Image.fromarray(astro).save(tmp_path / "astro.png")
    img = load_image(tmp_path / "astro.png")
    assert img.dtype == np.uint8 and img.shape == (512, 512, 3)
    np.testing.assert_array_equal(img, astro)


@pytest.mark.parametrize(
    ("mode", "value", "suffix", "expected"),
    [
        ("L", 77, ".png", (77, 77, 77)),
        ("1", 1, ".png", (255, 255, 255)),
        ("1", 0, ".bmp", (0, 0, 0)),
        ("LA", (90, 0), ".png", (90, 90, 90)),
        ("RGBA", (10, 20, 30, 0), ".png", (10, 20, 30)),
        ("RGBA", (10, 20, 30, 128), ".webp", (10, 20, 30)),
        ("I;16", 1000, ".png", (4, 4, 4)),  # 1000 / 257 = 3.89
        ("I;16", 65535, ".tif", (255, 255, 255)),
        ("I;16B", 128 * 257, ".tif", (128, 128, 128)),
        ("I", 70000, ".tif", (255, 255, 255)),  # clipped to 65535 first
        ("I", -5, ".tif", (0, 0, 0)),
        ("I", 2570, ".tif", (10, 10, 10)),
        ("F", 0.5, ".tif", (128, 128, 128)),  # max <= 1: [0, 1] range
        ("F", 1.0, ".tif", (255, 255, 255)),
        ("CMYK", (0, 255, 0, 0), ".tif", (255, 0, 255)),
        ("CMYK", (0, 0, 0, 0), ".jpg", (255, 255, 255)),
        ("YCbCr", (100, 128, 128), ".tif", (100, 100, 100)),
    ],
)
def test_mode_conversions(
    tmp_path: Path, mode: str, value: object, suffix: str, expected: tuple[int, int, int]
) -> None:
    path = tmp_path / f"img{suffix}"
    Image.new(mode, (6, 5), value).save(path)
    with Image.open(path) as check:
        assert check.mode == mode or suffix in (".jpg", ".webp")  # the file really holds that mode
    img = load_image(path)
    assert img.dtype == np.uint8 and img.shape == (5, 6, 3)
    assert tuple(int(v) for v in img[2, 3]) == pytest.approx(
        expected, abs=2 if suffix in (".jpg", ".webp") else 0
    )


def test_float_image_in_0_255_range_and_nan(tmp_path: Path) -> None:
    arr = np.array([[-3.0, 0.4, 100.6, 300.0, np.nan]] * 4, dtype=np.float32)
    Image.fromarray(arr, "F").save(tmp_path / "f.tif")
    img = load_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(img[0, :, 0], [0, 0, 101, 255, 0])


def test_lfw_float_faces_as_float_tiffs(tmp_path: Path) -> None:
    faces = skimage_data.lfw_subset()[:3]  # (3, 25, 25) float in [0, 1]
    for k, face in enumerate(faces):
        Image.fromarray(face.astype(np.float32), "F").save(tmp_path / f"face{k}.tif")
    for k, face in enumerate(faces):
        img = load_image(tmp_path / f"face{k}.tif")
        expected = np.rint(face.astype(np.float32).astype(np.float64) * 255).astype(np.uint8)
        np.testing.assert_array_equal(img[:, :, 1], expected)


def test_palette_image_uses_palette(tmp_path: Path) -> None:
    img = Image.new("P", (5, 5), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.info["transparency"] = 1  # palette transparency is ignored like alpha
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[3, 3]) == (200, 100, 50)


def test_16bit_rgb_png_is_reduced_sanely(tmp_path: Path) -> None:
    arr = np.zeros((4, 5, 3), np.uint16)
    arr[..., 0] = 65535
    arr[..., 1] = 32896  # 128 * 257
    arr[..., 2] = 2770  # 10.78 * 257
    write_png16(tmp_path / "rgb16.png", arr)
    img = load_image(tmp_path / "rgb16.png")
    assert img.dtype == np.uint8 and img.shape == (4, 5, 3)
    np.testing.assert_allclose(img[0, 0].astype(float), arr[0, 0] / 257, atol=1)

    rgba = np.concatenate([arr, np.zeros((4, 5, 1), np.uint16)], axis=2)
    write_png16(tmp_path / "rgba16.png", rgba)
    np.testing.assert_array_equal(load_image(tmp_path / "rgba16.png"), img)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.png", exif=exif)
    out = load_image(tmp_path / "rot.png")
    assert out.shape == (8, 4, 3)  # width and height swapped
    assert tuple(out[0, 3]) == (255, 0, 0)  # top-left corner went to the top-right


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert tuple(load_image(tmp_path / "anim.gif")[0, 0]) == (255, 0, 0)


# --------------------------------------------------------------------------------------------
# load_image: errors
# --------------------------------------------------------------------------------------------


def test_text_file_named_png_is_an_image_error(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_text("not an image at all")
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image(path)
    assert str(err.value).startswith(f"{path}: ")


def test_truncated_jpeg_is_an_error_not_padded(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(skimage_data.astronaut()).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image(cut)
    assert str(cut) in str(err.value)
    assert load_image(full).shape == (512, 512, 3)


@pytest.mark.parametrize("size", [(1, 1), (3, 20)])
def test_too_small_image(tmp_path: Path, size: tuple[int, int]) -> None:
    path = save_rgb(tmp_path / "tiny.png", size=size)
    with pytest.raises(ImageError) as err:
        load_image(path)
    w, h = size
    assert (
        str(err.value)
        == f"{path}: image is {w}x{h} px, too small to analyse (minimum 4 px per side)"
    )


def test_missing_file_and_decompression_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ImageError, match="not a readable image") as err:
        load_image(tmp_path / "ghost.png")
    assert str(tmp_path / "ghost.png") in str(err.value)

    path = save_rgb(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="(?i)decompression bomb"):
        load_image(path)


# --------------------------------------------------------------------------------------------
# preprocess
# --------------------------------------------------------------------------------------------


def tiny_image() -> np.ndarray:
    """4 rows x 2 columns: left column (0, 100, 40), right column (200, 100, 80)."""
    img = np.zeros((4, 2, 3), np.uint8)
    img[:, 0] = (0, 100, 40)
    img[:, 1] = (200, 100, 80)
    return img


def test_stretch_values_by_hand() -> None:
    spec = Preprocess(input_size=(4, 4), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = preprocess(tiny_image(), spec)
    assert x.dtype == np.float32 and x.shape == (3, 4, 4)
    # Bilinear 2 -> 4 columns: output centres at 0.25, 0.75, 1.25, 1.75 input px, edges clamped:
    # a, 0.75a + 0.25b, 0.25a + 0.75b, b.
    red = np.array([0, 50, 150, 200]) / 255
    blue = np.array([40, 50, 70, 80]) / 255
    for row in range(4):
        np.testing.assert_allclose(x[0, row], (red - 0.5) / 0.5, atol=1e-6)
        np.testing.assert_allclose(x[1, row], (100 / 255 - 0.25) / 0.25, atol=1e-6)
        np.testing.assert_allclose(x[2, row], blue / 2.0, atol=1e-6)


def test_stretch_shape_non_square_and_downscale() -> None:
    astro = skimage_data.astronaut()
    x = preprocess(astro, Preprocess(input_size=(60, 90)))
    assert x.shape == (3, 60, 90) and x.dtype == np.float32 and x.flags.c_contiguous
    y = preprocess(astro, Preprocess(input_size=(60, 90), mean=(0, 0, 0), std=(1, 1, 1)))
    assert y.min() >= 0.0 and y.max() <= 1.0


def test_bgr_reverses_channels_after_conversion() -> None:
    img = tiny_image()
    rgb = preprocess(img, Preprocess(input_size=(4, 4), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6)))
    bgr = preprocess(
        img,
        Preprocess(input_size=(4, 4), mean=(0.3, 0.2, 0.1), std=(0.6, 0.5, 0.4), channels="bgr"),
    )
    np.testing.assert_allclose(bgr, rgb[::-1], atol=1e-6)
    plain_bgr = preprocess(
        img, Preprocess(input_size=(4, 2), mean=(0, 0, 0), std=(1, 1, 1), channels="bgr")
    )
    np.testing.assert_allclose(plain_bgr[:, 0, 0], np.array([40, 100, 0]) / 255, atol=1e-6)


def test_grayscale_uses_itu601_luminance_and_first_mean_std() -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2] = (255, 0, 0)
    img[2:] = (0, 0, 255)
    x = preprocess(
        img, Preprocess(input_size=(4, 4), mean=(0.1, 0.9, 0.9), std=(0.5, 9, 9), grayscale=True)
    )
    assert x.shape == (1, 4, 4)
    # L = R * 299/1000 + G * 587/1000 + B * 114/1000, rounded: 76 for pure red, 29 for pure blue.
    np.testing.assert_allclose(x[0, 0], (76 / 255 - 0.1) / 0.5, atol=1e-6)
    np.testing.assert_allclose(x[0, 3], (29 / 255 - 0.1) / 0.5, atol=1e-6)


@pytest.mark.parametrize(
    "crop", [(0, 0, 512, 512), (0, 0, 300, 451), (30, 50, 481, 350), (0, 0, 250, 240)]
)
def test_shorter_side_crop_matches_torchvision(crop: tuple[int, int, int, int]) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    top, left, bottom, right = crop
    img = np.ascontiguousarray(skimage_data.astronaut()[top:bottom, left:right])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = preprocess(
        img, Preprocess(input_size=(224, 224), mean=mean, std=std, resize="shorter_side_crop")
    )
    ref = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )(Image.fromarray(img)).numpy()
    assert ours.shape == ref.shape == (3, 224, 224)
    diff = np.abs(
        (ours - ref) * np.array(std, np.float32)[:, None, None]
    )  # back in [0, 1] pixel units
    assert diff.max() <= 1 / 255 + 1e-6


def test_shorter_side_crop_non_square_target_and_small_image() -> None:
    img = np.ascontiguousarray(skimage_data.astronaut()[:100, :300])
    x = preprocess(
        img, Preprocess(input_size=(64, 48), resize="shorter_side_crop", crop_fraction=0.8)
    )
    assert x.shape == (3, 64, 48)
    tiny = preprocess(
        tiny_image(), Preprocess(input_size=(8, 8), resize="shorter_side_crop", crop_fraction=1.0)
    )
    assert tiny.shape == (3, 8, 8)


# --------------------------------------------------------------------------------------------
# ImageLoader
# --------------------------------------------------------------------------------------------


def make_loader_folder(tmp_path: Path) -> tuple[ImageSet, set[str]]:
    """10 good images (distinct colours) plus a fake PNG, a truncated JPEG and a 1x1 image."""
    root = tmp_path / "set"
    for k in range(10):
        save_rgb(root / f"img{k:02d}.png", color=(k * 20, 0, 0))
    (root / "img03b.png").write_text("text, not pixels")
    full = tmp_path / "full.jpg"
    Image.fromarray(skimage_data.astronaut()).save(full)
    (root / "img06b.jpg").write_bytes(full.read_bytes()[:3000])
    save_rgb(root / "img08b.png", size=(1, 1))
    bad = {str(root / n) for n in ("img03b.png", "img06b.jpg", "img08b.png")}
    return open_image_set(root), bad


def test_loader_covers_good_images_in_order_and_skips_bad(tmp_path: Path, engine_log) -> None:
    s, bad = make_loader_folder(tmp_path)
    assert len(s) == 13
    loader = ImageLoader(s, PLAIN, batch_size=3, workers=2, prefetch=1)
    assert len(loader) == 5
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    got = np.concatenate([b.indices for b in batches])
    assert got.dtype == np.int64
    good = [i for i, r in enumerate(s.records) if r.path not in bad]
    assert got.tolist() == good
    for b in batches:
        assert b.array.dtype == np.float32 and b.array.shape == (len(b), 3, 8, 8)
        for k, i in enumerate(b.indices):
            red = int(Path(s.records[i].path).stem[3:5]) * 20
            np.testing.assert_allclose(b.array[k, 0], red / 255, atol=1e-6)
    assert {p for p, _ in loader.skipped} == bad
    reasons = dict(loader.skipped)
    assert "too small" in reasons[str(tmp_path / "set" / "img08b.png")]
    for path in bad:
        assert any(path in r.getMessage() for r in engine_log if r.levelno == logging.WARNING)
    assert wait_no_loader_threads()


def test_loader_subset_indices_keep_given_order(tmp_path: Path) -> None:
    s, _ = make_loader_folder(tmp_path)
    order = [9, 0, 4, 5, 1]  # 4 is the fake PNG (img03b)
    with ImageLoader(s, PLAIN, batch_size=2, workers=2, indices=order) as loader:
        got = [i for b in loader for i in b.indices.tolist()]
    assert got == [9, 0, 5, 1]
    assert len(loader.skipped) == 1
    with pytest.raises(ValueError):
        ImageLoader(s, PLAIN, indices=[0, 13])


def test_loader_with_only_bad_images_yields_nothing(tmp_path: Path) -> None:
    s, bad = make_loader_folder(tmp_path)
    idx = [i for i, r in enumerate(s.records) if r.path in bad]
    loader = ImageLoader(s, PLAIN, batch_size=2, indices=idx)
    assert list(loader) == []
    assert len(loader.skipped) == 3


class CountingLoader(ImageLoader):
    """An ImageLoader that records how many images its workers started."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.started = 0
        self._count_lock = threading.Lock()

    def _load(self, i: int) -> np.ndarray:
        with self._count_lock:
            self.started += 1
        return super()._load(i)


def test_loader_prefetch_is_bounded_and_abandoning_stops_the_pool(tmp_path: Path) -> None:
    faces = skimage_data.lfw_subset()[:60]
    for k, face in enumerate(faces):
        label = "a" if k % 2 else "b"
        (tmp_path / "faces" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(face * 255).astype(np.uint8), "L").save(
            tmp_path / "faces" / label / f"{k:03d}.png"
        )
    s = open_image_set(tmp_path / "faces")
    assert s.labels == ("a", "b") and len(s) == 60

    loader = CountingLoader(s, PLAIN, batch_size=4, workers=2, prefetch=2)
    it = iter(loader)
    first = next(it)
    assert first.array.shape == (4, 3, 8, 8)
    time.sleep(0.2)
    assert loader.started <= 4 * 3  # the batch being assembled + 2 batches ahead
    del it  # abandon midway: the generator is finalised and its pool shut down
    assert wait_no_loader_threads()

    with CountingLoader(s, PLAIN, batch_size=4, workers=2, prefetch=1) as loader2:
        for _ in loader2:
            break
    assert wait_no_loader_threads()
    assert loader2.started < 60


def test_loader_close_from_another_thread(tmp_path: Path) -> None:
    for k in range(40):
        Image.fromarray(skimage_data.astronaut()[: 256 + k, :256]).save(tmp_path / f"{k:02d}.png")
    s = open_image_set(tmp_path)
    loader = ImageLoader(s, PLAIN, batch_size=2, workers=2, prefetch=4)
    got = 0
    for batch in loader:
        got += len(batch)
        if got == 2:
            threading.Thread(target=loader.close).start()
            time.sleep(0.1)
    assert 2 <= got < 40
    assert wait_no_loader_threads()
    assert list(loader) == []  # closed for good
