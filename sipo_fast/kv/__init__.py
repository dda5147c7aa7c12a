"""Shared paged KV cache: one block table for all policies, prompts prefilled once and shared by every sample.

- :class:`BlockManager` (C++, ``sipo_fast._C``): which blocks each sequence owns; fork, copy-on-write,
  optional prefix caching. Errors: :class:`OutOfBlocksError` (a RuntimeError), KeyError, ValueError.
- :class:`PagedKVPool`: one policy's K/V pages, ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``.
- :class:`SharedPagedKV`: one BlockManager + one pool per policy (same geometry, same block tables), and the
  per-forward bookkeeping (which rows, which new tokens, where they go).
- :class:`PagedCache` + :func:`paged_attention_enabled` + :func:`forward_paged`: the transformers integration
  (a ``Cache`` whose layers write K/V into pages and an attention function, ``"sipo_paged"``, that reads them in
  place), so stock HF Llama, Mistral and Qwen2 models run on it unchanged.
- the MOD decoder's runners on it live in :mod:`sipo_fast.decoding.paged` (``MODDecoder(..., kv_cache="paged")``, the
  default where supported): each distinct prompt prefilled once per policy, forked for every (weight, sample)
  row, all rows decoded together.
"""
from __future__ import annotations

from sipo_fast import _ext

from sipo_fast.kv.pool import PagedKVPool, SharedPagedKV, StepInputs

__all__ = ["BlockManager", "OutOfBlocksError", "PagedKVPool", "SharedPagedKV", "StepInputs", "PagedCache",
           "paged_attention_enabled", "forward_paged", "ATTN_IMPLEMENTATION"]
_HF = ("PagedCache", "paged_attention_enabled", "forward_paged", "ATTN_IMPLEMENTATION")


def __getattr__(name: str):
    # The block manager lives in the compiled extension; resolve it on first use so `import sipo_fast.kv`
    # works without it and the error (with the build command) appears only when the cache is used.
    if name in ("BlockManager", "OutOfBlocksError"):
        return getattr(_ext.require(f"sipo_fast.kv.{name}"), name)
    if name in _HF:  # imports transformers: only when asked for
        from sipo_fast.kv import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'sipo_fast.kv' has no attribute {name!r}")
