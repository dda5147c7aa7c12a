"""Fused token log-probabilities: ``log softmax(h Wᵀ + b)[label]`` without a [M, V] logits tensor.

For hidden states h_m (rows of [M, H]), an LM head W [V, H] (optional bias b [V]) and labels y_m:

    z_m = W h_m + b                         (logits, never stored for all rows at once)
    lse_m = log Σ_v exp(z_mv)
    out_m = z_m[y_m] - lse_m                (0 where y_m == ignore_index)

Gradient, for an upstream gradient g_m:   dz_m = g_m · (onehot(y_m) - softmax(z_m)),
    dh_m = dz_m W,   dW = Σ_m dz_mᵀ h_m,   db = Σ_m dz_m.

Backends (the shared vocabulary of :mod:`sipo_fast.ops.backend`, which decides):
  * ``"triton"``: ``sipo_fast.kernels.logprobs`` (online logsumexp over vocabulary tiles; the default for CUDA
    tensors; runs on CPU tensors only under ``TRITON_INTERPRET=1``, which is how tests force it).
  * ``"cpu"`` (old name ``"chunked"``): plain torch over row chunks (the CPU default; any device): per chunk, one
    [chunk, V] logits matmul, logsumexp and gather, then freed; the backward recomputes the chunk. Extra memory:
    chunk × V.
  * ``"ref"``: :func:`token_logprobs_ref`, the full-logits reference that defines the semantics.
Ignored rows are dropped before any backend runs, so prompt and padding positions cost nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sipo_fast.ops.backend import resolve

# Default row chunk: about 2**25 logits (128 MiB in float32) per chunk; 682 rows at V = 49152. Larger chunks
# amortise streaming W through the cache over more rows; the chunked CPU path holds one such block.
_CHUNK_ELEMENTS = 1 << 25


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(num_rows: int, vocab_size: int) -> int:
    """Rows per chunk so that one chunk's logits hold about 2**25 elements (at least 16 rows)."""
    return max(16, min(max(num_rows, 1), _CHUNK_ELEMENTS // max(vocab_size, 1)))


def _validate(hidden, weight, labels, bias, ignore_index, chunk_size) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be a [M, H] or [B, T, H] tensor, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be the [V, H] LM head matrix, got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden size mismatch: hidden [..., {hidden.shape[-1]}] vs weight [{weight.shape[0]}, "
                         f"{weight.shape[1]}]; pass the LM head weight as [V, H] (nn.Linear.weight layout)")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype; "
                         "cast one of them first")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}; move them to one device")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError("labels must be an int64/int32 tensor of token ids")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {hidden.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V]={weight.shape[0]} in {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    if labels.numel():
        valid = labels != ignore_index
        if valid.any():
            lo, hi = labels[valid].min().item(), labels[valid].max().item()
            if lo < 0 or hi >= weight.shape[0]:
                raise ValueError(f"labels must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}; "
                                 f"found values in [{lo}, {hi}]")


def token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                       ignore_index: int = -100, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch reference: full logits (in the inputs' dtype, like an HF forward), upcast to float32
    (float64 for float64 inputs), ``log_softmax``, gather; 0 where ``labels == ignore_index``.
    Materialises [..., V] twice; it is the oracle for tests and the naive baseline in benchmarks."""
    _validate(hidden, weight, labels, bias, ignore_index, None)
    logits = F.linear(hidden, weight, bias).to(_out_dtype(hidden.dtype))  # (..., V)
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0).long()
    out = logits.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(~valid, 0.0)


def _logits_into(buf: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """z = h wᵀ (+ b) written into ``buf[:rows]``: one buffer serves every chunk, so the loop allocates nothing
    (a fresh 100 MB block per chunk costs page faults comparable to the softmax itself on CPU)."""
    z = buf[: h.shape[0]]  # (c, V)
    torch.mm(h, w.t(), out=z)
    return z.add_(b) if b is not None else z


def _chunked_forward(hidden, weight, labels, bias, chunk, eager_grad_h=False):
    """(log p, lse, D) per row, one [chunk, V] logits block at a time. Computes in float32 (float64 for float64
    inputs): half-precision weights are upcast once, so the logits and their normaliser are exact to fp32.

    With ``eager_grad_h`` (hidden needs a gradient, weight and bias do not: a frozen LM head under LoRA), the
    softmax already in hand gives D_m = d out_m / d h_m = (onehot(y_m) - softmax(z_m)) W, so the backward is
    just g[:, None] · D and never recomputes the logits. D is [M, H], the size of ``hidden``. D is None otherwise.
    """
    cd = _out_dtype(hidden.dtype)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    M = hidden.shape[0]
    out = torch.empty(M, dtype=cd, device=hidden.device)
    lse = torch.empty(M, dtype=cd, device=hidden.device)
    d_h = torch.empty((M, w.shape[1]), dtype=cd, device=hidden.device) if eager_grad_h else None
    buf = torch.empty((min(chunk, M), w.shape[0]), dtype=cd, device=hidden.device)  # (chunk, V), reused
    for start in range(0, M, chunk):
        stop = min(M, start + chunk)
        y = labels[start:stop, None]  # (c, 1)
        z = _logits_into(buf, hidden[start:stop].to(cd), w, b)  # (c, V)
        target = z.gather(1, y).squeeze(1)
        # In place: z -> exp(z - max); lse = max + log Σ. No second [c, V] block.
        zmax = z.amax(1, keepdim=True)  # (c, 1)
        p = z.sub_(zmax).exp_()
        total = p.sum(1)
        lse[start:stop] = zmax.squeeze(1) + total.log()
        out[start:stop] = target - lse[start:stop]
        if d_h is not None:
            p.div_(total[:, None]).scatter_add_(1, y, torch.full_like(y, -1, dtype=cd))  # softmax - onehot
            torch.matmul(p, w, out=d_h[start:stop]).neg_()  # (onehot - softmax) W
    return out, lse, d_h


def _chunked_backward(hidden, weight, labels, bias, lse, grad_out, chunk, need_w, need_b):
    cd = _out_dtype(hidden.dtype)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    M = hidden.shape[0]
    grad_h = torch.empty(hidden.shape, dtype=cd, device=hidden.device)
    grad_w = torch.zeros(w.shape, dtype=cd, device=w.device) if need_w else None
    grad_b = torch.zeros(w.shape[0], dtype=cd, device=w.device) if (need_b and b is not None) else None
    g = grad_out.to(cd)
    buf = torch.empty((min(chunk, M), w.shape[0]), dtype=cd, device=hidden.device)  # (chunk, V), reused
    for start in range(0, M, chunk):
        stop = min(M, start + chunk)
        h = hidden[start:stop].to(cd)  # (c, H)
        dz = _logits_into(buf, h, w, b)  # (c, V): recomputed logits, turned in place into g·(onehot - softmax)
        dz.sub_(lse[start:stop, None]).exp_().mul_(-g[start:stop, None])
        dz.scatter_add_(1, labels[start:stop, None], g[start:stop, None])
        torch.matmul(dz, w, out=grad_h[start:stop])
        if grad_w is not None:
            grad_w.addmm_(dz.t(), h)  # (V, H)
        if grad_b is not None:
            grad_b += dz.sum(0)
    return grad_h, grad_w, grad_b


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd for rows that all have a valid label: saves hidden, weight, labels and lse (O(M)), and
    recomputes the logits chunk by chunk in backward instead of keeping [M, V]. On the chunked path with a
    frozen head it saves D = d out / d hidden ([M, H]) from the forward instead, so nothing is recomputed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk, backend):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_h = None
        if backend == "triton":
            from sipo_fast.kernels.logprobs import token_logprobs_forward

            out, lse = token_logprobs_forward(hidden, weight, labels, bias)
        else:
            out, lse, d_h = _chunked_forward(hidden, weight, labels, bias, chunk,
                                             eager_grad_h=need_h and not need_w and not need_b)
        if d_h is not None:  # frozen head: the backward only scales D, nothing else to keep
            ctx.save_for_backward(d_h)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.eager, ctx.hidden_dtype = d_h is not None, hidden.dtype
        ctx.chunk, ctx.backend = chunk, backend
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.eager:
            (d_h,) = ctx.saved_tensors
            return (grad_out.to(d_h.dtype)[:, None] * d_h).to(ctx.hidden_dtype), None, None, None, None, None
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.backend == "triton":
            from sipo_fast.kernels.logprobs import token_logprobs_backward

            gh, gw, gb = token_logprobs_backward(hidden, weight, labels, lse, grad_out, bias, chunk_size=ctx.chunk,
                                                 need_weight=need_w, need_bias=need_b)
        else:
            gh, gw, gb = _chunked_backward(hidden, weight, labels, bias, lse, grad_out, ctx.chunk, need_w, need_b)
        gh = gh.to(hidden.dtype) if need_h else None
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   bias: torch.Tensor | None = None, chunk_size: int | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """log softmax(hidden @ weightᵀ + bias)[labels] at every position, without a [M, V] tensor in memory.

    Args:
        hidden: [M, H] or [B, T, H] final hidden states (any strides).
        weight: [V, H] LM head weight (``nn.Linear.weight`` layout; a tied embedding matrix works as is).
        labels: [M] or [B, T] token ids in [0, V), or ``ignore_index`` for positions to skip.
        bias: optional [V] LM head bias.
        chunk_size: rows per chunk for the chunked paths (default: ~2**25 logits per chunk).
        backend: None/"auto" (the process default, else Triton for CUDA tensors, the chunked torch path
            otherwise), "triton", "cpu" (chunked torch) or "ref" (:mod:`sipo_fast.ops.backend`).
    Returns:
        log p(label) with labels' shape, float32 (float64 for float64 inputs), 0 at ignored positions.
        Differentiable w.r.t. hidden, weight and bias; the backward also works chunk by chunk.
    """
    _validate(hidden, weight, labels, bias, ignore_index, chunk_size)
    backend = resolve(backend, hidden, "token_logprobs")
    if backend == "ref":
        return token_logprobs_ref(hidden, weight, labels, ignore_index=ignore_index, bias=bias)
    H = hidden.shape[-1]
    flat_h = hidden.reshape(-1, H)  # (M, H)
    flat_y = labels.reshape(-1)  # (M,)
    idx = (flat_y != ignore_index).nonzero().squeeze(1)  # (n,) rows that carry a label
    if idx.numel() == flat_y.numel():
        rows_h, rows_y = flat_h, flat_y.long()
    else:
        rows_h, rows_y = flat_h.index_select(0, idx), flat_y.index_select(0, idx).long()  # (n, H), (n,)
    if backend == "triton" and rows_h.stride(-1) != 1:
        rows_h = rows_h.contiguous()  # the kernel reads any strides, but unit-stride K loads are far faster
    chunk = chunk_size or default_chunk_size(rows_h.shape[0], weight.shape[0])
    vals = TokenLogprobsFunction.apply(rows_h, weight, bias, rows_y, chunk, backend)  # (n,)
    if idx.numel() == flat_y.numel():
        out = vals
    else:
        # index_copy keeps the result connected to the graph even when no row is valid (zero gradients, no error)
        out = vals.new_zeros(flat_y.shape).index_copy(0, idx, vals)
    return out.view(labels.shape)
