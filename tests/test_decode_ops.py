"""The fused per-layer ops of the captured decode step (sipo_fast.ops.decode): the Triton kernels (run by the
interpreter on CPU) against the plain-torch paths, which mirror transformers' eager Llama modules, and the
attention against its float64 reference and a hand-computed case."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from sipo_fast.ops.decode import decode_attention, decode_attention_ref, rms_norm, rope_kv, silu_mul

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    # bf16: one rounding step of the output (2^-8 relative) either way, and the interpreter truncates
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 64), (3, 100), (7, 576)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_triton_and_torch_match_transformers(rows, cols, residual, dtype):
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    r = torch.randn(rows, cols, generator=g).to(dtype) if residual else None
    hf = LlamaRMSNorm(cols, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.rand(cols, generator=g) + 0.5)
    s = x + r if residual else x
    want = hf(s)
    for backend in ("cpu", "triton"):
        got = rms_norm(x, hf.weight, 1e-5, r, backend=backend)
        y = got[0] if residual else got
        torch.testing.assert_close(y, want, **_tol(dtype))
        if residual:  # the residual stream is the rounded sum itself (the interpreter truncates bf16: 1 ulp)
            torch.testing.assert_close(got[1], s, atol=0, rtol=0 if dtype == torch.float32 else 2 ** -7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(2, 128), (5, 1537)])  # 1537: several column blocks, ragged tail
def test_silu_mul_matches_eager(rows, cols, dtype):
    g = torch.Generator().manual_seed(cols)
    gate, up = (torch.randn(rows, cols, generator=g).to(dtype) for _ in range(2))
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(silu_mul(gate, up, backend="triton"), want, **_tol(dtype))
    assert torch.equal(silu_mul(gate, up, backend="cpu"), want)


def _rope_tables(positions, dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (3, 3, 64), (9, 3, 64)])
def test_rope_kv_rotates_like_transformers_and_writes_only_column_cur(heads, kv_heads, dim, dtype):
    rows, width, cur = 5, 11, 7
    g = torch.Generator().manual_seed(heads * dim)
    q = torch.randn(rows, heads * dim, generator=g).to(dtype)
    k = torch.randn(rows, kv_heads * dim, generator=g).to(dtype)
    v = torch.randn(rows, kv_heads * dim, generator=g).to(dtype)
    cos, sin = _rope_tables(40, dim, dtype)
    pos = torch.tensor([0, 3, 17, 39, 8])
    want_q, want_k = apply_rotary_pos_emb(q.view(rows, heads, 1, dim), k.view(rows, kv_heads, 1, dim),
                                          cos[pos][:, None], sin[pos][:, None], unsqueeze_dim=1)
    for backend in ("cpu", "triton"):
        poison = torch.full((rows, kv_heads, width, dim), 123.0, dtype=dtype)
        kc, vc = poison.clone(), poison.clone()
        got = rope_kv(q, k, v, cos, sin, pos, kc, vc, torch.tensor([cur]), backend=backend)
        torch.testing.assert_close(got, want_q[:, :, 0], **_tol(dtype))
        torch.testing.assert_close(kc[:, :, cur], want_k[:, :, 0], **_tol(dtype))
        assert torch.equal(vc[:, :, cur], v.view(rows, kv_heads, dim))
        others = torch.arange(width) != cur
        assert torch.equal(kc[:, :, others], poison[:, :, others]) and torch.equal(vc[:, :, others], poison[:, :, others])


def test_decode_attention_hand_computed():
    """One row, one head, D = 1, scale 1: q = 1, keys [0, ln 3] → scores [0, ln 3] → softmax [1/4, 3/4];
    values [4, 8] → 4/4 + 3·8/4 = 7. Column 0 lies before the row's start when starts = 1: the output is
    then value 8 alone."""
    q = torch.tensor([[[1.0]]])
    kc = torch.tensor([0.0, math.log(3.0), 99.0]).view(1, 1, 3, 1)
    vc = torch.tensor([4.0, 8.0, -99.0]).view(1, 1, 3, 1)
    for backend in ("ref", "cpu", "triton"):
        out = decode_attention(q, kc, vc, torch.tensor([0]), torch.tensor([2]), 1.0, backend=backend)
        torch.testing.assert_close(out, torch.tensor([[[7.0]]]))
        out = decode_attention(q, kc, vc, torch.tensor([1]), torch.tensor([2]), 1.0, backend=backend)
        torch.testing.assert_close(out, torch.tensor([[[8.0]]]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim,width,length,window", [
    (4, 2, 16, 70, 70, 0),    # length not a multiple of the 64-key tile
    (3, 3, 48, 130, 97, 0),   # head dim not a power of two, columns past length never read
    (8, 2, 64, 40, 33, 5),    # sliding window
])
def test_decode_attention_matches_float64_reference(heads, kv_heads, dim, width, length, window, dtype):
    rows = 6
    g = torch.Generator().manual_seed(width)
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    kc = torch.randn(rows, kv_heads, width, dim, generator=g).to(dtype)
    vc = torch.randn(rows, kv_heads, width, dim, generator=g).to(dtype)
    kc[:, :, length:] = float("nan")  # never written: must never be read
    vc[:, :, length:] = float("nan")
    starts = torch.tensor([0, 1, 5, length - 1, length, 2])  # row 4: nothing to attend → zeros
    ln = torch.tensor([length])
    want = decode_attention_ref(q.double(), kc.double(), vc.double(), starts, ln, dim ** -0.5, window)
    for backend in ("triton", "cpu"):
        got = decode_attention(q, kc, vc, starts, ln, dim ** -0.5, window, backend=backend)
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, **_tol(dtype))
    assert (want[4] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_torch(dtype):
    """The same ops compiled for the GPU against the torch path on the CPU (float64 attention reference)."""
    g = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, width = 5, 8, 2, 64, 150
    x, r = (torch.randn(rows, 2048, generator=g).to(dtype) for _ in range(2))
    wt = (torch.rand(2048, generator=g) + 0.5).to(dtype)
    y, s = rms_norm(x.cuda(), wt.cuda(), 1e-5, r.cuda())
    want_y, want_s = rms_norm(x, wt, 1e-5, r, backend="cpu")
    torch.testing.assert_close(y.cpu(), want_y, **_tol(dtype))
    assert torch.equal(s.cpu(), want_s)
    gate, up = (torch.randn(rows, 5504, generator=g).to(dtype) for _ in range(2))
    torch.testing.assert_close(silu_mul(gate.cuda(), up.cuda()).cpu(), silu_mul(gate, up, backend="cpu"), **_tol(dtype))
    q = torch.randn(rows, heads * dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, kv_heads * dim, generator=g).to(dtype) for _ in range(2))
    cos, sin = _rope_tables(width, dim, dtype)
    pos = torch.tensor([0, 9, 33, 149, 2])
    caches = [torch.randn(rows, kv_heads, width, dim, generator=g).to(dtype) for _ in range(2)]
    cur = torch.tensor([77])
    cuda_caches = [c.cuda().index_fill_(2, cur.cuda(), float("nan")) for c in caches]  # column 77: poisoned
    want_q = rope_kv(q, k, v, cos, sin, pos, *caches, cur, backend="cpu")
    got_q = rope_kv(q.cuda(), k.cuda(), v.cuda(), cos.cuda(), sin.cuda(), pos.cuda(), *cuda_caches, cur.cuda())
    torch.testing.assert_close(got_q.cpu(), want_q, **_tol(dtype))
    for got, want in zip(cuda_caches, caches):
        torch.testing.assert_close(got.cpu(), want, **_tol(dtype))
    starts, ln = torch.tensor([0, 3, 70, 77, 78]), torch.tensor([78])
    qa = torch.randn(rows, heads, dim, generator=g).to(dtype)
    want = decode_attention_ref(qa.double(), caches[0].double(), caches[1].double(), starts, ln, dim ** -0.5)
    got = decode_attention(qa.cuda(), cuda_caches[0], cuda_caches[1], starts.cuda(), ln.cuda(), dim ** -0.5)
    torch.testing.assert_close(got.cpu().double(), want, **_tol(dtype))
