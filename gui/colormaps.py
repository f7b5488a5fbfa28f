"""Colormaps as 256 x 3 ``uint8`` lookup tables, for colouring activation maps with numpy.

The perceptual maps (viridis, inferno, magma, plasma; turbo) are matplotlib's and Google's
published tables, read from the copies bundled with pyqtgraph (no matplotlib needed); ``jet``
and ``gray`` are computed. Tables are built once per name and returned read-only.

``apply(values, name)`` maps values in [0, 1] (NaN counts as 0) to RGB.
"""

from __future__ import annotations

from functools import cache

import numpy as np

__all__ = ["COLORMAPS", "DEFAULT", "apply", "lut"]

COLORMAPS: tuple[str, ...] = ("inferno", "viridis", "magma", "plasma", "turbo", "jet", "gray")
"""Names offered to users, the default first."""

DEFAULT = COLORMAPS[0]

_PYQTGRAPH_MAPS = frozenset({"viridis", "inferno", "magma", "plasma", "turbo"})


@cache
def lut(name: str) -> np.ndarray:
    """The (256, 3) ``uint8`` table of colormap ``name`` (one of :data:`COLORMAPS`)."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")
    x = np.linspace(0.0, 1.0, 256)
    if name == "gray":
        table = np.repeat(np.round(x * 255)[:, None], 3, axis=1)
    elif name == "jet":
        # The classic MATLAB jet: piecewise-linear ramps of red, green and blue.
        r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
        g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
        b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
        table = np.round(np.stack([r, g, b], axis=1) * 255)
    else:
        assert name in _PYQTGRAPH_MAPS
        import pyqtgraph as pg

        table = pg.colormap.get(name).getLookupTable(0.0, 1.0, 256, alpha=False)
    out = np.ascontiguousarray(table, dtype=np.uint8)
    out.setflags(write=False)
    return out


def apply(values: np.ndarray, name: str) -> np.ndarray:
    """RGB ``uint8`` array (``values.shape + (3,)``) of ``values`` in [0, 1] (clipped; NaN as 0)."""
    scaled = np.nan_to_num(np.asarray(values, dtype=np.float32) * np.float32(255), copy=False, nan=0.0)
    np.clip(scaled, 0, 255, out=scaled)
    scaled += np.float32(0.5)
    idx = scaled.astype(np.uint8)  # truncation of x + 0.5: rounding (half up)
    return np.take(lut(name), idx, axis=0)
