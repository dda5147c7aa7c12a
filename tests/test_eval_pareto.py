"""Pareto fronts, hypervolume and coverage (sipo_fast.eval.pareto).

Hand-computed cases carry their arithmetic; the fast hypervolume is also checked against two independent
references: inclusion–exclusion over all subsets (hypervolume_ref) and a Monte-Carlo estimate written here.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from sipo_fast.eval.pareto import coverage, dominates, hypervolume, hypervolume_ref, pareto_front


def _naive_front(points):
    """Independent double loop: i is kept unless some j is ≥ everywhere and > somewhere."""
    keep = []
    for i, p in enumerate(points):
        if not any(all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for q in points):
            keep.append(i)
    return keep


def _monte_carlo_hv(points, ref, n=400_000, seed=0):
    """Share of uniform samples in the bounding box [ref, max] that some point weakly dominates, times the
    box volume; returns (estimate, standard error)."""
    pts, r = np.asarray(points, float), np.asarray(ref, float)
    hi = pts.max(0)
    rng = np.random.default_rng(seed)
    x = r + rng.random((n, len(r))) * (hi - r)                     # (n, d)
    inside = (pts[None, :, :] >= x[:, None, :]).all(-1).any(1)     # (n,)
    vol = float(np.prod(hi - r))
    p = inside.mean()
    return vol * p, vol * math.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------- pareto_front
def test_pareto_front_hand_example():
    """(1,1) is dominated by (2,2); (0,3) by (1,3); both copies of (2,2) stay (copies do not dominate each other)."""
    assert pareto_front([[1, 3], [2, 2], [1, 1], [2, 2], [0, 3]]) == [0, 1, 3]


@pytest.mark.parametrize("points, want", [
    ([], []),                                          # empty
    ([[5.0, -1.0]], [0]),                              # single point
    ([[1, 1], [1, 1], [1, 1]], [0, 1, 2]),             # all identical: all kept
    ([[1, 1], [2, 2], [3, 3]], [2]),                   # a chain: only the top
    ([[1, 2], [1, 3]], [1]),                           # tie in x, better y dominates
    ([[1, 2], [2, 1]], [0, 1]),                        # trade-off: both
    ([[-np.inf, 5], [0, 0], [1, -np.inf]], [0, 1, 2]),  # infinities compare like numbers
    ([[3], [1], [3]], [0, 2]),                          # one objective: the maxima
    ([[1, 2, 3], [3, 2, 1], [1, 2, 2], [2, 2, 2]], [0, 1, 3]),  # 3 objectives
])
def test_pareto_front_edge_cases(points, want):
    assert pareto_front(points) == want


def test_pareto_front_matches_naive_on_random_ties():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n, d = rng.integers(1, 40), rng.integers(1, 5)
        pts = rng.integers(0, 4, size=(n, d)).astype(float)  # few levels: many ties and duplicates
        assert pareto_front(pts) == _naive_front(pts.tolist()), (trial, pts)
        assert pareto_front(pts, chunk=3) == _naive_front(pts.tolist())  # chunking changes nothing


def test_pareto_front_accepts_tensors_and_rejects_bad_input():
    assert pareto_front(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])) == [0, 1]
    view = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.2]]).t()  # (4, 2), non-contiguous
    assert not view.is_contiguous() and pareto_front(view) == [0, 1, 2]
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="2-D"):
        pareto_front([1.0, 2.0])


def test_dominates():
    assert dominates([2, 2], [1, 2]) and not dominates([1, 2], [1, 2]) and not dominates([2, 1], [1, 2])


# ------------------------------------------------------------------------------------------- hypervolume
@pytest.mark.parametrize("points, ref, want", [
    # staircase: 3·1 + 2·(2−1) + 1·(3−2) = 6
    ([[3, 1], [2, 2], [1, 3]], [0, 0], 6.0),
    # a dominated point and a duplicate add nothing
    ([[3, 1], [2, 2], [1, 3], [1, 1], [2, 2]], [0, 0], 6.0),
    # ref (1.5, 0): (1,3) is outside; x∈[1.5,2] reaches y=2 (0.5·2), x∈[2,3] reaches y=1 (1·1): 2
    ([[3, 1], [2, 2], [1, 3]], [1.5, 0], 2.0),
    # a point on the boundary (y = ref) spans no area
    ([[2, 0], [1, 1]], [0, 0], 1.0),
    # every point outside the box
    ([[-1, 5], [5, -1]], [0, 0], 0.0),
    # negative coordinates: box [−2,−1]×[−3,−1] = 1·2
    ([[-1, -1]], [-2, -3], 2.0),
    # one objective: max − ref
    ([[0.5], [2.0]], [0.0], 2.0),
    # 3-D: boxes (2,1,1), (1,2,1), (1,1,2): 3·2 − 3·1 (pairwise overlaps) + 1 (triple) = 4
    ([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0], 4.0),
    # 3-D: (3,1,1), (1,3,1), (1,1,3): 3·3 − 3·1 + 1 = 7
    ([[3, 1, 1], [1, 3, 1], [1, 1, 3]], [0, 0, 0], 7.0),
    # 3-D: cube 2³ = 8 plus (3,1,1) minus their overlap (2,1,1)=2: 8 + 3 − 2 = 9
    ([[2, 2, 2], [3, 1, 1]], [0, 0, 0], 9.0),
    # 3-D with a point outside (z below ref) and a dominated one: only the unit cube (1,1,1)−(0,0,0)
    ([[1, 1, 1], [5, 5, -1], [0.5, 0.5, 0.5]], [0, 0, 0], 1.0),
    # 4-D: two boxes 2·1·1·1 and 1·2·1·1 overlapping in 1: 2 + 2 − 1 = 3
    ([[2, 1, 1, 1], [1, 2, 1, 1]], [0, 0, 0, 0], 3.0),
])
def test_hypervolume_hand_computed(points, ref, want):
    assert hypervolume(points, ref) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert hypervolume_ref(points, ref) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_hypervolume_empty():
    assert hypervolume(np.zeros((0, 2)), [0, 0]) == 0.0
    assert hypervolume([], [0, 0]) == 0.0


@pytest.mark.parametrize("d", [2, 3, 4])
def test_hypervolume_matches_inclusion_exclusion(d):
    rng = np.random.default_rng(d)
    for _ in range(25):
        n = int(rng.integers(1, 11))
        pts = rng.normal(size=(n, d))
        ref = rng.normal(size=d) - 1.0
        assert hypervolume(pts, ref) == pytest.approx(hypervolume_ref(pts, ref), rel=1e-9, abs=1e-12)


def test_hypervolume_matches_monte_carlo_3d():
    rng = np.random.default_rng(7)
    pts = rng.random((12, 3))
    ref = [0.1, 0.05, 0.0]  # some points fall outside in x or y
    est, se = _monte_carlo_hv(pts[(pts > ref).all(1)], ref)
    assert abs(hypervolume(pts, ref) - est) < 5 * se


def test_hypervolume_invariances():
    rng = np.random.default_rng(1)
    pts = rng.random((30, 3))
    ref = np.zeros(3)
    hv = hypervolume(pts, ref)
    assert hypervolume(pts[::-1], ref) == pytest.approx(hv, rel=1e-12)                      # order
    assert hypervolume(np.vstack([pts, pts[:5]]), ref) == pytest.approx(hv, rel=1e-12)       # duplicates
    assert hypervolume(pts[pareto_front(pts)], ref) == pytest.approx(hv, rel=1e-12)          # only the front counts
    assert hypervolume(np.vstack([pts, pts * 0.5]), ref) == pytest.approx(hv, rel=1e-12)     # dominated points
    assert hypervolume(pts * 2, ref) == pytest.approx(8 * hv, rel=1e-12)                     # scaling
    assert hypervolume(np.vstack([pts, [[1.5, 1.5, 1.5]]]), ref) > hv                        # a better point adds
    assert hypervolume(pts[:, [2, 0, 1]], ref) == pytest.approx(hv, rel=1e-12)               # axis permutation


def test_hypervolume_bad_input():
    with pytest.raises(ValueError, match="one reference value per objective"):
        hypervolume([[1, 2]], [0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        hypervolume([[1, 2]], [0, float("nan")])
    with pytest.raises(ValueError, match="infinite"):
        hypervolume([[1, np.inf]], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        hypervolume([[1, float("nan")]], [0, 0])
    with pytest.raises(ValueError, match="subsets"):
        hypervolume_ref(np.ones((17, 2)), [0, 0])


def test_hypervolume_scales_to_large_2d_fronts():
    """A 2000-point front on the quarter circle: the sweep is O(n log n), and the staircase approaches π/4."""
    t = np.linspace(0, np.pi / 2, 2000)
    pts = np.stack([np.cos(t), np.sin(t)], 1)
    hv = hypervolume(pts, [0, 0])
    assert math.pi / 4 - 0.01 < hv < math.pi / 4


# ------------------------------------------------------------------------------------------- coverage
def test_coverage_hand_computed():
    """A = {(2,2)} covers (1,1) but not (3,0): C(A,B) = 1/2; B's (3,0) and (1,1) cover nothing of A: 0."""
    a, b = [[2, 2]], [[1, 1], [3, 0]]
    assert coverage(a, b) == 0.5
    assert coverage(b, a) == 0.0
    assert coverage(b, b) == 1.0  # weak dominance: a set covers itself
    assert coverage(np.zeros((0, 2)), b) == 0.0
    with pytest.raises(ValueError, match="empty"):
        coverage(a, np.zeros((0, 2)))


def test_coverage_matches_naive():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.integers(0, 3, (5, 2)), rng.integers(0, 3, (6, 2))
        want = sum(any(all(x >= y for x, y in zip(p, q)) for p in a) for q in b) / len(b)
        assert coverage(a, b) == pytest.approx(want)


def test_inclusion_exclusion_is_itself_right_on_a_grid():
    """Sanity for the oracle: for integer boxes, count unit cells of the union directly."""
    pts = [[3, 1], [2, 2], [1, 3], [2, 1]]
    cells = {(x, y) for p in pts for x, y in itertools.product(range(p[0]), range(p[1]))}
    assert hypervolume_ref(pts, [0, 0]) == len(cells) == 6
