"""Mergeable statistics: every statistic a shard computes merges into the one-pass result.

Each test splits the data into 2-3 shards, builds the statistic per shard, merges them in
different orders and compares with one pass over all of it: exactly equal where the statistic
is exact, within the stated bound for the histogram quantile. Real models and images for the
end-to-end parts (the demo RNet, its face crops, the built-in concept set).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.activations import TopK, extract, merge_extractions, merge_rows
from engine.backends import open_backend
from engine.cache import Cache
from engine.concepts import generate_concepts
from engine.data.images import open_image_set
from engine.dissection import IoUTally, TopQuantile
from engine.dissection import run as drun
from engine.dissection.labels import Labels
from engine.dissection.sparse import SparseTally
from engine.dissection.timing import Clock
from engine.jobs import run_sync
from engine.models import load_model
from engine.types import ConvLensError

ORDERS = [(0, 1, 2), (2, 0, 1), (1, 2, 0)]


def _shards(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Three disjoint, non-contiguous, uneven subsets of range(n) (each increasing)."""
    owner = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    owner[:3] = [0, 1, 2]
    return [np.flatnonzero(owner == s) for s in range(3)]


def _merge_all(items: list, order: tuple[int, ...]):
    out = items[order[0]]
    for i in order[1:]:
        out = out.merge(items[i])
    return out


# ----------------------------------------------------------------------------- top-k heaps


def test_topk_heaps_of_shards_merge_into_the_one_pass_heap() -> None:
    rng = np.random.default_rng(0)
    n, units, k = 300, 5, 16
    values = np.round(rng.normal(size=(n, units)), 1).astype(np.float32)  # many ties
    values[:, 4] = 0.0  # one unit all ties: the lowest image numbers win
    one = TopK(units, k)
    for s in range(0, n, 7):
        one.add(values[s:s + 7], np.arange(s, min(s + 7, n)))
    ids, vals = one.arrays()
    # the definition: by value descending, then image ascending
    for u in range(units):
        want = np.lexsort((np.arange(n), -values[:, u]))[:k]
        np.testing.assert_array_equal(ids[u], want)
        np.testing.assert_array_equal(vals[u], values[want, u])
    np.testing.assert_array_equal(ids[4], np.arange(k))
    parts = []
    for shard in _shards(n, rng):
        h = TopK(units, k)
        for s in range(0, len(shard), 5):
            h.add(values[shard[s:s + 5]], shard[s:s + 5])
        parts.append(h)
    for order in ORDERS:
        mids, mvals = _merge_all(parts, order).arrays()
        np.testing.assert_array_equal(mids, ids)
        np.testing.assert_array_equal(mvals, vals)
    # a shard of fewer than k images pads; round trip through the saved arrays
    small = TopK(units, k)
    small.add(values[:3], np.arange(3))
    sids, svals = small.arrays()
    assert (sids[:, 3:] == -1).all() and np.isnan(svals[:, 3:]).all()
    back = TopK.from_arrays(sids, svals).merge(TopK.from_arrays(*TopK(units, k).arrays()))
    np.testing.assert_array_equal(back.arrays()[0], sids)
    with pytest.raises(ConvLensError, match="cannot merge"):
        small.merge(TopK(units, k + 1))


def test_per_image_arrays_of_disjoint_shards_concatenate_in_image_order() -> None:
    rng = np.random.default_rng(1)
    full = rng.normal(size=(50, 3, 2)).astype(np.float32)
    shards = _shards(50, rng)
    for order in ORDERS:
        idx, rows = merge_rows([(shards[i], full[shards[i]]) for i in order])
        np.testing.assert_array_equal(idx, np.arange(50))
        np.testing.assert_array_equal(rows, full)
    with pytest.raises(ConvLensError, match="overlap"):
        merge_rows([(shards[0], full[shards[0]]), (shards[0][:2], full[shards[0][:2]])])


# ----------------------------------------------------------------------------- quantiles


def _reference(data: np.ndarray, q: float) -> np.ndarray:
    per_unit = np.moveaxis(data, 1, 0).reshape(data.shape[1], -1).astype(np.float64)
    return np.quantile(per_unit, 1 - q, axis=1, method="linear")


def _sketches(data: np.ndarray, shards: list[np.ndarray], q: float, max_bytes: int) -> list[TopQuantile]:
    total = data.shape[0] * int(np.prod(data.shape[2:]))
    out = []
    for shard in shards:
        tq = TopQuantile(data.shape[1], total, q, max_bytes=max_bytes)
        for s in range(0, len(shard), 6):
            tq.update(torch.from_numpy(data[shard[s:s + 6]]))
        out.append(tq)
    return out


@pytest.mark.parametrize("q", [0.005, 0.2])
def test_exact_quantile_sketches_merge_bit_for_bit(q: float) -> None:
    rng = np.random.default_rng(2)
    data = np.round(rng.normal(-0.5, 2.0, size=(90, 4, 5, 3)) * 2).astype(np.float32) / 2  # ties
    total = 90 * 15
    one = TopQuantile(4, total, q)
    one.update(torch.from_numpy(data))
    want = one.thresholds()
    np.testing.assert_array_equal(want, _reference(data, q))
    parts = _sketches(data, _shards(90, rng), q, 256 * 2**20)
    assert all(p.exact for p in parts)
    for order in ORDERS:
        merged = _merge_all(parts, order)
        np.testing.assert_array_equal(merged.thresholds(), want)
    with pytest.raises(ConvLensError, match=r"expected 1350 .* saw"):
        parts[0].merge(parts[1]).thresholds()  # two of three shards: not the whole data set
    with pytest.raises(ConvLensError, match="brings the count"):
        _merge_all(parts, (0, 1, 2)).merge(parts[0])  # a shard twice
    with pytest.raises(ConvLensError, match="same units"):
        parts[0].merge(TopQuantile(3, total, q))


@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_quantile_sketches_merge_within_the_stated_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_units, n_bins, q, n = 3, 64, 0.2, 240
    data = rng.standard_t(df=3, size=(n, n_units, 6, 6)).astype(np.float32)
    data *= np.linspace(0.1, 30.0, n, dtype=np.float32)[:, None, None, None]
    data[n // 2:, 1] -= 50.0
    data[:, 2] = np.maximum(data[:, 2], 0)  # ReLU: many tied zeros
    max_bytes = 16 * n_units * n_bins
    ref = _reference(data, q)
    one = _sketches(data, [np.arange(n)], q, max_bytes)[0]
    t1, b1 = one.thresholds(), one.error_bound
    shards = _shards(n, rng)
    shards[0] = np.concatenate([shards[0][shards[0] >= n // 2], shards[0][shards[0] < n // 2]])  # scales differ
    parts = _sketches(data, shards, q, max_bytes)
    assert not any(p.exact for p in parts)
    per_unit = np.moveaxis(data, 1, 0).reshape(n_units, -1).astype(np.float64)
    spread = per_unit.max(axis=1) - per_unit.min(axis=1)
    for order in ORDERS:
        merged = _merge_all(parts, order)
        t, bound = merged.thresholds(), merged.error_bound
        assert np.all(np.abs(t - ref) <= bound + 1e-9 * np.abs(ref))  # the stated guarantee
        assert np.all(bound <= merged.bin_width / 2)
        assert np.all(merged.bin_width <= 2 * spread / (n_bins - 1))
        assert np.all(np.abs(t - t1) <= bound + b1 + 1e-9 * np.abs(ref))  # and so near one pass
    # merged counts are the one-pass counts whatever the grid: the same number of values
    assert int(merged._counts.sum()) == int(one._counts.sum()) == n * 36 * n_units


# ----------------------------------------------------------------------------- IoU tallies


@pytest.mark.parametrize("mode", ["paper", "lite"])
def test_iou_tallies_of_shards_merge_exactly(mode: str) -> None:
    rng = np.random.default_rng(3)
    n_units, h, w, n = 4, 6, 5, 30
    label_category = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    images = []
    for _ in range(n):
        masks = torch.from_numpy(rng.random((n_units, h, w)) < rng.uniform(0, 0.5))
        pixel = [(0, np.where(rng.random((h, w)) < 0.5, 0, rng.choice([1, 2, 3], (h, w)))),
                 (1, np.where(rng.random((h, w)) < 0.7, 0, rng.choice([4, 5], (h, w))))]
        images.append((masks, pixel, [(2, int(rng.choice([0, 6, 7])))]))

    def tally(which: np.ndarray) -> IoUTally:
        t = IoUTally(n_units, label_category, 3, mode=mode)
        for i in which:
            t.update(*images[i])
        return t

    want = tally(np.arange(n)).result()
    parts = [tally(s) for s in _shards(n, rng)]
    for order in ORDERS:
        merged = _merge_all(parts, order)
        r = merged.result()
        np.testing.assert_array_equal(r.intersection, want.intersection)
        np.testing.assert_array_equal(r.union, want.union)
        np.testing.assert_array_equal(r.iou, want.iou)
        assert merged.n_images == n
    assert parts[0].result().intersection.sum() < want.intersection.sum()  # the parts were partial
    with pytest.raises(ConvLensError, match="same units"):
        parts[0].merge(IoUTally(n_units, label_category, 3, mode="lite" if mode == "paper" else "paper"))


@pytest.fixture(scope="module")
def rnet(demo):
    loaded = load_model(demo[0])
    return loaded, open_backend(loaded, device="cpu")


def test_dissection_sparse_tallies_of_shards_merge_exactly(rnet, tmp_path: Path) -> None:
    """The tally dissection really uses, on the real RNet and built-in concept images."""
    loaded, be = rnet
    concepts = run_sync(generate_concepts(tmp_path / "concepts", n_images=30, image_size=48))
    result = run_sync(drun.dissect(be, loaded.cache_id, concepts, ["conv2"], cache=Cache(tmp_path / "c")))
    labels = Labels.of(concepts)
    params, dev = drun.DissectionParams(), torch.device("cpu")
    clock = Clock(dev)
    thresholds = result.layers["conv2"].thresholds
    units = result.layers["conv2"].units
    pre = drun.dissection_preprocess(be.spec.preprocess)
    image_set = drun.concept_image_set(concepts)
    from engine.data.images import ImageLoader

    def tally(which: np.ndarray) -> SparseTally:
        t = SparseTally(units, labels, thresholds, params, dev)
        with ImageLoader(image_set, pre, batch_size=7, indices=which.tolist()) as loader:
            for batch in loader:
                acts = drun.forward_batch(be, batch.array, ["conv2"], dev)["conv2"]
                ims = [drun._ImageLabels.of(concepts.sample(int(i)), labels) for i in batch.indices]
                t.update(acts, ims, clock, "conv2")
        return t

    one = tally(np.arange(len(concepts)))
    np.testing.assert_array_equal(one.iou(), result.layers["conv2"].iou)  # what dissect computed
    parts = [tally(s) for s in _shards(len(concepts), np.random.default_rng(4))]
    for order in ORDERS:
        merged = _merge_all(parts, order)
        for name in ("inter", "extra_union", "label_area"):
            assert torch.equal(getattr(merged, name), getattr(one, name))
        np.testing.assert_array_equal(merged.iou(), one.iou())


# ----------------------------------------------------------------------------- extraction shards


@pytest.mark.parametrize("batch_size", [1, 10])
def test_extraction_shards_merge_into_the_one_pass_entries(rnet, demo_images: Path, tmp_path: Path,
                                                           batch_size: int) -> None:
    loaded, be = rnet
    images = open_image_set(demo_images)
    layers = ["conv1", "conv3", "dense4"]
    one = run_sync(extract(be, loaded.cache_id, images, layers, batch_size=batch_size,
                           cache=Cache(tmp_path / "one")))
    if batch_size == 1:  # any split: single-image forwards are the same computations
        shards = _shards(len(images), np.random.default_rng(5))
    else:  # blocks of whole batches, so that the batches are the one pass's batches
        shards = [np.arange(0, 70), np.arange(70, 140), np.arange(140, 200)]
    for order in ORDERS[:2]:
        cache = Cache(tmp_path / f"shards{order[0]}")
        parts = [run_sync(extract(be, loaded.cache_id, images, layers, batch_size=batch_size, cache=cache,
                                  indices=shards[i])) for i in order]
        assert [p.n_images for p in parts] == [len(shards[i]) for i in order]
        np.testing.assert_array_equal(parts[0].rows(), shards[order[0]])
        merged = merge_extractions(parts, cache=cache)
        assert merged.indices is None and merged.n_images == 200
        np.testing.assert_array_equal(merged.outputs, one.outputs)
        np.testing.assert_array_equal(merged.valid, one.valid)
        for n in layers:
            np.testing.assert_array_equal(merged.maps(n), one.maps(n))
            for arr in ("max", "mean", "top_images", "top_values"):
                np.testing.assert_array_equal(getattr(merged.stats(n), arr), getattr(one.stats(n), arr))
        # the merged entries are those a whole pass writes: extracting the whole set now hits them
        calls: list[int] = []
        real = be.forward_summaries

        def counted(*a, _calls=calls, _real=real, **k):
            _calls.append(1)
            return _real(*a, **k)

        try:
            be.forward_summaries = counted
            again = run_sync(extract(be, loaded.cache_id, images, layers, batch_size=batch_size, cache=cache))
        finally:
            del be.forward_summaries
        assert again.from_cache and calls == []
    with pytest.raises(ConvLensError, match="overlap"):
        merge_extractions([parts[0], parts[0]], cache=Cache(tmp_path / "bad"))
    with pytest.raises(ConvLensError, match="increasing"):
        run_sync(extract(be, loaded.cache_id, images, layers, indices=[5, 3], cache=Cache(tmp_path / "bad")))
