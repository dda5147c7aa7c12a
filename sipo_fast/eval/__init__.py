"""Pareto-front evaluation as a library: weight sweeps over given policies, scoring with a persistent cache,
fronts, hypervolume, confidence intervals, average gain, the generators of MOD and DPO soups, and the Markdown +
PNG report, and the demo's gates (:mod:`.gates`). It knows nothing of run directories: comparing SIPO with the
baselines on a pipeline run (and training MODPO / DPO LW) is :func:`sipo_fast.pipeline.baselines.compare.evaluate_run`.

    from sipo_fast.eval import pareto_front, hypervolume
    pareto_front([[1, 3], [2, 2], [1, 1]])        # [0, 1]
    hypervolume([[3, 1], [2, 2], [1, 3]], [0, 0])  # 6.0

Names resolve lazily so the pure math imports without torch models, matplotlib or TRL.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "pareto_front": "pareto", "hypervolume": "pareto", "hypervolume_ref": "pareto", "dominates": "pareto",
    "coverage": "pareto", "fixed_reference": "pareto", "front_points": "pareto",
    "mean_ci": "stats", "to_maximisation": "stats", "average_gain": "stats", "weight_grid": "stats",
    "bootstrap_ci": "stats", "paired_differences": "stats",
    "pair_correlation": "gates", "data_correlation": "gates", "endpoint_separation": "gates",
    "implicit_reward_accuracy": "gates", "truly_dominates": "gates", "filter_lift": "gates",
    "ScoreCache": "cache", "CachedScorer": "cache",
    "SweepResult": "sweep", "run_eval": "sweep", "score_responses": "sweep", "pooled": "sweep",
    "build_report": "report", "write_report": "report", "plot_fronts": "report", "default_reference": "report",
    "Report": "report",
    "mod_generator": "methods", "soup_generator": "methods", "per_weight_generator": "methods",
    "heldout_prompts": "inputs", "build_scorers": "inputs", "diagnostics_markdown": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sipo_fast.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sipo_fast.eval' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
