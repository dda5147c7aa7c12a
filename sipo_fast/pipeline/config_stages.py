"""The stage sections of :class:`~sipo_fast.pipeline.config.PipelineConfig` (align, sample, refine, filter,
finetune, eval): one dataclass each, every field documented once and validated in ``__post_init__``.
(Split from config.py, which keeps the model and data sections and the composition.)"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config_checks import Section as _Section
from .config_checks import check_max_steps, check_str_list, coerce  # noqa: F401

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class _Training(_Section):
    """The training recipe align and finetune share (transformers' names and meanings); each stage adds its own
    learning rate, checkpoint choice and extras. Not a section of its own."""

    beta: float = 0.1
    epochs: float = 3.0
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run all epochs)."""
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    """Prompt + response tokens; longer responses are truncated, longer prompts are an error."""
    eval_steps: float | None = None
    """Evaluate (and checkpoint) every this many steps, or this share of the steps if below 1 (None: per epoch)."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule (transformers' lr_scheduler_type); the paper presets use the authors' "cosine"."""
    warmup_ratio: float = 0.0
    """Share of the optimiser steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (the authors use 0.05)."""

    def check_training(self, section: str) -> None:
        self.check_positive("learning_rate", "beta", "epochs", "batch_size", "grad_accum", "max_length")
        self.check_positive("eval_steps", allow_none=True)
        self.check_positive("weight_decay", allow_zero=True)
        check_max_steps(f"{section}.max_steps", self.max_steps)
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"{section}.lr_scheduler={self.lr_scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"{section}.warmup_ratio={self.warmup_ratio} must be in [0, 1) (a share of the steps)")


@dataclass
class AlignConfig(_Training):
    """Stage 1: one DPO run per objective from π_ref (SIPO.md §3 defaults)."""

    use_lora: bool = True
    """LoRA adapters (default) or full fine-tuning."""
    lora_r: int = 64
    lora_alpha: float = 1.0
    """LoRA scaling is lora_alpha / lora_r: 1/64 with the paper's values, hence the large learning rate."""
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(LORA_TARGETS))
    learning_rate: float = 5e-4
    select_best: bool = True
    """Keep the checkpoint with the best eval loss (needs data.eval_fraction > 0 or data.eval_split)."""
    policies: list | None = None
    """Adopt these already-aligned per-objective policies (one per objective: LoRA adapter dirs, or full
    model paths) instead of training; their tokenizers must equal π_ref's."""

    def __post_init__(self):
        self.check_positive("lora_r", "lora_alpha")
        self.check_training("align")
        check_str_list("align.target_modules", self.target_modules)
        check_str_list("align.policies", self.policies, allow_none=True)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"align.lora_dropout={self.lora_dropout} must be in [0, 1)")


@dataclass
class SampleConfig(_Section):
    """Stage 2a: MOD over the stage-1 policies at every weight in W, on the conflicting prompts."""

    weights: list = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    """W: numbers (two objectives, w -> [w, 1-w]) or simplex vectors."""
    max_new_tokens: int = 256
    do_sample: bool = False
    """Greedy by default, as in the paper."""
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    """Prompts per MOD batch. Greedy sampling decodes every weight of W for them in the same batch
    (batch_size·|W| rows sharing each prompt's prefill); with do_sample, one batch per weight."""

    def __post_init__(self):
        self.check_positive("max_new_tokens", "batch_size", "temperature")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sample.top_p={self.top_p} must be in (0, 1]")


@dataclass
class RefineConfig(_Section):
    """Stage 2b (optional): review with a one-hot weight w_e, rewrite with MOD at the candidate's weight."""

    enabled: bool = True
    template: str = "default"
    """Named review/rewrite prompt set (sipo_fast.pipeline.templates): "default" (this project's) or
    "sipo-helpsteer" (the authors' HelpSteer prompts, exact under the beaver model.template)."""
    review_objective: str | None = None
    """Objective whose policy writes the review (w_e is one-hot on it); None = the first objective."""
    review_template: str | None = None
    """One-shot review prompt with {question} and {response}; None = the default for the objectives."""
    rewrite_template: str | None = None
    """One-shot rewrite prompt with {question}, {response} and {review}; None = the default."""
    review_max_new_tokens: int = 128
    rewrite_max_new_tokens: int = 256
    batch_size: int = 8

    def __post_init__(self):
        self.check_positive("review_max_new_tokens", "rewrite_max_new_tokens", "batch_size")
        from .templates import REFINE_TEMPLATES

        if self.template not in REFINE_TEMPLATES:
            raise ValueError(f"refine.template={self.template!r}: choose one of {', '.join(REFINE_TEMPLATES)}")
        for name, keys in (("review_template", ("{question}", "{response}")),
                           ("rewrite_template", ("{question}", "{response}", "{review}"))):
            text = getattr(self, name)
            if text is not None and not all(k in text for k in keys):
                raise ValueError(f"refine.{name} must contain {', '.join(keys)}")


@dataclass
class FilterConfig(_Section):
    """Stage 2c: strict dominance under every implicit reward model, then the max-sum pick."""

    beta: float = 0.1
    """β of the implicit reward r = β (log π − log π_ref)."""
    soups: bool = True
    """Add DPO soups (exact LoRA ΔW interpolation) at the soup weights as extra reward models."""
    soup_weights: list | None = None
    """Weights of the soups; None = sample.weights."""
    batch_size: int = 8
    max_length: int = 512

    def __post_init__(self):
        self.check_positive("beta", "batch_size", "max_length")


@dataclass
class FinetuneConfig(_Training):
    """Stage 3: each stage-1 policy (adapter merged) fine-tuned on D_c with the SIPO loss, itself as reference."""

    loss: str = "sipo"
    """"sipo" (DPO + α·NLL/|y_c|, SIPO.md §2) or "sigmoid" (plain DPO, for ablations)."""
    alpha: float = 0.1
    learning_rate: float = 5e-6
    select_best: bool = False
    """Keep the checkpoint with the best loss on stage 1's held-out pairs of the objective (the authors'
    Iterative_DPO.py); needs held-out data (data.eval_fraction > 0 or data.eval_split)."""

    def __post_init__(self):
        if self.loss not in ("sipo", "sigmoid"):
            raise ValueError(f"finetune.loss={self.loss!r}: choose 'sipo' or 'sigmoid'")
        self.check_positive("alpha", allow_zero=True)
        self.check_training("finetune")


EVAL_BASELINES = ("mod", "soups", "soups_ab", "modpo", "dpo_lw")


@dataclass
class EvalConfig(_Section):
    """Evaluation after stage 3 (:func:`sipo_fast.pipeline.compare.evaluate_run`): MOD sweeps of the fine-tuned policies and the
    baselines over the weights, scored by ground-truth scorers on the data source's held-out prompts."""

    enabled: bool = True
    weights: list | None = None
    """Weights of the sweep; None = sample.weights plus the endpoints (one-hot weights)."""
    num_prompts: int = 64
    """Held-out prompts scored per weight."""
    prompt_source: str | None = None
    """Dataset the held-out prompts come from (a hub name or local path); None = data.source."""
    prompt_split: str = "test"
    """Split of prompt_source holding them."""
    prompt_select: str = "first"
    """Which rows: "first" / "last" (the split's first / last num_prompts distinct prompts), or "first:N" /
    "last:N" (the split's first / last N rows, then their first num_prompts distinct prompts)."""
    max_new_tokens: int = 128
    batch_size: int = 8
    baselines: list = field(default_factory=lambda: ["mod", "soups"])
    """Swept beside "sipo": "mod" (MOD over the stage-1 policies), "soups" (exact LoRA DPO soups), "soups_ab"
    (the authors' inexact A/B soups), "modpo" (trains one MODPO model per interior weight), "dpo_lw" (trains one
    model per interior weight on the w-weighted sum of the objectives' DPO losses)."""
    scorers: list | None = None
    """Ground-truth scorer per objective, "name" or "name:path" (sipo_fast.scoring); None = the data's defaults."""

    def __post_init__(self):
        self.check_positive("num_prompts", "max_new_tokens", "batch_size")
        check_str_list("eval.baselines", self.baselines, allow_empty=True)
        check_str_list("eval.scorers", self.scorers, allow_none=True)
        bad = [b for b in self.baselines if b not in EVAL_BASELINES]
        if bad:
            raise ValueError(f"eval.baselines: unknown {bad}; choose from {', '.join(EVAL_BASELINES)}")
        from sipo_fast.data.prompts import parse_select

        parse_select(self.prompt_select, "eval.prompt_select")
