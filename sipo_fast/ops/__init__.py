"""Fused ops: one functional API each, dispatching to Triton (CUDA tensors), a C++/torch CPU fast path,
or the plain-torch ``<op>_ref`` reference that sits beside them and defines the semantics. Every op's
``backend=`` speaks one vocabulary (``"auto"``, ``"triton"``, ``"cpu"``, ``"ref"``) with one process-wide
default (``set_default_backend``, ``use_backend``): :mod:`sipo_fast.ops.backend`.

Names resolve lazily from the submodules below, so ``import sipo_fast.ops`` stays cheap and an op
module that needs an optional backend fails only when that op is used.
"""
from __future__ import annotations

import importlib

# Submodules searched, in order, for a public name: backend (the backend vocabulary and default), mod (MOD
# mix/sample), logprobs (fused token log-probs), attention (paged_attention: decode attention over the shared paged KV
# cache), decode (the fused per-layer ops of the captured decode step).
_SUBMODULES = ("backend", "mod", "logprobs", "attention", "decode")


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)
    for sub in _SUBMODULES:
        try:
            mod = importlib.import_module(f"sipo_fast.ops.{sub}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sipo_fast.ops.{sub}":
                continue
            raise
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module 'sipo_fast.ops' has no attribute {name!r}")
