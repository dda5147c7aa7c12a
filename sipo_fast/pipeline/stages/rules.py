"""The pure decision rules of stage 2 (SIPO.md §3), kept free of models so they can be tested by hand.

Notation: K implicit reward models (the N stage-1 policies plus the DPO soups), a prompt x with its two
original responses y_a, y_b, and candidates y_1..y_M (one per weight in W, possibly rewritten).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def conflicting_mask(prefs: torch.Tensor) -> torch.Tensor:
    """``prefs`` [B, N] (index 0/1 of the response each objective prefers) -> [B] bool: objectives disagree."""
    if prefs.dim() != 2 or prefs.shape[1] < 2:
        raise ValueError(f"prefs must be [B, N>=2], got {tuple(prefs.shape)}")
    return (prefs != prefs[:, :1]).any(dim=1)


def keep_rewrite(original: torch.Tensor, rewrite: torch.Tensor) -> torch.Tensor:
    """Refinement's rule: keep the rewrite unless the original scores >= on every implicit reward.

    ``original``, ``rewrite``: [M, K] implicit rewards of each candidate before and after the rewrite.
    Returns [M] bool, True where the rewrite replaces the original. Example: original [1, 2], rewrite [3, 2]
    -> original >= rewrite is [False, True], not all True -> keep the rewrite; a tie on every model
    ([1, 2] vs [1, 2]) keeps the original.
    """
    if original.shape != rewrite.shape or original.dim() != 2:
        raise ValueError(f"original and rewrite must both be [M, K], got {tuple(original.shape)} and "
                         f"{tuple(rewrite.shape)}")
    return ~(original >= rewrite).all(dim=1)


def dominates(cand: torch.Tensor, r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Strict dominance: cand [P, M, K] vs the originals r_a, r_b [P, K] -> [P, M] bool.

    True where, for every reward model k, r_k(y) > r_k(y_a) and r_k(y) > r_k(y_b). Ties fail.
    """
    if cand.dim() != 3 or r_a.shape != (cand.shape[0], cand.shape[2]) or r_b.shape != r_a.shape:
        raise ValueError(f"expected cand [P, M, K] and r_a, r_b [P, K]; got {tuple(cand.shape)}, "
                         f"{tuple(r_a.shape)}, {tuple(r_b.shape)}")
    best_original = torch.maximum(r_a, r_b).unsqueeze(1)  # (P, 1, K): beating the larger beats both
    return (cand > best_original).all(dim=2)


@dataclass
class Selection:
    """Result of :func:`select_pareto`: per prompt the chosen candidate index (-1 = none survived)."""

    survives: torch.Tensor  # (P, M) bool
    chosen: torch.Tensor  # (P,) long, -1 where no candidate survives

    @property
    def num_survivors(self) -> int:
        return int(self.survives.sum())

    @property
    def prompts_covered(self) -> int:
        return int((self.chosen >= 0).sum())


def select_pareto(cand: torch.Tensor, r_a: torch.Tensor, r_b: torch.Tensor,
                  valid: torch.Tensor | None = None) -> Selection:
    """Filtering: strict dominance over both originals under every model, then the max-sum pick.

    ``cand`` [P, M, K], ``r_a``/``r_b`` [P, K]; ``valid`` [P, M] bool masks missing candidates (ragged
    prompts). Among a prompt's survivors the one with the largest sum_k r_k(x, y) is chosen; on an exact tie
    of sums the lowest candidate index wins (deterministic). At most one per prompt.
    Example (K=2): r_a=[0, 1], r_b=[1, 0]; candidates [2, 2] (sum 4), [3, 0.5] (fails: 0.5 < 1), [1.5, 3]
    (sum 4.5) -> survivors 0 and 2, chosen 2.
    """
    survives = dominates(cand, r_a, r_b)
    if valid is not None:
        survives = survives & valid
    sums = cand.sum(dim=2).masked_fill(~survives, float("-inf"))  # (P, M)
    # argmax returns the first maximal index, which is the documented tie-break.
    chosen = torch.where(survives.any(dim=1), sums.argmax(dim=1), torch.full_like(sums[:, 0], -1, dtype=torch.long))
    return Selection(survives=survives, chosen=chosen.long())


def margin_counts(cand: torch.Tensor, r_a: torch.Tensor, r_b: torch.Tensor, valid: torch.Tensor,
                  names: list[str]) -> dict:
    """Why the filter kept what it kept: how the candidates compare with the weaker and the stronger original.

    ``cand`` [P, M, K], ``r_a``/``r_b`` [P, K], ``valid`` [P, M]; ``names`` the K reward models. Margins per
    model k: m_weak = r_k(y) − min(r_k(y_a), r_k(y_b)) and m_strong = r_k(y) − max(...). Counts are over valid
    candidates: beating the weaker (resp. stronger) original under each model and under all of them (the
    latter is the survivor count), the survival rate, and the best min_k m_strong (> 0 iff some survive).
    Example (K=2): r_a=[0, 1], r_b=[1, 0], candidates [2, 2], [0.5, 0.5], [-1, 5]: m_weak > 0 on all for the
    first two, on model 1 only for the third; m_strong > 0 on all for the first only; best margin min(1, 1) = 1.
    """
    lo, hi = torch.minimum(r_a, r_b).unsqueeze(1), torch.maximum(r_a, r_b).unsqueeze(1)  # (P, 1, K)
    weak, strong = cand - lo, cand - hi                                                      # (P, M, K)
    v = valid.unsqueeze(2)
    n = int(valid.sum())
    best = strong.min(dim=2).values[valid]
    return {"survival_rate": round(int(((strong > 0) & v).all(dim=2).sum()) / max(n, 1), 6),
            "beat_weaker_all": int(((weak > 0) & v).all(dim=2).sum()),
            "beat_stronger_all": int(((strong > 0) & v).all(dim=2).sum()),
            "beat_weaker_per_model": dict(zip(names, ((weak > 0) & v).sum(dim=(0, 1)).tolist())),
            "beat_stronger_per_model": dict(zip(names, ((strong > 0) & v).sum(dim=(0, 1)).tolist())),
            "best_margin_vs_stronger": round(float(best.max()), 6) if n else None}


def one_hot(index: int, n: int) -> list[float]:
    """w_e: the one-hot weight of the reviewing objective."""
    return [1.0 if i == index else 0.0 for i in range(n)]
