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

#: the SHA-256 of each wheel (as PyPI lists it): pip checks it on download (--require-hashes)
#: and it is checked again before a member is read, so a changed or swapped wheel is refused
WHEEL_SHA256 = {
    ("facenet-pytorch", "2.6.0"): "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
    ("rapidocr-onnxruntime", "1.4.4"): "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
}


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
    want = WHEEL_SHA256.get((package, version))
    found = _find_wheel(wheels, package, version)
    if found is not None and want and _sha256(found) != want:
        found.unlink()  # a partial or swapped download in our own cache folder: fetch it again
        found = None
    if found is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{package}=={version}" + (f" --hash=sha256:{want}" if want else "") + "\n")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   *(["--require-hashes"] if want else []), "-r", str(req), "-d", str(wheels)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = _find_wheel(wheels, package, version)
        if proc.returncode != 0 or found is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise AssetError(f"could not download {package}=={version} from PyPI: {' '.join(tail)}")
        if want and _sha256(found) != want:
            raise AssetError(f"{found}: its SHA-256 is not the pinned {want}")
    try:
        with zipfile.ZipFile(found) as z:
            data = z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise AssetError(f"{found}: does not contain {member} ({e})") from e
    return atomic_write_bytes(dest, data)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    stem = package.replace("-", "_")
    hits = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    return hits[0] if hits else None
