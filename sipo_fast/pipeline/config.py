"""Pipeline configuration: one dataclass per stage, composed into :class:`PipelineConfig`.

Every field is documented once, here, and validated in ``__post_init__`` with a message that says what to
do. YAML files under ``configs/`` mirror these dataclasses key for key; ``PipelineConfig.from_dict`` rejects
unknown keys so a typo in a YAML file fails loudly instead of being ignored.

Weights: a weight vector w lies on the simplex (w_i >= 0, sum w_i = 1), one entry per objective. For two
objectives a bare number w is shorthand for [w, 1 - w]; for N > 2 objectives give explicit vectors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .config_checks import SIMPLEX_TOL, check_max_steps, check_str_list, check_types, coerce  # noqa: F401
from .config_checks import positive as _positive
from .config_checks import resolve_weights  # noqa: F401 - re-exported

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class _Section:
    """Shared dict conversion for the section dataclasses (strict about unknown keys), and type checks: every
    section's ``__post_init__`` is wrapped so that the fields are checked against their annotations first
    (``config_checks.check_types``), whether the section comes from YAML, an override or Python."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self):
            check_types(self, _SECTION_NAMES.get(type(self).__name__, type(self).__name__))
            if own is not None:
                own(self)
        cls.__post_init__ = __post_init__

    @classmethod
    def from_dict(cls, data: dict | None, where: str):
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"section '{where}' must be a mapping of keys to values, got {data!r}")
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in section '{where}'; valid keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ModelConfig(_Section):
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
class DataConfig(_Section):
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
        _positive("data.max_rows", self.max_rows, allow_none=True)
        _positive("data.max_conflict_prompts", self.max_conflict_prompts, allow_none=True)
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


SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


def _check_optimiser(section: str, scheduler: str, warmup_ratio: float, weight_decay: float) -> None:
    """The optimiser recipe fields shared by align and finetune (transformers' names and meanings)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"{section}.lr_scheduler={scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"{section}.warmup_ratio={warmup_ratio} must be in [0, 1) (a share of the steps)")
    _positive(f"{section}.weight_decay", weight_decay, allow_zero=True)


@dataclass
class AlignConfig(_Section):
    """Stage 1: one DPO run per objective from π_ref (SIPO.md §3 defaults)."""

    use_lora: bool = True
    """LoRA adapters (default) or full fine-tuning."""
    lora_r: int = 64
    lora_alpha: float = 1.0
    """LoRA scaling is lora_alpha / lora_r: 1/64 with the paper's values, hence the large learning rate."""
    lora_dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: list(LORA_TARGETS))
    learning_rate: float = 5e-4
    beta: float = 0.1
    epochs: float = 3.0
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run all epochs)."""
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    """Prompt + response tokens; longer responses are truncated, longer prompts are an error."""
    select_best: bool = True
    """Keep the checkpoint with the best eval loss (needs data.eval_fraction > 0 or data.eval_split)."""
    eval_steps: float | None = None
    """Evaluate (and checkpoint) every this many steps, or this share of the steps if below 1 (None: per epoch)."""
    lr_scheduler: str = "linear"
    """Learning-rate schedule (transformers' lr_scheduler_type); the paper presets use the authors' "cosine"."""
    warmup_ratio: float = 0.0
    """Share of the optimiser steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay (the authors use 0.05)."""
    policies: list | None = None
    """Adopt these already-aligned per-objective policies (one per objective: LoRA adapter dirs, or full
    model paths) instead of training; their tokenizers must equal π_ref's."""

    def __post_init__(self):
        _positive("align.lora_r", self.lora_r)
        _positive("align.lora_alpha", self.lora_alpha)
        _positive("align.learning_rate", self.learning_rate)
        _positive("align.beta", self.beta)
        _positive("align.epochs", self.epochs)
        _positive("align.batch_size", self.batch_size)
        _positive("align.grad_accum", self.grad_accum)
        _positive("align.max_length", self.max_length)
        _positive("align.eval_steps", self.eval_steps, allow_none=True)
        check_max_steps("align.max_steps", self.max_steps)
        check_str_list("align.target_modules", self.target_modules)
        check_str_list("align.policies", self.policies, allow_none=True)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"align.lora_dropout={self.lora_dropout} must be in [0, 1)")
        _check_optimiser("align", self.lr_scheduler, self.warmup_ratio, self.weight_decay)


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

    def __post_init__(self):
        _positive("sample.max_new_tokens", self.max_new_tokens)
        _positive("sample.batch_size", self.batch_size)
        _positive("sample.temperature", self.temperature)
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
        _positive("refine.review_max_new_tokens", self.review_max_new_tokens)
        _positive("refine.rewrite_max_new_tokens", self.rewrite_max_new_tokens)
        _positive("refine.batch_size", self.batch_size)
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
        _positive("filter.beta", self.beta)
        _positive("filter.batch_size", self.batch_size)
        _positive("filter.max_length", self.max_length)


@dataclass
class FinetuneConfig(_Section):
    """Stage 3: each stage-1 policy (adapter merged) fine-tuned on D_c with the SIPO loss, itself as reference."""

    loss: str = "sipo"
    """"sipo" (DPO + α·NLL/|y_c|, SIPO.md §2) or "sigmoid" (plain DPO, for ablations)."""
    alpha: float = 0.1
    beta: float = 0.1
    learning_rate: float = 5e-6
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    select_best: bool = False
    """Keep the checkpoint with the best loss on stage 1's held-out pairs of the objective (the authors'
    Iterative_DPO.py); needs held-out data (data.eval_fraction > 0 or data.eval_split)."""
    eval_steps: float | None = None
    """As align.eval_steps, for select_best."""
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    """lr_scheduler, warmup_ratio, weight_decay: as in align."""

    def __post_init__(self):
        if self.loss not in ("sipo", "sigmoid"):
            raise ValueError(f"finetune.loss={self.loss!r}: choose 'sipo' or 'sigmoid'")
        _positive("finetune.alpha", self.alpha, allow_zero=True)
        _positive("finetune.beta", self.beta)
        _positive("finetune.learning_rate", self.learning_rate)
        _positive("finetune.epochs", self.epochs)
        _positive("finetune.batch_size", self.batch_size)
        _positive("finetune.grad_accum", self.grad_accum)
        _positive("finetune.max_length", self.max_length)
        _positive("finetune.eval_steps", self.eval_steps, allow_none=True)
        _check_optimiser("finetune", self.lr_scheduler, self.warmup_ratio, self.weight_decay)
        check_max_steps("finetune.max_steps", self.max_steps)


EVAL_BASELINES = ("mod", "soups", "soups_ab", "modpo", "dpo_lw")


@dataclass
class EvalConfig(_Section):
    """Evaluation after stage 3 (``sipo_fast.eval.evaluate_run``): MOD sweeps of the fine-tuned policies and the
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
        _positive("eval.num_prompts", self.num_prompts)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        _positive("eval.batch_size", self.batch_size)
        check_str_list("eval.baselines", self.baselines, allow_empty=True)
        check_str_list("eval.scorers", self.scorers, allow_none=True)
        bad = [b for b in self.baselines if b not in EVAL_BASELINES]
        if bad:
            raise ValueError(f"eval.baselines: unknown {bad}; choose from {', '.join(EVAL_BASELINES)}")
        from sipo_fast.data.prompts import parse_select

        parse_select(self.prompt_select, "eval.prompt_select")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "align": AlignConfig, "sample": SampleConfig,
             "refine": RefineConfig, "filter": FilterConfig, "finetune": FinetuneConfig, "eval": EvalConfig}
_SECTION_NAMES = {cls.__name__: name for name, cls in _SECTIONS.items()}


@dataclass
class PipelineConfig:
    """The whole SIPO run: a seed plus one section per stage. Cross-section rules are checked here."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        self.seed = coerce("seed", "int", self.seed)
        n = len(self.data.objectives)
        self.sample.weights = resolve_weights(self.sample.weights, n, "sample.weights")
        if self.filter.soup_weights is not None:
            self.filter.soup_weights = resolve_weights(self.filter.soup_weights, n, "filter.soup_weights")
        if self.eval.weights is not None:
            self.eval.weights = resolve_weights(self.eval.weights, n, "eval.weights")
        ro = self.refine.review_objective
        if ro is not None and ro not in self.data.objectives:
            raise ValueError(f"refine.review_objective={ro!r} is not one of data.objectives {self.data.objectives}")
        if self.align.policies is not None and len(self.align.policies) != n:
            raise ValueError(f"align.policies lists {len(self.align.policies)} models but there are {n} objectives; "
                             f"give one per objective, in the order of data.objectives")
        held_out = self.data.eval_fraction > 0 or self.data.eval_split is not None
        if self.align.select_best and not held_out and self.align.policies is None:
            raise ValueError("align.select_best needs held-out data: set data.eval_fraction > 0 (or data.eval_split) "
                             "or align.select_best=false")
        if self.finetune.select_best and not held_out:
            raise ValueError("finetune.select_best needs held-out data: set data.eval_fraction > 0 (or "
                             "data.eval_split) or finetune.select_best=false")
        if self.eval.scorers is not None and len(self.eval.scorers) != n:
            raise ValueError(f"eval.scorers lists {len(self.eval.scorers)} scorers; give one per objective ({n})")

    # -- derived values -------------------------------------------------------------------------------------
    @property
    def objectives(self) -> list[str]:
        return self.data.objectives

    @property
    def soup_weights(self) -> list[list[float]]:
        return self.filter.soup_weights if self.filter.soup_weights is not None else self.sample.weights

    @property
    def review_objective(self) -> str:
        return self.refine.review_objective or self.data.objectives[0]

    # -- conversion -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None) -> "PipelineConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - set(_SECTIONS) - {"seed"})
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; valid keys: seed, {', '.join(_SECTIONS)}")
        sections = {name: sec.from_dict(data.get(name), name) for name, sec in _SECTIONS.items()}
        return cls(seed=data.get("seed", 0), **sections)

    def to_dict(self) -> dict:
        return {"seed": self.seed, **{name: getattr(self, name).to_dict() for name in _SECTIONS}}

    def to_yaml(self) -> str:
        """Block-style sections with one field per line and lists inline: easy to read and to diff."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=110)

    @classmethod
    def from_yaml(cls, text: str) -> "PipelineConfig":
        data = yaml.safe_load(text)
        if data is not None and not isinstance(data, dict):
            raise ValueError("a pipeline YAML file must hold a mapping of sections (model, data, align, ...)")
        return cls.from_dict(data)

    def override(self, assignments: list[str]) -> "PipelineConfig":
        """A copy with ``section.key=value`` assignments applied (values parsed as YAML: 32, true, [0.3, 0.7])."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like section.key=value, e.g. sample.max_new_tokens=32")
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as exc:
                first = str(exc).splitlines()[0]
                raise ValueError(f"override {item!r}: the value is not valid YAML ({first})") from None
            parts = key.strip().split(".")
            if parts == ["seed"]:
                data["seed"] = value
                continue
            if len(parts) != 2 or parts[0] not in _SECTIONS:
                raise ValueError(f"override {item!r}: the key must be seed or <section>.<field> with section one of "
                                 f"{', '.join(_SECTIONS)}")
            section, name = parts
            if name not in {f.name for f in fields(_SECTIONS[section])}:
                raise ValueError(f"override {item!r}: section '{section}' has no field '{name}'; valid: "
                                 f"{sorted(f.name for f in fields(_SECTIONS[section]))}")
            data[section][name] = value
        return PipelineConfig.from_dict(data)

    def get(self, dotted: str) -> Any:
        """Value at ``section.field`` (or ``seed``), used by stage fingerprints."""
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj.to_dict() if isinstance(obj, _Section) else obj
