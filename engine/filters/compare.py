"""One filter of several models on the same images, side by side (the dock's comparison view).

:func:`filter_maps` opens every model it is given with the safe loaders of
:mod:`engine.models` (:func:`~engine.models.loading.load_model`) as a backend of its own (it never
touches a model someone else holds open), runs the chosen images through each with that
model's own preprocessing, and returns each model's activation map of one filter index at its
layer as plain data. The start model and the trained models of :mod:`engine.filters.train`
name the layer differently (the trained model is measured at ``<layer>.mask``), so every model
comes with its own layer: a :class:`MapSource`.

The job is cached by content (:func:`engine.analysis.cached_job`, kind :data:`CACHE_KIND`): the
key holds each model's weights hash (:attr:`LoadedModel.cache_id`), preprocessing, output
index and layer, the filter index, and the chosen images' paths with their size and
modification time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import cached_job
from ..cache import Cache, DamagedEntry, check_array, load_array, make_key, read_meta, write_meta
from ..jobs import Job
from ..types import ConvLensError, ModelSpec, Progress

__all__ = ["CACHE_KIND", "FORMAT_VERSION", "FilterMaps", "MapSource", "filter_maps", "load_result", "save_result"]

CACHE_KIND = "filters-compare"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MapSource:
    """One model of the comparison: a name (``"original"``, ``"interpretable"``, ...), the
    spec that opens it and the layer whose filter is shown (``<layer>.mask`` in a trained one)."""

    name: str
    spec: ModelSpec
    layer: str


@dataclass
class FilterMaps:
    """Filter ``unit`` of each model on each image: ``maps[name]`` is (images, h, w) float32
    (each model's own map size), ``image_max[name]`` its max per image, ``layers[name]`` the
    layer it was read at; ``paths`` the images in the order asked."""

    unit: int
    names: tuple[str, ...]
    layers: dict[str, str]
    paths: tuple[str, ...]
    maps: dict[str, np.ndarray]
    from_cache: bool = False
    image_max: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image_max:
            self.image_max = {n: m.reshape(m.shape[0], -1).max(axis=1) if m.size else np.zeros(m.shape[0])
                              for n, m in self.maps.items()}

    def shared_max(self, image: int = 0) -> float:
        """The largest value of any model's map on image ``image`` (the shared colour scale)."""
        return float(max((float(v[image]) for v in self.image_max.values()), default=0.0))


def _image_key(images: Any, indices: Sequence[int]) -> list[Any]:
    out = []
    for i in indices:
        path = images.records[i].path
        try:
            st = os.stat(path)
            out.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([path, -1, -1])
    return out


def filter_maps(sources: Sequence[MapSource], images: Any, indices: Sequence[int], unit: int, *,
                device: str | None = None, cache: Cache | None = None) -> Job[FilterMaps]:
    """The job: filter ``unit`` of every model in ``sources`` on images ``indices`` of the image
    set ``images`` (see the module docstring). Raises :class:`ConvLensError` naming the model
    file for an unknown layer or a filter index out of range, and naming the image set for an
    index out of range."""
    from ..models.loading import load_model

    if not sources:
        raise ConvLensError("filter_maps: no models to compare")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConvLensError(f"filter_maps: model names repeat ({', '.join(names)})")
    idx = [int(i) for i in indices]
    if not idx:
        raise ConvLensError("filter_maps: no images chosen")
    bad = [i for i in idx if not 0 <= i < len(images)]
    if bad:
        raise ConvLensError(f"{images.source}: no image {bad[0]} (the set has {len(images)})")
    if unit < 0:
        raise ConvLensError(f"filter_maps: filter index {unit} is negative")
    yield Progress(0.0, "opening the models")
    loaded = []
    for s in sources:
        m = load_model(s.spec)
        loaded.append(m)
    key = make_key(CACHE_KIND, FORMAT_VERSION, unit,
                   [[s.name, m.cache_id, m.format, s.spec.arch, s.spec.preprocess, s.spec.output_index, s.layer]
                    for s, m in zip(sources, loaded, strict=True)], _image_key(images, idx))

    def compute() -> Job[FilterMaps]:
        from ..backends import open_backend
        from ..data.images import ImageLoader

        maps: dict[str, np.ndarray] = {}
        for j, (s, m) in enumerate(zip(sources, loaded, strict=True)):
            yield Progress(0.1 + 0.9 * j / len(sources), f"{s.name}: {s.layer} filter {unit}")
            backend = open_backend(m, device=device)
            try:
                backend.check_capture([s.layer])
                rows: list[np.ndarray] = []
                got: list[int] = []
                with ImageLoader(images, s.spec.preprocess, batch_size=16, indices=idx) as loader:
                    for batch in loader:
                        a = backend.forward(batch.array, [s.layer]).activations[s.layer]
                        if a.ndim != 4:
                            raise ConvLensError(f"{s.spec.path}: layer '{s.layer}' gives maps of shape "
                                                f"{tuple(a.shape[1:])}, not (filters, h, w)")
                        if unit >= a.shape[1]:
                            raise ConvLensError(f"{s.spec.path}: layer '{s.layer}' has {a.shape[1]} filters, "
                                                f"no filter {unit}")
                        rows.append(np.asarray(a[:, unit], dtype=np.float32))
                        got.extend(int(i) for i in batch.indices)
                        yield Progress(None, f"{s.name}: {len(got)} of {len(idx)} images")
                    skipped = list(loader.skipped)
            finally:
                backend.close()
            if got != idx:
                path, why = skipped[0] if skipped else (images.source, "not read")
                raise ConvLensError(f"{path}: the image could not be read ({why})")
            maps[s.name] = np.concatenate(rows, axis=0)
        yield Progress(1.0, "done")
        return FilterMaps(unit=unit, names=tuple(names), layers={s.name: s.layer for s in sources},
                          paths=tuple(images.records[i].path for i in idx), maps=maps)

    return (yield from cached_job(cache, CACHE_KIND, key, load_result, compute=compute, save=save_result,
                                  found="filter maps found in cache"))


def save_result(result: FilterMaps, folder: str | Path) -> Path:
    """One ``.npy`` per model (``map_<k>.npy``) and ``meta.json`` (written last); no pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(result.names):
        np.save(folder / f"map_{k}.npy", np.asarray(result.maps[name], dtype=np.float32))
    write_meta(folder, {"version": FORMAT_VERSION, "kind": CACHE_KIND, "unit": result.unit, "names": list(result.names),
                        "layers": result.layers, "paths": list(result.paths)})
    return folder


def load_result(folder: str | Path) -> FilterMaps:
    """Read what :func:`save_result` wrote; :class:`DamagedEntry` naming the folder otherwise."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"{folder}: not a filter-maps result ({e}).") from e
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION or meta.get("kind") != CACHE_KIND:
        raise DamagedEntry(f"{folder}: not a filter-maps result of format {FORMAT_VERSION}.")
    try:
        names = tuple(str(n) for n in meta["names"])
        paths = tuple(str(p) for p in meta["paths"])
        maps = {}
        for k, name in enumerate(names):
            check_array(folder, f"map_{k}", np.float32, (len(paths), None, None))
            maps[name] = load_array(folder, f"map_{k}", mmap=False)
        return FilterMaps(unit=int(meta["unit"]), names=names, layers={str(k): str(v) for k, v in meta["layers"].items()},
                          paths=paths, maps=maps)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedEntry(f"{folder}: inconsistent filter-maps result ({type(e).__name__}: {e}).") from e
