"""The Network Dissection report: CSV, JSON summary, per-unit tiles, an SVG chart and HTML.

Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying Interpretability of Deep
Visual Representations", CVPR 2017, present each unit by its top-activating images with the
unit's mask (the upsampled activation above ``T_k``) highlighted, its label and IoU, and each
layer by its number of detectors per category. :func:`write_report` writes all of it into one
folder, atomically (a failed run leaves the previous report, or nothing):

- ``dissection.csv``: one row per unit (:meth:`DissectionResult.to_rows`);
- ``thresholds.csv``: layer, unit, ``T_k``;
- ``summary.json``: per layer "N/M units are detectors covering K concepts", detectors and unique concepts
  per category, the units drawn, the units whose tied threshold fell back to ``S > T``, timings;
- ``tiles/<layer>/unit_<k>.jpg`` (with a backend): the unit's top images in a row, the mask
  region bright and outlined, the rest dimmed, captioned with label and IoU. Only what the page
  shows is drawn: every detector and the :data:`REPORT_TOP_UNITS` best units of each layer
  (``all_units=True`` draws every unit; :func:`render_tiles` draws any units later, and
  :func:`top_image_masks` gives one unit's masks, as the GUI shows them). Tiles are drawn in a
  thread pool sized to the cores, as small JPEGs (:data:`TILE_CELL` px per image);
- ``layers.svg``: detectors per category per layer (hand-written SVG);
- ``index.html``: a self-contained page with the summary, the chart and a sortable unit table.

Masks come from :mod:`engine.dissection.masks` (the engine's one code path: upsampled to the
label-mask size, the result's rule ``S >= T`` or ``S > T`` and its per-unit tie fallback), so
the tiles show the pixels the IoUs counted.
"""

from __future__ import annotations

import csv
import html
import json
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from engine.backends.base import Backend
from engine.cache import atomic_dir
from engine.cache import safe_name as layer_folder
from engine.concepts import ConceptDataset
from engine.data.images import ImageLoader, load_image
from engine.dissection.masks import layer_masks
from engine.dissection.run import (
    DissectionResult,
    concept_image_set,
    dissection_preprocess,
    forward_batch,
)

TILE_CELL = 80
"""Side in pixels of one image in a unit's tile."""
TILE_FORMAT = "jpg"
"""File type of the tiles (JPEG: a tenth of a PNG's size for photo-like concept images)."""
TILE_QUALITY = 88
REPORT_TOP_UNITS = 16
"""Besides every detector, the report draws the tiles of this many best units of each layer."""

_CAPTION = 16
_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
            "#ff9da7", "#9c755f", "#bab0ac")
_OUTLINE = (255, 230, 0)


def write_report(result: DissectionResult, concepts: ConceptDataset, out_dir: str | Path, *,
                 backend: Backend | None = None, all_units: bool = False,
                 top_units: int = REPORT_TOP_UNITS, workers: int | None = None) -> Path:
    """Write the report folder ``out_dir`` (replaced as a whole) and return it.

    Unit tiles need the model again (the activations of each unit's top images), so they are
    drawn only when ``backend`` is given: for every detector and the ``top_units`` best units
    of each layer, or for every unit with ``all_units``; ``workers`` threads draw them (default:
    the cores). ``concepts`` must be the data set ``result`` came from (its image indices).
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        drawn = report_units(result, top=top_units, all_units=all_units) if backend is not None else {}
        tiles = (render_tiles(backend, concepts, result, tmp, units=drawn, workers=workers)
                 if backend is not None else {})
        rows = result.to_rows()
        _write_csv(tmp / "dissection.csv", rows, result.categories)
        with open(tmp / "thresholds.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["layer", "unit", "threshold"])
            for name, ld in result.layers.items():
                w.writerows([name, k, repr(float(t))] for k, t in enumerate(ld.thresholds))
        summary = summary_dict(result, tiles={name: sorted(ks) for name, ks in drawn.items()})
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        svg = layers_svg(result)
        (tmp / "layers.svg").write_text(svg, encoding="utf-8")
        (tmp / "index.html").write_text(_html(result, summary, rows, svg, tiles, all_units=all_units,
                                              top_units=top_units), encoding="utf-8")
    return out


def tie_fallback_units(result: DissectionResult, layer: str) -> list[int]:
    """The units of ``layer`` whose threshold tied with a mass of activations, so that their masks
    use ``S > T`` instead of the paper's ``S >= T`` (see :mod:`engine.dissection.masks`)."""
    return np.flatnonzero(np.asarray(result.layers[layer].tie_fallback, dtype=bool)).tolist()


def summary_dict(result: DissectionResult, *, tiles: Mapping[str, Sequence[int]] | None = None) -> dict[str, object]:
    """What ``summary.json`` holds; ``tiles``: the units drawn per layer (none when omitted)."""
    layers = {}
    for name, ld in result.layers.items():
        s = ld.summary
        layers[name] = {
            "summary": result.summary_line(name),
            "units": ld.units,
            "detectors": s.n_detectors,
            "unique_concepts": s.n_unique_concepts,
            "detectors_per_category": dict(zip(result.categories,
                                               s.detectors_per_category.tolist(), strict=True)),
            "unique_concepts_per_category": dict(
                zip(result.categories, s.unique_concepts_per_category.tolist(), strict=True)),
            "concepts": sorted({s.label_name[k] for k in np.flatnonzero(s.is_detector)}),
            "tie_fallback_units": tie_fallback_units(result, name),
            "tiles": [int(k) for k in (tiles or {}).get(name, ())],
        }
    return {
        "model": result.model,
        "model_sha256": result.model_sha256,
        "concepts": result.concepts_root,
        "images": result.n_images,
        "skipped": [{"path": p, "reason": r} for p, r in result.skipped],
        "params": result.params.to_dict(),
        "categories": list(result.categories),
        "layers": layers,
        "passes": result.passes,
        "notes": list(result.notes),
        "warnings": list(result.warnings),
        "thresholds": "thresholds.csv",
        "seconds": result.seconds,
    }


def _write_csv(path: Path, rows: list[dict[str, object]], categories: Sequence[str]) -> None:
    header = ["layer", "unit", "category", "label", "iou", "detector"]
    for cat in categories:
        header += [f"best_{cat}", f"iou_{cat}"]
    header += [k for r in rows[:1] for k in r if k not in header]  # columns the engine adds
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.DictWriter(f, header, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else
                            str(v).lower() if isinstance(v, bool) else v) for k, v in r.items()})


# ----------------------------------------------------------------------------- tiles


def report_units(result: DissectionResult, *, top: int = REPORT_TOP_UNITS,
                 all_units: bool = False) -> dict[str, list[int]]:
    """Per layer the units whose tiles the report draws: every detector and the ``top`` best
    units by IoU (every unit with ``all_units``), best first."""
    chosen: dict[str, list[int]] = {}
    for name, ld in result.layers.items():
        s = ld.summary
        order = np.lexsort((np.arange(ld.units), -np.asarray(s.iou, dtype=np.float64)))
        if all_units:
            chosen[name] = order.tolist()
            continue
        keep = np.zeros(ld.units, dtype=bool)
        keep[order[:top]] = True
        keep |= np.asarray(s.is_detector, dtype=bool)
        chosen[name] = [int(k) for k in order if keep[k]]
    return chosen


def unit_maps(backend: Backend, concepts: ConceptDataset, result: DissectionResult,
              wanted: Mapping[tuple[str, int], Sequence[int]]) -> dict[tuple[str, int], dict[int, torch.Tensor]]:
    """The activation maps ``(h, w)`` of units on images: ``wanted[(layer, unit)]`` lists the
    concept image indices for that unit. One forward pass (in ``result.params.batch_size``
    batches, fed as the dissection fed them) over the union of the images; only the wanted
    maps are kept. Images that cannot be read are left out of the answer."""
    per_image: dict[int, dict[str, list[int]]] = {}
    for (layer, unit), images in wanted.items():
        for i in images:
            if i >= 0:
                per_image.setdefault(int(i), {}).setdefault(layer, []).append(unit)
    out: dict[tuple[str, int], dict[int, torch.Tensor]] = {key: {} for key in wanted}
    if not per_image:
        return out
    layers = [n for n in result.layers if any(n in v for v in per_image.values())]
    loader = ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess),
                         batch_size=result.params.batch_size, indices=sorted(per_image))
    with loader:
        for batch in loader:
            got = forward_batch(backend, batch.array, layers, torch.device("cpu"))
            for row, i in enumerate(batch.indices.tolist()):
                for layer, units in per_image[i].items():
                    maps = got[layer][row, units].clone()
                    for j, unit in enumerate(units):
                        out[(layer, unit)][i] = maps[j]
    return out


def unit_image_masks(result: DissectionResult, layer: str, unit: int, maps: Mapping[int, torch.Tensor],
                     mask_sizes: Mapping[int, tuple[int, int]]) -> dict[int, np.ndarray]:
    """The unit's masks ``M_k`` on the images of ``maps`` (image index -> its ``(h, w)`` map), each
    at its label-mask size ``mask_sizes[i]``: :func:`engine.dissection.masks.layer_masks`, the
    engine's one code path (the result's thresholds, rule and tie fallback), bool arrays."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in maps:
        by_size.setdefault(tuple(mask_sizes[i]), []).append(i)  # type: ignore[arg-type]
    out: dict[int, np.ndarray] = {}
    for size, images in by_size.items():
        stack = torch.stack([maps[i] for i in images])
        masks = layer_masks(result, layer, stack, size, unit).numpy()
        out.update(zip(images, masks, strict=True))
    return out


def top_image_masks(backend: Backend, concepts: ConceptDataset, result: DissectionResult, layer: str,
                    unit: int, images: Sequence[int] | None = None) -> list[tuple[int, np.ndarray]]:
    """``(image index, mask)`` for ``unit``'s top images (or ``images``), in that order, each mask
    bool at the image's label-mask size: what the report's tiles and the GUI view draw."""
    chosen = [int(i) for i in (result.layers[layer].top_images[unit] if images is None else images) if i >= 0]
    maps = unit_maps(backend, concepts, result, {(layer, unit): chosen})[(layer, unit)]
    masks = unit_image_masks(result, layer, unit, maps, {i: concepts.sample(i).mask_size for i in maps})
    return [(i, masks[i]) for i in chosen if i in masks]


def render_tiles(backend: Backend, concepts: ConceptDataset, result: DissectionResult,
                 out_dir: str | Path, *, units: Mapping[str, Sequence[int]] | None = None,
                 cell: int = TILE_CELL, workers: int | None = None) -> dict[tuple[str, int], Path]:
    """Draw ``tiles/<layer>/unit_<k>.jpg`` under ``out_dir`` for ``units`` (default: every
    unit) and return the paths.

    Runs the model once over the union of those units' top images (a few), then draws each
    tile in a thread pool of ``workers`` (default: the cores): each image at ``cell`` px with
    the unit's mask ``M_k`` (:func:`unit_image_masks`: activation upsampled to the label-mask
    size, compared with ``T_k`` by the dissection's rule) bright and outlined and the rest
    dimmed, captioned with label and IoU.
    """
    out = Path(out_dir)
    if units is None:
        units = {name: list(range(ld.units)) for name, ld in result.layers.items()}
    wanted = {(name, int(k)): [int(i) for i in result.layers[name].top_images[k] if i >= 0]
              for name, ks in units.items() for k in ks}
    maps = unit_maps(backend, concepts, result, wanted)
    for name in units:
        (out / "tiles" / layer_folder(name)).mkdir(parents=True, exist_ok=True)
    pictures: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}

    def picture(i: int) -> tuple[np.ndarray, tuple[int, int]]:
        got = pictures.get(i)
        if got is None:  # two threads may decode the same image: harmless, the same pixels
            got = pictures[i] = (load_image(concepts.image_path(i)), concepts.sample(i).mask_size)
        return got

    def draw(key: tuple[str, int]) -> Path:
        name, k = key
        ld = result.layers[name]
        s = ld.summary
        have = maps[key]
        masks = unit_image_masks(result, name, k, have, {i: picture(i)[1] for i in have})
        cells = [_overlay(picture(i)[0], masks[i], cell) if i in masks else
                 np.full((cell, cell, 3), 40, dtype=np.uint8) for i in ld.top_images[k].tolist()]
        caption = (f"{name} unit {k}: {s.label_name[k]} ({s.category_name[k]}) "
                   f"IoU {s.iou[k]:.3f}" + (" detector" if s.is_detector[k] else ""))
        path = out / "tiles" / layer_folder(name) / f"unit_{k}.{TILE_FORMAT}"
        _tile(cells, caption, cell).save(path, quality=TILE_QUALITY)
        return path

    with ThreadPoolExecutor(max_workers=workers or _cores(), thread_name_prefix="convlens-tiles") as pool:
        return dict(zip(wanted, pool.map(draw, wanted), strict=True))


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _overlay(picture: np.ndarray, mask: np.ndarray, cell: int) -> np.ndarray:
    """The picture at ``cell`` px with the mask region bright, the rest dimmed, edges marked."""
    img = np.asarray(Image.fromarray(picture).resize((cell, cell), Image.Resampling.BILINEAR),
                     dtype=np.float32)
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((cell, cell), Image.Resampling.NEAREST)) > 0
    out = np.where(m[:, :, None], img, img * 0.3)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out[m & ~inner] = _OUTLINE
    return out.clip(0, 255).astype(np.uint8)


def _tile(cells: list[np.ndarray], caption: str, cell: int) -> Image.Image:
    gap = 2
    width = len(cells) * (cell + gap) - gap
    tile = Image.new("RGB", (width, cell + _CAPTION), (255, 255, 255))
    for j, c in enumerate(cells):
        tile.paste(Image.fromarray(c), (j * (cell + gap), _CAPTION))
    ImageDraw.Draw(tile).text((2, 2), caption, fill=(0, 0, 0))
    return tile


# ----------------------------------------------------------------------------- chart


def layers_svg(result: DissectionResult) -> str:
    """Grouped bars: per layer, the number of detectors of each category (SVG text)."""
    layers = list(result.layers)
    cats = result.categories
    counts = np.array([result.layers[n].summary.detectors_per_category for n in layers]).reshape(
        len(layers), len(cats))
    top = max(1, int(counts.max()) if counts.size else 1)
    bar, gap, left, base, height = 18, 24, 48, 230, 200
    group = bar * len(cats) + gap
    width = left + group * len(layers) + 140
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{base + 60}" '
             f'viewBox="0 0 {width} {base + 60}" font-family="sans-serif" font-size="11">'),
             '<title>Detectors per category per layer</title>',
             f'<line x1="{left}" y1="{base}" x2="{width - 130}" y2="{base}" stroke="#333"/>',
             f'<line x1="{left}" y1="{base - height}" x2="{left}" y2="{base}" stroke="#333"/>']
    for t in sorted({0, top // 2, top}):
        y = base - height * t / top
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t}</text>')
    for i, name in enumerate(layers):
        x0 = left + gap / 2 + i * group
        for g in range(len(cats)):
            v = int(counts[i, g])
            h = height * v / top
            x = x0 + g * bar
            parts.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar - 2}" '
                         f'height="{h:.1f}" fill="{_PALETTE[g % len(_PALETTE)]}">'
                         f'<title>{_escape(name)} {_escape(cats[g])}: {v}</title></rect>')
            if v:
                parts.append(f'<text x="{x + (bar - 2) / 2:.1f}" y="{base - h - 3:.1f}" '
                             f'text-anchor="middle">{v}</text>')
        parts.append(f'<text x="{x0 + bar * len(cats) / 2:.1f}" y="{base + 16}" '
                     f'text-anchor="middle">{_escape(name)}</text>')
    for g, cat in enumerate(cats):
        y = base - height + g * 16
        parts.append(f'<rect x="{width - 120}" y="{y}" width="10" height="10" '
                     f'fill="{_PALETTE[g % len(_PALETTE)]}"/>')
        parts.append(f'<text x="{width - 104}" y="{y + 9}">{_escape(cat)}</text>')
    parts.append(f'<text x="{left}" y="{base + 40}">detectors (IoU &gt; '
                 f'{result.params.iou_threshold:g}) per category</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- HTML


_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.from(body.rows);
    var asc = th.dataset.asc !== '1';
    th.dataset.asc = asc ? '1' : '0';
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _escape(text: object) -> str:
    """``text`` for HTML and SVG: names that are not valid UTF-8 (surrogate escapes from
    ``os.fsdecode``, e.g. a folder named in Latin-1) show their raw bytes as ``\\xNN``, so the
    page stays valid UTF-8."""
    return html.escape(str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def _href(name: str) -> str:
    """A relative link to a file named ``name``: its bytes percent-encoded (raw bytes included)."""
    return html.escape(urllib.parse.quote(os.fsencode(name)))


def _html(result: DissectionResult, summary: dict[str, object], rows: list[dict[str, object]],
          svg: str, tiles: dict[tuple[str, int], Path], *, all_units: bool = False,
          top_units: int = REPORT_TOP_UNITS) -> str:
    e = _escape
    cats = result.categories
    p = result.params
    head = ("<tr><th>layer</th><th>units</th><th>detectors</th><th>unique concepts</th>"
            + "".join(f"<th>{e(c)}</th>" for c in cats) + "</tr>")
    layer_rows = []
    fallback: dict[str, set[int]] = {}
    for name, ld in result.layers.items():
        s = ld.summary
        per = "".join(f"<td>{d} ({u})</td>" for d, u in zip(
            s.detectors_per_category.tolist(), s.unique_concepts_per_category.tolist(),
            strict=True))
        layer_rows.append(f"<tr><td>{e(name)}</td><td>{ld.units}</td><td>{s.n_detectors}</td>"
                          f"<td>{s.n_unique_concepts}</td>{per}</tr>")
        fallback[name] = set(tie_fallback_units(result, name))
    unit_rows = []
    # detectors first, then by IoU: the units with tiles open the table (a click on a title re-sorts)
    order = {name: j for j, name in enumerate(result.layers)}
    for r in sorted(rows, key=lambda r: (not r["detector"], -float(r["iou"]), order[str(r["layer"])],  # type: ignore[arg-type]
                                         int(r["unit"]))):  # type: ignore[call-overload]
        layer, unit = str(r["layer"]), int(r["unit"])  # type: ignore[call-overload]
        tile = tiles.get((layer, unit))
        href = f"tiles/{_href(tile.parent.name)}/{_href(tile.name)}" if tile is not None else ""
        img = (f'<a href="{href}"><img loading="lazy" src="{href}" alt="{e(layer)} unit {unit}"></a>'
               if tile is not None else "")
        iou = float(r["iou"])  # type: ignore[arg-type]
        note = "tie: S &gt; T" if unit in fallback.get(layer, ()) else ""
        unit_rows.append(
            f'<tr class="{"det" if r["detector"] else ""}"><td>{e(layer)}</td>'
            f'<td data-v="{unit}">{unit}</td><td>{e(str(r["label"]))}</td>'
            f'<td>{e(str(r["category"]))}</td><td data-v="{iou:.6f}">{iou:.4f}</td>'
            f'<td>{"yes" if r["detector"] else "no"}</td><td>{note}</td><td>{img}</td></tr>')
    skipped = (f"<p>{len(result.skipped)} images could not be read and were skipped.</p>"
               if result.skipped else "")
    n_units = sum(ld.units for ld in result.layers.values())
    if not tiles:
        drawn = "<p>No unit tiles in this report (written without the model).</p>"
    elif all_units or len(tiles) == n_units:
        drawn = f"<p>Top images are drawn for all {n_units} units; click one to enlarge it.</p>"
    else:
        drawn = (f"<p>Top images are drawn for {len(tiles)} of the {n_units} units: every detector and "
                 f"the {top_units} best units of each layer (click one to enlarge it); "
                 "<code>convlens dissect --all-units</code> draws every unit.</p>")
    any_tie = any(fallback.values())
    tie_note = ("<p class=\"note\">Tied thresholds: a mass of a unit's activations equals its <i>T</i> "
                "(e.g. <i>T</i> = 0 on a sparse unit), so <i>S</i> &ge; <i>T</i> would mark (nearly) the whole "
                "image; those units (marked in the table) use <i>S</i> &gt; <i>T</i> instead, and one that "
                "never exceeds <i>T</i> gets no label.</p>") if any_tie else ""
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in result.notes)
    notes += "".join(f'<p class="warn">{e(n)}</p>' for n in result.warnings)
    passes_text = (" The images went through the model once (the maps were kept for the tally)."
                   if result.passes == 1 else f" The images went through the model {result.passes} times.")
    seconds = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items()
                        if "[" not in k and k not in ("setup", "progress"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Network Dissection: {e(Path(result.model).name)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: left; }}
table.sortable th {{ cursor: pointer; background: #f3f3f3; }}
tr.det td {{ background: #f2f8ee; }}
td img {{ height: 56px; display: block; }}
p.note {{ background: #f4f6fa; padding: 4px 8px; border-left: 3px solid #7a8aa8; }}
p.warn {{ background: #fff6e0; padding: 4px 8px; border-left: 3px solid #e0a000; }}
</style></head><body>
<h1>Network Dissection of {e(Path(result.model).name)}</h1>
<p>Model <code>{e(result.model)}</code> (sha256 {e(result.model_sha256[:12])}), concepts
<code>{e(result.concepts_root)}</code>: {result.n_images} images, categories
{e(", ".join(cats))}.</p>
<p>Method: Bau, Zhou, Khosla, Oliva, Torralba, <i>Network Dissection</i>, CVPR 2017 —
top quantile {p.quantile:g}, mask {"S &gt; T" if p.strict_mask else "S &ge; T"} (activations
upsampled to the label-mask size), {e(p.mask_rule)} union rule, detector when IoU &gt; {p.iou_threshold:g}.{passes_text}</p>
{skipped}{notes}{tie_note}
<h2>Layers</h2>
<table><thead>{head}</thead><tbody>{"".join(layer_rows)}</tbody></table>
<p>Per category: detectors (unique concepts).</p>
{svg}
<h2>Units</h2>
{drawn}
<p>Detectors first, then by IoU; click a column title to sort.</p>
<table class="sortable"><thead><tr><th>layer</th><th>unit</th><th>label</th><th>category</th>
<th>IoU</th><th>detector</th><th>note</th><th>top images</th></tr></thead>
<tbody>
{chr(10).join(unit_rows)}
</tbody></table>
<p>Time: {e(seconds)}.</p>
<script>{_SORT_JS}</script>
</body></html>
"""
