"""Preference losses on sequence log-likelihoods (SIPO.md §2 and §4). Pure tensor functions: inputs are [B]
tensors of log π(y|x) = Σ over response tokens of log-probs (sums, not means), outputs per pair or reduced.

    Δ_w = log π_θ(y_w|x) - log π_ref(y_w|x),   Δ_l = log π_θ(y_l|x) - log π_ref(y_l|x)
    DPO   = -log σ(β (Δ_w - Δ_l))
    SIPO  = DPO - α · log π_θ(y_c|x) / |y_c|              (y_c is the chosen response; |y_c| its token count)
    MODPO = -log σ( (1/w_k) [ β (Δ_w - Δ_l) - w_{-k}ᵀ (r_φ(x, y_w) - r_φ(x, y_l)) ] )
    DPO LW = Σ_i w_i · -log σ(s_i β (Δ_w - Δ_l)),   s_i = +1 if objective i prefers y_w, -1 if it prefers y_l
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def _check(reduction: str, *tensors: torch.Tensor) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    shape = tensors[0].shape
    if len(shape) != 1:
        raise ValueError(f"log-probs must be [B] tensors (one sum per sequence), got shape {tuple(shape)}")
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"all log-prob tensors must share shape {tuple(shape)}, got {tuple(t.shape)}")


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    return losses.sum() if reduction == "sum" else losses


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             reduction: str = "mean") -> torch.Tensor:
    """DPO loss -log σ(β[(log π_θ(y_w) - log π_ref(y_w)) - (log π_θ(y_l) - log π_ref(y_l))]) per pair.

    Same as TRL's ``loss_type="sigmoid"`` with ``label_smoothing=0``. ``reduction``: mean (default), sum, none.
    """
    _check(reduction, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return _reduce(-F.logsigmoid(beta * margin), reduction)


def sipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor, *,
              beta: float = 0.1, alpha: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """SIPO fine-tuning loss (stage 3) per pair (x, y_c, y_l): DPO(x, y_c, y_l) - α · log π_θ(y_c|x) / |y_c|.

    ``chosen_lengths`` [B] is |y_c|, the number of scored response tokens of each chosen response (not the
    padded length: SIPO.md §2 calls dividing by the padded length a bug of the released code). The NLL term is
    normalised per example, unlike TRL's ``loss_type=["sigmoid", "sft"]``, which averages over all chosen
    tokens of the batch.
    """
    _check(reduction, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
           chosen_lengths)
    if (chosen_lengths <= 0).any():
        raise ValueError("chosen_lengths must be >= 1: every chosen response needs at least one scored token")
    dpo = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                   reduction="none")
    nll = -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype)
    return _reduce(dpo + alpha * nll, reduction)


def modpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               chosen_margin_rewards: torch.Tensor, rejected_margin_rewards: torch.Tensor, *, weight: float,
               margin_weights, beta: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """MODPO loss for objective k (SIPO.md §4): DPO's sigmoid loss on the reward
    r_θ(x, y) = (1/w_k) [β log(π_θ(y|x)/π_ref(y|x)) - w_{-k}ᵀ r_φ(x, y)], i.e.
    -log σ( (1/w_k) [β (Δ_w - Δ_l) - w_{-k}ᵀ (r_φ(x, y_w) - r_φ(x, y_l))] ).

    Args:
        chosen_margin_rewards, rejected_margin_rewards: [B, N-1] (or [B] for N = 2) rewards r_φ of the other
            objectives on y_w and y_l (e.g. their implicit rewards).
        weight: w_k > 0, the weight of the objective being trained.
        margin_weights: w_{-k}, N-1 weights (a float for N = 2).
    """
    _check(reduction, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not weight > 0:
        raise ValueError(f"weight (w_k) must be > 0, got {weight}")
    B = policy_chosen_logps.shape[0]
    cm = chosen_margin_rewards.reshape(B, -1) if chosen_margin_rewards.dim() == 1 else chosen_margin_rewards
    rm = rejected_margin_rewards.reshape(B, -1) if rejected_margin_rewards.dim() == 1 else rejected_margin_rewards
    w = torch.as_tensor(margin_weights, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device).reshape(-1)
    if cm.shape != rm.shape or cm.shape != (B, w.numel()):
        raise ValueError(f"margin rewards must be [B, N-1] = [{B}, {w.numel()}] (one column per margin weight), "
                         f"got {tuple(chosen_margin_rewards.shape)} and {tuple(rejected_margin_rewards.shape)}")
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    reward_gap = (cm - rm).to(margin.dtype) @ w  # (B,)
    return _reduce(-F.logsigmoid((beta * margin - reward_gap) / weight), reduction)


def dpo_lw_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, signs: torch.Tensor, *, weights,
                beta: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """DPO loss weighting (DPO LW, SIPO.md §4): the w-weighted sum of the objectives' DPO losses on one pair,
    Σ_i w_i · -log σ(s_i · β (Δ_w - Δ_l)).

    The pair's two responses are stored once, as (y_w, y_l) of a reference orientation (say objective 1's);
    ``signs`` [B, N] holds s_i = +1 where objective i prefers y_w and -1 where it prefers y_l, i.e. objective i's
    pair is the same pair flipped where it conflicts (the authors' DPOLWTrainer, src/trainer/dpolw_trainer.py,
    with N = 2). ``weights``: N weights w_i >= 0.
    """
    _check(reduction, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    w = torch.as_tensor(weights, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device).reshape(-1)
    B = policy_chosen_logps.shape[0]
    if signs.shape != (B, w.numel()):
        raise ValueError(f"signs must be [B, N] = [{B}, {w.numel()}] (one column per weight), got {tuple(signs.shape)}")
    if (w < 0).any():
        raise ValueError(f"DPO LW weights must be >= 0, got {w.tolist()}")
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)  # (B,)
    per_objective = -F.logsigmoid(signs.to(margin.dtype) * (beta * margin)[:, None])  # (B, N)
    return _reduce(per_objective @ w, reduction)
