"""Paged decode attention (C++ CPU kernel, Triton kernel, flash-attn on GPU) against plain SDPA.

Each case builds contiguous per-sequence K/V, scatters it into randomly chosen pages (so tables are not
monotone and sequences interleave), and compares every backend with torch's scaled_dot_product_attention
on the contiguous data. Tolerance rule for low precision (flash-attention's): the kernel's error against the
float64 answer is at most twice the error of torch SDPA run in the same low precision (+ a small floor).
"""
import pytest
import torch
import torch.nn.functional as F

from sipo_fast.ops.attention import paged_attention, paged_attention_ref

CPU_BACKENDS = ["cpu", "triton", "ref"]


def make_case(lens, heads, kv_heads, head_dim, block_size, dtype, *, seed=0, extra_blocks=3, device="cpu"):
    """Random q [B, H, D], contiguous K/V per row, and the same K/V scattered into shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lens)
    pages = [-(-n // block_size) for n in lens]
    width = max(max(pages), 1) + 1  # one spare column: tables are wider than any row needs
    num_blocks = sum(pages) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g, dtype=torch.float64)
    tables = torch.randint(0, num_blocks, (batch, width), generator=g)  # junk beyond each row's pages
    ks, vs, used = [], [], 0
    for b, n in enumerate(lens):
        tables[b, : pages[b]] = perm[used: used + pages[b]]
        used += pages[b]
        k = torch.randn(n, kv_heads, head_dim, generator=g, dtype=torch.float64)
        v = torch.randn(n, kv_heads, head_dim, generator=g, dtype=torch.float64)
        t = torch.arange(n)
        k_cache[tables[b, t // block_size], t % block_size] = k
        v_cache[tables[b, t // block_size], t % block_size] = v
        ks.append(k)
        vs.append(v)
    q = torch.randn(batch, heads, head_dim, generator=g, dtype=torch.float64)
    conv = dict(dtype=dtype, device=device)
    return (q.to(**conv), k_cache.to(**conv), v_cache.to(**conv), tables.to(torch.int32).to(device),
            torch.tensor(lens, dtype=torch.int32, device=device), ks, vs)


def sdpa_answer(q, ks, vs, dtype, scale=None, window=None):
    """torch SDPA per row on contiguous K/V in `dtype` (zeros for empty rows)."""
    outs = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        if window is not None:
            k, v = k[-window:], v[-window:]
        if k.shape[0] == 0:
            outs.append(torch.zeros(q.shape[1], q.shape[2], dtype=dtype))
            continue
        group = q.shape[1] // k.shape[1]
        kk = k.to(dtype).transpose(0, 1).repeat_interleave(group, 0)  # (H, n, D)
        vv = v.to(dtype).transpose(0, 1).repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q[b].to(dtype)[:, None, :], kk, vv, scale=scale)  # (H, 1, D)
        outs.append(o[:, 0])
    return torch.stack(outs)


def assert_close_to_sdpa(out, q, ks, vs, scale=None, window=None):
    """Compare with float64 SDPA on the inputs as the kernel saw them (rounded to q's dtype)."""
    ks = [k.to(q.dtype).double() for k in ks]
    vs = [v.to(q.dtype).double() for v in vs]
    exact = sdpa_answer(q.double(), ks, vs, torch.float64, scale, window)
    err = (out.double() - exact).abs().max().item()
    if q.dtype in (torch.float32, torch.float64):
        tol = 1e-5 if q.dtype == torch.float32 else 1e-10
    else:
        torch_err = (sdpa_answer(q, ks, vs, q.dtype, scale, window).double() - exact).abs().max().item()
        tol = 2 * torch_err + 1e-4
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


SHAPES = [
    # lens, heads, kv_heads, head_dim, block_size
    ([5, 16, 1, 33], 4, 2, 64, 16),  # ragged, one exactly at a block boundary, GQA 2
    ([0, 7, 12], 6, 3, 40, 5),  # empty row, odd head dim and block size
    ([1], 1, 1, 8, 1),  # single token, block of one slot
    ([31, 2, 17, 9], 8, 1, 32, 7),  # multi-query attention (one kv head)
    ([20, 3], 2, 2, 128, 4),  # plain multi-head, large head dim
]


# float64 under the Triton interpreter is slow and takes the same code path: two shapes suffice there.
GRID = [(backend, dtype, case) for backend in CPU_BACKENDS
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) for case in range(len(SHAPES))
        if not (backend == "triton" and dtype == torch.float64 and case > 1)]


@pytest.mark.parametrize("backend,dtype,case", GRID, ids=lambda v: str(v).removeprefix("torch."))
def test_matches_sdpa(backend, dtype, case):
    lens, heads, kv_heads, head_dim, block_size = SHAPES[case]
    q, kc, vc, tables, clens, ks, vs = make_case(lens, heads, kv_heads, head_dim, block_size, dtype, seed=case)
    out = paged_attention(q, kc, vc, tables, clens, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_to_sdpa(out, q, ks, vs)
    if 0 in lens:
        assert out[lens.index(0)].abs().max() == 0, "an empty row must give zeros"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [1, 4, 100])
def test_sliding_window(backend, window):
    lens = [9, 4, 0, 13]
    q, kc, vc, tables, clens, ks, vs = make_case(lens, 4, 2, 16, 4, torch.float32, seed=7)
    out = paged_attention(q, kc, vc, tables, clens, sliding_window=window, backend=backend)
    assert_close_to_sdpa(out, q, ks, vs, window=window)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_scale_and_non_contiguous_inputs(backend):
    lens = [6, 11, 3]
    q, kc, vc, tables, clens, ks, vs = make_case(lens, 4, 2, 24, 4, torch.float32, seed=3)
    q_wide = torch.zeros(3, 8, 24)
    q_wide[:, ::2] = q
    q_strided = q_wide[:, ::2]  # (B, H, D) with stride 2 on H
    tables_wide = torch.zeros(3, 2 * tables.shape[1], dtype=torch.int64)
    tables_wide[:, ::2] = tables
    tables_strided = tables_wide[:, ::2]  # int64 and non-contiguous
    assert not q_strided.is_contiguous() and not tables_strided.is_contiguous()
    out = paged_attention(q_strided, kc, vc, tables_strided, clens.long(), scale=0.3, backend=backend)
    assert_close_to_sdpa(out, q, ks, vs, scale=0.3)


def test_auto_backend_on_cpu_is_cpp_and_agrees_with_ref():
    from sipo_fast.ops.attention import select_backend

    q, kc, vc, tables, clens, ks, vs = make_case([3, 8], 2, 1, 16, 4, torch.float32)
    assert select_backend(q, kc) == "cpu"
    torch.testing.assert_close(paged_attention(q, kc, vc, tables, clens),
                               paged_attention_ref(q, kc, vc, tables, clens), rtol=1e-5, atol=1e-6)


def test_pages_are_read_in_place():
    """Changing one page changes exactly the rows whose tables hold it (the kernel reads the pool itself)."""
    q, kc, vc, tables, clens, ks, vs = make_case([8, 8], 2, 2, 8, 4, torch.float32, seed=5)
    before = paged_attention(q, kc, vc, tables, clens, backend="cpu")
    vc[tables[1, 0]] += 1.0
    after = paged_attention(q, kc, vc, tables, clens, backend="cpu")
    torch.testing.assert_close(after[0], before[0])
    assert (after[1] - before[1]).abs().min() > 1e-3


def test_bad_inputs_raise_value_errors():
    q, kc, vc, tables, clens, _, _ = make_case([3, 5], 4, 2, 16, 4, torch.float32)
    bad = [
        dict(query=q[0]),  # 2-D query
        dict(k_cache=kc[0]),  # 3-D cache
        dict(v_cache=vc[:, :2]),  # shapes differ
        dict(query=torch.randn(2, 3, 16)),  # 3 heads over 2 kv heads
        dict(query=q.double()),  # dtype mismatch
        dict(context_lens=clens[:1]),  # batch mismatch
        dict(context_lens=torch.tensor([3, 99], dtype=torch.int32)),  # longer than the table allows
        dict(context_lens=torch.tensor([-1, 2], dtype=torch.int32)),
        dict(block_tables=tables.float()),
        dict(block_tables=torch.full_like(tables, kc.shape[0])),  # blocks outside the cache
        dict(sliding_window=0),
        dict(backend="cuda"),
    ]
    args = dict(query=q, k_cache=kc, v_cache=vc, block_tables=tables, context_lens=clens)
    for override in bad:
        kw = {**args, **override}
        backend = kw.pop("backend", "cpu")
        window = kw.pop("sliding_window", None)
        with pytest.raises(ValueError):
            paged_attention(kw["query"], kw["k_cache"], kw["v_cache"], kw["block_tables"], kw["context_lens"],
                            sliding_window=window, backend=backend)
    with pytest.raises(ValueError, match="unit-stride"):
        paged_attention(q, kc.transpose(2, 3).contiguous().transpose(2, 3), vc, tables, clens, backend="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_backends_match_sdpa(backend, dtype):
    import importlib.util

    block_size = 256 if backend == "flash" else 16
    if backend == "flash" and (importlib.util.find_spec("flash_attn") is None or dtype == torch.float32):
        pytest.skip("flash-attn not installed / no float32 support")
    lens = [300, 1, 513, 0, 77] if block_size == 256 else [33, 1, 64, 0, 17]
    q, kc, vc, tables, clens, ks, vs = make_case(lens, 8, 2, 64, block_size, dtype, device="cuda")
    out = paged_attention(q, kc, vc, tables, clens, backend=backend).cpu()
    assert_close_to_sdpa(out, q.cpu(), ks, vs)
    windowed = paged_attention(q, kc, vc, tables, clens, sliding_window=20, backend=backend).cpu()
    assert_close_to_sdpa(windowed, q.cpu(), ks, vs, window=20)
