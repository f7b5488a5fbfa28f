"""Real models and images that ship inside packages on PyPI, fetched once into the cache.

Some pretrained networks travel inside wheels (facenet-pytorch carries MTCNN's weights,
rapidocr-onnxruntime carries ONNX CNNs). Those packages pin old dependencies, so ConvLens never
installs or imports them: ``pip download --no-deps`` fetches the wheel and the one file needed
is read out of the zip.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .cache import atomic_write_bytes, default_cache_root
from .types import ConvLensError

#: (package, version, member inside the wheel)
RNET_WEIGHTS = ("facenet-pytorch", "2.6.0", "facenet_pytorch/data/rnet.pt")
OCR_CLS_ONNX = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")


class AssetError(ConvLensError):
    pass


def wheel_member(package: str, version: str, member: str, dest: str | Path | None = None) -> Path:
    """Path of ``member`` extracted from ``package==version``'s wheel (downloaded once)."""
    root = default_cache_root() / "assets"
    dest = Path(dest) if dest else root / f"{package}-{version}" / Path(member).name
    if dest.is_file():
        return dest
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = _find_wheel(wheels, package, version)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{package}=={version}", "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = _find_wheel(wheels, package, version)
        if proc.returncode != 0 or found is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise AssetError(f"could not download {package}=={version} from PyPI: {' '.join(tail)}")
    try:
        with zipfile.ZipFile(found) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise AssetError(f"{found}: does not contain {member} ({e})") from e
    return atomic_write_bytes(dest, data)


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    stem = package.replace("-", "_")
    hits = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    return hits[0] if hits else None
