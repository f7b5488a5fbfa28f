"""IoUTally, unit_masks and summarize (Network Dissection, Bau et al. 2017)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.dissection.tally import IoUTally, summarize, unit_masks
from engine.types import ConvLensError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Categories: 0 = object (pixel maps), 1 = scene (image-level).
# Labels: 0 unlabelled, 1 sky (object), 2 tree (object), 3 street (scene), 4 indoor (scene).
LABEL_CATEGORY = [0, 0, 0, 1, 1]
OBJ, SCENE = 0, 1


def _m(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=bool)


def _l(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


# Pixels of a 2x2 mask, row-major: p0 p1 / p2 p3.
# Image A: M0 = {p0,p1}, M1 = {p3}; two object maps: sky {p0} + tree {p2}, and sky {p0,p1}
#          -> L_sky = {p0,p1} (p0 once), L_tree = {p2}; image label street (all 4 pixels).
# Image B: M0 = {p2,p3}, M1 = all 4; object maps all 0 (no object category); label indoor.
# Image C: M0 = {}, M1 = {p0,p1}; tree {p1,p2,p3}; image label 0 only (ignored: no scene).
IMAGES = [
    (
        np.stack([_m([[1, 1], [0, 0]]), _m([[0, 0], [0, 1]])]),
        [(OBJ, _l([[1, 0], [2, 0]])), (OBJ, _l([[1, 1], [0, 0]]))],
        [(SCENE, 3)],
    ),
    (
        np.stack([_m([[0, 0], [1, 1]]), _m([[1, 1], [1, 1]])]),
        [(OBJ, _l([[0, 0], [0, 0]])), (OBJ, _l([[0, 0], [0, 0]]))],
        [(SCENE, 4)],
    ),
    (
        np.stack([_m([[0, 0], [0, 0]]), _m([[1, 1], [0, 0]])]),
        [(OBJ, _l([[0, 2], [2, 2]])), (OBJ, _l([[0, 0], [0, 0]]))],
        [(SCENE, 0)],
    ),
]

# Intersections (both modes), per label over the images carrying its category:
#   sky:    unit0 A |{p0,p1}&{p0,p1}| = 2, C 0 -> 2;     unit1 A 0, C 0 -> 0
#   tree:   unit0 A 0, C 0 -> 0;                          unit1 A 0, C |{p0,p1}&{p1,p2,p3}| = 1 -> 1
#   street: unit0 A |M0| = 2 -> 2;                        unit1 A 1 -> 1
#   indoor: unit0 B |M0| = 2 -> 2;                        unit1 B 4 -> 4
INTER = np.array([[0, 2, 0, 2, 2], [0, 0, 1, 1, 4]])
# Paper unions, |M|+|L|-|M&L| summed over images with the category (object: A, C; scene: A, B):
#   sky:    unit0 A 2+2-2=2, C 0+0-0=0 -> 2;              unit1 A 1+2-0=3, C 2+0-0=2 -> 5
#   tree:   unit0 A 2+1-0=3, C 0+3-0=3 -> 6;              unit1 A 1+1-0=2, C 2+3-1=4 -> 6
#   street: unit0 A 2+4-2=4, B 2+0-0=2 -> 6;              unit1 A 1+4-1=4, B 4+0-0=4 -> 8
#   indoor: unit0 A 2+0-0=2, B 2+4-2=4 -> 6;              unit1 A 1+0-0=1, B 4+4-4=4 -> 5
# (B carrying no object label adds nothing to sky/tree; C, without scene, nothing to street/indoor.)
UNION_PAPER = np.array([[0, 2, 6, 6, 6], [0, 5, 6, 8, 5]])
# Lite: an image's |M_k| joins object unions only when M_k touches labelled object pixels.
#   A: labelled {p0,p1,p2}: unit0 {p0,p1} touches, unit1 {p3} does not.
#   C: labelled {p1,p2,p3}: unit0 empty (adds 0 either way), unit1 {p0,p1} touches at p1.
#   sky:  unit1 A 0+2-0=2, C 2+0-0=2 -> 4 (paper 5)
#   tree: unit1 A 0+1-0=1, C 2+3-1=4 -> 5 (paper 6)
#   unit0 and the scene labels are as in the paper.
UNION_LITE = np.array([[0, 2, 6, 6, 6], [0, 4, 5, 8, 5]])


def _tally(mode: str, device: str = "cpu") -> IoUTally:
    tally = IoUTally(2, LABEL_CATEGORY, 2, device=device, mode=mode)
    for masks, pixel, image in IMAGES:
        tally.update(torch.from_numpy(masks), pixel, image)
    return tally


@pytest.mark.parametrize("device", DEVICES)
def test_hand_built_paper(device: str) -> None:
    r = _tally("paper", device).result()
    assert r.intersection.dtype == np.int64 and r.union.dtype == np.int64
    np.testing.assert_array_equal(r.intersection, INTER)
    np.testing.assert_array_equal(r.union, UNION_PAPER)
    # IoU: sky 2/2, 0/5; tree 0/6, 1/6; street 2/6, 1/8; indoor 2/6, 4/5; label 0 -> 0.
    expected = np.array([[0, 1, 0, 2 / 6, 2 / 6], [0, 0, 1 / 6, 1 / 8, 4 / 5]])
    np.testing.assert_array_equal(r.iou, expected)


def test_hand_built_lite_differs_from_paper() -> None:
    r = _tally("lite").result()
    np.testing.assert_array_equal(r.intersection, INTER)
    np.testing.assert_array_equal(r.union, UNION_LITE)
    # tree, unit 1: 1/5 in lite against 1/6 in the paper.
    assert r.iou[1, 2] == 1 / 5 and _tally("paper").result().iou[1, 2] == 1 / 6


def test_update_batch_equals_update() -> None:
    masks = torch.from_numpy(np.stack([m for m, _, _ in IMAGES]))
    maps = [(OBJ, np.stack([p[j][1] for _, p, _ in IMAGES])) for j in range(2)]
    for mode, union in [("paper", UNION_PAPER), ("lite", UNION_LITE)]:
        tally = IoUTally(2, LABEL_CATEGORY, 2, mode=mode)
        tally.update_batch(masks, maps, [image for _, _, image in IMAGES])
        np.testing.assert_array_equal(tally.result().union, union)
        np.testing.assert_array_equal(tally.result().intersection, INTER)


def _brute_force(images: list, label_category: np.ndarray, n_units: int, mode: str):
    """Per image and label, with numpy set operations on pixel indices."""
    n_labels = len(label_category)
    inter = np.zeros((n_units, n_labels), dtype=np.int64)
    union = np.zeros((n_units, n_labels), dtype=np.int64)
    for masks, pixel, image in images:
        n_pix = masks[0].size
        everything = np.arange(n_pix)
        label_pixels: dict[int, np.ndarray] = {}
        for _, lmap in pixel:
            flat = lmap.ravel()
            for c in np.unique(flat[flat != 0]):
                label_pixels[c] = np.union1d(label_pixels.get(c, []), np.flatnonzero(flat == c))
        for _, c in image:
            if c != 0:
                label_pixels[c] = everything
        present = {label_category[c] for c in label_pixels}
        labelled = {  # all labelled pixels of each present category
            g: np.unique(
                np.concatenate([p for c, p in label_pixels.items() if label_category[c] == g])
            )
            for g in present
        }
        for c in range(1, n_labels):
            g = label_category[c]
            if g not in present:
                continue
            lc = label_pixels.get(c, np.array([], dtype=np.int64))
            for k in range(n_units):
                mk = np.flatnonzero(masks[k].ravel())
                inter[k, c] += np.intersect1d(mk, lc).size
                touches = np.intersect1d(mk, labelled[g]).size > 0
                if mode == "paper" or touches:
                    union[k, c] += np.union1d(mk, lc).size
                else:
                    union[k, c] += lc.size
    return inter, union


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["paper", "lite"])
def test_random_equals_brute_force(device: str, mode: str) -> None:
    rng = np.random.default_rng(7)
    n_units, h, w, n_images = 4, 6, 5, 24
    # 12 labels: 1-4 object, 5-7 part (pixel maps); 8-9 scene, 10-11 texture (image-level).
    label_category = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    obj, part = np.array([1, 2, 3, 4]), np.array([5, 6, 7])
    images = []
    for _ in range(n_images):
        masks = rng.random((n_units, h, w)) < rng.uniform(0.0, 0.5)

        def lmap(labels: np.ndarray, p_none: float) -> np.ndarray:
            m = rng.choice(labels, size=(h, w))
            return np.where(rng.random((h, w)) < p_none, 0, m)

        pixel = [(0, lmap(obj, rng.choice([0.3, 1.0]))), (0, lmap(obj, 0.8)), (1, lmap(part, 0.5))]
        image = [(2, int(rng.choice([0, 8, 9])))]  # scene label 0: no scene
        if rng.random() < 0.4:
            image += [(3, 10), (3, 11)]
        images.append((masks, pixel, image))
    inter, union = _brute_force(images, label_category, n_units, mode)
    tally = IoUTally(n_units, label_category, 4, device=device, mode=mode)
    for masks, pixel, image in images[:10]:
        tally.update(torch.from_numpy(masks), pixel, image)
    rest = images[10:]
    tally.update_batch(
        torch.from_numpy(np.stack([m for m, _, _ in rest])),
        [
            (cat, torch.from_numpy(np.stack([p[j][1] for _, p, _ in rest])))
            for j, (cat, _) in enumerate(rest[0][1])
        ],
        [image for _, _, image in rest],
    )
    r = tally.result()
    np.testing.assert_array_equal(r.intersection, inter)
    np.testing.assert_array_equal(r.union, union)
    expected = np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)
    np.testing.assert_array_equal(r.iou, expected)
    assert tally.n_images == n_images


def test_update_validates() -> None:
    tally = IoUTally(2, LABEL_CATEGORY, 2)
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    with pytest.raises(ConvLensError, match="outside 0..4"):
        tally.update(masks, [(OBJ, _l([[0, 5], [0, 0]]))], [])
    with pytest.raises(ConvLensError, match="shape"):
        tally.update(masks, [(OBJ, _l([[0, 1, 0]]))], [])
    with pytest.raises(ConvLensError, match="Category index 2"):
        tally.update(masks, [], [(2, 3)])
    with pytest.raises(ConvLensError, match="mode"):
        IoUTally(2, LABEL_CATEGORY, 2, mode="fast")  # type: ignore[arg-type]


def test_unit_masks_strict_at_tie() -> None:
    # [[1, 2], [3, 4]] upsampled 2x (align_corners=False): S[i, j] = 1 + c_j + 2 r_i with
    # r, c in (0, 0.25, 0.75, 1) by row/column; all exact binary fractions.
    acts = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 2, 2, 2)
    t = torch.tensor([2.5, 4.0], dtype=torch.float64)
    # Unit 0, T = 2.5: c + 2 r >= 1.5; ties at (1, 3) (c=1, r=.25) and (2, 0) (c=0, r=.75).
    ge0 = [[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    gt0 = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]]
    # Unit 1, T = 4: only S[3, 3] = 4 reaches it, as a tie.
    ge1 = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    m = unit_masks(acts, t, (4, 4))
    s = unit_masks(acts, t.numpy(), (4, 4), strict=True)
    assert m.dtype == torch.bool and m.shape == (1, 2, 4, 4)
    np.testing.assert_array_equal(m[0, 0].numpy(), np.array(ge0, dtype=bool))
    np.testing.assert_array_equal(s[0, 0].numpy(), np.array(gt0, dtype=bool))
    np.testing.assert_array_equal(m[0, 1].numpy(), np.array(ge1, dtype=bool))
    assert not s[0, 1].any()
    # A float64 threshold just above a float32 activation is compared unrounded.
    above = unit_masks(torch.ones(1, 1, 2, 2), torch.tensor([1.0 + 1e-9], dtype=torch.float64), (3, 3))
    assert not above.any()


def test_summarize() -> None:
    names = ["-", "sky", "tree", "street"]
    label_categories = [0, 0, 0, 1]
    categories = ["object", "scene", "texture"]  # texture has no label
    iou = np.array(
        [
            [0.9, 0.04, 0.03, 0.02],  # label 0 ignored; best sky at exactly 0.04: not a detector
            [0.0, 0.01, 0.2, 0.05],  # tree
            [0.0, 0.3, 0.1, 0.06],  # sky
            [0.0, 0.5, 0.0, 0.1],  # sky again
        ]
    )
    s = summarize(iou, names, label_categories, categories)
    np.testing.assert_array_equal(s.label, [1, 2, 1, 1])
    assert s.label_name == ("sky", "tree", "sky", "sky")
    np.testing.assert_array_equal(s.category, [0, 0, 0, 0])
    assert s.category_name == ("object",) * 4
    np.testing.assert_array_equal(s.iou, [0.04, 0.2, 0.3, 0.5])
    np.testing.assert_array_equal(s.is_detector, [False, True, True, True])
    np.testing.assert_array_equal(
        s.category_label, [[1, 3, -1], [2, 3, -1], [1, 3, -1], [1, 3, -1]]
    )
    np.testing.assert_array_equal(
        s.category_iou[:, :2], [[0.04, 0.02], [0.2, 0.05], [0.3, 0.06], [0.5, 0.1]]
    )
    np.testing.assert_array_equal(s.category_iou[:, 2], 0.0)
    assert s.n_detectors == 3 and s.n_unique_concepts == 2
    np.testing.assert_array_equal(s.detectors_per_category, [3, 0, 0])
    np.testing.assert_array_equal(s.unique_concepts_per_category, [2, 0, 0])
    # The threshold is strict: lowering it just below 0.04 makes unit 0 a detector.
    assert summarize(iou, names, label_categories, categories, threshold=0.039).n_detectors == 4
