"""The SIPO pipeline end to end (SIPO.md §3): align → sample → refine → filter → finetune → eval, resumable.

    from sipo_fast.pipeline import SIPOPipeline, preset
    SIPOPipeline(preset("demo"), "runs/demo").run()

Configs are one dataclass per stage composed into :class:`PipelineConfig` (YAML files under ``configs/``
mirror them); :mod:`.rundir` keeps the run directory, its ``manifest.json`` and the fingerprints that decide
what re-runs; :mod:`.rules` holds the pure filter/refine rules; :mod:`.stages` the stage objects.
"""
from __future__ import annotations

import importlib

from .config import (AlignConfig, DataConfig, EvalConfig, FilterConfig, FinetuneConfig, ModelConfig, PipelineConfig,
                     RefineConfig, SampleConfig, resolve_weights)
from .presets import PRESETS, preset, preset_dict

_LAZY = {"SIPOPipeline": "runner", "STAGES": "stages", "RunDir": "rundir", "select_pareto": "rules",
         "keep_rewrite": "rules", "dominates": "rules"}

__all__ = ["PipelineConfig", "ModelConfig", "DataConfig", "AlignConfig", "SampleConfig", "RefineConfig",
           "FilterConfig", "FinetuneConfig", "EvalConfig", "PRESETS", "preset", "preset_dict", "resolve_weights",
           "load_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"sipo_fast.pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sipo_fast.pipeline' has no attribute {name!r}")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(config_file: str | None = None, preset_name: str | None = None,
                overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults ← preset ← YAML file (its keys win over the preset's) ← ``section.key=value`` overrides."""
    import yaml

    data = preset_dict(preset_name) if preset_name else {}
    if config_file:
        with open(config_file) as fh:
            loaded = yaml.safe_load(fh)
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{config_file} must hold a mapping of sections (model, data, align, ...)")
        data = _merge(data, loaded or {})
    config = PipelineConfig.from_dict(data)
    return config.override(overrides) if overrides else config
