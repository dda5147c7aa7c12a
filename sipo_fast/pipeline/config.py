"""Pipeline configuration: one dataclass per stage, composed into :class:`PipelineConfig`.

Every field is documented once (the model and data sections here, the stage sections in config_stages.py)
and validated in ``__post_init__`` with a message that says what to do. YAML files under ``configs/`` mirror
these dataclasses key for key; ``PipelineConfig.from_dict`` rejects unknown keys so a typo in a YAML file
fails loudly instead of being ignored.

Weights: a weight vector w lies on the simplex (w_i >= 0, sum w_i = 1), one entry per objective. For two
objectives a bare number w is shorthand for [w, 1 - w]; for N > 2 objectives give explicit vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .config_checks import SIMPLEX_TOL, check_max_steps, check_str_list, check_types, coerce  # noqa: F401
from .config_checks import SECTION_NAMES
from .config_checks import Section as _Section
from .config_checks import resolve_weights  # noqa: F401 - re-exported
from .config_stages import (EVAL_BASELINES, LORA_TARGETS, SCHEDULERS, AlignConfig,  # noqa: F401 - re-exported
                            EvalConfig, FilterConfig, FinetuneConfig, RefineConfig, SampleConfig)

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


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "align": AlignConfig, "sample": SampleConfig,
             "refine": RefineConfig, "filter": FilterConfig, "finetune": FinetuneConfig, "eval": EvalConfig}
SECTION_NAMES.update({cls.__name__: name for name, cls in _SECTIONS.items()})


BACKEND_CHOICES = ("auto", "triton", "cpu", "ref")


@dataclass
class PipelineConfig:
    """The whole SIPO run: a seed, the ops' backend, one section per stage. Cross-section rules are checked here."""

    seed: int = 0
    backend: str = "auto"
    """Which implementation every op runs for the length of the run (:mod:`sipo_fast.ops.backend`): "auto" (leave
    the process default alone: Triton on CUDA, the CPU fast paths on CPU), "triton", "cpu" or "ref" (every op on
    its plain-torch reference, the MOD decoder on transformers' own cache and PEFT's adapters: a check of the
    fast paths). Not part of any stage's fingerprint: the paths agree to float tolerance, not bit for bit, so
    switching a finished run's backend re-uses its stages (--rerun or --force to recompute them)."""
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
        self.backend = coerce("backend", "str", self.backend)
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend={self.backend!r}: choose {', '.join(BACKEND_CHOICES[:-1])} or "
                             f"{BACKEND_CHOICES[-1]}")
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
        unknown = sorted(set(data) - set(_SECTIONS) - set(_TOP_LEVEL))
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; valid keys: {', '.join(_TOP_LEVEL)}, "
                             f"{', '.join(_SECTIONS)}")
        sections = {name: sec.from_dict(data.get(name), name) for name, sec in _SECTIONS.items()}
        return cls(**{k: data.get(k, default) for k, default in _TOP_LEVEL.items()}, **sections)

    def to_dict(self) -> dict:
        top = {k: getattr(self, k) for k in _TOP_LEVEL}
        return {**top, **{name: getattr(self, name).to_dict() for name in _SECTIONS}}

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
            if len(parts) == 1 and parts[0] in _TOP_LEVEL:
                data[parts[0]] = value
                continue
            if len(parts) != 2 or parts[0] not in _SECTIONS:
                raise ValueError(f"override {item!r}: the key must be {' or '.join(_TOP_LEVEL)} or <section>.<field> "
                                 f"with section one of {', '.join(_SECTIONS)}")
            section, name = parts
            if name not in {f.name for f in fields(_SECTIONS[section])}:
                raise ValueError(f"override {item!r}: section '{section}' has no field '{name}'; valid: "
                                 f"{sorted(f.name for f in fields(_SECTIONS[section]))}")
            data[section][name] = value
        return PipelineConfig.from_dict(data)

    def get(self, dotted: str) -> Any:
        """Value at ``section.field`` (or a top-level key such as ``seed``), used by stage fingerprints."""
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj.to_dict() if isinstance(obj, _Section) else obj


# Top-level keys besides the sections, with their defaults (from_dict, to_dict and overrides read this).
_TOP_LEVEL = {"seed": 0, "backend": "auto"}
