"""MOD (multi-objective decoding) mixing and sampling: functional API, dispatch and plain-torch references.

Reverse-KL MOD (SIPO.md §2): for policies π_1..π_N with next-token logits ``l_i`` and weights w on the
simplex, the next-token distribution is

    p_w(v) ∝ exp( Σ_i w_i · log π_i(v) / τ ) = softmax( (Σ_i w_i · l_i) / τ )(v)

because log π_i = l_i − logsumexp(l_i) differs from l_i by a per-row constant. So the mix needs only raw
logits: ``z = Σ_i w_i · l_i`` (float32; terms with w_i = 0 are skipped, so a policy that masks a token
with −inf cannot turn it into 0·(−inf) = NaN). Greedy = argmax_v z_v (first index on ties). Sampling
draws from softmax(z/τ) restricted by top-k then top-p (the order transformers applies them), via the
Gumbel-max trick: argmax_v (z_v/τ + G_v) over kept tokens with G_v = −log(−log U_v), U_v ~ U[0, 1).

Each call also returns, per policy, the log-probability of the chosen token under that policy alone, at
temperature 1 and without top-k/top-p: ``log π_i(tok) = l_i[tok] − logsumexp(l_i)``. Summed over a
response, these are the log π_i(y|x) of implicit rewards (SIPO.md §2), obtained without another pass.

Backends (the shared vocabulary of :mod:`sipo_fast.ops.backend`, which decides):
  * ``"triton"``: the fused kernels in :mod:`sipo_fast.kernels.mod_sample` (CUDA; CPU tensors only under
    ``TRITON_INTERPRET=1``, which is how tests exercise it).
  * ``"cpu"`` (old name ``"torch"``): the CPU fast path. Plain torch ops, no interpreter; none of the N
    per-policy log-softmax tensors is materialised.
  * ``"ref"``: :func:`mod_mix_ref` / :func:`mod_sample_ref`, the documented semantics and test oracle.
  * ``None``/``"auto"`` (default): the process default, else triton for CUDA tensors and cpu otherwise.

Top-k / top-p keep the set ``{v : z_v/τ ≥ t}`` for a per-row threshold t (:func:`mod_filter_threshold`):
top-k keeps the k largest (ties with the k-th are kept, as in transformers); top-p then keeps the
smallest prefix of the remaining tokens, sorted by probability, whose mass reaches ``top_p``
(a token is kept when the mass strictly above it is < top_p; at least one token is always kept).
"""
from __future__ import annotations

import torch

from sipo_fast.ops.backend import resolve

WEIGHT_TOL = 1e-6


# --------------------------------------------------------------------------------------------- checks
def check_weights(weights, num_policies: int, batch_size: int | None = None) -> torch.Tensor:
    """Validate MOD weights and return them as a float32 [B, N] tensor (or [1, N] when B is None).

    ``weights`` is [N] (one vector for all rows) or [B, N] (one per row); every row must be non-negative
    and sum to 1 within ``WEIGHT_TOL``. Raises ValueError before any work otherwise. This is the project's one
    simplex check: the pipeline's config (``resolve_weights``) and the evaluation's sweeps call it too.
    """
    w = torch.as_tensor(weights)
    if w.dtype == torch.bool or w.is_complex():
        raise ValueError(f"weights must be real numbers, got dtype {w.dtype}")
    # A Python list is judged as written (float64), not after torch's default float32 rounding.
    w = w.detach().double() if isinstance(weights, torch.Tensor) else torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.shape[1] != num_policies:
        raise ValueError(f"weights must have shape [N] or [B, N] with N={num_policies} policies, got "
                         f"{tuple(torch.as_tensor(weights).shape)}")
    if batch_size is not None and w.shape[0] not in (1, batch_size):
        raise ValueError(f"weights has {w.shape[0]} rows but the batch has {batch_size}; pass one weight vector "
                         f"[N] for all rows or one per row [B, N]")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or inf")
    if (w < 0).any():
        row = int((w < 0).any(1).nonzero()[0])
        raise ValueError(f"weights must be non-negative; row {row} is {w[row].tolist()}")
    sums = w.sum(1)
    bad = (sums - 1).abs() > WEIGHT_TOL
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"each weight vector must sum to 1 (within {WEIGHT_TOL}); row {row} sums to "
                         f"{float(sums[row]):.8g}. Normalise it, e.g. w / w.sum()")
    if batch_size is not None and w.shape[0] == 1:
        w = w.expand(batch_size, -1)
    return w.to(torch.float32).contiguous()


def _check_inputs(logits: torch.Tensor, weights, temperature=1.0, top_k=0, top_p=1.0):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a [N, B, V] tensor (policies, rows, vocabulary), got "
                         f"{getattr(logits, 'shape', type(logits))}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    n, b, v = logits.shape
    if n == 0 or b == 0 or v == 0:
        raise ValueError(f"logits has an empty dimension: shape {tuple(logits.shape)}")
    if isinstance(weights, torch.Tensor) and weights.device != logits.device:
        # Validation reads values; do it on a host copy, the launchers get a device copy.
        w = check_weights(weights.cpu(), n, b)
    else:
        w = check_weights(weights, n, b)
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and temperature == temperature):
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    check_top_k_top_p(top_k, top_p)
    return w.to(logits.device)


def check_top_k_top_p(top_k, top_p) -> None:
    """The truncation arguments of MOD sampling (this op and the decoder): top_k an int >= 0, top_p in (0, 1]."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


# ----------------------------------------------------------------------------------------- references
def _mix_sequential(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z = Σ_i w_i · l_i in float32, summed in policy order, zero-weight terms skipped. [B, V]."""
    z = torch.zeros(logits.shape[1:], dtype=torch.float32, device=logits.device)
    for i in range(logits.shape[0]):
        w = weights[:, i : i + 1]  # [B, 1]
        term = w * logits[i].float()
        z = z + torch.where(w != 0, term, torch.zeros_like(term))
    return z


def mod_mix_ref(logits: torch.Tensor, weights) -> torch.Tensor:
    """Reference: ``log_softmax(Σ_i w_i · logits_i)`` in float32. logits [N, B, V], weights [N] or [B, N] → [B, V]."""
    w = _check_inputs(logits, weights)
    return torch.log_softmax(_mix_sequential(logits, w), dim=-1)


def mod_filter_threshold(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor | None:
    """Per-row threshold t [B] such that top-k-then-top-p keeps exactly ``{v : scaled_v ≥ t}``.

    ``scaled`` is the tempered mix z/τ, float32 [B, V]. Returns None when neither filter is active.
    """
    v = scaled.shape[-1]
    use_k = 0 < top_k < v
    if not use_k and top_p >= 1:
        return None
    thr = torch.full(scaled.shape[:1], float("-inf"), dtype=torch.float32, device=scaled.device)
    if use_k:
        thr = torch.topk(scaled, top_k, dim=-1).values[:, -1]
    if top_p < 1:
        vals = torch.sort(scaled, dim=-1, descending=True).values  # [B, V]
        vals = vals.masked_fill(vals < thr[:, None], float("-inf"))  # top-k first, then renormalise
        probs = torch.softmax(vals, dim=-1)
        mass_above = torch.cumsum(probs, dim=-1) - probs  # probability strictly ranked above each token
        count = (mass_above < top_p).sum(-1).clamp(min=1)  # tokens kept, >= 1
        thr = torch.maximum(thr, vals.gather(-1, (count - 1)[:, None]).squeeze(-1))
    return thr


def _uniform_noise(shape, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device=gen_device)
    return u.to(device)


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def _policy_logprobs_ref(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π_i(tok_b) = log_softmax(l_i)[b, tok_b], float32 → [B, N]."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [N, B, V]
    idx = tokens.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return lp.gather(-1, idx).squeeze(-1).T.contiguous()  # [B, N]


def mod_sample_ref(logits: torch.Tensor, weights, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, do_sample: bool = True,
                   uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference MOD sampling step: ``(tokens [B] int64, token_logprobs [B, N] float32)``.

    Greedy (``do_sample=False`` or ``temperature=0``): argmax_v Σ_i w_i·l_i (first index on ties).
    Sampling: Gumbel-max over softmax(z/τ) restricted by top-k then top-p. ``uniform`` [B, V] in [0, 1)
    supplies the noise U explicitly (tests use it to compare backends token for token); otherwise U is
    drawn from ``generator``.
    """
    w = _check_inputs(logits, weights, temperature, top_k, top_p)
    z = _mix_sequential(logits, w)  # [B, V]
    if not do_sample or temperature == 0:
        tokens = torch.argmax(z, dim=-1)
    else:
        scaled = z * (1.0 / temperature)  # multiply by 1/τ: the same rounding as the kernels
        thr = mod_filter_threshold(scaled, top_k, top_p)
        u = uniform.to(torch.float32) if uniform is not None else _uniform_noise(z.shape, generator, z.device)
        score = scaled + _gumbel(u)
        if thr is not None:
            score = score.masked_fill(scaled < thr[:, None], float("-inf"))
        tokens = torch.argmax(score, dim=-1)
    return tokens, _policy_logprobs_ref(logits, tokens)


# ------------------------------------------------------------------------------------ CPU fast path
def _scratch(workspace: dict | None, name: str, shape, device) -> torch.Tensor:
    """A float32 buffer, reused across calls through ``workspace`` (a dict the caller keeps). A decode step
    needs several [B, V] buffers; fresh ones of tens of MB come from mmap and cost a page fault per 4 KiB on
    first touch, which on CPU took longer than the arithmetic itself."""
    if workspace is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    buf = workspace.get(name)
    if buf is None or buf.shape != tuple(shape) or buf.device != device:
        buf = workspace[name] = torch.empty(shape, dtype=torch.float32, device=device)
    return buf


def _mix_torch(logits: torch.Tensor, weights: torch.Tensor, workspace: dict | None = None) -> torch.Tensor:
    """Same arithmetic as :func:`_mix_sequential` (one rounding for w_i·l_i, one for the add, policies in
    order), so results match the reference bit for bit, without its temporaries: each term is written
    into one reused float32 buffer (``out=`` also does the bf16 → f32 conversion in the same pass)."""
    z = _scratch(workspace, "z", logits.shape[1:], logits.device)
    term = _scratch(workspace, "term", logits.shape[1:], logits.device) if logits.shape[0] > 1 else None
    for i in range(logits.shape[0]):
        w = weights[:, i : i + 1]  # [B, 1]
        dst = z if i == 0 else term
        torch.mul(logits[i], w, out=dst)
        zero = w == 0
        if bool(zero.any()):  # 0·(−inf) would be NaN: a zero weight contributes exactly 0
            dst.masked_fill_(zero.expand_as(dst), 0.0)
        if i > 0:
            z += term
    return z


def _policy_logprobs_torch(logits: torch.Tensor, tokens: torch.Tensor, workspace: dict | None = None,
                           out_buf: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax(l_i)[tok] per policy, one policy at a time into one float32 [B, V] buffer (``out_buf``, e.g.
    the mix buffer once the tokens are chosen), so the [N, B, V] log-softmax never exists. The same op as the
    reference (bit for bit in float32), and on CPU faster than logsumexp: its kernel fuses max, exp-sum and
    the write. Reduced-precision logits are upcast into a second buffer first."""
    b, v = logits.shape[1:]
    dst = out_buf if out_buf is not None else _scratch(workspace, "lsm", (b, v), logits.device)
    idx = tokens.view(-1, 1)
    lps = []
    for i in range(logits.shape[0]):
        src = logits[i]
        if src.dtype != torch.float32 or src.stride(-1) != 1:
            src = _scratch(workspace, "term", (b, v), logits.device).copy_(src)
        torch.ops.aten._log_softmax.out(src, -1, False, out=dst)
        lps.append(dst.gather(-1, idx)[:, 0])
    return torch.stack(lps, 1)  # [B, N]


def _mod_sample_torch(logits, w, temperature, top_k, top_p, generator, do_sample, uniform, workspace=None):
    z = _mix_torch(logits, w, workspace)
    if not do_sample or temperature == 0:
        tokens = torch.argmax(z, dim=-1)
    else:
        scaled = z.mul_(1.0 / temperature) if temperature != 1 else z
        thr = mod_filter_threshold(scaled, top_k, top_p)
        u = uniform.to(torch.float32) if uniform is not None else _uniform_noise(z.shape, generator, z.device)
        score = _gumbel(u).add_(scaled)
        if thr is not None:
            score.masked_fill_(scaled < thr[:, None], float("-inf"))
        tokens = torch.argmax(score, dim=-1)
    return tokens, _policy_logprobs_torch(logits, tokens, workspace, out_buf=z)  # z is free once tokens are chosen


# ----------------------------------------------------------------------------------------- public API
def mod_mix(logits: torch.Tensor, weights, *, backend: str | None = None) -> torch.Tensor:
    """MOD mix: ``log_softmax(Σ_i w_i · logits_i)`` in float32.

    Args:
        logits: [N, B, V] raw next-token logits of N policies (any float dtype, any strides).
        weights: [N] for all rows or [B, N] per row; each row on the simplex.
        backend: None/"auto", "triton", "cpu" or "ref" (:mod:`sipo_fast.ops.backend`).
    Returns:
        [B, V] float32 log-probabilities of the mixed distribution at temperature 1.
    """
    w = _check_inputs(logits, weights)
    backend = resolve(backend, logits, "mod_mix")
    if backend == "ref":
        return mod_mix_ref(logits, w)
    if backend == "triton":
        from sipo_fast.kernels.mod_sample import mod_mix_triton

        return mod_mix_triton(logits, w)
    return torch.log_softmax(_mix_torch(logits, w), dim=-1)


def mod_logits(logits: torch.Tensor, weights, *, backend: str | None = None) -> torch.Tensor:
    """The raw MOD mix ``z = Σ_i w_i · logits_i`` in float32, not normalised: what a transformers logits processor
    sees where it would see one model's logits (for a one-hot weight, exactly that policy's logits in float32).

    Args:
        logits: [N, B, V] raw next-token logits of N policies.
        weights: [N] or [B, N], each row on the simplex.
        backend: "ref" sums with :func:`_mix_sequential`; any other runs the CPU path (bit for bit the same).
    Returns:
        [B, V] float32.
    """
    w = _check_inputs(logits, weights)
    return mod_logits_unchecked(logits, w, backend=backend)


def mod_logits_unchecked(logits: torch.Tensor, weights: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """:func:`mod_logits` for callers that validated ``weights`` (a float32 [B, N] tensor on the logits' device)."""
    if resolve(backend, logits, "mod_logits") == "ref":
        return _mix_sequential(logits, weights)
    return _mix_torch(logits, weights)  # no workspace: a fresh buffer the caller owns


def policy_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits_i)[b, tokens_b]`` per policy: [N, B, V] logits and [B] tokens -> [B, N] float32, the
    per-policy scores :func:`mod_sample` returns, for a token chosen some other way."""
    return _policy_logprobs_ref(logits, tokens)


def mod_sample(logits: torch.Tensor, weights, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None, do_sample: bool = True,
               uniform: torch.Tensor | None = None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One MOD decoding step: choose a token per row and score it under every policy.

    Args:
        logits: [N, B, V] raw next-token logits of N policies (any float dtype, any strides).
        weights: [N] or [B, N], each row non-negative and summing to 1.
        temperature: τ > 0 for sampling; 0 (or ``do_sample=False``) means greedy argmax of Σ w_i·l_i.
        top_k: keep the k most likely mixed tokens (0 = off). top_p: nucleus mass (1 = off).
        generator: torch.Generator for reproducible sampling (the Triton path draws one seed from it).
        uniform: optional explicit noise U [B, V] in [0, 1) for the Gumbel-max draw (tests).
        backend: None/"auto" (the process default, else triton on CUDA, cpu on CPU), "triton", "cpu" or "ref".
    Returns:
        tokens [B] int64 and token_logprobs [B, N] float32, ``log_softmax(l_i)[tok]`` at temperature 1.
    """
    w = _check_inputs(logits, weights, temperature, top_k, top_p)
    if uniform is not None and uniform.shape != logits.shape[1:]:
        raise ValueError(f"uniform must have shape [B, V] = {tuple(logits.shape[1:])}, got {tuple(uniform.shape)}")
    return mod_sample_unchecked(logits, w, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                              do_sample=do_sample, uniform=uniform, backend=backend)


def mod_sample_unchecked(logits: torch.Tensor, weights: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, generator: torch.Generator | None = None, do_sample: bool = True,
                       uniform: torch.Tensor | None = None, backend: str | None = None,
                       seed_tensor: torch.Tensor | None = None, workspace: dict | None = None):
    """:func:`mod_sample` for callers that validated once up front (the decoder, every step):
    ``weights`` must already be a float32 [B, N] tensor on the logits' device and the arguments valid.
    ``seed_tensor`` ([1] int64 on the device, Triton backend only) makes a sampling call free of host work,
    for the captured decode step. ``workspace`` (a dict kept by the caller) lets the CPU path reuse its
    scratch buffers between calls."""
    backend = resolve(backend, logits, "mod_sample")
    if backend == "ref":
        return mod_sample_ref(logits, weights, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator, do_sample=do_sample, uniform=uniform)
    if backend == "triton":
        from sipo_fast.kernels.mod_sample import mod_sample_triton

        return mod_sample_triton(logits, weights, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator, do_sample=do_sample, uniform=uniform, seed_tensor=seed_tensor,
                                 threshold_fn=lambda scaled: mod_filter_threshold(scaled, top_k, top_p))
    return _mod_sample_torch(logits, weights, temperature, top_k, top_p, generator, do_sample, uniform, workspace)


__all__ = ["mod_mix", "mod_mix_ref", "mod_logits", "policy_token_logprobs", "mod_sample", "mod_sample_ref", "mod_filter_threshold", "check_weights"]
