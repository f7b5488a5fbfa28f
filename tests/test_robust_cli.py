"""The command line on bad input, as a careless user gives it: every problem is a usage error
(exit 2) or a one-line error naming the user's path or option (exit 1), found before any work;
skipped files are named on every run; non-UTF-8 file names survive every output.

All inputs are generated here, in tmp_path (small files).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVLENS_CACHE", str(cache))
    return cache


def _png(path: str | bytes, seed: int, size: int = 28) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    with open(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")


def _clean(err: str) -> None:
    assert "Traceback" not in err and ".tmp" not in err, err


# ----------------------------------------------------------------------------- options


def _model_args(rnet_spec, imgs: Path) -> list[str]:
    return ["--model", rnet_spec.path, "--images", str(imgs)]


@pytest.mark.parametrize(("cmd", "opt", "value", "needle"), [
    ("predict", "--batch-size", "0", "must be a positive whole number, got 0"),
    ("predict", "--batch-size", "-4", "must be a positive whole number, got -4"),
    ("predict", "--batch-size", "many", "expected a whole number, got 'many'"),
    ("activations", "--batch-size", "0", "must be a positive whole number"),
    ("predict", "--output-index", "-1", "must be at least 0, got -1"),
    ("predict", "--num-classes", "0", "must be a positive whole number"),
    ("dissect", "--batch-size", "-1", "must be a positive whole number"),
    ("dissect", "--top-k", "0", "must be a positive whole number"),
    ("dissect", "--builtin-images", "0", "must be a positive whole number"),
    ("dissect", "--builtin-size", "8", "must be from 16 to 4096, got 8"),
    ("dissect", "--builtin-size", "big", "expected a whole number"),
    ("dissect", "--quantile", "0", "must be in (0, 1), got 0"),
    ("dissect", "--quantile", "1", "must be in (0, 1), got 1"),
    ("dissect", "--quantile", "nan", "must be in (0, 1), got nan"),
    ("dissect", "--iou-threshold", "1.5", "must be in [0, 1], got 1.5"),
    ("dissect", "--iou-threshold", "-0.01", "must be in [0, 1]"),
])
def test_numeric_options_are_usage_errors_before_any_work(cmd, opt, value, needle, rnet_spec, demo_images,
                                                          tmp_path: Path, tmp_cache: Path, capsys) -> None:
    out = tmp_path / "out"
    base = ["--model", rnet_spec.path, "--out", str(out)]
    base += ["--concepts", "builtin"] if cmd == "dissect" else ["--images", str(demo_images)]
    assert main([cmd, *base, opt, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {opt}: {needle}" in err
    _clean(err)
    assert not out.exists() and not tmp_cache.exists()  # nothing opened, nothing computed


def test_bad_batch_size_is_refused_even_when_the_cache_holds_the_result(rnet_spec, demo_images: Path,
                                                                          tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["-q", "predict", *_model_args(rnet_spec, demo_images), "--out", str(out)]) == 0
    before = (out / "predictions.csv").stat().st_mtime_ns
    for bad in ("0", "-64"):
        assert main(["-q", "predict", *_model_args(rnet_spec, demo_images), "--out", str(out),
                     "--batch-size", bad]) == 2
        assert "--batch-size" in capsys.readouterr().err
    assert (out / "predictions.csv").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- outputs


def _unwritable_folder() -> Path | None:
    """A folder that even root cannot write into (sysfs), where there is one."""
    p = Path("/sys")
    if not p.is_dir():
        return None
    try:
        fd, name = tempfile.mkstemp(dir=p)
    except OSError:
        return p
    os.close(fd)
    os.unlink(name)
    return None


@pytest.mark.parametrize("cmd", [["predict"], ["activations", "--layers", "conv2"]])
def test_unwritable_out_fails_before_extraction_naming_the_folder(cmd, rnet_spec, demo_images: Path,
                                                                  tmp_path: Path, tmp_cache: Path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    bad = [(notes / "sub", "notes.txt is a file, not a folder")]
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anyway: sysfs is read-only for everyone
        sysfs = _unwritable_folder()
        if sysfs is not None:
            bad += [(sysfs, "cannot write the output folder"), (sysfs / "convlens-out", "cannot create")]
    else:
        bad += [(ro, "cannot write the output folder: permission denied"),
                (ro / "new", "cannot create the output folder (permission denied)")]
    for out, needle in bad:
        assert main(["-q", *cmd, *_model_args(rnet_spec, demo_images), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"convlens: error: {out}: ") and needle in err, err
        _clean(err)
        assert not (tmp_cache / "activations").exists()  # noticed before the extraction
    assert notes.read_text() == "mine"


def test_missing_out_folder_is_created_and_removed_again_when_the_run_fails(rnet_spec, tmp_path: Path,
                                                                            capsys) -> None:
    out = tmp_path / "new" / "deep" / "out"
    assert main(["-q", "predict", "--model", rnet_spec.path, "--images", str(tmp_path / "no-images"),
                 "--out", str(out)]) == 1
    assert "no-images" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_info_out_checked_before_loading_and_named(rnet_spec, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for out, needle in ((folder, "is a folder; --out names the JSON file to write"),
                        (notes / "info.json", "notes.txt is a file, not a folder")):
        # a model that does not exist: the output is checked first
        assert main(["info", "--model", str(tmp_path / "none.pt"), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"convlens: error: {out}: ") and needle in err, err
        _clean(err)
    assert list(folder.iterdir()) == [] and notes.read_text() == "mine"
    good = tmp_path / "made" / "info.json"
    assert main(["info", "--model", rnet_spec.path, "--out", str(good)]) == 0
    assert json.loads(good.read_text())["format"] == "state_dict"


def test_a_folder_in_the_place_of_an_output_file(rnet_spec, demo_images: Path, tmp_path: Path,
                                                 tmp_cache: Path, capsys) -> None:
    out = tmp_path / "out"
    (out / "predictions.csv").mkdir(parents=True)  # found before any work
    assert main(["-q", "predict", *_model_args(rnet_spec, demo_images), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"convlens: error: {out / 'predictions.csv'}: is a folder"), err
    _clean(err)
    assert not (tmp_cache / "activations").exists()

    # a unit table's name depends on the layer: that write fails late, and still names the file
    (out / "conv2_units.csv").mkdir()
    assert main(["-q", "activations", *_model_args(rnet_spec, demo_images), "--layers", "conv2",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"convlens: error: {out / 'conv2_units.csv'}: cannot write (is a directory)"), err
    _clean(err)
    assert sorted(p.name for p in out.iterdir()) == ["conv2_units.csv", "predictions.csv"]  # no temporary left


def test_dissect_out_checked_before_any_work(rnet_spec, tmp_path: Path, tmp_cache: Path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    bad = [(notes, "exists and is not a folder"), (notes / "report", "notes.txt is a file, not a folder")]
    sysfs = _unwritable_folder()
    if sysfs is not None:
        bad.append((sysfs / "report", "cannot write the output folder (its folder /sys)"))
    for out, needle in bad:
        assert main(["-q", "dissect", "--model", rnet_spec.path, "--concepts", "builtin", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"convlens: error: {out}: ") and needle in err, err
        _clean(err)
        assert not (tmp_cache / "concepts").exists()  # no concept set generated
    assert notes.read_text() == "mine"


# ----------------------------------------------------------------------------- cache --clear


def test_cache_clear_removes_only_cache_kinds(rnet_spec, demo_images: Path, tmp_path: Path, tmp_cache: Path,
                                              capsys) -> None:
    assert main(["-q", "activations", *_model_args(rnet_spec, demo_images), "--layers", "conv3",
                 "--out", str(tmp_path / "o")]) == 0
    outside, sibling = tmp_path / "outside", tmp_path / "sibling"
    for d in (outside, sibling):
        d.mkdir()
        (d / "keep.txt").write_text("mine")
    capsys.readouterr()
    for what in (str(outside), "../sibling", "bogus", "activations/..", ".", ""):
        assert main(["cache", "--clear", what]) == 1, what
        err = capsys.readouterr().err
        assert err.startswith("convlens: error: ") and repr(what) in err and "nothing was removed" in err, err
        _clean(err)
    assert (outside / "keep.txt").read_text() == "mine" and (sibling / "keep.txt").read_text() == "mine"
    assert any((tmp_cache / "activations").iterdir())

    assert main(["cache", "--clear", "activations"]) == 0
    captured = capsys.readouterr()
    assert f"cleared activations in {tmp_cache}" in captured.err
    assert "activations" not in json.loads(captured.out)["kinds"]
    (tmp_cache / "dissection" / "x").mkdir(parents=True)
    assert main(["cache", "--clear", "all"]) == 0
    captured = capsys.readouterr()
    assert "cleared dissection" in captured.err and json.loads(captured.out)["kinds"] == {}
    assert (outside / "keep.txt").exists() and (sibling / "keep.txt").exists()


# ----------------------------------------------------------------------------- skipped files


def test_skipped_files_counted_for_csv_lists_and_named_on_a_cached_rerun(rnet_spec, tmp_path: Path,
                                                                         capsys) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        _png(imgs / f"ok{i}.png", i)
    (imgs / "broken.png").write_bytes(b"not a png")
    rows = ["path,label", "ok0.png,a", "gone.png,a", "ok1.png,b", "broken.png,b", "ok2.png,a"]
    rows += [f"gone{i}.png,b" for i in range(5)]
    listing = imgs / "list.csv"
    listing.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    for run in ("fresh", "cached"):
        assert main(["-q", "predict", "--model", rnet_spec.path, "--images", str(listing), "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert "convlens: warning: 7 files skipped:" in err, (run, err)
        assert f"{imgs / 'gone.png'}: does not exist" in err and "... and 2 more" in err, (run, err)
        assert err.count("gone") == 5  # the first five named once each (not once more by the loader)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["listed"] == 10 and summary["images"] == 4
        skipped = {s["path"]: s["reason"] for s in summary["skipped"]}
        assert len(skipped) == 7 and skipped[str(imgs / "gone4.png")] == "does not exist"
        assert "not a readable image" in skipped[str(imgs / "broken.png")]
    assert main(["predict", "--model", rnet_spec.path, "--images", str(listing), "--out", str(out)]) == 0
    # labels a and b exist but name no class: said, with the labels and the class names
    assert ("10 images, 7 skipped: no accuracy: no label matches a class name (labels: a, b; classes: non-face, "
            "face; give the names with --classes); wrote") in capsys.readouterr().err


def test_unreadable_files_named_on_every_run_and_status_column(rnet_spec, tmp_path: Path, capsys) -> None:
    imgs = tmp_path / "imgs"
    (imgs / "face").mkdir(parents=True)
    _png(imgs / "face" / "a.png", 1)
    _png(imgs / "face" / "b.png", 2)
    (imgs / "face" / "c.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    for _run in range(2):  # the second one comes from the cache
        assert main(["predict", "--model", rnet_spec.path, "--images", str(imgs), "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert "convlens: warning: 1 file skipped:" in err and f"{imgs / 'face' / 'c.png'}: " in err, err
        assert "3 images, 1 skipped" in err
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "predictions.csv").read_text().splitlines())}
    assert rows["c.png"]["status"] == "unreadable" and rows["c.png"]["correct"] == ""
    assert rows["c.png"]["predicted"] == "" and rows["c.png"]["confidence"] == ""
    assert rows["a.png"]["status"] == "ok" and rows["a.png"]["correct"] in ("true", "false")
    assert rows["a.png"]["predicted"] in ("face", "non-face")


# ----------------------------------------------------------------------------- non-UTF-8 names


@pytest.fixture
def latin1_images(tmp_path: Path) -> bytes:
    """A folder whose folder and file names are Latin-1 bytes (not valid UTF-8)."""
    root = os.fsencode(tmp_path) + b"/caf\xe9"
    for label in (b"face", b"na\xefve"):
        os.makedirs(root + b"/" + label)
    for i, name in enumerate((b"face/\xff\xfe.png", b"face/ok.png", b"na\xefve/b\xe9b\xe9.png", b"na\xefve/c.png")):
        _png(root + b"/" + name, i)
    with open(root + b"/face/bad\xe9.png", "wb") as f:
        f.write(b"garbage")
    return root


def test_non_utf8_names_survive_predict_and_activations(rnet_spec, latin1_images: bytes, tmp_path: Path,
                                                        capsys) -> None:
    imgs = os.fsdecode(latin1_images)
    out = os.fsdecode(os.fsencode(tmp_path) + b"/r\xe9sultats")
    assert main(["predict", "--model", rnet_spec.path, "--images", imgs, "--out", out]) == 0
    err = capsys.readouterr().err
    assert "bad\\xe9.png: not a readable image" in err  # shown with its raw byte, not a crash
    raw = Path(out, "predictions.csv").read_bytes()
    assert b"/caf\xe9/na\xefve/b\xe9b\xe9.png" in raw  # the file's real name, byte for byte
    with open(os.path.join(out, "predictions.csv"), newline="", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and all(os.path.isfile(r["path"]) for r in rows)
    assert {r["label"] for r in rows} == {"face", os.fsdecode(b"na\xefve")}
    assert [r["status"] for r in rows].count("unreadable") == 1
    summary = json.loads(Path(out, "summary.json").read_text(encoding="ascii"))
    assert summary["skipped"][0]["path"] == os.fsdecode(latin1_images + b"/face/bad\xe9.png")

    acts = os.fsdecode(os.fsencode(tmp_path) + b"/unit\xe9s")
    assert main(["-q", "activations", "--model", rnet_spec.path, "--images", imgs, "--layers", "conv2",
                 "--out", acts]) == 0
    table = Path(acts, "conv2_units.csv").read_bytes()
    assert b"/caf\xe9/" in table
    top = json.loads(Path(acts, "conv2_top.json").read_bytes())
    assert all(os.path.isfile(t["image"]) for t in top["0"])
    assert json.loads(Path(acts, "summary.json").read_bytes())["valid"] == 4


def _dissect_small(rnet_spec, out: str) -> list[str]:
    return ["-q", "dissect", "--model", rnet_spec.path, "--concepts", "builtin", "--builtin-images", "16",
            "--builtin-size", "32", "--layers", "conv2", "--no-tiles", "--out", out]


def test_dissect_report_into_a_non_utf8_folder(rnet_spec, tmp_path: Path, capsys) -> None:
    out = os.fsdecode(os.fsencode(tmp_path) + b"/rapport-\xe9t\xe9")
    assert main(_dissect_small(rnet_spec, out)) == 0, capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, "index.html")) and os.path.isfile(os.path.join(out, "dissection.csv"))


def test_dissect_concepts_under_a_non_utf8_folder(rnet_spec, tmp_path: Path, monkeypatch, capsys) -> None:
    """The built-in concept set in a cache folder whose name is not UTF-8: the report is written,
    its page stays valid UTF-8 and shows the folder's raw byte as ``\\xe9`` (as the CLI's
    messages do); the CSV and JSON files keep the real name."""
    monkeypatch.setenv("CONVLENS_CACHE", os.fsdecode(os.fsencode(tmp_path) + b"/cach\xe9"))
    out = tmp_path / "report"
    code = main(_dissect_small(rnet_spec, str(out)))
    err = capsys.readouterr().err
    _clean(err)
    assert code == 0, err
    page = (out / "index.html").read_bytes().decode("utf-8")  # strict: the page is valid UTF-8
    assert "cach\\xe9" in page
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert b"cach\xe9" in os.fsencode(summary["concepts"])


def test_a_terminal_progress_bar_ends_its_line_when_a_job_stops_short() -> None:
    import io

    from engine.cli import ProgressBar
    from engine.types import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for last, newlines in ((0.5, 1), (1.0, 1)):  # 0.5: an extraction with skipped images ends there
        stream = Terminal()
        bar = ProgressBar("extract", stream=stream)
        bar(Progress(0.0, "starting"))
        bar(Progress(last, "1/2 images"))
        bar.close()
        assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == newlines


def test_the_cli_quiets_the_loaders_skip_warnings_only_while_it_runs(rnet_spec, tmp_path: Path, caplog) -> None:
    import logging

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _png(imgs / "a.png", 0)
    (imgs / "b.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="convlens"):
        assert main(["-q", "predict", "--model", rnet_spec.path, "--images", str(imgs),
                     "--out", str(tmp_path / "out")]) == 0
        assert "b.png" not in caplog.text  # the CLI names it itself, once
        logging.getLogger("convlens.data").warning("skipped %s", "later.png: not an image")
    assert "later.png" in caplog.text  # library users (and later tests) still get the warnings


def test_errors_name_the_users_path_for_temporaries_of_atomic_writes(tmp_path: Path) -> None:
    import tempfile as tf

    from engine.cli import _user_path

    fd, tmp = tf.mkstemp(prefix=".predictions.csv.", suffix=".tmp", dir=tmp_path)  # as atomic_write_bytes
    os.close(fd)
    assert _user_path(tmp) == str(tmp_path / "predictions.csv")
    assert _user_path(tmp_path / ".report.tmp-1a2b3c4d" / "index.html") == str(tmp_path / "report" / "index.html")
    assert _user_path(tmp_path / "plain.tmp") == str(tmp_path / "plain.tmp")


def test_labels_that_look_like_numbers_but_are_not(rnet_spec, tmp_path: Path, capsys) -> None:
    imgs = tmp_path / "imgs"
    for label in ("²", "1", "7"):  # "²".isdigit() is True but int("²") fails
        (imgs / label).mkdir(parents=True)
        _png(imgs / label / "a.png", len(label))
    out = tmp_path / "out"
    assert main(["-q", "predict", "--model", rnet_spec.path, "--images", str(imgs), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unmatched_labels"] == ["7", "²"]  # RNet has outputs 0 and 1
    rows = {r["label"]: r for r in csv.DictReader((out / "predictions.csv").read_text(encoding="utf-8").splitlines())}
    assert rows["²"]["correct"] == "" and rows["1"]["correct"] in ("true", "false")
    assert summary["scored"] == 1  # "1" names an output index; "²" and "7" name none


def test_empty_out_and_empty_layers_are_errors(rnet_spec, demo_images: Path, tmp_path: Path,
                                               monkeypatch, tmp_cache: Path, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # an empty --out would otherwise write here
    for argv in (["predict", *_model_args(rnet_spec, demo_images), "--out", ""],
                 ["info", "--model", rnet_spec.path, "--out", " "],
                 ["dissect", "--model", rnet_spec.path, "--concepts", "builtin", "--out", ""]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("convlens: error: --out is empty"), err
    assert main(["activations", *_model_args(rnet_spec, demo_images), "--layers", " , ",
                 "--out", str(tmp_path / "o")]) == 1
    assert "--layers ' , ': names no layer" in capsys.readouterr().err
    assert not any(p.name.endswith((".csv", ".json")) for p in tmp_path.iterdir())
