"""Shared fixtures: the real demo model (RNet, pretrained) and its real face images.

Assets come from PyPI wheels on first use and are kept in the user cache
(``~/.cache/convlens/assets``); extraction caches of each test live in its tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Qt tests run offscreen: no display on CI. Set before any Qt import.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """(ModelSpec of the pretrained RNet state dict, folder of 200 lfw_subset images)."""
    from engine.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def rnet_spec(demo):  # noqa: ANN001, ANN201
    return demo[0]


@pytest.fixture(scope="session")
def demo_images(demo) -> Path:  # noqa: ANN001
    return demo[1]


@pytest.fixture(scope="session")
def ocr_onnx() -> Path:
    """A real third-party ONNX CNN: PaddleOCR's text-direction classifier (rapidocr wheel)."""
    from engine.assets import OCR_CLS_ONNX, wheel_member

    return wheel_member(*OCR_CLS_ONNX)


@pytest.fixture()
def cache(tmp_path: Path):  # noqa: ANN201
    from engine.cache import Cache

    return Cache(tmp_path / "cache")
