"""Saving and loading a :class:`~engine.dissection.result.DissectionResult`: ``.npy`` arrays and
``meta.json`` (no pickle), checked from the headers when read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.cache import DamagedEntry, check_array, load_array, read_meta, write_meta
from engine.data.images import DIGEST_SIZE
from engine.dissection.result import (
    FORMAT_VERSION,
    DissectionParams,
    DissectionResult,
    LayerDissection,
    summarize_layer,
)


def save_result(result: DissectionResult, folder: str | Path) -> Path:
    """Write ``result`` into ``folder`` as ``.npy`` arrays and ``meta.json`` (written last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, (name, ld) in enumerate(result.layers.items()):
        stem = f"layer{i}"
        np.save(folder / f"{stem}_thresholds.npy", np.asarray(ld.thresholds, dtype=np.float64))
        np.save(folder / f"{stem}_iou.npy", np.asarray(ld.iou, dtype=np.float64))
        np.save(folder / f"{stem}_top_images.npy", np.asarray(ld.top_images, dtype=np.int64))
        np.save(folder / f"{stem}_top_values.npy", np.asarray(ld.top_values, dtype=np.float32))
        np.save(folder / f"{stem}_tie_fallback.npy", np.asarray(ld.tie_fallback, dtype=bool))
        np.save(folder / f"{stem}_at_threshold.npy", np.asarray(ld.at_threshold, dtype=np.float64))
        layers.append({"name": name, "stem": stem, "units": ld.units, "shape": list(ld.shape)})
    if result.input_digests is not None:
        np.save(folder / "input_digests.npy", np.asarray(result.input_digests, dtype=np.uint8))
    write_meta(folder, {
        "version": FORMAT_VERSION,
        "model": result.model,
        "model_sha256": result.model_sha256,
        "concepts_root": result.concepts_root,
        "params": result.params.to_dict(),
        "layers": layers,
        "concept_names": list(result.concept_names),
        "concept_categories": list(result.concept_categories),
        "categories": list(result.categories),
        "n_images": result.n_images,
        "seconds": result.seconds,
        "skipped": [list(s) for s in result.skipped],
        "input_digests": result.input_digests is not None,
        "passes": result.passes,
        "notes": list(result.notes),
        "warnings": list(result.warnings),
    })
    return folder


def load_result(folder: str | Path) -> DissectionResult:
    """Read a result written by :func:`save_result` (no pickle).

    Raises :class:`engine.cache.DamagedEntry` (a ConvLensError) naming the folder when
    meta.json is unreadable, of another format version or inconsistent, or when an array it
    lists is missing, truncated or of the wrong shape or dtype (checked from the headers).
    """
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"{folder}: not a dissection result ({e}).") from e
    if not isinstance(meta, dict):
        raise DamagedEntry(f"{folder}: not a dissection result (meta.json is not an object).")
    if meta.get("version") != FORMAT_VERSION:
        raise DamagedEntry(f"{folder}: dissection format {meta.get('version')}, "
                           f"expected {FORMAT_VERSION}.")
    try:
        return _read_result(folder, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedEntry(f"{folder}: inconsistent dissection result ({type(e).__name__}: {e}).") from e


def _read_result(folder: Path, meta: dict[str, Any]) -> DissectionResult:
    p = meta["params"]
    params = DissectionParams(**{**p, "categories": None if p["categories"] is None
                                 else tuple(p["categories"])})
    names = tuple(str(n) for n in meta["concept_names"])
    cat_names = tuple(meta["concept_categories"])
    categories = tuple(meta["categories"])
    if len(cat_names) != len(names):
        raise ValueError(f"{len(names)} concept names but {len(cat_names)} categories")
    category_index = np.array([categories.index(c) if c else -1 for c in cat_names],
                              dtype=np.int64)
    layers = {}
    for entry in meta["layers"]:
        stem, units = str(entry["stem"]), int(entry["units"])
        check_array(folder, f"{stem}_thresholds", np.float64, (units,))
        check_array(folder, f"{stem}_iou", np.float64, (units, len(names)))
        k = check_array(folder, f"{stem}_top_images", np.int64, (units, None))[1]
        check_array(folder, f"{stem}_top_values", np.float32, (units, k))
        check_array(folder, f"{stem}_tie_fallback", np.bool_, (units,))
        check_array(folder, f"{stem}_at_threshold", np.float64, (units,))
        iou = load_array(folder, f"{stem}_iou", mmap=False)
        layers[entry["name"]] = LayerDissection(
            layer=entry["name"], units=units, shape=tuple(int(d) for d in entry["shape"]),
            thresholds=load_array(folder, f"{stem}_thresholds", mmap=False), iou=iou,
            summary=summarize_layer(iou, names, category_index, categories,
                                    params.iou_threshold),
            top_images=load_array(folder, f"{stem}_top_images", mmap=False),
            top_values=load_array(folder, f"{stem}_top_values", mmap=False),
            tie_fallback=load_array(folder, f"{stem}_tie_fallback", mmap=False),
            at_threshold=load_array(folder, f"{stem}_at_threshold", mmap=False),
        )
    digests = None
    if meta.get("input_digests"):
        check_array(folder, "input_digests", np.uint8, (None, DIGEST_SIZE))
        digests = load_array(folder, "input_digests", mmap=False)
    return DissectionResult(
        model=meta["model"], model_sha256=meta["model_sha256"],
        concepts_root=meta["concepts_root"], params=params, layers=layers,
        concept_names=names, concept_categories=cat_names, categories=categories,
        n_images=int(meta["n_images"]), seconds={k: float(v) for k, v in meta["seconds"].items()},
        skipped=tuple((str(a), str(b)) for a, b in meta["skipped"]), input_digests=digests,
        passes=int(meta["passes"]), notes=tuple(str(n) for n in meta["notes"]),
        warnings=tuple(str(w) for w in meta["warnings"]),
    )
