"""SIPO's baselines (SIPO.md §4) on a pipeline run directory.

- ``trained.py``: the baselines that train one model per interior weight, MODPO and DPO LW, with stage 1's recipe;
- ``compare.py``: :func:`evaluate_run`, SIPO against MOD, DPO soups, MODPO and DPO LW, swept over the same
  weights, prompts and scorers (``sipo-fast eval --run-dir``, the evaluation stage, benchmarks/pareto_demo.py).
"""
