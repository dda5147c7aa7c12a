"""Triton decode attention over a paged KV cache (one query token per sequence).

For sequence b and query head h (kv head g = h // (H / Hkv)), context length L_b, window start
s_b = max(0, L_b - window) (0 without a window) and block size B:

    K_b[t] = k_cache[block_tables[b, t // B], t % B, g]            (V likewise)
    out[b, h] = Σ_{t=s_b}^{L_b-1} softmax_t(scale · q[b, h] · K_b[t]) V_b[t]      (zeros when L_b = 0)

One program per (sequence, query head) walks the sequence's block table one page at a time with an online
softmax (running max m, running sum l, rescaled accumulator), so keys and values are read in place and
never gathered. Accumulation is float32 (float64 for float64 caches).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    Q, K, V, Out, Tables, Lens,
    scale, window,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tb, stride_ob, stride_oh,
    HEAD_DIM,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = h // GROUP
    length = tl.load(Lens + b).to(tl.int32)
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(ACC) * scale

    m_i = tl.zeros([], dtype=ACC) - float("inf")
    l_i = tl.zeros([], dtype=ACC)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for page in range(start // BLOCK_SIZE, tl.cdiv(length, BLOCK_SIZE)):
        block = tl.load(Tables + b * stride_tb + page).to(tl.int64)
        t = page * BLOCK_SIZE + offs_n
        n_mask = (offs_n < BLOCK_SIZE) & (t >= start) & (t < length)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + block * stride_kb + offs_n[:, None] * stride_ks + g * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(ACC)  # (BLOCK_N, BLOCK_D)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(n_mask, s, float("-inf"))
        # Every visited page holds at least one valid token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(V + block * stride_vb + offs_n[:, None] * stride_vs + g * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(ACC)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out, mask=d_mask)


def paged_attention_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           sliding_window: int = 0) -> torch.Tensor:
    """Launch the kernel. query [B, H, D]; caches [num_blocks, block_size, Hkv, D] (unit stride on D);
    block_tables int [B, W] (unit stride on W); context_lens int [B]. Returns [B, H, D] in query's dtype.
    No validation here: :func:`sipo_fast.ops.paged_attention` validates."""
    batch, heads, head_dim = query.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    # The kernel writes float32/float64; the cast to a 16-bit dtype happens in torch (round to nearest even).
    # [B, H, D] is tiny, and the Triton interpreter's own bf16 store truncates, which doubles the error.
    acc_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = torch.empty(batch, heads, head_dim, dtype=acc_dtype, device=query.device)
    if batch == 0:
        return out.to(query.dtype)
    grid = (batch, heads)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, block_tables, context_lens,
        float(scale), int(sliding_window),
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        head_dim,
        GROUP=heads // kv_heads, BLOCK_SIZE=block_size, BLOCK_N=triton.next_power_of_2(block_size),
        BLOCK_D=triton.next_power_of_2(head_dim),
        ACC=tl.float64 if query.dtype == torch.float64 else tl.float32,
    )
    return out.to(query.dtype)
