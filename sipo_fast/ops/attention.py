"""Decode attention over the shared paged KV cache, reading K/V pages in place.

Layout: a cache holds ``num_blocks`` pages of ``block_size`` token slots, ``[num_blocks, block_size, Hkv, D]``
(the layout of flash-attn's paged ``flash_attn_with_kvcache``). Sequence b's token t lives at page
``block_tables[b, t // block_size]``, slot ``t % block_size``. For query head h (kv head g = h // (H / Hkv),
grouped-query attention), context length L_b and, with a sliding window w, start s_b = max(0, L_b - w)
(s_b = 0 without one):

    out[b, h] = Σ_{t=s_b}^{L_b-1} softmax_t(scale · q[b, h] · K_b[t, g]) · V_b[t, g],   scale = D^-1/2 by default

A row with L_b = 0 gets zeros. The window follows transformers' convention: the query at position L_b - 1
sees the last w keys (itself included).

Backends (the shared vocabulary of :mod:`sipo_fast.ops.backend`, which decides, plus ``"flash"``):
  * ``"cpu"`` (old name ``"cpp"``): the C++ kernel in ``csrc/paged_attention.cpp`` (OpenMP over (sequence,
    kv head), vectorised inner loops); CPU tensors only. The CPU default.
  * ``"flash"`` (this op only): flash-attn's ``flash_attn_with_kvcache(..., block_table=...)``. The CUDA default
    when flash-attn is installed, the dtype is fp16/bf16 and the block size is a multiple of 256 (its page rule).
  * ``"triton"``: ``sipo_fast.kernels.paged_attention`` (online softmax, one page at a time). The CUDA default
    otherwise; runs on CPU tensors only under ``TRITON_INTERPRET=1``, which is how tests force it.
  * ``"ref"``: :func:`paged_attention_ref`, plain torch: gather every page, mask, softmax. The semantics.
  * ``"auto"``/None: the process default, else the CUDA or CPU default above.
"""
from __future__ import annotations

import importlib.util

import torch

from sipo_fast.ops.backend import BACKENDS as _SHARED
from sipo_fast.ops.backend import resolve, triton_available

EXTRA = ("flash",)  # a distinct implementation only this op has
BACKENDS = _SHARED + EXTRA
_FLASH_PAGE = 256  # flash-attn 2 requires paged KV blocks to be a multiple of 256 tokens


def _validate(query, k_cache, v_cache, block_tables, context_lens, sliding_window) -> None:
    def shape(x):
        return tuple(getattr(x, "shape", ()))

    if not isinstance(query, torch.Tensor) or query.dim() != 3:
        raise ValueError(f"query must be [B, H, D] (one decode token per sequence), got shape {shape(query)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(c, torch.Tensor) or c.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, Hkv, D], got shape {shape(c)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {shape(k_cache)} and v_cache {shape(v_cache)} must have the same shape")
    batch, heads, head_dim = query.shape
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head dim mismatch: query has D={head_dim}, the caches D={k_cache.shape[3]}")
    if k_cache.shape[2] == 0 or heads % k_cache.shape[2] != 0:
        raise ValueError(f"query heads ({heads}) must be a positive multiple of the caches' kv heads "
                         f"({k_cache.shape[2]}) for grouped-query attention")
    if not query.is_floating_point() or query.dtype != k_cache.dtype or query.dtype != v_cache.dtype:
        raise ValueError(f"query ({query.dtype}), k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must "
                         "share one floating dtype; cast the query to the cache dtype")
    if not (query.device == k_cache.device == v_cache.device == block_tables.device == context_lens.device):
        raise ValueError("query, caches, block_tables and context_lens must be on one device; move them first")
    if block_tables.dtype not in (torch.int32, torch.int64) or context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_tables and context_lens must be int32 or int64 tensors")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, W], got {shape(block_tables)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [B={batch}], got {shape(context_lens)}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    # Value checks read the tensors, so only on CPU: on CUDA they would synchronise every decode step.
    if query.device.type == "cpu" and batch:
        capacity = block_tables.shape[1] * k_cache.shape[1]
        lo, hi = int(context_lens.min()), int(context_lens.max())
        if lo < 0 or hi > capacity:
            raise ValueError(f"context_lens must lie in [0, {capacity}] (block table width × block size), "
                             f"got values in [{lo}, {hi}]")
        pages = (context_lens.long() + k_cache.shape[1] - 1) // k_cache.shape[1]  # pages each row reads
        used = torch.arange(block_tables.shape[1]) < pages[:, None]
        if used.any():
            ids = block_tables[used]
            if int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]:
                raise ValueError(f"block_tables name blocks outside [0, {k_cache.shape[0]}) within the context; "
                                 "tables and caches come from different managers/pools?")


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float | None = None,
                        sliding_window: int | None = None) -> torch.Tensor:
    """Plain-torch reference: gather each row's pages into [B, W·block_size, Hkv, D], mask slots outside
    [s_b, L_b), softmax in float32 (float64 for float64 input). Memory O(B · W · block_size · Hkv · D)."""
    _validate(query, k_cache, v_cache, block_tables, context_lens, sliding_window)
    batch, heads, head_dim = query.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = head_dim ** -0.5 if scale is None else scale
    tables = block_tables.long()
    k = k_cache[tables].reshape(batch, -1, kv_heads, head_dim).to(acc)  # (B, W*bs, Hkv, D)
    v = v_cache[tables].reshape(batch, -1, kv_heads, head_dim).to(acc)
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=2)  # (B, T, H, D)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bthd->bht", query.to(acc), k) * scale  # (B, H, T)
    t = torch.arange(k.shape[1], device=query.device)
    lens = context_lens.long()[:, None]
    valid = t[None, :] < lens  # (B, T)
    if sliding_window is not None:
        valid &= t[None, :] >= lens - sliding_window
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows: all -inf -> NaN -> zeros
    return torch.einsum("bht,bthd->bhd", probs, v).to(query.dtype)


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _gpu_choice(query: torch.Tensor, k_cache: torch.Tensor) -> str:
    if _has_flash_attn() and query.dtype in (torch.float16, torch.bfloat16) and k_cache.shape[1] % _FLASH_PAGE == 0:
        return "flash"
    return "triton" if triton_available() else "ref"  # the C++ kernel cannot read CUDA tensors


def select_backend(query: torch.Tensor, k_cache: torch.Tensor) -> str:
    """The backend ``"auto"`` picks by device for these tensors (see the module docstring), ignoring the
    process default."""
    return _gpu_choice(query, k_cache) if query.device.type == "cuda" else "cpu"


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float | None = None,
                    sliding_window: int | None = None, backend: str | None = "auto") -> torch.Tensor:
    """Decode attention reading K/V pages in place: query [B, H, D] -> [B, H, D] (formula in the module
    docstring). ``backend`` in ``("auto", "triton", "cpu", "ref", "flash")``; ``"auto"``: the process default,
    else CUDA -> flash-attn if it applies, else Triton; CPU -> the C++ kernel."""
    _validate(query, k_cache, v_cache, block_tables, context_lens, sliding_window)
    return paged_attention_unchecked(query, k_cache, v_cache, block_tables, context_lens, scale=scale,
                                     sliding_window=sliding_window, backend=backend)


def paged_attention_unchecked(query, k_cache, v_cache, block_tables, context_lens, *, scale=None,
                              sliding_window=None, backend="auto"):
    """:func:`paged_attention` without the Python-side input checks, for callers whose inputs are valid by
    construction (the transformers integration builds tables and lengths from the BlockManager once per
    step and calls this once per layer; the checks would cost more than the CPU kernel on small batches).
    The C++ kernel still bounds-checks block ids and lengths."""
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve(backend, query, "paged_attention", gpu=lambda: _gpu_choice(query, k_cache), extra=EXTRA)
    if backend == "ref":
        return paged_attention_ref(query, k_cache, v_cache, block_tables, context_lens, scale=scale,
                                   sliding_window=sliding_window)
    if query.stride(-1) != 1:
        query = query.contiguous()  # kernels need a unit-stride head dim; [B, H, D] is small
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit-stride head dim (copying a whole cache per step would defeat "
                             "paging); allocate it with sipo_fast.kv.PagedKVPool")
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    window = sliding_window or 0
    if backend == "cpu":
        if query.device.type != "cpu":
            raise ValueError("paged_attention: backend 'cpu' (the C++ kernel) runs on CPU tensors; use 'triton', "
                             "'flash' or 'ref' for CUDA tensors")
        from sipo_fast import _ext

        return _ext.require("paged_attention(backend='cpu')").paged_attention_decode(
            query, k_cache, v_cache, tables, lens, scale, window)
    if backend == "triton":
        from sipo_fast.kernels.paged_attention import paged_attention_decode

        return paged_attention_decode(query, k_cache, v_cache, tables, lens, scale, window)
    # backend == "flash"
    if not _has_flash_attn():
        raise ValueError("backend='flash' needs flash-attn (`pip install flash-attn`); use 'triton' instead")
    if k_cache.shape[1] % _FLASH_PAGE != 0 or query.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"backend='flash' needs fp16/bf16 and a block size that is a multiple of {_FLASH_PAGE} "
                         f"(got {query.dtype}, block size {k_cache.shape[1]}); use 'triton'")
    from flash_attn import flash_attn_with_kvcache

    # flash-attn's window (left, right) counts keys left of the query: w keys including itself -> w - 1.
    out = flash_attn_with_kvcache(query.unsqueeze(1), k_cache, v_cache, cache_seqlens=lens, block_table=tables,
                                  softmax_scale=scale, causal=True,
                                  window_size=(window - 1, 0) if window else (-1, -1))
    return out.squeeze(1)  # (B, 1, H, D) -> (B, H, D)
