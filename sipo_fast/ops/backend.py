"""Which implementation an op runs: one vocabulary, one resolver, one process-wide default.

Every op (``mod_mix``/``mod_sample``, ``token_logprobs``, ``paged_attention``, the decode ops) takes ``backend=``:

  * ``"auto"`` (or None): the process default below; while that is ``"auto"`` too, by device: the op's GPU
    path for CUDA tensors (its Triton kernel; paged attention prefers flash-attn where it applies; without an
    importable triton, the ``"cpu"`` path) and its ``"cpu"`` path otherwise.
  * ``"triton"``: the Triton kernel in ``kernels/`` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
    Raises ValueError when triton is not importable or cannot reach the tensors.
  * ``"cpu"``: the op's plain-torch or C++ fast path, no Triton. The torch paths run on CUDA tensors too;
    paged attention's C++ kernel takes CPU tensors only. Old names, kept as aliases: ``"torch"`` (MOD and
    decode ops), ``"chunked"`` (token log-probs), ``"cpp"`` (paged attention).
  * ``"ref"``: the plain-torch ``<op>_ref`` beside the op, which defines its semantics (slow; no fused memory savings).

Op-specific extra choices stay op-specific (paged attention's ``"flash"``). A bad name raises one ValueError
naming the op and the choices.

The process-wide default (``"auto"`` unless set) replaces ``"auto"``/None in every op call, as if that call had
been given it; an explicit ``backend=`` always wins. ``set_default_backend("ref")`` or ``with use_backend("ref"):``
runs every op on its reference and also turns :class:`~sipo_fast.decoding.MODDecoder`'s automatic choices into
its reference-like ones (``kv_cache`` "dynamic": transformers' own cache; ``lora_impl`` "peft"; the sampler
``"ref"``), read when a decoder is built. A ``"cpu"`` default rules Triton out (e.g. to tell a kernel bug from a
model bug); a ``"triton"`` default forces every kernel and fails loudly where one cannot run. The pipeline's
``backend:`` config key sets this default for the length of a run. The default is one per process, not per thread.
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "cpu", "ref")
ALIASES = {"torch": "cpu", "chunked": "cpu", "cpp": "cpu"}
_NAMES = {**{b: b for b in BACKENDS}, **ALIASES}
_default = "auto"
_has_triton: bool | None = None


def _bad_name(name, op: str, extra: tuple = ()) -> ValueError:
    choices = ", ".join(repr(b) for b in BACKENDS + tuple(extra))
    aliases = ", ".join(repr(a) for a in ALIASES)
    return ValueError(f"{op}: backend={name!r} is not one of {choices} (None means 'auto'; {aliases} are old "
                      "names of 'cpu')")


def canonical(name, op: str = "backend", extra: tuple = ()) -> str:
    """``name`` in the shared vocabulary: None -> ``"auto"``, an old name -> ``"cpu"``, an ``extra`` name kept;
    anything else raises the one bad-name ValueError."""
    if name is None:
        return "auto"
    if isinstance(name, str):
        if name in _NAMES:
            return _NAMES[name]
        if name in extra:
            return name
    raise _bad_name(name, op, extra)


def get_default_backend() -> str:
    """The process-wide default: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"ref"``."""
    return _default


def set_default_backend(name) -> str:
    """Set the process-wide default (see the module docstring); returns the previous one."""
    global _default
    new = canonical(name, "set_default_backend")
    old, _default = _default, new
    return old


@contextlib.contextmanager
def use_backend(name):
    """``with use_backend("ref"): ...``: the process-wide default for the block, restored afterwards."""
    old = set_default_backend(name)
    try:
        yield
    finally:
        set_default_backend(old)


def requested(backend, op: str = "backend", extra: tuple = ()) -> str:
    """The name an op call asks for: ``backend`` itself, or the process default where it is None/"auto"."""
    b = canonical(backend, op, extra)
    return _default if b == "auto" else b


def triton_available() -> bool:
    global _has_triton
    if _has_triton is None:
        from sipo_fast.kernels import HAS_TRITON

        _has_triton = bool(HAS_TRITON)
    return _has_triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_triton(x: torch.Tensor, op: str) -> None:
    """Raise a ValueError saying why the Triton kernel cannot run on ``x``, if it cannot."""
    if not triton_available():
        raise ValueError(f"{op}: backend 'triton' needs the triton package, which is not importable here; "
                         "use backend='cpu' or 'ref'")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{op}: backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, "
                         f"set before triton is imported), got {x.device.type} tensors; use backend='cpu' or 'ref'")


def resolve(backend, x: torch.Tensor, op: str, *, gpu=None, extra: tuple = ()) -> str:
    """The implementation an op runs on ``x``: ``"triton"``, ``"cpu"``, ``"ref"`` or one of ``extra``.

    ``gpu``: the op's own ``"auto"`` choice for CUDA tensors (a name, or a function of no arguments returning
    one); default: ``"triton"`` where triton is importable, else ``"cpu"``.
    """
    b = requested(backend, op, extra)
    if b == "auto":
        if not x.is_cuda:
            return "cpu"
        if gpu is not None:
            return gpu() if callable(gpu) else gpu
        return "triton" if triton_available() else "cpu"
    if b == "triton":
        check_triton(x, op)
    return b
