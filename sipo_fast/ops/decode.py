"""The per-layer ops of the captured MOD decode step (:mod:`sipo_fast.decoding.static`), each with one API,
a plain-torch path and a fused Triton kernel (``sipo_fast.kernels.decode``).

For a Llama-family layer, in the model's dtype (``dt``), as transformers' eager modules compute it:

  * ``rms_norm(x, w, eps, residual=r)``: ``s = (x + r).to(dt)``; ``y = w · (s / sqrt(mean(s²) + eps)).to(dt)``
    (statistics in float32); returns ``y`` or ``(y, s)``.
  * ``silu_mul(g, u)``: ``silu(g).to(dt) · u``.
  * ``rope_kv(q, k, v, cos, sin, pos, k_cache, v_cache, cur)``: for each row r at position ``pos[r]``,
    ``x ↦ (x·cos).to(dt) + (rotate_half(x)·sin).to(dt)`` on every head of q and k (``rotate_half([a, b]) =
    [−b, a]``); the rotated k and the raw v go to cache column ``cur[0]``; returns the rotated q ``[R, H, D]``.
  * ``decode_attention(q, k_cache, v_cache, starts, length, scale)``: row r, head h (kv head
    g = h // (H / Hkv)) attends to columns ``t ∈ [max(starts[r], length − window), length)``:
    ``out[r, h] = Σ_t softmax_t(scale · q[r, h] · K[r, g, t]) · V[r, g, t]`` (zeros for an empty range).

``length`` and ``cur`` are one-element device tensors, not Python ints, so a CUDA graph can replay a step
whose cache column advances. Backends (:mod:`sipo_fast.ops.backend`): ``"triton"`` (CUDA; CPU only under
``TRITON_INTERPRET=1``, as the tests run it), ``"cpu"`` (plain torch, any device; old name ``"torch"``), ``"ref"``
(:func:`decode_attention_ref`, the semantics in float32/64; the other ops' plain-torch path *is* their reference,
so ``"ref"`` runs it), ``None``/``"auto"``: the process default, else triton on CUDA and cpu otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sipo_fast.ops.backend import resolve


# ------------------------------------------------------------------------------------------------ norms
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             backend: str | None = None):
    """RMSNorm of ``x (+ residual)`` over the last dim; rows ``[R, C]``. See the module docstring."""
    if resolve(backend, x, "rms_norm") == "triton":
        from sipo_fast.kernels.decode import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    s = x if residual is None else x + residual  # same dtype: one rounding, like the eager residual add
    xf = s.float()
    y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return y if residual is None else (y, s)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) · up`` for the gated MLP, rows ``[R, C]``."""
    if resolve(backend, gate, "silu_mul") == "triton":
        from sipo_fast.kernels.decode import silu_mul_triton

        return silu_mul_triton(gate, up)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------- rope
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [R, heads, (T,) D]; cos/sin broadcastable to it, in x's dtype."""
    return x * cos + rotate_half(x) * sin


def rope_kv(q, k, v, cos, sin, pos, k_cache, v_cache, cur, *, backend: str | None = None) -> torch.Tensor:
    """Rotate q and k of one decode token per row, store k and v at cache column ``cur[0]``; returns q
    ``[R, H, D]``. q ``[R, H·D]``, k/v ``[R, Hkv·D]``, cos/sin ``[P, D]`` (position table), pos ``[R]``,
    caches ``[R, Hkv, T, D]``, cur ``[1]`` int64."""
    if resolve(backend, q, "rope_kv") == "triton":
        from sipo_fast.kernels.decode import rope_kv_triton

        return rope_kv_triton(q, k, v, cos, sin, pos, k_cache, v_cache, cur)
    rows, kv_heads, _, head_dim = k_cache.shape
    c, s = cos[pos][:, None], sin[pos][:, None]  # (R, 1, D)
    q = apply_rope(q.view(rows, -1, head_dim), c, s)
    k = apply_rope(k.view(rows, kv_heads, head_dim), c, s)
    k_cache.index_copy_(2, cur, k[:, :, None])
    v_cache.index_copy_(2, cur, v.view(rows, kv_heads, 1, head_dim))
    return q


# -------------------------------------------------------------------------------------------- attention
def _valid_columns(starts, length: int, window: int, width: int, device) -> torch.Tensor:
    t = torch.arange(width, device=device)
    lo = starts.long()[:, None]
    if window:
        lo = torch.clamp(lo, min=length - window)
    return (t[None, :] >= lo) & (t[None, :] < length)  # (R, width)


def decode_attention_ref(q, k_cache, v_cache, starts, length, scale: float, window: int = 0) -> torch.Tensor:
    """Plain softmax attention in float32 (float64 for float64 input) over the valid columns."""
    n = int(length)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k_cache.shape[1]
    k = k_cache[:, :, :n].to(acc).repeat_interleave(group, dim=1)  # (R, H, n, D)
    v = v_cache[:, :, :n].to(acc).repeat_interleave(group, dim=1)
    scores = torch.einsum("rhd,rhtd->rht", q.to(acc), k) * scale
    valid = _valid_columns(starts, n, window, n, q.device)
    probs = torch.softmax(scores.masked_fill(~valid[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("rht,rhtd->rhd", probs, v).to(q.dtype)


def decode_attention(q, k_cache, v_cache, starts, length, scale: float, window: int = 0, *,
                     backend: str | None = None) -> torch.Tensor:
    """One query token per row against its cache columns; q ``[R, H, D]``, caches ``[R, Hkv, T, D]``,
    starts ``[R]``, length ``[1]``. Returns ``[R, H, D]`` in q's dtype."""
    b = resolve(backend, q, "decode_attention")
    if b == "triton":
        from sipo_fast.kernels.decode import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, starts, length, scale, window)
    if b == "ref":
        return decode_attention_ref(q, k_cache, v_cache, starts, length, scale, window)
    # cpu: SDPA over the columns written so far (a host read of length: this path is never captured)
    n = int(length)
    valid = _valid_columns(starts, n, window, n, q.device)
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :n], v_cache[:, :, :n],
                                         attn_mask=valid[:, None, None], scale=scale,
                                         enable_gqa=k_cache.shape[1] != q.shape[1])
    return out[:, :, 0].nan_to_num_(0.0)  # a row with no valid column: zeros, as the kernel


__all__ = ["rms_norm", "silu_mul", "rope_kv", "apply_rope", "rotate_half", "decode_attention", "decode_attention_ref"]
