"""sipo_fast: the SIPO multi-objective alignment pipeline, made fast.

Layers (imports point one way, checked by tests/test_layers.py): ``kernels`` (Triton) < ``sipo_fast._ext`` (the
C++ extension) < ``ops`` (references and dispatch) < ``data``, ``models``, ``scoring``, ``merging``,
``distributed`` < ``kv`` (the paged cache) < ``decoding`` < ``training`` < ``eval`` (sweeps, fronts, report over
given policies) < ``pipeline`` (stages, run directories, the comparison with baselines) < ``cli``.
Heavy submodules load lazily so ``import sipo_fast`` stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"models", "data", "ops", "kernels", "scoring", "decoding", "kv", "training", "pipeline", "eval",
               "env_report", "distributed", "merging", "cli"}
# public name -> module that defines it
_EXPORTS = {
    "MODDecoder": "sipo_fast.decoding",
    "sequence_logprobs": "sipo_fast.training",
    "implicit_rewards": "sipo_fast.training",
    "SIPOPipeline": "sipo_fast.pipeline",
    "evaluate_run": "sipo_fast.pipeline",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"sipo_fast.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sipo_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + list(_EXPORTS))
