"""Which decode path (KV cache + runner) the MOD decoder uses: the one place that decides.

  * ``"static"``: the captured step (:mod:`sipo_fast.decoding.capture`): a lean Llama-family forward over a
    preallocated cache, fixed padded batch, replayed as a CUDA graph on GPU. Llama, Mistral, Qwen2.
  * ``"paged"``: the shared paged KV cache of :mod:`sipo_fast.kv` (C++ block manager, prompts shared by block
    tables, forks without copies) through transformers' own forward. Llama, Mistral, Qwen2 + the extension.
  * ``"dynamic"``: transformers' forward with its DynamicCache (preallocated layers). Any causal LM.
  * ``"auto"``: the first of those that applies, in the order of :data:`AUTO_ORDER` for the device: on CUDA
    the captured step (the GPU is host-bound without it); on CPU the paged cache, whose state sharing and
    dropping of finished rows save compute where compute is the cost. When a preferred path does not apply,
    one warning says why and the next path is used; an explicit choice that cannot apply raises.

Under the process-wide ``"ref"`` default (:mod:`sipo_fast.ops.backend`, e.g. the pipeline's ``backend: ref``) the
decoder's automatic choices are its reference-like ones: ``"auto"`` -> ``"dynamic"`` (transformers' own forward
and cache), LoRA ``lora_impl="auto"`` -> ``"peft"`` (PEFT's own mixed-adapter batches) and the sampler ->
``"ref"``. Under any other default they are the fast ones (``lora_impl`` ``"bmm"``; the sampler follows the default).
"""
from __future__ import annotations

import warnings

from sipo_fast.ops.backend import canonical, get_default_backend

KV_CACHES = ("auto", "static", "paged", "dynamic")
LORA_IMPLS = ("auto", "bmm", "peft")
AUTO_ORDER = {"cuda": ("static", "paged", "dynamic"), "cpu": ("paged", "dynamic")}
_warned: set[str] = set()


def problem(path: str, model) -> str | None:
    """Why ``path`` cannot run ``model`` (a transformers causal LM; the base model for PEFT), or None."""
    if path == "static":
        from sipo_fast.decoding.static import unsupported_reason

        return unsupported_reason(model)
    if path == "paged":
        from sipo_fast import _ext
        from sipo_fast.decoding.paged import PAGED_MODEL_TYPES

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PAGED_MODEL_TYPES:
            return f"model type {model_type!r} is not one of {PAGED_MODEL_TYPES}"
        if not _ext.available():
            return f"the compiled extension did not load ({_ext.error()})"
    return None


def _order(device) -> tuple:
    return AUTO_ORDER["cuda" if getattr(device, "type", str(device)) == "cuda" else "cpu"]


def fallback_after(path: str, model, device) -> str:
    """The path ``"auto"`` would take on ``device`` if ``path`` were unavailable (used when the captured step
    fails at run time; no warning here, the caller says why)."""
    return next((p for p in _order(device) if p != path and problem(p, model) is None), "dynamic")


def resolve_lora_impl(lora_impl: str) -> str:
    """``"bmm"`` (batched LoRA) or ``"peft"``; ``"auto"``: peft under the ``"ref"`` default, else bmm."""
    if lora_impl not in LORA_IMPLS:
        raise ValueError(f"lora_impl must be one of {LORA_IMPLS}, got {lora_impl!r}")
    if lora_impl == "auto":
        return "peft" if get_default_backend() == "ref" else "bmm"
    return lora_impl


def resolve_sampler(sample_backend) -> str | None:
    """The sampler's backend: the name given (checked), or ``"ref"`` for None/"auto" under the ``"ref"`` default
    (other defaults are left to :func:`sipo_fast.ops.mod_sample` at each call)."""
    name = canonical(sample_backend, "MODDecoder(sample_backend=...)")
    if name == "auto":
        return "ref" if get_default_backend() == "ref" else sample_backend
    return name


def resolve_kv_cache(kv_cache: str, model, device) -> str:
    """The path to use for ``kv_cache`` on ``device`` (see the module docstring)."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if kv_cache == "auto" and get_default_backend() == "ref":
        return "dynamic"
    if kv_cache != "auto":
        why = problem(kv_cache, model)
        if why:
            raise ValueError(f"kv_cache={kv_cache!r} cannot be used: {why}; use kv_cache='auto' or 'dynamic'")
        return kv_cache
    for path in _order(device):
        why = problem(path, model)
        if why is None:
            return path
        msg = f"MODDecoder(kv_cache='auto'): not using the {path!r} path: {why}"
        if msg not in _warned:
            _warned.add(msg)
            warnings.warn(msg + "; falling back to the next one", RuntimeWarning, stacklevel=3)
    return "dynamic"
