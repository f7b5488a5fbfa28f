"""Concept labels as the tally needs them: which labels are scored, one image's labels by
category, a group of images' label maps as tensors, and a background decoder of label masks."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.concepts import ConceptDataset, ConceptSample, open_broden


@dataclass
class Labels:
    """What the tally needs to know about the data set's labels."""

    names: tuple[str, ...]  # per global label number ("" when no scored concept)
    categories_of: tuple[str, ...]  # per global label number ("" likewise)
    category_index: np.ndarray  # (L,) int64, -1 when not scored
    categories: tuple[str, ...]
    scored: np.ndarray = field(init=False)  # (L,) bool

    def __post_init__(self) -> None:
        self.scored = self.category_index >= 0

    @classmethod
    def of(cls, concepts: ConceptDataset) -> Labels:
        cats = concepts.label_categories()
        names = [""] * concepts.n_labels
        cat_names = [""] * concepts.n_labels
        for c in concepts.concepts:
            if cats[c.number] >= 0:
                names[c.number] = c.name
                cat_names[c.number] = c.category
        return cls(tuple(names), tuple(cat_names), cats, tuple(concepts.categories))


@dataclass
class _ImageLabels:
    """One image's labels by category index (scored labels only; others set to 0)."""

    mask_size: tuple[int, int]
    pixel_labels: list[tuple[int, np.ndarray]]  # (category index, (H, W) label map)
    image_labels: list[tuple[int, int]]  # (category index, label)

    @classmethod
    def of(cls, sample: ConceptSample, labels: Labels) -> _ImageLabels:
        cat_index = {c: g for g, c in enumerate(labels.categories)}
        drop = not labels.scored[1:].all()
        pixel = [(cat_index[cat], np.where(labels.scored[m], m, 0) if drop else m)
                 for cat, m in sample.pixel_labels]
        whole = [(cat_index[cat], lab) for cat, lab in sample.image_labels if labels.scored[lab]]
        return cls((int(sample.mask_size[0]), int(sample.mask_size[1])), pixel, whole)


@dataclass
class _GroupLabels:
    """Labels of n images sharing a mask size, as tensors.

    ``maps`` (n, M, P): each image's pixel maps, padded with zeros to M maps, a label repeated
    at a pixel in a later map set to 0 (``L_c(x)`` is a set of pixels); ``whole`` (n, L): the
    image-level labels; ``area`` (n, L): ``|L_c(x)|`` (the whole mask for image-level labels).
    """

    maps: torch.Tensor
    whole: torch.Tensor
    area: torch.Tensor

    @classmethod
    def of(cls, images: Sequence[_ImageLabels], n_labels: int, device: torch.device
           ) -> _GroupLabels:
        h, w = images[0].mask_size
        p = h * w
        n_maps = max(1, *(len(im.pixel_labels) for im in images))
        maps = np.zeros((len(images), n_maps, p), dtype=np.int64)
        whole = np.zeros((len(images), n_labels), dtype=bool)
        for j, im in enumerate(images):
            for m, (_, lab) in enumerate(im.pixel_labels):
                maps[j, m] = lab.reshape(-1)
            for _, label in im.image_labels:
                whole[j, label] = True
        for m in range(1, n_maps):
            repeated = (maps[:, m:m + 1] == maps[:, :m]).any(axis=1)
            maps[:, m][repeated] = 0
        t = torch.as_tensor(maps, device=device)
        key = (torch.arange(len(images), device=device)[:, None, None] * n_labels + t).flatten()
        area = torch.bincount(key, minlength=len(images) * n_labels).reshape(-1, n_labels)
        area[:, 0] = 0
        whole_t = torch.as_tensor(whole, device=device)
        area = torch.where(whole_t, p, area)
        return cls(t.transpose(1, 2).contiguous(), whole_t, area)


class _LabelPrefetcher:
    """Decodes concept samples (label-mask PNGs) ahead of use in a worker thread.

    Samples are requested in ``order``; an index the image loader skipped is dropped when a
    later one is taken. At most ``ahead`` samples are queued or held.
    """

    def __init__(self, concepts: ConceptDataset, order: Sequence[int], ahead: int) -> None:
        self._concepts = concepts
        self._todo = iter(order)
        self._ahead = ahead
        self._queue: deque[tuple[int, Future[ConceptSample]]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlens-labels")
        self._fill()

    def _fill(self) -> None:
        while len(self._queue) < self._ahead and (i := next(self._todo, None)) is not None:
            self._queue.append((i, self._pool.submit(self._concepts.sample, i)))

    def take(self, indices: Sequence[int]) -> list[ConceptSample]:
        """The samples of ``indices`` (increasing, in ``order``)."""
        out = []
        for i in indices:
            while True:
                if not self._queue:
                    self._fill()
                j, fut = self._queue.popleft()
                if j == i:
                    out.append(fut.result())
                    break
                fut.cancel()
            self._fill()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def restrict_categories(concepts: ConceptDataset, categories: Sequence[str]) -> ConceptDataset:
    """``concepts`` (same images, in order) scored on ``categories`` only; images without a
    label of those categories drop out, as in NetDissect."""
    narrowed = open_broden(concepts.root, categories=categories)
    where = {narrowed.image_path(i): i for i in range(len(narrowed))}
    paths = (concepts.image_path(i) for i in range(len(concepts)))
    return narrowed.subset([where[p] for p in paths if p in where])


