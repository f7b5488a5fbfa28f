"""What verifying a cached extraction costs: re-hashing every image file's bytes at reuse.

    .venv/bin/python bench/cache_verify.py [--small 20000] [--repeats 3] [--workers N]

A cached extraction is reused only after every image file is re-read and its BLAKE2b digest
compared with the one stored when it was extracted (``engine.data.images.digest_files``: files
are read, never decoded). This prints, per image set made in a temporary folder:

- ``stat``:    ``ImageSet.fingerprint()`` (path, size, mtime of every file), what the cache key
               already cost before content digests;
- ``verify``:  ``digest_files`` over the set (the added cost of every cache hit);
- ``decode``:  ``load_image`` per file, measured on a sample and scaled to the set: what a
               recomputation would spend before even running the model;
- ``hit``:     a whole cache hit of ``extract`` (key, entry checks, verification) for the 20k PNGs,
               with the demo model.

Times are the best of ``--repeats`` runs with the files in the page cache (a first run after a
reboot reads from disk and is bound by the disk instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.data.images import digest_files, load_image, open_image_set


def make_set(folder: Path, n: int, size: tuple[int, int], ext: str, noise: float) -> Path:
    """``n`` crops of real pictures (plus some noise, to set the file size) as PNG or JPEG."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    w, h = size
    for i in range(n):
        p = pics[i % len(pics)]
        if p.shape[0] >= h and p.shape[1] >= w:
            y, x = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
            img = p[y:y + h, x:x + w].astype(np.float32)
        else:
            img = np.asarray(Image.fromarray(p).resize((w, h)), dtype=np.float32)
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        pil = Image.fromarray(img)
        if ext == "png":
            pil.save(folder / f"{i:05d}.png")
        else:
            pil.save(folder / f"{i:05d}.jpg", quality=92)
    return folder


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cache_hit_seconds(folder: Path, repeats: int) -> float:
    from engine.activations import extract
    from engine.backends import open_backend
    from engine.cache import Cache
    from engine.demo import prepare_demo
    from engine.jobs import run_sync
    from engine.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        spec, _ = prepare_demo(Path(tmp) / "demo")
        loaded = load_model(spec)
        be = open_backend(loaded, device="cpu")
        cache = Cache(Path(tmp) / "cache")
        run_sync(extract(be, loaded.cache_id, open_image_set(folder), [], batch_size=256, cache=cache))

        def hit() -> None:
            acts = run_sync(extract(be, loaded.cache_id, open_image_set(folder), [], cache=cache))
            assert acts.from_cache

        return best(hit, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=20000, help="files in each small-image set")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="threads for digest_files (default: min(8, cpus))")
    ap.add_argument("--no-hit", action="store_true", help="skip the whole-cache-hit measurement")
    a = ap.parse_args()

    sets = [
        (f"{a.small} PNG ~5 KB", a.small, (46, 46), "png", 12.0),
        (f"{a.small} JPEG ~5 KB", a.small, (100, 100), "jpg", 10.0),
        ("500 JPEG ~1 MB", 500, (1400, 1050), "jpg", 30.0),
        ("50 JPEG ~10 MB", 50, (4000, 3000), "jpg", 60.0),
    ]
    print(f"cpus: {os.cpu_count()}, digest workers: {a.workers or min(8, os.cpu_count() or 1)}; "
          f"best of {a.repeats}, files in the page cache")
    rows = []
    with tempfile.TemporaryDirectory(prefix="convlens-verify-") as tmp:
        for label, n, size, ext, noise in sets:
            folder = make_set(Path(tmp) / label.replace(" ", "_").replace("~", ""), n, size, ext, noise)
            images = open_image_set(folder)
            paths = [r.path for r in images.records]
            mb = sum(os.path.getsize(p) for p in paths) / 1e6
            t_stat = best(images.fingerprint, a.repeats)
            t_verify = best(lambda paths=paths: digest_files(paths, workers=a.workers), a.repeats)
            sample = paths[:: max(1, len(paths) // 200)]
            t0 = time.perf_counter()
            for p in sample:
                load_image(p)
            t_decode = (time.perf_counter() - t0) / len(sample) * len(paths)
            hit = (cache_hit_seconds(folder, a.repeats) if label.startswith(f"{a.small} PNG") and not a.no_hit
                   else None)
            rows.append((label, n, mb, t_stat, t_verify, t_decode, hit))

    head = ("image set", "files", "MB", "stat s", "verify s", "verify us/file", "verify MB/s", "decode s", "hit s")
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for label, n, mb, t_stat, t_verify, t_decode, hit in rows:
        print(f"| {label} | {n} | {mb:.0f} | {t_stat:.3f} | {t_verify:.3f} | {t_verify / n * 1e6:.0f} | "
              f"{mb / t_verify:.0f} | {t_decode:.2f} | {'' if hit is None else f'{hit:.3f}'} |")


if __name__ == "__main__":
    main()
