"""The SIPO pipeline end to end (SIPO.md §3): align → sample → refine → filter → finetune → eval, resumable.

    from sipo_fast.pipeline import SIPOPipeline, preset
    SIPOPipeline(preset("demo"), "runs/demo").run()

Configs are one dataclass per stage composed into :class:`PipelineConfig` (YAML files under ``configs/``
mirror them); :mod:`.rundir` keeps the run directory, its ``manifest.json`` and the fingerprints that decide
what re-runs; :mod:`.rules` holds the pure filter/refine rules; :mod:`.stages` the stage objects.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .config import (AlignConfig, DataConfig, EvalConfig, FilterConfig, FinetuneConfig, ModelConfig, PipelineConfig,
                     RefineConfig, SampleConfig, resolve_weights)
from .presets import PRESETS, preset, preset_dict

_LAZY = {"SIPOPipeline": "runner", "STAGES": "stages", "RunDir": "rundir", "select_pareto": "rules",
         "keep_rewrite": "rules", "dominates": "rules", "evaluate_run": "compare", "train_modpo": "trained",
         "train_dpo_lw": "trained"}

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


def _read_yaml(path: str):
    """A YAML file's content; every way it can fail becomes one ValueError naming the file (and the line)."""
    import yaml

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
