"""The demo: MTCNN's RNet (a real pretrained face / non-face CNN) on real face crops.

Weights: ``facenet_pytorch/data/rnet.pt`` from the facenet-pytorch wheel (MIT), read out of the
wheel, never imported. Images: scikit-image's bundled ``lfw_subset()`` (200 real 25x25 crops;
the first 100 are faces, the rest non-faces), written as a class-folder image set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .assets import RNET_WEIGHTS, wheel_member
from .cache import default_cache_root
from .models.config import RNET_CLASSES, RNET_PREPROCESS
from .types import ModelSpec

DEMO_LAYERS = ("conv1", "conv2", "conv3")


def demo_dir() -> Path:
    return default_cache_root() / "demo"


def prepare_demo(folder: str | Path | None = None) -> tuple[ModelSpec, Path]:
    """Write (once) ``rnet.pt`` with its ``rnet.toml`` and the ``lfw`` image folder."""
    folder = Path(folder) if folder else demo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    weights = wheel_member(*RNET_WEIGHTS, dest=folder / "rnet.pt")
    toml = folder / "rnet.toml"
    spec = ModelSpec(path=str(weights), arch="rnet", preprocess=RNET_PREPROCESS, classes=RNET_CLASSES,
                     layers=DEMO_LAYERS)
    if not toml.is_file():
        from .models.config import write_config

        write_config(spec.with_(path="rnet.pt"), toml)
    images = folder / "lfw"
    if not (images / "non-face").is_dir():
        _write_lfw(images)
    return spec, images


def _write_lfw(target: Path) -> None:
    from PIL import Image
    from skimage.data import lfw_subset

    from .cache import atomic_dir

    faces = lfw_subset()  # (200, 25, 25) float in [0, 1]
    with atomic_dir(target) as tmp:
        for i, img in enumerate(faces):
            cls = "face" if i < 100 else "non-face"
            (tmp / cls).mkdir(exist_ok=True)
            arr = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
            Image.fromarray(arr, mode="L").save(tmp / cls / f"{i:03d}.png")
