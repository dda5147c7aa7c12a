"""Triton kernels (importable as ``sipo_fast.kernels``).

This layer knows nothing of the pipeline: each module holds ``@triton.jit`` kernels and thin launchers
that take and return tensors. Dispatch, autograd and the plain-torch references live in ``sipo_fast.ops``.
On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before import); that is how CI
tests them. The CPU fast paths in ``sipo_fast.ops`` never go through here.
"""

try:  # triton is optional at import time: the CPU paths work without it.
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False
