"""The sections of :class:`~.pipeline_config.PipelineConfig`, one dataclass each: the model and the data, then
the stages in pipeline order (align, sample, refine, filter, finetune, eval). Every field is documented once,
here, and validated in ``__post_init__`` (after :mod:`.checks` has checked it against its annotation) with a
message that says what to do. YAML files under ``configs/`` mirror these dataclasses key for key.

Weights: a weight vector w lies on the simplex (w_i >= 0, sum w_i = 1), one entry per objective. For two
objectives a bare number w is shorthand for [w, 1 - w]; for N > 2 objectives give explicit vectors
(:func:`~.checks.resolve_weights`, called by ``PipelineConfig`` once the number of objectives is known).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .checks import SECTION_NAMES, Section, check_max_steps, check_str_list

@dataclass
class ModelConfig(Section):
    """Which model every policy starts from (π_ref) and how to load it."""

    name: str = "default"
    """"default" (embedded SmolLM2-135M-Instruct), "tiny" / "tiny:<arch>" (random test model), or a HF name/path."""
    trust_remote_code: bool = False
    """Load hub code with the model. Off unless you trust the repository: it runs arbitrary Python."""
    dtype: str = "auto"
    """"auto" (float32 on CPU, bfloat16 on CUDA), "float32", "bfloat16" or "float16"."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    template: str = "chat"
    """Prompt template: "chat" (the tokenizer's chat template), "none", or a format string with {prompt}."""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("model.name must be 'default', 'tiny', 'tiny:<arch>' or a Hugging Face model name/path")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if self.template not in ("chat", "none") and "{prompt}" not in self.template:
            raise ValueError(f"model.template={self.template!r} must be 'chat', 'none' or contain '{{prompt}}'")


@dataclass
class DataConfig(Section):
    """Preference data (``sipo_fast.data.load_preferences`` schema) and the objectives taken from it."""

    source: str = "demo"
    """"demo" (shipped), "pku" / "pku-10k" (PKU-SafeRLHF-10K), "helpsteer", or a local file/dataset path."""
    objectives: list = field(default_factory=lambda: ["helpful", "harmless"])
    """Objective names, one column pref_<name> each; at least two."""
    max_rows: int | None = None
    """Use at most this many training rows (after the seeded shuffle); None = all."""
    eval_fraction: float = 0.1
    """Share of rows held out for stage 1's eval loss (best-checkpoint choice). 0 disables."""
    split_seed: int = 0
    """Seed of the train/eval split (the paper splits 90/10 with seed 0)."""
    conflict_ratio: float | None = None
    """Subsample stage 1's rows to this share of conflicting pairs (the paper's HelpSteer mix is 0.6); None = as is."""
    max_conflict_prompts: int | None = None
    """Stage 2 uses at most this many conflicting training prompts (in split order); None = all."""
    drop_long_prompts: bool = False
    """Drop prompts that do not fit the context instead of failing."""
    split_method: str = "shuffle"
    """How eval_fraction is held out: "shuffle" (seeded shuffle, first share held out after the mix and max_rows)
    or "datasets" (the authors' ``Dataset.train_test_split(test_size=eval_fraction, seed=split_seed)``, first)."""
    eval_split: str | None = None
    """Take stage 1's held-out pairs from this split of data.source (HelpSteer's "validation") instead of holding
    out data.eval_fraction of the training rows; None = hold out."""
    conflict_mix: str = "largest"
    """How data.conflict_ratio subsamples: "largest" (the largest subset with that share) or "min" (the authors':
    min(#conflicting, #agreeing) pairs in all, split ratio / 1 - ratio)."""
    holdout_stage2: bool = False
    """Keep stage 2's conflicting prompts out of stage 1's training rows (a deviation: the paper samples stage 2
    on prompts stage 1 trained on, which a small model memorises, so no candidate beats its chosen response)."""

    def __post_init__(self):
        if not isinstance(self.objectives, (list, tuple)) or len(self.objectives) < 2:
            raise ValueError(f"data.objectives={self.objectives!r}: SIPO needs at least two objectives")
        if len(set(self.objectives)) != len(self.objectives):
            raise ValueError(f"data.objectives={self.objectives!r} repeats a name; list each objective once")
        check_str_list("data.objectives", self.objectives)
        self.check_positive("max_rows", "max_conflict_prompts", allow_none=True)
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
        if self.conflict_ratio is not None and not 0 < self.conflict_ratio < 1:
            raise ValueError(f"data.conflict_ratio={self.conflict_ratio} must be in (0, 1), or null to keep the "
                             "data's mix")
        if self.split_method not in ("shuffle", "datasets"):
            raise ValueError(f"data.split_method={self.split_method!r}: choose 'shuffle' or 'datasets'")
        if self.split_method == "datasets" and self.eval_fraction == 0 and self.eval_split is None:
            raise ValueError("data.split_method='datasets' holds out data.eval_fraction of the rows: set it > 0")
        if self.conflict_mix not in ("largest", "min"):
            raise ValueError(f"data.conflict_mix={self.conflict_mix!r}: choose 'largest' or 'min'")
        if self.eval_split is not None and (not isinstance(self.eval_split, str) or not self.eval_split):
            raise ValueError(f"data.eval_split={self.eval_split!r}: give a split name such as 'validation', or null")
        if self.holdout_stage2 and self.max_conflict_prompts is None:
            raise ValueError("data.holdout_stage2 needs data.max_conflict_prompts: how many conflicting prompts to "
                             "keep out of stage 1 for stage 2")

    @property
    def stage2_reserved(self) -> int | None:
        """Conflicting prompts kept out of stage 1 for stage 2 (None: none, as in the paper)."""
        return self.max_conflict_prompts if self.holdout_stage2 else None


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class _Training(Section):
    """The training recipe align and finetune share; each stage adds its learning rate, checkpoint choice and
    extras. Not a section of its own. :meth:`trainer_config` turns it into the one ``FusedDPOConfig`` (TRL's
    ``DPOConfig``) of a training run: fields named as in TRL keep TRL's name, the others say which TRL field they
    set."""

    beta: float = 0.1
    """β of the DPO loss (DPOConfig.beta)."""
    epochs: float = 3.0
    """Passes over the pairs (TrainingArguments.num_train_epochs)."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run all epochs)."""
    batch_size: int = 8
    """Pairs per device and step (TrainingArguments.per_device_train_batch_size, and the eval batch size)."""
    grad_accum: int = 1
    """Steps whose gradients are summed before each update (TrainingArguments.gradient_accumulation_steps)."""
    max_length: int = 512
    """Prompt + response tokens; longer responses are truncated, longer prompts are an error."""
    eval_steps: float | None = None
    """Evaluate (and checkpoint) every this many steps, or this share of the steps if below 1 (None: per epoch)."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule (TrainingArguments.lr_scheduler_type); the paper presets use the authors' "cosine"."""
    warmup_ratio: float = 0.0
    """Share of the optimiser steps spent warming the learning rate up from 0 (TrainingArguments.warmup_steps:
    transformers 5 reads a value below 1 as that share)."""
    weight_decay: float = 0.0
    """AdamW weight decay (the authors use 0.05)."""

    def trainer_config(self, *, output_dir, seed: int, prompt_template: str, evaluate: bool, **fields):
        """This recipe as the ``FusedDPOConfig`` of one training run, built here once and passed whole to the
        trainer. ``evaluate``: the run has held-out pairs, evaluated every ``eval_steps`` (else every epoch); with
        ``select_best`` the checkpoint of the best eval loss is the result. ``fields``: the run's own
        ``FusedDPOConfig`` fields (``loss_type``, ``objective_names``, ``disable_tqdm``, MODPO / DPO LW weights)."""
        import torch

        from sipo_fast.training.trainer import FusedDPOConfig

        keep_best = evaluate and self.select_best
        every = "no" if not evaluate else "epoch" if self.eval_steps is None else "steps"
        steps = {"eval_steps": self.eval_steps, "save_steps": self.eval_steps} if every == "steps" else {}
        return FusedDPOConfig(
            output_dir=str(output_dir), seed=seed, prompt_template=prompt_template, beta=self.beta,
            learning_rate=self.learning_rate, num_train_epochs=self.epochs, max_steps=self.max_steps,
            per_device_train_batch_size=self.batch_size, per_device_eval_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum, max_length=self.max_length,
            lr_scheduler_type=self.lr_scheduler, warmup_steps=float(self.warmup_ratio), weight_decay=self.weight_decay,
            eval_strategy=every, save_strategy=every if keep_best else "no", load_best_model_at_end=keep_best,
            metric_for_best_model="eval_loss", greater_is_better=False, save_total_limit=1 if keep_best else None,
            save_only_model=True, logging_steps=1, gradient_checkpointing=False, report_to="none",
            # Train in the model's own dtype: TRL's default bf16 autocast would change the numbers on CPU.
            bf16=False, fp16=False, dataloader_pin_memory=torch.cuda.is_available(), **steps, **fields)

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
class SampleConfig(Section):
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


# Names of the review/rewrite prompt sets (the sets themselves: pipeline/stages/refine_prompts.py).
REFINE_TEMPLATES = ("default", "sipo-helpsteer")


@dataclass
class RefineConfig(Section):
    """Stage 2b (optional): review with a one-hot weight w_e, rewrite with MOD at the candidate's weight."""

    enabled: bool = True
    template: str = "default"
    """Named review/rewrite prompt set (pipeline/stages/refine_prompts.py): "default" (this project's) or
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
        if self.template not in REFINE_TEMPLATES:
            raise ValueError(f"refine.template={self.template!r}: choose one of {', '.join(REFINE_TEMPLATES)}")
        for name, keys in (("review_template", ("{question}", "{response}")),
                           ("rewrite_template", ("{question}", "{response}", "{review}"))):
            text = getattr(self, name)
            if text is not None and not all(k in text for k in keys):
                raise ValueError(f"refine.{name} must contain {', '.join(keys)}")


@dataclass
class FilterConfig(Section):
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
    """"sipo" (DPO + α·NLL/|y_c|, SIPO.md §2) or "sigmoid" (plain DPO, for ablations) (FusedDPOConfig.loss_type)."""
    alpha: float = 0.1
    """α of the SIPO loss (FusedDPOConfig.sipo_alpha)."""
    learning_rate: float = 5e-6
    select_best: bool = False
    """Keep the checkpoint with the best loss on stage 1's held-out pairs of the objective (the authors'
    Iterative_DPO.py); needs held-out data (data.eval_fraction > 0 or data.eval_split)."""

    def __post_init__(self):
        if self.loss not in ("sipo", "sigmoid"):
            raise ValueError(f"finetune.loss={self.loss!r}: choose 'sipo' or 'sigmoid'")
        self.check_positive("alpha", allow_zero=True)
        self.check_training("finetune")

    def trainer_config(self, **run):
        """:meth:`_Training.trainer_config` with this stage's loss (FusedDPOConfig.loss_type, .sipo_alpha)."""
        return super().trainer_config(loss_type=[self.loss], sipo_alpha=self.alpha, **run)


EVAL_BASELINES = ("mod", "soups", "soups_ab", "modpo", "dpo_lw")


@dataclass
class EvalConfig(Section):
    """Evaluation after stage 3 (:func:`sipo_fast.pipeline.baselines.compare.evaluate_run`): MOD sweeps of the
    fine-tuned policies and the baselines over the weights, scored by ground-truth scorers on the data source's
    held-out prompts."""

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


# Section name -> dataclass, in pipeline order: the keys of a pipeline YAML file besides the top-level ones.
SECTIONS = {"model": ModelConfig, "data": DataConfig, "align": AlignConfig, "sample": SampleConfig,
            "refine": RefineConfig, "filter": FilterConfig, "finetune": FinetuneConfig, "eval": EvalConfig}
SECTION_NAMES.update({cls.__name__: name for name, cls in SECTIONS.items()})
