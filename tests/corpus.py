"""A generated corpus of crafted model files: each writes a marker file if anything in it runs.

Every maker takes a folder and a marker path and returns the crafted file. The payloads only
ever create ``marker`` (``open(marker, "w")``) so a test can tell whether code ran. Each one is
checked to be genuinely dangerous (the plain torch loader does create the marker) by
``tests/test_safety.py``, so a refusal by ConvLens means something.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch


class CreatesFile:
    """Unpickling this calls ``open(target, "w")``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


class TinyNet(torch.nn.Module):
    """A 3-channel conv net with a 2-class head: small, any input size >= 8 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv1(x)).mean((2, 3)))


def _rewrite_zip(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a zip member by member; ``edit(relative name, data)`` returns new data (None: keep)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            rel = info.filename.split("/", 1)[-1]
            new = edit(rel, data)
            zout.writestr(info, data if new is None else new)
    return dst


def exported_tiny(folder: Path, dynamic: bool = True) -> Path:
    """A genuine torch.export archive of TinyNet (dynamic batch unless ``dynamic=False``)."""
    torch.manual_seed(0)
    m = TinyNet().eval()
    x = torch.randn(2, 3, 12, 12)
    shapes = {"x": {0: torch.export.Dim("batch", max=1024)}} if dynamic else None
    ep = torch.export.export(m, (x,), dynamic_shapes=shapes)
    path = folder / ("tiny.pt2" if dynamic else "tiny_static.pt2")
    torch.export.save(ep, str(path))
    return path


def pickle_bytes(marker: Path) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save((CreatesFile(marker),), buf)
    return buf.getvalue()


def pt2_pickled_sample_inputs(folder: Path, marker: Path) -> Path:
    base = exported_tiny(folder)
    return _rewrite_zip(base, folder / "evil_sample_inputs.pt2",
                        lambda rel, _d: pickle_bytes(marker) if rel.startswith("data/sample_inputs/") else None)


def pt2_pickled_weight(folder: Path, marker: Path) -> Path:
    base = exported_tiny(folder)

    def edit(rel: str, data: bytes) -> bytes | None:
        if rel == "data/weights/model_weights_config.json":
            cfg = json.loads(data)
            cfg["config"]["conv1.weight"]["use_pickle"] = True
            return json.dumps(cfg).encode()
        if rel == "data/weights/weight_0":
            return pickle_bytes(marker)
        return None

    return _rewrite_zip(base, folder / "evil_weight.pt2", edit)


def pt2_sympy_expression(folder: Path, marker: Path) -> Path:
    """A symbolic-shape expression that sympify evaluates: it opens the marker."""
    base = exported_tiny(folder)
    payload = f"Symbol('s77', positive=True, integer=True) + 0*len(str(open({str(marker)!r}, 'w')))"

    def edit(rel: str, data: bytes) -> bytes | None:
        if rel.startswith("models/") and rel.endswith(".json"):
            text = data.decode()
            start = text.index('"expr_str": "') + len('"expr_str": "')
            end = text.index('"', start)
            return (text[:start] + payload.replace('"', '\\"') + text[end:]).encode()
        return None

    return _rewrite_zip(base, folder / "evil_sympy.pt2", edit)


def pt2_guard_code(folder: Path, marker: Path) -> Path:
    base = exported_tiny(folder)

    def edit(rel: str, data: bytes) -> bytes | None:
        if rel.startswith("models/") and rel.endswith(".json"):
            program = json.loads(data)
            program["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]
            return json.dumps(program).encode()
        return None

    return _rewrite_zip(base, folder / "evil_guards.pt2", edit)


def pt2_python_target(folder: Path, _marker: Path) -> Path:
    """A graph node whose target is a Python function reached through torch (os.system)."""
    base = exported_tiny(folder)

    def edit(rel: str, data: bytes) -> bytes | None:
        if rel.startswith("models/") and rel.endswith(".json"):
            program = json.loads(data)
            program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.serialization.os.system"
            return json.dumps(program).encode()
        return None

    return _rewrite_zip(base, folder / "evil_target.pt2", edit)


PT2_MAKERS = {"sample_inputs": pt2_pickled_sample_inputs, "pickled_weight": pt2_pickled_weight,
              "sympy_expression": pt2_sympy_expression, "guard_code": pt2_guard_code,
              "python_target": pt2_python_target}


class _WithState(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(2, 3, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, self.w).mean((2, 3))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.w = state[0]
        self.training = state[1]


def torchscript_writes_file(folder: Path, victim: Path, where: str = "setstate") -> Path:
    """A TorchScript archive whose code overwrites ``victim`` (4 bytes) through a shared
    ``from_file`` memory map: in ``__setstate__`` (runs inside ``torch.jit.load``) or in
    ``forward`` (runs on the first prediction)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(_WithState())
    base = folder / "base_ts.pt"
    scripted.save(str(base))
    evil = f"torch.from_file({str(victim)!r}, True, 4, dtype=0)"

    def edit(rel: str, data: bytes) -> bytes | None:
        if not (rel.startswith("code/") and rel.endswith(".py")) or b"class _WithState" not in data:
            return None
        text = data.decode()
        if where == "setstate":
            old = "    self.w = (state)[0]"
            new = f"    _evil = {evil}\n    self.w = torch.add((state)[0], torch.mul(torch.sum(torch.fill_(_evil, 66)), 0))"
        else:
            old = "    _0 = torch.mean(torch.conv2d(x, w), [2, 3])"
            new = f"    _evil = {evil}\n    _x = torch.add(x, torch.mul(torch.sum(torch.fill_(_evil, 66)), 0))\n" \
                  "    _0 = torch.mean(torch.conv2d(_x, w), [2, 3])"
        assert old in text, text
        edited.append(rel)
        return text.replace(old, new, 1).encode()

    edited: list[str] = []
    out = _rewrite_zip(base, folder / f"evil_ts_{where}.pt", edit)
    assert edited, "the class's code was not found in the archive"
    return out


EVIL_ARCH = '''
import torch
open({marker!r}, "w").write("ran")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.relu(self.conv1(x)).mean((2, 3)))
'''


def state_dict_with_code_toml(folder: Path, marker: Path) -> Path:
    """``model.pt`` (TinyNet weights) with ``model.pt.toml`` naming ``arch/net.py:Net`` relative to
    the TOML's folder; importing net.py creates the marker."""
    (folder / "arch").mkdir(parents=True, exist_ok=True)
    (folder / "arch" / "net.py").write_text(EVIL_ARCH.format(marker=str(marker)))
    torch.manual_seed(0)
    path = folder / "model.pt"
    torch.save(TinyNet().state_dict(), path)
    (folder / "model.pt.toml").write_text('[model]\narch = "arch/net.py:Net"\ninput_size = 12\nclasses = ["a", "b"]\n')
    return path


def malicious_pickle(folder: Path, marker: Path) -> Path:
    path = folder / "evil.pt"
    torch.save({"state_dict": CreatesFile(marker)}, path)
    return path


def project_granting_pickle(folder: Path, marker: Path) -> Path:
    """A project that names a malicious pickle and holds ``"allow_pickle": true``."""
    model = malicious_pickle(folder, marker)
    proj = folder / "evil.convlens"
    proj.write_text(json.dumps({"convlens_project": 1, "images": None, "selection": {}, "views": {}, "layout": "",
                                "model": {"path": model.name, "arch": "rnet", "allow_pickle": True}}))
    return proj
