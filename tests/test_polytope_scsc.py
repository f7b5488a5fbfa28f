"""The SCSC greedy of the polytope gallery on hand-made instances with known covers, and a
property test on random hyperplane arrangements (numpy only, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.polytope import scsc


def _instance(n: int, cuts: list[set[int]], different: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boundaries given by the images each one cuts away from x (x = image 0)."""
    region = np.ones((len(cuts), n), bool)
    for q, c in enumerate(cuts):
        region[q, sorted(c)] = False
    diff = np.zeros(n, bool)
    diff[sorted(different)] = True
    return scsc.pack(region), scsc.pack(diff), scsc.valid_mask(n)


def _covered(cov: scsc.Cover, n: int) -> set[int]:
    return set(scsc.members(cov.cover, n).tolist())


def test_bitsets_round_trip_and_count() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 63, 64, 65, 200):
        bits = rng.random((3, n)) < 0.4
        words = scsc.pack(bits)
        assert words.dtype == np.uint64 and words.shape == (3, scsc.words_for(n))
        np.testing.assert_array_equal(scsc.unpack(words, n), bits)
        np.testing.assert_array_equal(scsc.popcount(words), bits.sum(axis=1))
        assert int(scsc.popcount(scsc.valid_mask(n))) == n


def test_one_boundary_that_separates_everything_without_loss() -> None:
    # x=0; same class {0,1,2}; different {3,4,5}. h1 removes all of D and loses nothing.
    region, diff, valid = _instance(6, [{3}, {3, 4, 5}, {1, 3, 4, 5}], {3, 4, 5})
    cov = scsc.scsc_greedy(region, diff, valid)
    assert cov.chosen.tolist() == [1] and cov.feasible == 0 and cov.delta == 0
    assert _covered(cov, 6) == {0, 1, 2}


def test_two_boundaries_beat_one_that_loses_same_class_images() -> None:
    # h2 alone removes all of D but loses {1, 2}; the optimum is {h0, h1} (nothing lost)
    region, diff, valid = _instance(6, [{3, 4}, {5}, {1, 2, 3, 4, 5}], {3, 4, 5})
    cov = scsc.scsc_greedy(region, diff, valid)
    assert sorted(cov.chosen.tolist()) == [0, 1]
    assert cov.chosen.tolist() == [0, 1]  # h0 first: eps/2 < eps/1
    assert _covered(cov, 6) == {0, 1, 2}


def test_ratio_rule_prefers_the_cheaper_removal_and_breaks_exact_ties_by_index() -> None:
    # h0: removes {3,4,5}, loses {1} (1/3); h1: removes {3,4}, loses nothing (eps/2) -> h1 first;
    # then only 5 is left: h0 and h2 both lose one image to remove it (1/1): index order -> h0
    region, diff, valid = _instance(6, [{1, 3, 4, 5}, {3, 4}, {2, 5}], {3, 4, 5})
    cov = scsc.scsc_greedy(region, diff, valid)
    assert cov.chosen.tolist() == [1, 0]
    assert _covered(cov, 6) == {0, 2}
    # delta = 1 stops once a single different-class image is left
    cov1 = scsc.scsc_greedy(region, diff, valid, delta=1)
    assert cov1.chosen.tolist() == [1] and _covered(cov1, 6) == {0, 1, 2, 5}
    # delta = |D| needs no boundary at all
    assert scsc.scsc_greedy(region, diff, valid, delta=3).chosen.tolist() == []


def test_epsilon_breaks_ties_between_boundaries_that_lose_nothing() -> None:
    # without the epsilon both score 0; with it the one removing more wins
    region, diff, valid = _instance(6, [{3}, {3, 4, 5}], {3, 4, 5})
    assert scsc.scsc_greedy(region, diff, valid).chosen.tolist() == [1]
    assert scsc.scsc_greedy(region, diff, valid, eps=0.0).chosen.tolist() == [0, 1]


def test_default_delta_is_the_smallest_feasible_and_smaller_is_refused() -> None:
    # no boundary cuts image 5 away: at least one different-class image stays covered
    region, diff, valid = _instance(7, [{3, 6}, {4}, {1, 3, 4}], {3, 4, 5, 6})
    cov = scsc.scsc_greedy(region, diff, valid)
    assert cov.feasible == 1 and cov.delta == 1
    assert cov.chosen.tolist() == [0, 1] and _covered(cov, 7) == {0, 1, 2, 5}
    with pytest.raises(scsc.InfeasibleError, match="smallest feasible value 1"):
        scsc.scsc_greedy(region, diff, valid, delta=0)


def test_semantic_distance_ranking() -> None:
    proj = np.array([[0.0, 0.0, 5.0], [1.0, 2.0, -9.0], [0.5, 0.1, 100.0], [3.0, 0.0, 0.0]])
    cover = scsc.pack(np.array([True, True, True, False]))
    idx, d = scsc.rank(proj, 0, np.array([0, 1]), cover, 4)
    assert idx.tolist() == [2, 1] and np.allclose(d, [0.6, 3.0])  # column 2 is not in P(x)


@pytest.mark.parametrize("seed", range(6))
def test_property_covered_images_lie_on_xs_side_of_every_chosen_boundary(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, dim, q = int(rng.integers(30, 300)), int(rng.integers(2, 12)), int(rng.integers(5, 80))
    pts = rng.normal(size=(n, dim))
    w, b = rng.normal(size=(q, dim)), rng.normal(size=q) * 0.5
    margins = pts @ w.T + b
    labels = (pts[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(int) + (rng.random(n) < 0.1)
    sides = scsc.pack((margins > 0).T)
    valid = scsc.valid_mask(n)
    for x in rng.choice(n, size=8, replace=False):
        region = scsc.region_sets(sides, margins[x] > 0, valid)
        diff_bool = labels != labels[x]
        diff = scsc.pack(diff_bool)
        base = scsc.scsc_greedy(region, diff, valid)
        for delta in (None, base.feasible + int(rng.integers(0, 5))):
            cov = scsc.scsc_greedy(region, diff, valid, delta)
            got = scsc.members(cov.cover, n)
            assert x in got
            # every covered image is on x's side of every chosen boundary (from the margins
            # themselves, not the bitsets), and the cover is exactly those images
            same_side = np.all((margins[:, cov.chosen] > 0) == (margins[x, cov.chosen] > 0), axis=1)
            np.testing.assert_array_equal(np.flatnonzero(same_side), got)
            assert int(diff_bool[got].sum()) <= cov.delta
            assert cov.delta >= cov.feasible == base.feasible
            # the smallest feasible delta: what all of Q leaves
            all_side = np.all((margins > 0) == (margins[x] > 0), axis=1)
            assert cov.feasible == int((all_side & diff_bool).sum())
            assert len(set(cov.chosen.tolist())) == len(cov.chosen)


def test_knn_excludes_the_query_and_breaks_ties_by_index() -> None:
    f = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    assert scsc.knn(f, 0, 2).tolist() == [1, 2]
    assert scsc.knn(f, 3, 3, "cosine")[0] in (1, 2)
    p, c = scsc.gallery_scores(np.array([0, 0, 1, 0]), 0, np.array([1, 2]))
    assert p == 0.5 and c == 0.5
