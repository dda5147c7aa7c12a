"""The backend choice of the ops that dispatch by device (``mod``, ``decode``): one rule, one error message."""
from __future__ import annotations

import torch


def pick_backend(backend, x: torch.Tensor, backends: tuple, cpu: str = "torch") -> str:
    """``None``/``"auto"`` -> ``"triton"`` for CUDA tensors, ``cpu`` otherwise; any other name is kept if it is
    one of ``backends`` and refused (ValueError naming the choices) if not."""
    if backend not in backends:
        names = ", ".join(repr(b) for b in backends)
        raise ValueError(f"backend must be one of {names}; got {backend!r}")
    if backend in (None, "auto"):
        return "triton" if x.is_cuda else cpu
    return backend
