"""Summary statistics for evaluation: means with Student-t confidence intervals, direction handling, the
average gain over a baseline, and the weight grids a sweep visits."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_ci(values, confidence: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the two-sided Student-t confidence interval along ``axis``:

        mean ± t_{(1+c)/2, n−1} · s / √n,   s = sample standard deviation (ddof = 1).

    Returns ``(mean, half_width)`` with ``axis`` removed. With one sample the half-width is NaN (the spread is
    unknown), never 0. Example: [1, 2, 3] → mean 2, s = 1, t_{0.975,2} = 4.303, half-width 4.303/√3 = 2.484.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_ci: confidence must lie in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.shape[axis] == 0:
        raise ValueError("mean_ci: no values; a confidence interval needs at least one sample")
    n = x.shape[axis]
    mean = x.mean(axis=axis)
    if n == 1:
        return mean, np.full_like(mean, np.nan)
    from scipy.stats import t

    half = t.ppf(0.5 + confidence / 2, n - 1) * x.std(axis=axis, ddof=1) / math.sqrt(n)
    return mean, half


def to_maximisation(scores, higher_is_better: Sequence[bool]) -> np.ndarray:
    """Scores [..., N] in scorer units → maximisation orientation: columns whose scorer is lower-is-better
    (costs) are negated, so "larger is better" holds for every objective and one Pareto routine serves all."""
    x = np.asarray(scores, dtype=np.float64)
    sign = np.where(np.asarray(higher_is_better, dtype=bool), 1.0, -1.0)
    if x.shape[-1] != sign.shape[0]:
        raise ValueError(f"to_maximisation: scores have {x.shape[-1]} objectives but {sign.shape[0]} directions")
    return x * sign


def average_gain(method_means, baseline_means) -> np.ndarray:
    """Average gain per objective of a method over a baseline, both [W, N] in maximisation orientation and
    evaluated at the same W weights:  gain_k = (1/W) Σ_w (m_{w,k} − b_{w,k}).

    This is the matched-weight mean difference; the paper's "average gain of 2.1 (helpfulness) and 3.0
    (harmlessness)" is this quantity averaged over weights (and over baselines). Positive = better.
    """
    m, b = np.asarray(method_means, dtype=np.float64), np.asarray(baseline_means, dtype=np.float64)
    if m.shape != b.shape or m.ndim != 2:
        raise ValueError(f"average_gain: method {m.shape} and baseline {b.shape} must both be [W, N] at the same "
                         "weights; evaluate both on one weight grid")
    return (m - b).mean(0)


def weight_grid(n_objectives: int = 2, inner: Sequence[float] = (0.2, 0.4, 0.6, 0.8), *,
                endpoints: bool = True) -> np.ndarray:
    """Weights for a sweep, [W, N] rows on the simplex.

    Two objectives: w ∈ ``inner`` (SIPO.md's W), plus 0 and 1 when ``endpoints``, as rows [w, 1 − w] in
    increasing w. More objectives: every lattice point of the simplex with step = the smallest gap in
    ``inner`` ∪ {0, 1} (e.g. 0.2 → 21 points for N = 3); ``endpoints=False`` drops the rows that put
    weight 0 on some objective.
    """
    if n_objectives < 1:
        raise ValueError("weight_grid: need at least one objective")
    inner = sorted(float(w) for w in inner)
    if any(not 0.0 <= w <= 1.0 for w in inner):
        raise ValueError(f"weight_grid: weights must lie in [0, 1], got {inner}")
    if n_objectives == 1:
        return np.ones((1, 1))
    if n_objectives == 2:
        ws = sorted(set(inner) | ({0.0, 1.0} if endpoints else set()))
        if not ws:
            raise ValueError("weight_grid: empty grid; pass some inner weights or endpoints=True")
        return np.array([[w, 1.0 - w] for w in ws])
    levels = sorted(set(inner) | {0.0, 1.0})
    step = min(b - a for a, b in zip(levels, levels[1:]))
    k = round(1.0 / step)
    if abs(k * step - 1.0) > 1e-9:
        raise ValueError(f"weight_grid: for {n_objectives} objectives the grid step {step} must divide 1")
    rows = [c for c in _compositions(k, n_objectives) if endpoints or min(c) > 0]
    return np.array(rows, dtype=np.float64) / k


def _compositions(total: int, parts: int):
    """All tuples of ``parts`` non-negative integers summing to ``total`` (lexicographic, first part ascending)."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first,) + rest


def bootstrap_ci(stat, samples, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                 axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of ``stat`` over the samples along ``axis``: resample the samples with
    replacement ``n_boot`` times (numpy's default_rng(seed)), apply ``stat`` (a function of an array with the
    samples on ``axis``) to each resample, return the (1 − c)/2 and (1 + c)/2 quantiles ``(lo, hi)``
    (resamples where the statistic is NaN are skipped). Deterministic for a given seed."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must lie in (0, 1), got {confidence}")
    x = np.asarray(samples, dtype=np.float64)
    n = x.shape[axis]
    if n < 2:
        raise ValueError(f"bootstrap_ci: need at least 2 samples to resample, got {n}")
    rng = np.random.default_rng(seed)
    draws = np.stack([np.asarray(stat(np.take(x, rng.integers(0, n, n), axis=axis)), dtype=np.float64)
                      for _ in range(n_boot)])
    alpha = (1.0 - confidence) / 2
    # nanquantile: a statistic undefined on a degenerate resample (a correlation of constants) is skipped
    return np.nanquantile(draws, alpha, axis=0), np.nanquantile(draws, 1.0 - alpha, axis=0)


def paired_differences(a, b, *, confidence: float = 0.95, method: str = "t", n_boot: int = 2000,
                       seed: int = 0) -> dict:
    """Paired per-weight differences of two methods scored on the same prompts.

    ``a`` and ``b`` are [W, P, N] scores (weight, prompt, objective) in one orientation, the same prompts in
    the same order. d = a − b per (weight, prompt, objective); over the P prompts: ``mean`` [W, N] and an
    interval ``lo``/``hi`` [W, N] — Student-t (mean ± t·s/√P, :func:`mean_ci`) or ``method="bootstrap"``
    (:func:`bootstrap_ci` of the mean over prompts). ``significant`` [W, N] is True where the interval
    excludes 0. Example (one weight, one objective): a = [3, 5, 4], b = [1, 2, 3] → d = [2, 3, 1], mean 2,
    s = 1, half-width t_{0.975,2}·1/√3 = 4.303/1.732 = 2.484: interval [−0.484, 4.484], not significant.
    """
    A, B = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if A.shape != B.shape or A.ndim != 3:
        raise ValueError(f"paired_differences: a {A.shape} and b {B.shape} must both be [W, P, N] on the same "
                         "weights and prompts")
    d = A - B
    mean = d.mean(1)
    if method == "t":
        _, half = mean_ci(d, confidence, axis=1)
        lo, hi = mean - half, mean + half
    elif method == "bootstrap":
        lo, hi = bootstrap_ci(lambda x: x.mean(1), d, n_boot=n_boot, confidence=confidence, seed=seed, axis=1)
    else:
        raise ValueError(f"paired_differences: method must be 't' or 'bootstrap', got {method!r}")
    return {"mean": mean, "lo": lo, "hi": hi, "significant": (lo > 0) | (hi < 0), "n": d.shape[1]}
