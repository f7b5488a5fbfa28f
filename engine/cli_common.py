"""What every ``convlens`` command shares; imports no method, no torch, no ONNX Runtime.

A command lives in its package's ``cli.py`` (``engine/<method>/cli.py``) as
``register(subparsers)``, which adds its parser with ``subparsers.add_parser(name, help=...,
description=...)`` and ``set_defaults(func=...)``; ``func(args) -> int`` returns an exit code.
:mod:`engine.cli` finds every such module and runs the command. The pieces a command uses:

* model options: :func:`add_model_options`, :func:`spec_from_args`, :func:`open_model`,
  :func:`parse_layers`; ``argparse`` types :func:`int_range`, :func:`float_range`, ...;
* outputs checked before any work: :func:`check_out_dir`, :func:`check_out_parent`,
  :func:`check_out_file`; written atomically naming the user's path: :func:`writing`,
  :func:`write_text_output`, :func:`write_json_output`;
* jobs with a progress bar on standard error: :func:`run_job`, :class:`ProgressBar`;
* messages: :func:`say` (not with ``-q``), :func:`warn`, :func:`error`, :func:`shown`,
  :func:`report_skipped`;
* where the model passes run: :func:`add_executor_options` (``--ray ADDRESS``, ``--workers N``,
  ``--gpus-per-worker G``) and :func:`executor_from_args` (None: this process; else a
  :class:`engine.cluster.RayExecutor`, or a ConvLensError saying how to install Ray).

Exit codes: ``EXIT_OK`` 0 success, ``EXIT_INPUT`` 1 a problem with the input (raise a
:class:`~engine.types.ConvLensError` naming the file and the cause), ``EXIT_USAGE`` 2 a usage
error, ``EXIT_INTERRUPTED`` 130 interrupted. A command that names the files it skipped itself
(:func:`report_skipped`) sets ``names_skipped=True`` in its defaults, and the loader's per-file
warnings are then left out while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from .jobs import Job, run_sync
from .types import ConvLensError, ModelSpec, Progress

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ----------------------------------------------------------------------------- option types
# argparse ``type=`` functions: a bad value is a usage error (exit 2) naming the option, found
# while parsing, so before any file is opened or the cache is consulted.


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number ``low <= v`` (``<= high`` when given)."""

    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low or (high is not None and v > high):
            want = f"from {low} to {high}" if high is not None else (
                "a positive whole number" if low == 1 else f"at least {low}")
            raise argparse.ArgumentTypeError(f"must be {want}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


positive_int = int_range(1)
non_negative_int = int_range(0)


def float_range(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable[[str], float]:
    """A finite number in the interval from ``low`` to ``high`` (open or closed ends)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text.strip()}")
        return v

    parse.__name__ = "float"
    return parse


def positive_float(text: str) -> float:
    try:
        v = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text.strip()}")
    return v


# ----------------------------------------------------------------------------- messages and outputs


def shown(path: object) -> str:
    """``path`` for a message: a name that is not valid UTF-8 (surrogate escapes from
    ``os.fsdecode``) shows its raw bytes as ``\\xNN`` instead of failing to print."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def error(msg: object) -> None:
    """``convlens: error: msg`` on standard error, printable whatever the file names hold."""
    print(f"convlens: error: {shown(msg)}", file=sys.stderr)


def warn(msg: object) -> None:
    print(f"convlens: warning: {shown(msg)}", file=sys.stderr)


def _why(e: OSError) -> str:
    return e.strerror.lower() if e.strerror else str(e)


#: output folders this process created; removed again (only if still empty) when a command fails
_made_dirs: list[Path] = []


def _nonempty(out: str) -> Path:
    if not str(out).strip():
        raise ConvLensError("--out is empty: name the output (an empty path would mean the current folder)")
    return Path(out)


def _mkdirs(p: Path, what: str) -> None:
    """Create folder ``p`` (and missing parents) or raise a ConvLensError naming ``p``."""
    missing = []
    q = p
    try:
        while not q.exists() and q != q.parent:
            if q.is_symlink():  # a dangling link: mkdir would fail with a confusing "exists"
                raise ConvLensError(f"{p}: cannot create the {what}: {q} is a broken symbolic link")
            missing.append(q)
            q = q.parent
        if q.exists() and not q.is_dir():
            raise ConvLensError(f"{p}: cannot create the {what}: {q} is a file, not a folder")
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvLensError(f"{p}: cannot create the {what} ({_why(e)})") from None
    _made_dirs.extend(reversed(missing))


def _probe(folder: Path, target: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the cheap, exact test that ``target`` can be written."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".convlens-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = "" if folder == target else f" (its folder {folder})"
        raise ConvLensError(f"{target}: cannot write the {what}{where}: {_why(e)}") from None


def check_out_dir(out: str, files: Sequence[str] = ()) -> Path:
    """An output folder that can be written into, checked before any work: a file in the way,
    a path under a file or a folder that cannot be written is an error naming ``out``, and so
    is a folder in the place of one of the ``files`` the command writes there. A missing
    folder is created (and removed again if the command fails before writing to it)."""
    p = _nonempty(out)
    if p.exists() and not p.is_dir():
        raise ConvLensError(f"{p}: exists and is not a folder (--out names the output folder)")
    if not p.exists():
        _mkdirs(p, "output folder")
    _probe(p, p, "output folder")
    for name in files:
        if (p / name).is_dir():
            raise ConvLensError(f"{p / name}: is a folder; the output file {name} cannot be written there")
    return p


def check_out_parent(out: str) -> Path:
    """For an output folder that is built beside its place and renamed in (dissect's report):
    ``out`` is not a file, and its parent folder can be written."""
    p = _nonempty(out)
    if p.exists() and not p.is_dir():
        raise ConvLensError(f"{p}: exists and is not a folder (--out names the output folder)")
    parent = p.parent
    if not parent.exists():
        _mkdirs(parent, "folder for the output")
    elif not parent.is_dir():
        raise ConvLensError(f"{p}: cannot create the output folder: {parent} is a file, not a folder")
    _probe(parent, p, "output folder")
    return p


def check_out_file(out: str, what: str = "output file") -> Path:
    """A file output, checked before any work: not a folder, and its folder can be written."""
    p = _nonempty(out)
    if p.is_dir():
        raise ConvLensError(f"{p}: is a folder; --out names the {what} to write")
    parent = p.parent
    if not parent.exists():
        _mkdirs(parent, f"folder for the {what}")
    elif not parent.is_dir():
        raise ConvLensError(f"{p}: cannot write the {what}: {parent} is a file, not a folder")
    _probe(parent, p, what)
    return p


@contextlib.contextmanager
def writing(target: str | os.PathLike[str]) -> Iterator[None]:
    """Report a failure to write as a ConvLensError naming the user's ``target`` (file or
    folder), never the temporary file the atomic write went through."""
    try:
        yield
    except OSError as e:
        # os.replace(temporary, final) fails with filename2 = the final file; other calls name the
        # temporary file, which stands for the file beside it
        where = user_path(e.filename2 or e.filename) if e.filename else os.fspath(target)
        raise ConvLensError(f"{where}: cannot write ({_why(e)})") from None
    except UnicodeEncodeError as e:  # a name that is not valid UTF-8, should the writer not allow it
        raise ConvLensError(f"{target}: cannot write: a file name is not valid UTF-8 ({e.reason})") from None


def write_text_output(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text``; file names that are not valid UTF-8 keep their raw bytes."""
    from .cache import atomic_write_bytes

    with writing(path):
        return atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_json_output(path: str | os.PathLike[str], obj: Any) -> Path:
    # ensure_ascii: a surrogate-escaped name becomes "\\udcNN", valid JSON that json.load and
    # os.fsencode turn back into the file's real name
    return write_text_output(path, json.dumps(obj, indent=2, ensure_ascii=True) + "\n")


def skipped_files(acts: Any, images: Any) -> list[dict[str, str]]:
    """Every file left out of a run: listed but missing (CSV rows; ``ImageSet.missing`` where the
    image set records them) and unreadable (found by the extraction, kept with its cache entry)."""
    missing = getattr(images, "missing", ()) or ()
    out = [{"path": str(p), "reason": str(r)} for p, r in missing]
    out += [{"path": str(p), "reason": str(r)} for p, r in getattr(acts, "skipped", ())]
    return out


def report_skipped(skipped: Sequence[dict[str, str]], listed_in: Path | None = None, first: int = 5) -> None:
    """Name the skipped files on standard error, every run (a cached rerun too)."""
    if not skipped:
        return
    n = len(skipped)
    warn(f"{n} file{'s' if n != 1 else ''} skipped:")
    for s in skipped[:first]:
        print(f"  {shown(s['path'])}: {shown(s['reason'])}", file=sys.stderr)
    if n > first:
        where = f" (all in {shown(listed_in)})" if listed_in else ""
        print(f"  ... and {n - first} more{where}", file=sys.stderr)


class _SkipLogFilter(logging.Filter):
    """On the ``convlens.data`` logger while a command runs: drop the image loader's per-file
    "skipped" warnings, and the CSV reader's for listed files that are missing. The CLI names
    every skipped file itself once the pass is over (cached or not), the first few and a count,
    instead of one line each."""

    FORMATS = ("skipped %s", "%s: row %d: %s does not exist; skipped", "%s: row %d: %s is not a regular file; skipped")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "convlens.data" and record.msg in self.FORMATS)


# ----------------------------------------------------------------------------- progress


class ProgressBar:
    """A one-line progress bar on a terminal; periodic plain lines otherwise (logs, CI)."""

    def __init__(self, title: str, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.title, self.stream, self.quiet = title, stream or sys.stderr, quiet
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.shown = False
        self.open_line = False  # a terminal bar drawn without its closing newline

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        final = p.fraction is not None and p.fraction >= 1.0
        if not final and now - self.last < (0.1 if self.tty else 5.0) and self.shown:
            return
        self.last, self.shown = now, True
        frac = p.fraction or 0.0
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.title} [{bar:<30}] {frac:5.1%} {shown(p.message)[:60]:<60}")
            self.open_line = not final
            if final:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.title}: {frac:5.1%} {shown(p.message)}\n")
        self.stream.flush()

    def close(self) -> None:
        """End a terminal bar's line (a job may finish short of 100%, e.g. with skipped images),
        so that what is printed next starts on a line of its own."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False


def run_job(job: Job[Any], title: str, quiet: bool = False) -> Any:
    bar = ProgressBar(title, quiet=quiet)
    try:
        return run_sync(job, bar)
    finally:
        bar.close()


# ----------------------------------------------------------------------------- model options


def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="checkpoint: TorchScript, .pt2, state dict, safetensors or ONNX")
    g.add_argument("--arch", help="architecture for state dicts: torchvision name, 'rnet', or file.py:Class")
    g.add_argument("--input-size", help="N or HxW (height x width)")
    g.add_argument("--mean", help="per-channel mean in [0,1] pixel units, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="per-channel std in [0,1] pixel units, e.g. 0.229,0.224,0.225")
    g.add_argument("--channels", choices=["rgb", "bgr"])
    g.add_argument("--grayscale", action="store_true", default=None, help="the model takes one channel")
    g.add_argument("--resize", choices=["stretch", "shorter_side_crop"])
    g.add_argument("--classes", help="class names: a file (one per line) or a comma-separated list")
    g.add_argument("--backend", choices=["auto", "torch", "onnx"])
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--output-index", type=non_negative_int,
                   help="which output is the classifier when there are several")
    g.add_argument("--scores", choices=["auto", "logits", "probs"], help="what the classifier output holds")
    g.add_argument("--num-classes", type=positive_int, help="class count for a torchvision architecture")
    g.add_argument("--no-strict", dest="strict", action="store_false", default=None,
                   help="load a state dict even if some keys are missing or unexpected")
    g.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow unpickling a full pickled model (runs code stored in the file; trusted files only)")
    g.add_argument("--model-config", help="TOML model description (default: <model>.toml beside the checkpoint)")


def spec_from_args(a: argparse.Namespace) -> ModelSpec:
    from .models.config import build_spec

    return build_spec(
        a.model, config=a.model_config, arch=a.arch, input_size=a.input_size, mean=a.mean, std=a.std,
        channels=a.channels, grayscale=a.grayscale, resize=a.resize, classes=a.classes,
        backend=a.backend, device=a.device, output_index=a.output_index, scores=a.scores,
        num_classes=a.num_classes, strict=a.strict, allow_pickle=a.allow_pickle,
    )


#: preprocessing values a model file seldom records: when nothing says them, they are assumed
_TRACKED = {"input_size": ("input size", "--input-size HxW"), "mean": ("mean", "--mean"),
            "std": ("std", "--std"), "channels": ("channel order", "--channels rgb|bgr")}


def _known_keys(spec: ModelSpec, flags: dict[str, Any] | None, config: str | None) -> set[str]:
    """The spec's keys that something stated: an option, the model config, what ConvLens knows
    of the architecture or the ONNX file, or a value other than the built-in default."""
    from .models.config import arch_defaults, find_config_beside, is_code_arch, read_config
    from .types import Preprocess

    known = {k for k, v in (flags or {}).items() if v is not None}
    cfg = Path(config) if config else find_config_beside(spec.path)
    if cfg is not None:
        known |= set(read_config(cfg))
    known |= set(arch_defaults(spec.arch, spec.path))
    default, pre = Preprocess(), spec.preprocess
    known |= {k for k in _TRACKED if getattr(pre, k) != getattr(default, k)}
    if spec.output_index != 0:
        known.add("output_index")
    if (spec.arch and not is_code_arch(spec.arch)) or pre.grayscale:  # torchvision and rnet take RGB
        known.add("channels")
    return known


def assumed_values(spec: ModelSpec, flags: dict[str, Any] | None = None, config: str | None = None) -> dict[str, str]:
    """Preprocessing values nothing stated (see :func:`_known_keys`), as shown to the user:
    ``{"input_size": "224x224", "mean": "0.485,0.456,0.406", ...}``."""
    known = _known_keys(spec, flags, config)
    pre = spec.preprocess
    shown_values = {"input_size": "x".join(map(str, pre.input_size)), "mean": ",".join(f"{v:g}" for v in pre.mean),
                    "std": ",".join(f"{v:g}" for v in pre.std), "channels": pre.channels}
    return {k: shown_values[k] for k in _TRACKED if k not in known}


def assumed_line(name: str, assumed: dict[str, str]) -> str:
    """The one line every command prints when values were assumed."""
    said = ", ".join(f"{_TRACKED[k][0]} {v}" for k, v in assumed.items())
    opts = ", ".join(_TRACKED[k][1] for k in assumed)
    return (f"{name}: assumed {said} (neither the model file, a model config nor an option says); "
            f"if the model was trained otherwise, give {opts}")


class OpenedModel:
    """What :func:`open_model` opened; unpacks as ``loaded, backend``."""

    def __init__(self, loaded: Any, backend: Any, choice: Any, assumed: dict[str, str]) -> None:
        self.loaded, self.backend, self.choice, self.assumed = loaded, backend, choice, assumed

    @property
    def spec(self) -> ModelSpec:
        """The spec in use: ``output_index`` is the output chosen as class scores."""
        spec: ModelSpec = self.loaded.spec
        return spec

    def __iter__(self) -> Iterator[Any]:
        return iter((self.loaded, self.backend))


def open_model(spec: ModelSpec, a: argparse.Namespace | None = None) -> OpenedModel:
    """Load and open ``spec``; what the user should know goes to stderr: the loader's notes, the
    values assumed (``a``: the parsed options, to tell given values from defaults), and which
    output is used as class scores when the model has several or none (see
    :func:`engine.predict.choose_output`). A model that fails on a probe image says which option
    to try. Unpacks as ``loaded, backend``; ``.spec`` has the chosen ``output_index``."""
    import dataclasses

    from .backends import open_backend
    from .models.loading import load_model
    from .predict import choose_output, probe_batch

    loaded = load_model(spec)
    for note in loaded.notes:
        warn(note)
    flags = dict(vars(a)) if a is not None else None
    config = getattr(a, "model_config", None)
    assumed = assumed_values(spec, flags, config)
    name = Path(spec.path).name
    if assumed:
        warn(assumed_line(name, assumed))
    backend = open_backend(loaded)
    try:
        result = backend.forward(probe_batch(spec))
    except ConvLensError as e:
        backend.close()
        size = "x".join(map(str, spec.preprocess.input_size))
        why = (f"the input size {size} was assumed: give the size the model was trained at with --input-size HxW"
               if "input_size" in assumed else f"check --input-size (now {size}) and --channels/--grayscale")
        raise ConvLensError(f"{e} ({why})") from None
    given = spec.output_index if "output_index" in _known_keys(spec, flags, config) else None
    choice = choose_output(result.outputs, len(spec.classes) if spec.classes else None, given)
    message = choice.message(name)
    if message:
        warn(message)
    if choice.index is not None and choice.index != spec.output_index:
        backend.close()
        loaded = dataclasses.replace(loaded, spec=spec.with_(output_index=choice.index))
        backend = open_backend(loaded)
    return OpenedModel(loaded, backend, choice, assumed)


def parse_layers(value: str | None, spec: ModelSpec, backend: Any) -> list[str]:
    if value is not None:
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not names:
            raise ConvLensError(f"--layers {value!r}: names no layer (give comma-separated layer names, "
                                "or leave the option out for the model's default layers)")
        return names
    if spec.layers:
        return list(spec.layers)
    from .models.layers import default_layers

    return default_layers(backend.layers())


# ----------------------------------------------------------------------------- executor options


def add_executor_options(p: argparse.ArgumentParser) -> None:
    """``--ray ADDRESS``, ``--workers N``, ``--gpus-per-worker G`` (see :func:`executor_from_args`)."""
    g = p.add_argument_group("cluster (optional: pip install convlens[cluster])")
    g.add_argument("--ray", metavar="ADDRESS",
                   help="run the model passes on a Ray cluster: 'local' starts one on this machine, else the "
                        "cluster's address (auto, host:6379, ray://host:10001)")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="Ray workers (actors), each loading the model once (default 2; with --ray only)")
    g.add_argument("--gpus-per-worker", type=float_range(0, 64, low_open=False, high_open=False), default=None,
                   metavar="G", help="GPUs per Ray worker (default: 1 when the cluster has GPUs, else 0)")


def executor_from_args(a: argparse.Namespace) -> Any:
    """None (run in this process) without ``--ray``; else a :class:`engine.cluster.RayExecutor`
    (not connected yet). ``--workers``/``--gpus-per-worker`` without ``--ray`` is an error, and
    so is ``--ray`` where Ray is not installed (the message says ``pip install convlens[cluster]``)."""
    address = getattr(a, "ray", None)
    if address is None:
        given = [o for o, v in (("--workers", getattr(a, "workers", None)),
                                ("--gpus-per-worker", getattr(a, "gpus_per_worker", None))) if v is not None]
        if given:
            raise ConvLensError(f"{' and '.join(given)} only apply with --ray ADDRESS (e.g. --ray local)")
        return None
    from .cluster import RayExecutor, require_ray

    require_ray()
    return RayExecutor(address, workers=a.workers or 2, gpus_per_worker=a.gpus_per_worker)


# ----------------------------------------------------------------------------- small shared pieces


def say(a: argparse.Namespace, msg: str) -> None:
    """``msg`` on standard error unless ``-q``."""
    if not a.quiet:
        print(shown(msg), file=sys.stderr)


def emit_json(obj: Any, out: str | None) -> None:
    """``obj`` as JSON: into file ``out``, or on standard output."""
    if out is not None:
        write_json_output(out, obj)
    else:
        print(json.dumps(obj, indent=2))


def listed_count(images: Any) -> int:
    """Images the set names: those found, and those listed but missing."""
    return len(images) + len(getattr(images, "missing", ()) or ())


def user_path(filename: object) -> str:
    """The user's path a temporary name stands for: atomic writes go through ``.NAME.XXXX.tmp``
    files and ``.NAME.tmp-XXXX`` folders beside ``NAME`` (a report folder's files are written
    inside such a folder)."""
    import re

    p = Path(os.fsdecode(filename)) if isinstance(filename, (str, bytes, os.PathLike)) else Path(str(filename))
    parts = []
    for part in p.parts:
        m = re.fullmatch(r"\.(.+)\.[a-z0-9_]+\.tmp|\.(.+)\.tmp-[0-9a-f]+", part)
        parts.append((m.group(1) or m.group(2)) if m else part)
    return str(Path(*parts)) if parts else str(p)


_say, _emit_json, _listed, _user_path = say, emit_json, listed_count, user_path  # former names
