"""The whole run's configuration: :class:`PipelineConfig` composes one section per stage (:mod:`.sections`) with
the top-level keys, checks the rules that span sections, and converts to and from dicts, YAML and
``section.key=value`` overrides; :func:`load_config` layers defaults, a preset, a YAML file and overrides.

``PipelineConfig.from_dict`` rejects unknown keys, so a typo in a YAML file fails loudly instead of being ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .checks import Section, coerce, resolve_weights
from .presets import preset_dict
from .sections import (SECTIONS, AlignConfig, DataConfig, EvalConfig, FilterConfig, FinetuneConfig, ModelConfig,
                       RefineConfig, SampleConfig)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))

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
        unknown = sorted(set(data) - set(SECTIONS) - set(_TOP_LEVEL))
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}; valid keys: {', '.join(_TOP_LEVEL)}, "
                             f"{', '.join(SECTIONS)}")
        sections = {name: sec.from_dict(data.get(name), name) for name, sec in SECTIONS.items()}
        return cls(**{k: data.get(k, default) for k, default in _TOP_LEVEL.items()}, **sections)

    def to_dict(self) -> dict:
        top = {k: getattr(self, k) for k in _TOP_LEVEL}
        return {**top, **{name: getattr(self, name).to_dict() for name in SECTIONS}}

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
            if len(parts) != 2 or parts[0] not in SECTIONS:
                raise ValueError(f"override {item!r}: the key must be {' or '.join(_TOP_LEVEL)} or <section>.<field> "
                                 f"with section one of {', '.join(SECTIONS)}")
            section, name = parts
            if name not in {f.name for f in fields(SECTIONS[section])}:
                raise ValueError(f"override {item!r}: section '{section}' has no field '{name}'; valid: "
                                 f"{sorted(f.name for f in fields(SECTIONS[section]))}")
            data[section][name] = value
        return PipelineConfig.from_dict(data)

    def get(self, dotted: str) -> Any:
        """Value at ``section.field`` (or a top-level key such as ``seed``), used by stage fingerprints."""
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj.to_dict() if isinstance(obj, Section) else obj


# Top-level keys besides the sections, with their defaults (from_dict, to_dict and overrides read this).
_TOP_LEVEL = {"seed": 0, "backend": "auto"}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str):
    """A YAML file's content; every way it can fail becomes one ValueError naming the file (and the line)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--config {path}: is a directory; give a YAML file (see configs/)")
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise ValueError(f"--config {path}:{line}: not UTF-8 text (byte {p.read_bytes()[exc.start]:#04x})") from None
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"--config {path}{where}: YAML syntax error: {what}") from None


def load_config(config_file: str | None = None, preset_name: str | None = None,
                overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults ← preset ← YAML file (its keys win over the preset's) ← ``section.key=value`` overrides."""
    data = preset_dict(preset_name) if preset_name else {}
    if config_file:
        loaded = _read_yaml(config_file)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{config_file} must hold a mapping of sections (model, data, align, ...)")
        data = _merge(data, loaded or {})
    config = PipelineConfig.from_dict(data)
    return config.override(overrides) if overrides else config


def preset(name: str) -> PipelineConfig:
    """The resolved :class:`PipelineConfig` of a named preset (:data:`~.presets.PRESETS`)."""
    return PipelineConfig.from_dict(preset_dict(name))
