"""The "Run on" setting: its dialog saves it, the job functions follow it (this machine, or a
real local Ray cluster whose result the app's in-process extract then opens from the cache)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QMainWindow, QMenu

from engine.activations import extract as local_extract
from engine.cache import Cache
from engine.jobs import run_sync
from gui.cluster import RunOn, RunOnDialog, extract, install_run_on, load_run_on, save_run_on


@pytest.fixture
def settings(tmp_path: Path) -> QSettings:
    return QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)


def test_dialog_saves_the_setting(qapp, settings) -> None:
    assert load_run_on(settings) == RunOn()  # this machine by default
    dialog = RunOnDialog(settings)
    f = dialog.fields
    assert f.available  # Ray is installed in the test environment
    assert not f.address.isEnabled()
    f.cluster.setChecked(True)
    assert f.address.isEnabled() and not f.gpus.isEnabled()  # GPUs "auto" by default
    f.address.setText(" 10.0.0.5:6379 ")
    f.workers.setValue(8)
    f.auto_gpus.setChecked(False)
    f.gpus.setValue(1.0)
    dialog.accept()
    got = load_run_on(settings)
    assert got == RunOn(ray=True, address="10.0.0.5:6379", workers=8, gpus_per_worker=1.0)
    ex = got.executor()
    assert (ex.address, ex.workers, ex.gpus_per_worker) == ("10.0.0.5:6379", 8, 1.0)
    assert RunOn().executor() is None
    assert "8 workers" in got.describe()


def test_install_adds_the_menu_action(qapp, settings) -> None:
    win = QMainWindow()
    win.settings = settings  # type: ignore[attr-defined]
    menu = QMenu("Analysis", win)
    act = install_run_on(win, menu)
    assert act in menu.actions() and act.text() == "&Run on…"


@pytest.fixture(scope="module")
def small_images(demo_images, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gui-cluster-images")
    for cls in ("face", "non-face"):
        (root / cls).mkdir()
        for p in sorted((demo_images / cls).iterdir())[:12]:
            shutil.copy(p, root / cls / p.name)
    return root


def test_jobs_follow_the_setting_and_the_app_opens_a_cluster_run(qapp, settings, rnet_spec, small_images,
                                                                 tmp_path) -> None:
    ray = pytest.importorskip("ray")
    from engine.backends import open_backend
    from engine.data.images import open_image_set
    from engine.models.loading import load_model

    loaded = load_model(rnet_spec.with_(device="cpu"))
    backend = open_backend(loaded)
    images = open_image_set(str(small_images))
    here = run_sync(extract(backend, loaded.cache_id, images, ["conv3"], settings=settings, batch_size=8,
                            cache=Cache(tmp_path / "c1")))
    save_run_on(RunOn(ray=True, address="local", workers=2), settings)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cache = Cache(tmp_path / "c2")
        there = run_sync(extract(backend, loaded.cache_id, images, ["conv3"], settings=settings, batch_size=8,
                                 cache=cache))
    finally:
        ray.shutdown()
    assert not there.from_cache
    np.testing.assert_array_equal(np.asarray(here.outputs), np.asarray(there.outputs))
    np.testing.assert_array_equal(np.asarray(here.maps("conv3")), np.asarray(there.maps("conv3")))
    opened = run_sync(local_extract(backend, loaded.cache_id, images, ["conv3"], batch_size=8, cache=cache))
    assert opened.from_cache  # what the views' in-process extract finds


_NO_RAY_GUI = """
import sys
sys.modules["ray"] = None  # Ray absent, as when it is not installed
from PySide6.QtWidgets import QApplication
app = QApplication([])
from gui.cluster import RunOn, RunOnWidget, extract
w = RunOnWidget(RunOn(ray=True))
assert not w.cluster.isEnabled() and w.here.isChecked(), "cluster choice should be off without Ray"
print(w.note.text())
try:
    RunOn(ray=True).executor()
except Exception as e:
    print(type(e).__name__, e)
"""


def test_without_ray_the_setting_says_how_to_install(tmp_path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _NO_RAY_GUI], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert r.returncode == 0, r.stderr
    assert "Ray is not installed here: pip install convlens[cluster]" in r.stdout
    assert "ConvLensError" in r.stdout and "pip install convlens[cluster]" in r.stdout.splitlines()[-1]
