"""Triton kernels of the captured MOD decode step: the elementwise work of a Llama-family layer, fused.

An eager decoder layer launches ~45 small kernels (the RMSNorm alone is seven: upcast, square, mean,
rsqrt, two multiplies, downcast); at decode batch sizes each one moves a few kilobytes, so launch and
scheduling cost, not bandwidth, sets the step time. These kernels make a layer about twelve launches:

  * ``_rms_norm_kernel``: ``s = x + r`` (optional residual add, rounded to the model dtype as the eager
    ``residual + hidden`` is), ``y = w · (s / sqrt(mean(s²) + eps))``; writes y and s.
  * ``_silu_mul_kernel``: ``silu(g) · u`` (the gated MLP's activation).
  * ``_rope_kv_kernel``: rotary embedding of q and k at each row's position, and the new k and v written
    into the static cache at column ``cur`` (a device scalar, so the launch can be replayed in a graph).
  * ``_decode_attention_kernel``: one query token per row against the row's cache columns
    ``[start_r, length)`` (``length`` again read from device memory), online softmax over tiles.

Every kernel rounds where the eager module rounds (e.g. ``(q·cos).to(dtype) + (rot(q)·sin).to(dtype)``),
so in float32 they agree with it to float32 rounding. Semantics and references: ``sipo_fast.ops.decode``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, n_cols, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    dt = Y.dtype.element_ty
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dt)  # the eager residual add rounds to the model dtype
        tl.store(S + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * (1.0 / tl.sqrt(var + eps))).to(dt)
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(Y + row * stride_y + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(dt), mask=ok)


@triton.jit
def _silu_mul_kernel(G, U, Y, stride_g, stride_u, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    dt = Y.dtype.element_ty
    g = tl.load(G + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt)
    tl.store(Y + row * stride_y + cols, (act.to(tl.float32) * u).to(dt), mask=ok)


@triton.jit
def _rope_kv_kernel(Q, K, V, QO, KC, VC, COS, SIN, POS, CUR,
                    stride_qr, stride_kr, stride_vr, stride_qor,
                    stride_cr, stride_ch, stride_ct, stride_cos,
                    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (row, head): heads [0, H) rotate a query head into QO; heads [H, H + Hkv) rotate a key head
    and store it, with the matching value head, at cache column CUR[0]."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_H)
    ok = d < HALF
    dt = QO.dtype.element_ty
    pos = tl.load(POS + row)
    c1 = tl.load(COS + pos * stride_cos + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + pos * stride_cos + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + pos * stride_cos + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + pos * stride_cos + HALF + d, mask=ok, other=0.0).to(tl.float32)
    if head < NUM_HEADS:
        base = Q + row * stride_qr + head * 2 * HALF
    else:
        base = K + row * stride_kr + (head - NUM_HEADS) * 2 * HALF
    x1 = tl.load(base + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + d, mask=ok, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]; each product rounds to the dtype, then the sum does (as eager torch)
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    if head < NUM_HEADS:
        out = QO + row * stride_qor + head * 2 * HALF
        tl.store(out + d, o1, mask=ok)
        tl.store(out + HALF + d, o2, mask=ok)
    else:
        g = head - NUM_HEADS
        cur = tl.load(CUR)
        dst = row * stride_cr + g * stride_ch + cur * stride_ct
        tl.store(KC + dst + d, o1, mask=ok)
        tl.store(KC + dst + HALF + d, o2, mask=ok)
        vsrc = V + row * stride_vr + g * 2 * HALF
        tl.store(VC + dst + d, tl.load(vsrc + d, mask=ok, other=0.0), mask=ok)
        tl.store(VC + dst + HALF + d, tl.load(vsrc + HALF + d, mask=ok, other=0.0), mask=ok)


@triton.jit
def _decode_attention_kernel(Q, KC, VC, O, STARTS, LEN, scale, window,
                             stride_qr, stride_qh, stride_cr, stride_ch, stride_ct, stride_or, stride_oh,
                             HEAD_DIM, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    h = tl.program_id(1)
    g = h // GROUP
    length = tl.load(LEN).to(tl.int32)
    start = tl.load(STARTS + row).to(tl.int32)
    if window > 0:
        start = tl.maximum(start, length - window)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + row * stride_qr + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = row * stride_cr + g * stride_ch
    for t0 in range((start // BLOCK_N) * BLOCK_N, length, BLOCK_N):
        t = t0 + n
        t_ok = (t >= start) & (t < length)
        mask = t_ok[:, None] & d_ok[None, :]
        offs = base + t[:, None] * stride_ct + d[None, :]
        k = tl.load(KC + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        s = tl.where(t_ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile before the row's start: all -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        v = tl.load(VC + offs, mask=mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(O + row * stride_or + h * stride_oh + d, out.to(O.dtype.element_ty), mask=d_ok)


# ------------------------------------------------------------------------------------------ launchers
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x, residual [R, C] (unit stride on C); weight [C]. Returns y, or (y, x + residual) with a residual."""
    rows, cols = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else y
    r = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](x, r, weight, y, s, x.stride(0), r.stride(0), y.stride(0), s.stride(0), cols,
                              float(eps), HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(cols))
    return (y, s) if residual is not None else y


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """gate, up [R, C] (unit stride on C) -> silu(gate) · up."""
    rows, cols = gate.shape
    y = torch.empty_like(gate)
    _silu_mul_kernel[(rows, triton.cdiv(cols, block))](gate, up, y, gate.stride(0), up.stride(0), y.stride(0),
                                                       cols, BLOCK=block)
    return y


def rope_kv_triton(q, k, v, cos, sin, pos, k_cache, v_cache, cur):
    """q [R, H·D], k/v [R, Hkv·D] (rows unit-stride); cos/sin [P, D]; pos [R] int; caches [R, Hkv, T, D];
    cur [1] int. Returns the rotated q [R, H, D]; writes rotated k and v at column cur[0]."""
    rows, kv_heads, _, head_dim = k_cache.shape
    heads = q.shape[1] // head_dim
    q_out = torch.empty((rows, heads, head_dim), dtype=q.dtype, device=q.device)
    half = head_dim // 2
    _rope_kv_kernel[(rows, heads + kv_heads)](
        q, k, v, q_out, k_cache, v_cache, cos, sin, pos, cur,
        q.stride(0), k.stride(0), v.stride(0), q_out.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos.stride(0),
        NUM_HEADS=heads, HALF=half, BLOCK_H=triton.next_power_of_2(half))
    return q_out


def decode_attention_triton(q, k_cache, v_cache, starts, length, scale: float, window: int = 0,
                            block_n: int = 64) -> torch.Tensor:
    """q [R, H, D]; caches [R, Hkv, T, D] (unit stride on D); starts [R] int; length [1] int (columns
    [start_r, length) are attended). Returns [R, H, D] in q's dtype."""
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)
    _decode_attention_kernel[(rows, heads)](
        q, k_cache, v_cache, out, starts, length, float(scale), int(window),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), head_dim,
        GROUP=heads // kv_heads, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim))
    return out
