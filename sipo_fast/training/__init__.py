"""Training-side building blocks: sequence log-likelihoods and implicit rewards through the fused log-prob op,
the DPO / SIPO / MODPO / DPO LW losses, and TRL's DPOTrainer wired to both (stages 1 and 3 of SIPO.md §3).

The TRL-dependent names (``FusedDPOTrainer``, ``FusedDPOConfig``, ``train_preference``,
``build_preference_trainer``) load lazily: importing TRL takes seconds.
"""
from __future__ import annotations

import importlib

from sipo_fast.training.backbone import final_hidden_states, lm_head_plan
from sipo_fast.training.logprobs import (
    implicit_rewards,
    policy_logprobs,
    reference_logprobs,
    sequence_logprobs,
    sequence_logprobs_ref,
)
from sipo_fast.training.losses import dpo_loss, dpo_lw_loss, modpo_loss, sipo_loss

_LAZY = {name: "sipo_fast.training.trainer" for name in
         ("FusedDPOTrainer", "FusedDPOConfig", "train_preference", "build_preference_trainer", "LOSS_TYPES")}
_LAZY.update({name: "sipo_fast.training.reference" for name in ("reference_table", "with_reference")})

__all__ = ["sequence_logprobs", "sequence_logprobs_ref", "final_hidden_states", "lm_head_plan", "policy_logprobs",
           "reference_logprobs", "implicit_rewards", "dpo_loss", "sipo_loss", "modpo_loss", "dpo_lw_loss", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sipo_fast.training' has no attribute {name!r}")
