"""The SIPO pipeline end to end (SIPO.md §3): align → sample → refine → filter → finetune → eval, resumable.

    from sipo_fast.pipeline import SIPOPipeline, preset
    SIPOPipeline(preset("demo"), "runs/demo").run()

Rooms, bottom to top (each imports only the ones before it; tests/test_layers.py keeps it so):

- ``config/``: :class:`PipelineConfig`, one section per stage, the field checks, the named presets;
- ``rundir/``: the run directory as storage: files and hashes, ``manifest.json`` and the identity, resumable
  parts, the lock, repair;
- ``datacheck.py``: the value of every cell of preference data, checked before any work;
- ``context.py``: what every stage shares (tokenizer, model loading, the data split, the held-out prompts);
- ``policies.py``: the per-objective policies: loading, preference training, saving, reference tables;
- ``baselines/``: MODPO and DPO LW training, and the comparison of SIPO with the baselines on a run directory;
- ``stages/``: one file per stage (align, sample, refine, filter, finetune, evaluate);
- ``preflight.py``: every input resolved before the first stage, without writing;
- ``runner.py``: :class:`SIPOPipeline`, which plans, runs and records the stages.
"""
from __future__ import annotations

import importlib

from .config.checks import resolve_weights
from .config.pipeline_config import PipelineConfig, load_config, preset
from .config.presets import PRESETS, preset_dict
from .config.sections import (AlignConfig, DataConfig, EvalConfig, FilterConfig, FinetuneConfig, ModelConfig,
                              RefineConfig, SampleConfig)

_LAZY = {"SIPOPipeline": "runner", "STAGES": "stages", "RunDir": "rundir.directory", "select_pareto": "stages.rules",
         "keep_rewrite": "stages.rules", "dominates": "stages.rules", "evaluate_run": "baselines.compare",
         "train_modpo": "baselines.trained", "train_dpo_lw": "baselines.trained"}

__all__ = ["PipelineConfig", "ModelConfig", "DataConfig", "AlignConfig", "SampleConfig", "RefineConfig",
           "FilterConfig", "FinetuneConfig", "EvalConfig", "PRESETS", "preset", "preset_dict", "resolve_weights",
           "load_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"sipo_fast.pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sipo_fast.pipeline' has no attribute {name!r}")
