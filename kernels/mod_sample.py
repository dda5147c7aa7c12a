"""Triton kernels for MOD (multi-objective decoding): the weighted logit mix, temperature, top-k/top-p
threshold, Gumbel-max sampling or argmax, and each policy's log-probability of the chosen token.

Semantics are those of ``sipo_fast.ops.mod`` (``mod_mix_ref`` / ``mod_sample_ref``):
    z = Σ_i w_i · l_i  (float32, zero-weight terms skipped)
    greedy:   tok = argmax_v z_v                        (first index on ties)
    sampling: tok = argmax_{v : z_v/τ ≥ t} z_v/τ + G_v,  G_v = −log(−log U_v)
    logprob_i = l_i[tok] − logsumexp_v l_i[v]

Layout: the vocabulary is split into blocks of ``BLOCK_V`` and the grid is (rows, blocks), so even one
row keeps V / BLOCK_V programs busy (48 for V = 49152 at 1024). Each program reads its slice of the N
policies' logits once and writes per-block partials: its best score and index, and per policy an online
(max, Σexp) pair. A one-program-per-row finishing kernel merges the partials:
    lse_i = M_i + log Σ_j s_ij · exp(m_ij − M_i),  M_i = max_j m_ij
picks the winning block (first on ties, matching torch.argmax), and gathers l_i[tok].

Top-k/top-p need the whole row's distribution before any token can be ruled out, so they take one more
pass: the mix kernel writes z (and the policies' partials), the caller's ``threshold_fn`` computes the
per-row threshold t from z/τ (``sipo_fast.ops.mod.mod_filter_threshold``: a top-k/sort on a [B, V] float32
tensor; passed in, so this module imports nothing of the package), and the select kernel reads z back
instead of the N policies. Without filtering, the whole step is one pass over the logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _mod_partial_kernel(
    logits_ptr, stride_ln, stride_lb, stride_lv,  # [N, B, V], any float dtype, any strides
    w_ptr,  # [B, N] float32 contiguous
    z_ptr,  # [B, V] float32 contiguous: written if WRITE_Z, read if Z_IN
    thr_ptr,  # [B] float32, threshold on z/τ (HAS_THR)
    u_ptr, stride_ub, stride_uv,  # [B, V] uniform noise (HAS_U)
    pmax_ptr, psum_ptr,  # [N+1, B, NBLK] float32 per-block max / Σexp (row N: the mix z itself)
    pbest_ptr, pidx_ptr,  # [B, NBLK] float32 / int32 per-block best score and its vocabulary index
    B, V, NBLK, inv_temp, seed,
    seed_ptr,  # [1] int64: the seed, read from device memory (SEED_PTR), so a captured graph draws anew
    N: tl.constexpr, BLOCK_V: tl.constexpr, Z_IN: tl.constexpr, WRITE_Z: tl.constexpr, Z_LSE: tl.constexpr,
    SELECT: tl.constexpr,  # 0: none, 1: argmax z, 2: Gumbel-max over z/τ
    HAS_THR: tl.constexpr, HAS_U: tl.constexpr, SEED_PTR: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = offs < V
    neg_inf = float("-inf")
    part = row * NBLK + blk
    if Z_IN:
        z = tl.load(z_ptr + row * V + offs, mask=inb, other=neg_inf)
    else:
        z = tl.zeros([BLOCK_V], dtype=tl.float32)
        for i in tl.static_range(N):
            w = tl.load(w_ptr + row * N + i)
            x = tl.load(logits_ptr + i * stride_ln + row * stride_lb + offs * stride_lv, mask=inb,
                        other=neg_inf).to(tl.float32)
            # skip zero weights: 0 · (−inf) would be NaN for a token a policy masks out
            z += tl.where(w != 0.0, w * x, 0.0)
            # online log-sum-exp partial of policy i; guard an all −inf block (exp(−inf − −inf) = NaN)
            m = tl.max(x, axis=0)
            m_safe = tl.where(m == neg_inf, 0.0, m)
            s = tl.sum(tl.exp(x - m_safe), axis=0)
            tl.store(pmax_ptr + i * B * NBLK + part, m)
            tl.store(psum_ptr + i * B * NBLK + part, s)
        z = tl.where(inb, z, neg_inf)
        if WRITE_Z:
            tl.store(z_ptr + row * V + offs, z, mask=inb)
        if Z_LSE:
            m = tl.max(z, axis=0)
            m_safe = tl.where(m == neg_inf, 0.0, m)
            tl.store(pmax_ptr + N * B * NBLK + part, m)
            tl.store(psum_ptr + N * B * NBLK + part, tl.sum(tl.exp(z - m_safe), axis=0))
    if SELECT != 0:
        if SELECT == 1:
            score = z
        else:
            scaled = z * inv_temp
            if HAS_U:
                u = tl.load(u_ptr + row * stride_ub + offs * stride_uv, mask=inb, other=0.5).to(tl.float32)
            elif SEED_PTR:
                u = tl.rand(tl.load(seed_ptr), row * V + offs)
            else:
                u = tl.rand(seed, row * V + offs)
            score = scaled - tl.log(-tl.log(u))
            if HAS_THR:
                thr = tl.load(thr_ptr + row)
                score = tl.where(scaled >= thr, score, neg_inf)
        score = tl.where(inb, score, neg_inf)
        best, idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(pbest_ptr + part, best)
        tl.store(pidx_ptr + part, blk * BLOCK_V + idx)


@triton.jit
def _mod_finish_kernel(
    logits_ptr, stride_ln, stride_lb, stride_lv,
    pmax_ptr, psum_ptr, pbest_ptr, pidx_ptr,
    tok_ptr, lp_ptr,  # [B] int64, [B, N] float32
    B, NBLK,
    N: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    row = tl.program_id(0)
    j = tl.arange(0, BLOCK_NB)
    ok = j < NBLK
    best = tl.load(pbest_ptr + row * NBLK + j, mask=ok, other=float("-inf"))
    # first block holding the maximum (blocks are in vocabulary order, so this is torch.argmax's tie rule);
    # an all −inf row falls back to block 0
    _, jb = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tok = tl.load(pidx_ptr + row * NBLK + jb).to(tl.int64)
    tl.store(tok_ptr + row, tok)
    for i in tl.static_range(N):
        m = tl.load(pmax_ptr + i * B * NBLK + row * NBLK + j, mask=ok, other=float("-inf"))
        s = tl.load(psum_ptr + i * B * NBLK + row * NBLK + j, mask=ok, other=0.0)
        mm = tl.max(m, axis=0)
        mm_safe = tl.where(mm == float("-inf"), 0.0, mm)
        lse = mm_safe + tl.log(tl.sum(s * tl.exp(m - mm_safe), axis=0))
        x = tl.load(logits_ptr + i * stride_ln + row * stride_lb + tok * stride_lv).to(tl.float32)
        tl.store(lp_ptr + row * N + i, x - lse)


@triton.jit
def _mod_normalize_kernel(z_ptr, pmax_ptr, psum_ptr, V, NBLK, N: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_NB: tl.constexpr):
    """z ← z − logsumexp(z), in place (the mix's partials sit in row N of pmax/psum)."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    B = tl.num_programs(0)
    j = tl.arange(0, BLOCK_NB)
    ok = j < NBLK
    m = tl.load(pmax_ptr + N * B * NBLK + row * NBLK + j, mask=ok, other=float("-inf"))
    s = tl.load(psum_ptr + N * B * NBLK + row * NBLK + j, mask=ok, other=0.0)
    mm = tl.max(m, axis=0)
    mm_safe = tl.where(mm == float("-inf"), 0.0, mm)
    lse = mm_safe + tl.log(tl.sum(s * tl.exp(m - mm_safe), axis=0))
    offs = blk * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = offs < V
    z = tl.load(z_ptr + row * V + offs, mask=inb, other=0.0)
    tl.store(z_ptr + row * V + offs, z - lse, mask=inb)


# ------------------------------------------------------------------------------------------ launchers
def _partials(n: int, b: int, nblk: int, device) -> tuple[torch.Tensor, ...]:
    pmax = torch.empty((n + 1, b, nblk), dtype=torch.float32, device=device)
    psum = torch.empty_like(pmax)
    pbest = torch.empty((b, nblk), dtype=torch.float32, device=device)
    pidx = torch.empty((b, nblk), dtype=torch.int32, device=device)
    return pmax, psum, pbest, pidx


def _launch_partial(logits, w, z, thr, u, parts, *, inv_temp=1.0, seed=0, z_in=False, write_z=False,
                    z_lse=False, select=0, block_v=BLOCK_V, seed_tensor=None):
    n, b, v = logits.shape
    nblk = triton.cdiv(v, block_v)
    pmax, psum, pbest, pidx = parts
    dummy = pbest  # pointer for unused arguments (never dereferenced: the flags are constexpr)
    _mod_partial_kernel[(b, nblk)](
        logits, logits.stride(0), logits.stride(1), logits.stride(2),
        w, z if z is not None else dummy, thr if thr is not None else dummy,
        u if u is not None else dummy, u.stride(0) if u is not None else 0, u.stride(1) if u is not None else 0,
        pmax, psum, pbest, pidx,
        b, v, nblk, float(inv_temp), int(seed), seed_tensor if seed_tensor is not None else dummy,
        N=n, BLOCK_V=block_v, Z_IN=z_in, WRITE_Z=write_z, Z_LSE=z_lse, SELECT=select,
        HAS_THR=thr is not None, HAS_U=u is not None, SEED_PTR=seed_tensor is not None,
    )


def mod_mix_triton(logits: torch.Tensor, weights: torch.Tensor, *, block_v: int = BLOCK_V) -> torch.Tensor:
    """log_softmax(Σ_i w_i · l_i) → [B, V] float32. ``weights`` is a validated [B, N] tensor."""
    n, b, v = logits.shape
    w = weights.to(device=logits.device, dtype=torch.float32).contiguous()
    nblk = triton.cdiv(v, block_v)
    parts = _partials(n, b, nblk, logits.device)
    z = torch.empty((b, v), dtype=torch.float32, device=logits.device)
    _launch_partial(logits, w, z, None, None, parts, write_z=True, z_lse=True, block_v=block_v)
    _mod_normalize_kernel[(b, nblk)](z, parts[0], parts[1], v, nblk, N=n, BLOCK_V=block_v,
                                     BLOCK_NB=triton.next_power_of_2(nblk))
    return z


def mod_sample_triton(logits: torch.Tensor, weights: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, generator: torch.Generator | None = None, do_sample: bool = True,
                      uniform: torch.Tensor | None = None, block_v: int = BLOCK_V,
                      seed_tensor: torch.Tensor | None = None, threshold_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One MOD step → ``(tokens [B] int64, logprobs [B, N] float32)``. ``weights`` is a validated [B, N] tensor.

    Without a noise tensor the kernel draws U with ``tl.rand(seed, row·V + v)``; the seed comes from
    ``generator`` (or torch's default generator), so a seeded run is reproducible. ``seed_tensor`` (a [1]
    int64 device tensor) supplies the seed from device memory instead: no host work, so the call can be
    captured in a CUDA graph and replayed with a new seed written into that tensor. ``threshold_fn(z / τ) ->
    [B]`` gives the top-k/top-p threshold; it is called only when a filter is active and must be given then.
    """
    n, b, v = logits.shape
    dev = logits.device
    w = weights.to(device=dev, dtype=torch.float32).contiguous()
    nblk = triton.cdiv(v, block_v)
    parts = _partials(n, b, nblk, dev)
    greedy = (not do_sample) or temperature == 0
    u = uniform.to(dev) if (uniform is not None and not greedy) else None
    seed = 0
    if not greedy and u is None and seed_tensor is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device if generator else "cpu"))
    inv_temp = 1.0 if greedy else 1.0 / temperature
    if greedy:
        _launch_partial(logits, w, None, None, None, parts, select=1, block_v=block_v)
    else:
        thr = None
        z = None
        if (0 < top_k < v) or top_p < 1:
            # pass 1: mix + policy partials; torch threshold on z/τ; pass 2 reads z back
            z = torch.empty((b, v), dtype=torch.float32, device=dev)
            _launch_partial(logits, w, z, None, None, parts, write_z=True, block_v=block_v)
            if threshold_fn is None:
                raise ValueError("top_k/top_p filtering needs threshold_fn (sipo_fast.ops.mod passes it)")
            thr = threshold_fn(z * inv_temp).contiguous()
            _launch_partial(logits, w, z, thr, u, parts, inv_temp=inv_temp, seed=seed, z_in=True, select=2,
                            block_v=block_v, seed_tensor=seed_tensor)
        else:
            _launch_partial(logits, w, None, None, u, parts, inv_temp=inv_temp, seed=seed, select=2, block_v=block_v,
                            seed_tensor=seed_tensor)
    tokens = torch.empty((b,), dtype=torch.int64, device=dev)
    lp = torch.empty((b, n), dtype=torch.float32, device=dev)
    pmax, psum, pbest, pidx = parts
    _mod_finish_kernel[(b,)](logits, logits.stride(0), logits.stride(1), logits.stride(2), pmax, psum, pbest, pidx,
                             tokens, lp, b, nblk, N=n, BLOCK_NB=triton.next_power_of_2(nblk))
    return tokens, lp
