"""The Network Dissection report: CSV, JSON summary, per-unit tiles, an SVG chart and HTML.

Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying Interpretability of Deep
Visual Representations", CVPR 2017, present each unit by its top-activating images with the
unit's mask (the upsampled activation above ``T_k``) highlighted, its label and IoU, and each
layer by its number of detectors per category. :func:`write_report` writes all of it into one
folder, atomically (a failed run leaves the previous report, or nothing):

- ``dissection.csv``: one row per unit (:meth:`DissectionResult.to_rows`);
- ``thresholds.csv``: layer, unit, ``T_k``;
- ``summary.json``: per layer "N/M units are detectors covering K concepts", detectors and unique concepts
  per category, timings;
- ``tiles/<layer>/unit_<k>.png`` (with a backend): the unit's top images in a row, the mask
  region bright and outlined, the rest dimmed, captioned with label and IoU;
- ``layers.svg``: detectors per category per layer (hand-written SVG);
- ``index.html``: a self-contained page with the summary, the chart and a sortable unit table.
"""

from __future__ import annotations

import csv
import html
import json
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image, ImageDraw

from engine.backends.base import Backend
from engine.cache import atomic_dir
from engine.cache import safe_name as layer_folder
from engine.concepts import ConceptDataset
from engine.data.images import ImageLoader, load_image
from engine.dissection.run import (
    DissectionResult,
    concept_image_set,
    dissection_preprocess,
    forward_batch,
)
from engine.dissection.tally import unit_masks

TILE_CELL = 96
"""Side in pixels of one image in a unit's tile."""

_CAPTION = 16
_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
            "#ff9da7", "#9c755f", "#bab0ac")
_OUTLINE = (255, 230, 0)



def write_report(result: DissectionResult, concepts: ConceptDataset, out_dir: str | Path, *,
                 backend: Backend | None = None) -> Path:
    """Write the report folder ``out_dir`` (replaced as a whole) and return it.

    Unit tiles need the model again (the activations of each unit's top images), so they are
    drawn only when ``backend`` is given; ``concepts`` must be the data set ``result`` came
    from (its image indices).
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tiles = render_tiles(backend, concepts, result, tmp) if backend is not None else {}
        rows = result.to_rows()
        _write_csv(tmp / "dissection.csv", rows, result.categories)
        with open(tmp / "thresholds.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["layer", "unit", "threshold"])
            for name, ld in result.layers.items():
                w.writerows([name, k, repr(float(t))] for k, t in enumerate(ld.thresholds))
        summary = summary_dict(result)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        svg = layers_svg(result)
        (tmp / "layers.svg").write_text(svg, encoding="utf-8")
        (tmp / "index.html").write_text(_html(result, summary, rows, svg, tiles),
                                        encoding="utf-8")
    return out


def summary_dict(result: DissectionResult) -> dict[str, object]:
    """What ``summary.json`` holds."""
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
        "thresholds": "thresholds.csv",
        "seconds": result.seconds,
    }


def _write_csv(path: Path, rows: list[dict[str, object]], categories: Sequence[str]) -> None:
    header = ["layer", "unit", "category", "label", "iou", "detector"]
    for cat in categories:
        header += [f"best_{cat}", f"iou_{cat}"]
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.DictWriter(f, header, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else
                            str(v).lower() if isinstance(v, bool) else v) for k, v in r.items()})


# ----------------------------------------------------------------------------- tiles


def render_tiles(backend: Backend, concepts: ConceptDataset, result: DissectionResult,
                 out_dir: str | Path, *, cell: int = TILE_CELL) -> dict[tuple[str, int], Path]:
    """Draw ``tiles/<layer>/unit_<k>.png`` under ``out_dir`` for every unit; return the paths.

    Runs the model once over the union of the units' top images (a few), and draws each
    image with the unit's mask ``M_k`` (activation upsampled to the label-mask size, ``>= T_k``,
    or ``> T_k`` with ``strict_mask``) bright and outlined and the rest dimmed.
    """
    out = Path(out_dir)
    layers = list(result.layers)
    wanted = np.unique(np.concatenate([ld.top_images.ravel() for ld in result.layers.values()]))
    wanted = wanted[wanted >= 0]
    acts: dict[str, dict[int, torch.Tensor]] = {n: {} for n in layers}
    device = torch.device("cpu")
    loader = ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess),
                         batch_size=result.params.batch_size, indices=wanted.tolist())
    with loader:
        for batch in loader:
            got = forward_batch(backend, batch.array, layers, device)
            for n in layers:
                for row, i in enumerate(batch.indices.tolist()):
                    acts[n][i] = got[n][row]
    paths: dict[tuple[str, int], Path] = {}
    pictures: dict[int, np.ndarray] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for name, ld in result.layers.items():
        folder = out / "tiles" / layer_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        s = ld.summary
        for k in range(ld.units):
            cells = []
            for i in ld.top_images[k].tolist():
                if i < 0 or i not in acts[name]:
                    cells.append(np.full((cell, cell, 3), 40, dtype=np.uint8))
                    continue
                if i not in pictures:
                    pictures[i] = load_image(concepts.image_path(i))
                    sizes[i] = concepts.sample(i).mask_size
                mask = unit_masks(acts[name][i][k][None, None], ld.thresholds[k:k + 1], sizes[i],
                                  strict=result.params.strict_mask)[0, 0].numpy()
                cells.append(_overlay(pictures[i], mask, cell))
            caption = (f"{name} unit {k}: {s.label_name[k]} ({s.category_name[k]}) "
                       f"IoU {s.iou[k]:.3f}" + (" detector" if s.is_detector[k] else ""))
            path = folder / f"unit_{k}.png"
            _tile(cells, caption, cell).save(path, optimize=False, compress_level=3)
            paths[(name, k)] = path
    return paths


def _overlay(picture: np.ndarray, mask: np.ndarray, cell: int) -> np.ndarray:
    """The picture at ``cell`` px with the mask region bright, the rest dimmed, edges marked."""
    img = np.asarray(Image.fromarray(picture).resize((cell, cell), Image.Resampling.BILINEAR),
                     dtype=np.float32)
    small = torch.from_numpy(mask)[None, None].float()
    m = nnf.interpolate(small, size=(cell, cell), mode="nearest")[0, 0].numpy() > 0.5
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
          svg: str, tiles: dict[tuple[str, int], Path]) -> str:
    e = _escape
    cats = result.categories
    p = result.params
    head = ("<tr><th>layer</th><th>units</th><th>detectors</th><th>unique concepts</th>"
            + "".join(f"<th>{e(c)}</th>" for c in cats) + "</tr>")
    layer_rows = []
    for name, ld in result.layers.items():
        s = ld.summary
        per = "".join(f"<td>{d} ({u})</td>" for d, u in zip(
            s.detectors_per_category.tolist(), s.unique_concepts_per_category.tolist(),
            strict=True))
        layer_rows.append(f"<tr><td>{e(name)}</td><td>{ld.units}</td><td>{s.n_detectors}</td>"
                          f"<td>{s.n_unique_concepts}</td>{per}</tr>")
    unit_rows = []
    for r in rows:
        tile = tiles.get((str(r["layer"]), int(r["unit"])))  # type: ignore[call-overload]
        img = (f'<img loading="lazy" src="tiles/{_href(layer_folder(str(r["layer"])))}/'
               f'unit_{r["unit"]}.png" alt="unit {r["unit"]}">' if tile is not None else "")
        iou = float(r["iou"])  # type: ignore[arg-type]
        unit_rows.append(
            f'<tr class="{"det" if r["detector"] else ""}"><td>{e(str(r["layer"]))}</td>'
            f'<td data-v="{r["unit"]}">{r["unit"]}</td><td>{e(str(r["label"]))}</td>'
            f'<td>{e(str(r["category"]))}</td><td data-v="{iou:.6f}">{iou:.4f}</td>'
            f'<td>{"yes" if r["detector"] else "no"}</td><td>{img}</td></tr>')
    skipped = (f"<p>{len(result.skipped)} images could not be read and were skipped.</p>"
               if result.skipped else "")
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
td img {{ height: 56px; }}
</style></head><body>
<h1>Network Dissection of {e(Path(result.model).name)}</h1>
<p>Model <code>{e(result.model)}</code> (sha256 {e(result.model_sha256[:12])}), concepts
<code>{e(result.concepts_root)}</code>: {result.n_images} images, categories
{e(", ".join(cats))}.</p>
<p>Method: Bau, Zhou, Khosla, Oliva, Torralba, <i>Network Dissection</i>, CVPR 2017 —
top quantile {p.quantile:g}, mask {"S &gt; T" if p.strict_mask else "S &ge; T"},
{e(p.mask_rule)} union rule, detector when IoU &gt; {p.iou_threshold:g}.</p>
{skipped}
<h2>Layers</h2>
<table><thead>{head}</thead><tbody>{"".join(layer_rows)}</tbody></table>
<p>Per category: detectors (unique concepts).</p>
{svg}
<h2>Units</h2>
<p>Click a column title to sort.</p>
<table class="sortable"><thead><tr><th>layer</th><th>unit</th><th>label</th><th>category</th>
<th>IoU</th><th>detector</th><th>top images</th></tr></thead>
<tbody>
{chr(10).join(unit_rows)}
</tbody></table>
<p>Time: {e(seconds)}.</p>
<script>{_SORT_JS}</script>
</body></html>
"""
