"""The gates a demo run must pass before its hypervolumes mean anything (pure functions, numpy only).

- G1, the data has a trade-off: the correlation over preference pairs of the two objectives' score differences
  (response 1 − response 0) is below 0 (:func:`pair_correlation`, :func:`data_correlation`).
- G2, the front has width: the MOD endpoints (w = 0 and w = 1) differ beyond their confidence interval on every
  objective (:func:`endpoint_separation`).
- G3, the filter sees something: each stage-1 policy's implicit reward ranks held-out pairs at least 0.7 right
  (:func:`implicit_reward_accuracy`), and the filter's survivors truly dominate both originals at least 1.5 times
  as often as the candidates do overall (:func:`filter_lift`, with :func:`truly_dominates`).

Each function returns a dict of plain numbers with ``passed``, so a run can write it as JSON and a report can
print it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .stats import bootstrap_ci, mean_ci


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    return float((xc * yc).sum() / den) if den > 0 else float("nan")


def pair_correlation(d1, d2, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """G1: Pearson correlation of two objectives' per-pair differences, with a percentile bootstrap interval
    over pairs (:func:`sipo_fast.eval.stats.bootstrap_ci`). ``passed`` = r < 0; ``below_zero`` = the whole
    interval is below 0.

    Example: d1 = (1, 2, 3), d2 = (3, 2, 1): the centred vectors are (−1, 0, 1) and (1, 0, −1), so
    r = (−1 + 0 − 1) / √(2 · 2) = −1.
    """
    x, y = np.asarray(d1, dtype=np.float64).reshape(-1), np.asarray(d2, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or x.size < 3:
        raise ValueError(f"pair_correlation: need two equally long difference lists of at least 3 pairs, got "
                         f"{x.size} and {y.size}")
    r = _pearson(x, y)
    lo, hi = bootstrap_ci(lambda s: _pearson(s[:, 0], s[:, 1]), np.stack([x, y], 1), n_boot=n_boot,
                          confidence=confidence, seed=seed)
    return {"r": r, "lo": float(lo), "hi": float(hi), "n": int(x.size), "passed": bool(r < 0),
            "below_zero": bool(hi < 0)}


def data_correlation(rows: Sequence[dict], keys: tuple[str, str] = ("relevance", "tone"), **kw) -> dict:
    """G1 on preference rows that carry raw scores ``<key>_0`` and ``<key>_1`` (the demo data does):
    :func:`pair_correlation` of (key1_1 − key1_0) and (key2_1 − key2_0)."""
    missing = [f"{k}_{i}" for k in keys for i in (0, 1) if rows and f"{k}_{i}" not in rows[0]]
    if missing:
        raise ValueError(f"data_correlation: rows lack the score columns {missing}")
    d = [[r[f"{k}_1"] - r[f"{k}_0"] for r in rows] for k in keys]
    return pair_correlation(d[0], d[1], **kw)


def endpoint_separation(at_w0, at_w1, *, confidence: float = 0.95) -> dict:
    """G2: per objective, the paired difference over prompts between the two endpoints of a sweep.

    ``at_w0`` and ``at_w1`` are [P, N] per-prompt scores (same prompts, maximisation orientation) at w = 0 and
    w = 1. For each objective k: mean of (w1 − w0) and its Student-t half-width; ``separated[k]`` = the interval
    excludes 0. ``passed`` = separated on every objective. Example (one objective): w1 − w0 = (2, 3, 1) →
    mean 2 ± 2.484 (t_{0.975,2} · 1/√3), the interval [−0.48, 4.48] covers 0: not separated.
    """
    a, b = np.asarray(at_w0, dtype=np.float64), np.asarray(at_w1, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"endpoint_separation: at_w0 {a.shape} and at_w1 {b.shape} must both be [P, N] with P ≥ 2")
    mean, half = mean_ci(b - a, confidence, axis=0)
    separated = np.abs(mean) > half
    return {"diff": mean.tolist(), "half_width": half.tolist(), "separated": separated.tolist(),
            "n": int(a.shape[0]), "passed": bool(separated.all())}


def implicit_reward_accuracy(chosen, rejected, *, threshold: float = 0.7, confidence: float = 0.95) -> dict:
    """G3, first half: the share of held-out pairs whose chosen response gets the larger implicit reward
    r = β·(log π − log π_ref) (strictly larger, as TRL's ``rewards/accuracies``), with a Wilson score interval.
    ``passed`` = accuracy ≥ ``threshold``.

    Example: margins (chosen − rejected) 0.3, −0.1, 0.2, 0.0 → 2 of 4 strictly positive: accuracy 0.5.
    Wilson interval for k of n at z: (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n).
    """
    c, r = np.asarray(chosen, dtype=np.float64).reshape(-1), np.asarray(rejected, dtype=np.float64).reshape(-1)
    if c.shape != r.shape or c.size == 0:
        raise ValueError(f"implicit_reward_accuracy: need equally many chosen and rejected rewards (≥ 1), got "
                         f"{c.size} and {r.size}")
    n, k = c.size, int((c > r).sum())
    lo, hi = wilson_interval(k, n, confidence)
    acc = k / n
    return {"accuracy": acc, "lo": lo, "hi": hi, "n": n, "correct": k, "passed": bool(acc >= threshold)}


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial share k/n. Example: 8 of 10 at 95% (z = 1.96) → (0.490, 0.943)."""
    from scipy.stats import norm

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 ≤ k ≤ n and n ≥ 1, got k={k}, n={n}")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def truly_dominates(candidate, original_a, original_b) -> np.ndarray:
    """Per candidate: does it beat both of its originals on every objective under the ground-truth scorers?
    All three [C, N] in maximisation orientation; strict on every objective, as the filter's rule (SIPO.md §3)."""
    c, a, b = (np.asarray(x, dtype=np.float64) for x in (candidate, original_a, original_b))
    if not (c.shape == a.shape == b.shape) or c.ndim != 2:
        raise ValueError(f"truly_dominates: candidate {c.shape}, original_a {a.shape} and original_b {b.shape} "
                         "must all be [C, N]")
    return ((c > a) & (c > b)).all(1)


def filter_lift(truly, survived, *, threshold: float = 1.5) -> dict:
    """G3, second half: how much the filter enriches for candidates that truly dominate both originals.

        lift = P(truly dominates | survived) / P(truly dominates),

    both shares over the same candidates (``truly`` and ``survived`` are boolean [C]). Lift 1 is a filter that
    picks at random; ``passed`` = lift ≥ ``threshold``. NaN lift (no survivors, or no candidate dominates) fails.
    Example: 10 candidates, 4 truly dominate; 5 survive, 3 of them dominating → (3/5) / (4/10) = 1.5.
    """
    t, s = np.asarray(truly, dtype=bool).reshape(-1), np.asarray(survived, dtype=bool).reshape(-1)
    if t.shape != s.shape or t.size == 0:
        raise ValueError(f"filter_lift: need one truly/survived flag per candidate, got {t.size} and {s.size}")
    k_all, k_surv, n_surv = int(t.sum()), int((t & s).sum()), int(s.sum())
    share_all = k_all / t.size
    share_surv = k_surv / n_surv if n_surv else float("nan")
    # from the counts, so that a hand-made 1.5 is exactly 1.5 (0.6 / 0.4 is 1.4999999999999998 in floats)
    lift = k_surv * t.size / (n_surv * k_all) if n_surv and k_all else float("nan")
    return {"lift": lift, "share_survivors": share_surv, "share_all": share_all, "survivors": int(s.sum()),
            "candidates": int(t.size), "passed": bool(lift >= threshold)}
