"""Pareto fronts and hypervolume, for maximisation.

Conventions (all objectives maximised; negate costs first, see :func:`sipo_fast.eval.stats.to_maximisation`):

- p *dominates* q when p_k ≥ q_k for every objective k and p_k > q_k for at least one.
- :func:`pareto_front` returns the indices of the points no other point dominates, in ascending order.
  Duplicates: identical points do not dominate each other, so every copy of a non-dominated point is kept
  (and every copy of a dominated one dropped). Deduplicate first if you want one index per location.
- :func:`hypervolume` is the Lebesgue measure of the union of the boxes [ref, p] over the points p:

      HV(P, r) = λ( ∪_{p∈P} [r_1, p_1] × ... × [r_d, p_d] )

  A point with p_k ≤ r_k for some k spans an empty box and contributes nothing. It is exact in any
  dimension (recursive slicing along the last objective, 2-D sweep at the bottom) and costs O(n^(d-1) log n).
- :func:`hypervolume_ref` computes the same number by inclusion–exclusion over all subsets,

      HV = Σ_{∅≠S⊆P} (−1)^{|S|+1} Π_k max(0, min_{p∈S} p_k − r_k),

  exponential in n: it is the readable definition the fast one is tested against.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

ArrayLike = Sequence[Sequence[float]] | np.ndarray


def _as_points(points, what: str) -> np.ndarray:
    if hasattr(points, "detach"):  # torch.Tensor, without importing torch here
        points = points.detach().cpu().double().numpy()
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    if arr.ndim != 2:
        raise ValueError(f"{what}: points must be a 2-D array [n_points, n_objectives], got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{what}: points contain NaN; drop or impute those rows first")
    return arr


def dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    """True when p dominates q (maximisation): p ≥ q everywhere and p > q somewhere."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return bool((p >= q).all() and (p > q).any())


def pareto_front(points: ArrayLike, *, chunk: int = 1024) -> list[int]:
    """Indices (ascending) of the non-dominated rows of ``points`` [n, d], maximising every column.

    O(n²·d) comparisons, vectorised in chunks of ``chunk`` rows so memory stays O(chunk·n·d). Copies of a
    non-dominated point are all returned (no copy dominates another). An empty input gives [].
    Example: [[1, 3], [2, 2], [1, 1], [2, 2], [0, 3]] → [0, 1, 3]: (1,1) is dominated by (2,2) and
    (0,3) by (1,3); the two (2,2) are kept.
    """
    arr = _as_points(points, "pareto_front")
    n = arr.shape[0]
    if n == 0:
        return []
    keep = np.ones(n, dtype=bool)
    for start in range(0, n, chunk):
        block = arr[start:start + chunk]                        # (c, d): candidates
        ge = (arr[None, :, :] >= block[:, None, :]).all(-1)     # (c, n): row j ≥ candidate i everywhere
        gt = (arr[None, :, :] > block[:, None, :]).any(-1)      # (c, n): row j > candidate i somewhere
        keep[start:start + chunk] = ~(ge & gt).any(1)
    return [int(i) for i in np.flatnonzero(keep)]


def _check_ref(arr: np.ndarray, ref, what: str) -> np.ndarray:
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    if arr.shape[0] and r.shape[0] != arr.shape[1]:
        raise ValueError(f"{what}: reference point has {r.shape[0]} coordinates but points have {arr.shape[1]} "
                         "objectives; give one reference value per objective")
    if not np.isfinite(r).all():
        raise ValueError(f"{what}: reference point must be finite, got {r.tolist()}")
    if np.isposinf(arr).any():
        raise ValueError(f"{what}: a point is +inf in some objective, so the hypervolume is infinite")
    return r


def _hv2(pts: list[tuple[float, ...]], r0: float, r1: float) -> float:
    """2-D sweep: visit points by x descending; each one that raises the best y so far adds the strip
    [r0, x] × [y_best, y]."""
    area, y_best = 0.0, r1
    for x, y in sorted(pts, key=lambda p: (-p[0], -p[1])):
        if y > y_best:
            area += (x - r0) * (y - y_best)
            y_best = y
    return area


def _hv(pts: list[tuple[float, ...]], r: tuple[float, ...]) -> float:
    d = len(r)
    if not pts:
        return 0.0
    if d == 1:
        return max(p[0] for p in pts) - r[0]
    if d == 2:
        return _hv2(pts, r[0], r[1])
    # Slice along the last objective: between consecutive levels z_i ≥ z_{i+1}, the cross-section is the
    # (d−1)-D hypervolume of the points whose last coordinate reaches z_i.
    pts = sorted(pts, key=lambda p: -p[-1])
    total = 0.0
    for i, p in enumerate(pts):
        z_next = pts[i + 1][-1] if i + 1 < len(pts) else r[-1]
        if p[-1] > z_next:
            total += _hv([q[:-1] for q in pts[: i + 1]], r[:-1]) * (p[-1] - z_next)
    return total


def hypervolume(points: ArrayLike, ref: Sequence[float]) -> float:
    """Exact hypervolume (maximisation) dominated by ``points`` [n, d] and bounded below by ``ref`` [d].

    Points not strictly above ``ref`` in every objective contribute nothing; dominated points and duplicates
    change nothing. Hand-computed example (d = 2, ref (0, 0)): points (3, 1), (2, 2), (1, 3) give the
    staircase 3·1 + 2·(2−1) + 1·(3−2) = 6.
    """
    arr = _as_points(points, "hypervolume")
    r = _check_ref(arr, ref, "hypervolume")
    if arr.shape[0] == 0:
        return 0.0
    inside = arr[(arr > r).all(1)]
    if inside.shape[0] == 0:
        return 0.0
    front = inside[pareto_front(inside)]
    front = np.unique(front, axis=0)  # duplicates add no volume; dropping them keeps the recursion small
    return float(_hv([tuple(p) for p in front.tolist()], tuple(r.tolist())))


def hypervolume_ref(points: ArrayLike, ref: Sequence[float], *, max_points: int = 16) -> float:
    """Hypervolume by inclusion–exclusion over every non-empty subset (2ⁿ − 1 terms); the reference
    semantics of :func:`hypervolume`, usable for n ≤ ``max_points``."""
    arr = _as_points(points, "hypervolume_ref")
    r = _check_ref(arr, ref, "hypervolume_ref")
    n = arr.shape[0]
    if n > max_points:
        raise ValueError(f"hypervolume_ref: {n} points means 2^{n} subsets; use hypervolume() for more than "
                         f"{max_points} points")
    total = 0.0
    for size in range(1, n + 1):
        for subset in itertools.combinations(range(n), size):
            corner = arr[list(subset)].min(0)                 # the intersection of the boxes [r, p], p ∈ S
            total += (-1) ** (size + 1) * math.prod(max(0.0, c - rk) for c, rk in zip(corner, r))
    return float(total)


def coverage(a: ArrayLike, b: ArrayLike) -> float:
    """Set coverage C(A, B) (Zitzler): the share of B's points weakly dominated by some point of A
    (a ≥ b in every objective). C(A, B) = 1 means A's front covers all of B's; it is not symmetric, so
    report both C(A, B) and C(B, A). Example: A = {(2, 2)}, B = {(1, 1), (3, 0)} → C(A, B) = 1/2."""
    A, B = _as_points(a, "coverage"), _as_points(b, "coverage")
    if B.shape[0] == 0:
        raise ValueError("coverage: B is empty, so the share of it that A covers is undefined")
    if A.shape[0] == 0:
        return 0.0
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"coverage: A has {A.shape[1]} objectives, B has {B.shape[1]}")
    covered = (A[None, :, :] >= B[:, None, :]).all(-1).any(1)  # (|B|,)
    return float(covered.mean())


def fixed_reference(point: Sequence[float], margin) -> np.ndarray:
    """A hypervolume reference that does not depend on the fronts compared: ``point`` (e.g. π_ref's mean
    scores, maximisation orientation) minus ``margin`` (one number, or one per objective, ≥ 0).
    Example: π_ref at (0.50, 0.70), margin (0.1, 0.2) → reference (0.40, 0.50)."""
    p = np.asarray(point, dtype=np.float64).reshape(-1)
    m = np.broadcast_to(np.asarray(margin, dtype=np.float64), p.shape)
    if not (np.isfinite(p).all() and np.isfinite(m).all()) or (m < 0).any():
        raise ValueError(f"fixed_reference: point {p.tolist()} and margin {m.tolist()} must be finite, margin ≥ 0")
    return p - m


def front_points(scores, stat: str = "mean", *, trim: float = 0.1) -> np.ndarray:
    """One point per weight from per-prompt scores [W, P, N]: the ``"mean"`` over prompts (the usual front),
    the ``"median"``, or the ``"trimmed"`` mean (dropping the lowest and highest ``trim`` share of prompts per
    weight and objective). The median and trimmed fronts are the robust variant: one extreme response moves
    them little. Example: scores at one weight (0.9, 0.8, 0.1) → mean 0.6, median 0.8."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] == 0:
        raise ValueError(f"front_points: scores must be [W, P, N] with P ≥ 1, got shape {x.shape}")
    if stat == "mean":
        return x.mean(1)
    if stat == "median":
        return np.median(x, axis=1)
    if stat == "trimmed":
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"front_points: trim must lie in [0, 0.5), got {trim}")
        k = int(math.floor(trim * x.shape[1]))
        s = np.sort(x, axis=1)
        return s[:, k: x.shape[1] - k].mean(1)
    raise ValueError(f"front_points: stat must be 'mean', 'median' or 'trimmed', got {stat!r}")
