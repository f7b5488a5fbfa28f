"""Hostile and odd image inputs: FIFOs and devices, huge files, animated and multi-page images,
decompression bombs, missing CSV rows. Every one a named error or a named skip, never a hang,
a runaway read or a raw PIL warning."""

from __future__ import annotations

import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import images as images_mod
from engine.data.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ImageError,
    ImageLoader,
    digest_files,
    file_digest,
    load_image,
    open_image_set,
    read_image_bytes,
)
from engine.types import Preprocess

PRE = Preprocess(input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def engine_log():
    """Messages the engine logs under ``convlens`` (WARNING and up), captured by a handler of
    its own: unaffected by filters a CLI run put on the root logger's handlers."""
    class Lines(list):
        @property
        def text(self) -> str:
            return "\n".join(self)

    lines = Lines()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("convlens")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _png(path: Path, value: int = 100, size: tuple[int, int] = (10, 10)) -> Path:
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def _png_header(path: Path, w: int, h: int) -> Path:
    """A PNG that declares w x h gray pixels but holds almost no data (what a bomb's header says)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_fifo_and_devices_are_refused_by_name_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it blocking would hang forever
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")  # reading it would never end
    (tmp_path / "dir.png").mkdir()
    for p, kind in ((fifo, "a FIFO"), (zero, "a device"), (tmp_path / "dir.png", "a folder")):
        for fn in (load_image, read_image_bytes, file_digest):
            with pytest.raises(ImageError) as err:
                fn(p)
            assert str(err.value) == f"{p}: not a regular file ({kind})"
    assert not digest_files([str(fifo), str(zero)]).any()  # unreadable: all-zero digests


def test_a_folder_with_a_fifo_and_a_dev_zero_link_skips_both_by_name(tmp_path: Path, engine_log) -> None:
    _png(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    (tmp_path / "c.jpg").symlink_to("/dev/zero")
    _png(tmp_path / "d.png", 200)
    images = open_image_set(tmp_path)
    assert len(images) == 4
    with ImageLoader(images, PRE, batch_size=4, workers=2) as loader:
        batches = list(loader)
    assert [b.indices.tolist() for b in batches] == [[0, 3]]
    assert loader.skipped == [(str(tmp_path / "b.png"), "not a regular file (a FIFO)"),
                              (str(tmp_path / "c.jpg"), "not a regular file (a device)")]
    assert "b.png" in engine_log.text and "c.jpg" in engine_log.text
    assert loader.digests[[1, 2]].sum() == 0 and loader.digests[[0, 3]].all(axis=1).any()
    np.testing.assert_array_equal(loader.digests, digest_files([r.path for r in images.records]))


def test_files_over_the_size_limit_are_refused_before_reading(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # sparse: takes no disk space, but reading it would take 600 MiB
        f.truncate(600 * 1024**2)
    assert huge.stat().st_size > MAX_IMAGE_BYTES
    for fn in (load_image, file_digest):
        with pytest.raises(ImageError, match=r"file is 629,145,600 bytes, over the 512 MiB limit for an image"):
            fn(huge)


def test_csv_rows_of_missing_or_special_files_are_recorded(tmp_path: Path, engine_log) -> None:
    _png(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "list.csv").write_text("path,label\nok.png,a\nghost.png,b\nfifo.png,a\n/dev/zero,a\nok.png,a\n")
    images = open_image_set(tmp_path / "list.csv")
    assert [r.path for r in images.records] == [str(tmp_path / "ok.png")]
    assert images.missing == ((str(tmp_path / "ghost.png"), "does not exist"),
                              (str(tmp_path / "fifo.png"), "not a regular file"),
                              ("/dev/zero", "not a regular file"))
    assert f"{tmp_path / 'list.csv'}: row 4: {tmp_path / 'fifo.png'} is not a regular file; skipped" in engine_log.text
    assert open_image_set(tmp_path).missing == ()  # folders have no listed-but-missing files


def test_animated_gif_and_multipage_tiff_use_the_first_frame_with_a_warning(tmp_path: Path, engine_log) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "pages.tiff", save_all=True, append_images=frames[1:2])
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "still.gif")
    images = open_image_set(tmp_path)  # .gif is an image extension now: not silently ignored
    assert [Path(r.path).name for r in images.records] == ["anim.gif", "pages.tiff", "still.gif"]
    assert images.ignored == ()
    assert tuple(load_image(tmp_path / "anim.gif")[0, 0]) == (255, 0, 0)
    assert tuple(load_image(tmp_path / "pages.tiff")[0, 0]) == (255, 0, 0)
    assert tuple(load_image(tmp_path / "still.gif")[0, 0]) == (9, 9, 9)
    assert f"{tmp_path / 'anim.gif'}: 3 frames (animated or multi-page image); using the first" in engine_log.text
    assert f"{tmp_path / 'pages.tiff'}: 2 frames" in engine_log.text and "still.gif" not in engine_log.text


def test_decompression_bombs_are_refused_by_name_and_no_raw_pil_warning_escapes(tmp_path: Path, engine_log,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = _png_header(tmp_path / "bomb.png", 20_000, 20_000)
    assert MAX_IMAGE_PIXELS < 20_000 * 20_000
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageError) as err:
            load_image(bomb)
        assert str(err.value) == (f"{bomb}: image is 400,000,000 pixels, over the limit of "
                                  f"{MAX_IMAGE_PIXELS:,}; not decoded (a possible decompression bomb)")
        # with PIL's own limit lifted, ConvLens's still holds, and names the size
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with pytest.raises(ImageError, match=r"image is 20000x20000 = 400,000,000 pixels, over the limit"):
            load_image(bomb)

        # an image over PIL's warning threshold (made small here) is decoded; PIL's raw warning,
        # which names no file, stays inside
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
        big = _png(tmp_path / "big.png", size=(80, 80))
        assert load_image(big).shape == (80, 80, 3)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_large_images_are_decoded_with_a_warning_naming_the_file(tmp_path: Path, engine_log,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_mod, "LARGE_IMAGE_PIXELS", 1000)
    big = _png(tmp_path / "panorama.png", size=(50, 40))
    assert load_image(big).shape == (40, 50, 3)
    load_image(_png(tmp_path / "small.png", size=(20, 20)))
    assert f"{big}: large image, 50x40 = 2,000 pixels (warning above 1,000)" in engine_log.text
    assert "small.png" not in engine_log.text


def test_the_loader_digest_is_the_file_digest_and_tracks_content(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.png", 10)
    b = _png(tmp_path / "b.png", 10)
    images = open_image_set(tmp_path)
    with ImageLoader(images, PRE, batch_size=2) as loader:
        list(loader)
    assert bytes(loader.digests[0]) == file_digest(a) == file_digest(b)  # same bytes, same digest
    _png(b, 11)
    assert file_digest(a) != file_digest(b)
