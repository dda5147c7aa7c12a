"""Triton kernels for fused token log-probabilities: log softmax(h Wᵀ + b)[label] without a [M, V] logits tensor.

Forward (one program per BLOCK_M rows): loop over the vocabulary in BLOCK_V tiles; each tile of logits
z = h Wᵀ (+ b) is built in registers by a BLOCK_K loop of ``tl.dot`` and folded into an online logsumexp
(running max m and running sum l, rescaled by exp(m_old - m_new) when the max grows); the label's logit is
picked out of whichever tile holds it. Outputs, per row: log p(label) = z[label] - lse and lse.

Backward (one program per (BLOCK_M rows, BLOCK_V columns) tile): recompute the logits tile, form
dz = g · (onehot(label) - exp(z - lse)) and store it into a [rows, V] buffer the launcher sizes to one row
chunk; the launcher then finishes with two matmuls (dh = dz W, dW += dzᵀ h), which cuBLAS does better
than a hand-written reduction. So the backward holds at most chunk × V, never M × V.

Launchers take contiguous-or-not 2-D tensors and return tensors; dispatch, autograd and the reference
live in ``sipo_fast.ops.logprobs``. On CPU tensors these run only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, out_ptr, lse_ptr,
    M, V, K,
    stride_hm, stride_hk, stride_wv, stride_wk,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    target = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = tl.zeros((BLOCK_M, BLOCK_V), ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            h = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_V)
            if UPCAST_DOT:
                h = h.to(ACC_DTYPE)
                w = w.to(ACC_DTYPE)
            z = tl.dot(h, w, z, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        # Rescale the running sum to the new max; exp(-inf - finite) = 0 handles the first tile.
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    lse = m_i + tl.log(l_i)
    tl.store(out_ptr + rows, target - lse, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _token_logprobs_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, g_ptr, dz_ptr,
    M, V, K,
    stride_hm, stride_hk, stride_wv, stride_wk, stride_dm, stride_dv,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    col_ok = cols < V
    z = tl.zeros((BLOCK_M, BLOCK_V), ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        h = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST_DOT:
            h = h.to(ACC_DTYPE)
            w = w.to(ACC_DTYPE)
        z = tl.dot(h, w, z, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    # d log p(label) / dz_v = onehot_v - softmax_v
    p = tl.exp(z - lse[:, None])
    dz = g[:, None] * (tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - p)
    tl.store(dz_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dv,
             dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# GPU tile shapes, autotuned per (V, K, dtype): tl.dot needs every block dim >= 16; configurations too large
# for shared memory (fp64) are pruned by the autotuner when they fail to compile.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_V": v, "BLOCK_K": k}, num_warps=w, num_stages=st)
    for m, v, k, w, st in [(64, 128, 64, 8, 3), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3), (32, 128, 64, 4, 3),
                           (16, 64, 32, 4, 2)]
]
_fwd_tuned = triton.autotune(_GPU_CONFIGS, key=["V", "K"])(_token_logprobs_fwd_kernel)
_bwd_tuned = triton.autotune(_GPU_CONFIGS, key=["V", "K"])(_token_logprobs_bwd_kernel)


def _launch(plain, tuned, grid, hidden: torch.Tensor, *args, **meta) -> None:
    """Run ``plain`` with fixed tiles under the interpreter (each program is a Python loop iteration, so wide
    vocabulary tiles mean few iterations), or the autotuned ``tuned`` on a GPU. ``grid(BLOCK_M, BLOCK_V)``."""
    K = hidden.shape[1]
    meta.update(ACC_DTYPE=_acc_dtype(hidden.dtype), UPCAST_DOT=_upcast_dot(hidden),
                # fp32 inputs: IEEE products (tl.dot's default on CUDA is TF32, 10-bit mantissas, which would
                # break the tolerance rule against torch's fp32 matmul); ignored for half precision.
                DOT_PRECISION="ieee" if hidden.dtype in (torch.float32, torch.float64) else "tf32")
    if _interpreting(hidden):
        bm, bv, bk = 16, 512, min(64, max(16, triton.next_power_of_2(K)))
        plain[grid(bm, bv)](*args, **meta, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk)
    else:
        tuned[lambda cfg: grid(cfg["BLOCK_M"], cfg["BLOCK_V"])](*args, **meta)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _upcast_dot(t: torch.Tensor) -> bool:
    """Triton 3.9's interpreter returns garbage for tl.dot on bf16/fp16 tiles, so under the interpreter the
    tiles are upcast first. Same numbers as the GPU's half-precision dot: products of two half-precision values
    are exact in fp32, and both accumulate in fp32."""
    return _interpreting(t) and t.dtype in (torch.bfloat16, torch.float16)


def token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) and lse for every row. hidden [M,K], weight [V,K], labels [M] in [0, V) (no ignored rows:
    the caller compacts them away). Returns two [M] tensors in float32 (float64 for float64 inputs)."""
    M, K = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.empty(M, dtype=acc, device=hidden.device)
    lse = torch.empty(M, dtype=acc, device=hidden.device)
    if M == 0:
        return out, lse
    labels = labels.contiguous()
    _launch(_token_logprobs_fwd_kernel, _fwd_tuned, lambda bm, bv: (triton.cdiv(M, bm),), hidden,
            hidden, weight, bias if bias is not None else hidden, labels, out, lse,
            M, V, K,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            HAS_BIAS=bias is not None)
    return out, lse


def token_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            lse: torch.Tensor, grad_out: torch.Tensor, bias: torch.Tensor | None = None, *,
                            chunk_size: int, need_weight: bool = True, need_bias: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of Σ_m g_m · log p_m w.r.t. hidden, weight and bias, one row chunk at a time.

    dz = g · (onehot - softmax) is written by the kernel into a [chunk, V] buffer (in the inputs' dtype, as the
    matmuls that follow need), then dh = dz W and dW += dzᵀ h. Peak extra memory: chunk × V elements.
    """
    M, K = hidden.shape
    V = weight.shape[0]
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    grad_b = torch.zeros(V, dtype=acc, device=weight.device) if (need_bias and bias is not None) else None
    chunk = max(1, min(chunk_size, M))
    # The interpreter converts fp32 -> bf16 by truncation, not round-to-nearest as GPUs do, doubling the rounding
    # error; there the kernel writes fp32 and torch rounds (the .to below is a no-op on GPUs).
    dz_dtype = acc if _upcast_dot(hidden) else hidden.dtype
    dz = torch.empty((chunk, V), dtype=dz_dtype, device=hidden.device)
    g = grad_out.to(acc).contiguous()
    labels = labels.contiguous()
    for start in range(0, M, chunk):
        stop = min(M, start + chunk)
        h_c = hidden[start:stop]  # (c, K), a view: the kernel reads it through its strides
        dz_c = dz[: stop - start]  # (c, V)
        rows = stop - start
        _launch(_token_logprobs_bwd_kernel, _bwd_tuned, lambda bm, bv: (triton.cdiv(rows, bm), triton.cdiv(V, bv)),
                hidden,
                h_c, weight, bias if bias is not None else h_c, labels[start:stop], lse[start:stop], g[start:stop],
                dz_c, rows, V, K,
                h_c.stride(0), h_c.stride(1), weight.stride(0), weight.stride(1), dz_c.stride(0), dz_c.stride(1),
                HAS_BIAS=bias is not None)
        dz_c = dz_c.to(hidden.dtype)
        torch.matmul(dz_c, weight, out=grad_h[start:stop])
        if grad_w is not None:
            if hidden.dtype == acc:
                grad_w.addmm_(dz_c.t(), h_c)  # (V, K)
            else:  # bf16/fp16: the matmul accumulates in fp32 internally; only each chunk's sum is rounded
                grad_w += (dz_c.t() @ h_c).to(acc)
        if grad_b is not None:
            grad_b += dz_c.sum(0, dtype=acc)
    return grad_h, grad_w, grad_b
