"""sipo_fast.ops.token_logprobs (chunked torch and Triton backends) against the plain-torch reference.

Tolerance rule (flash-attention's): a backend's error against a float64 reference on the same (rounded) inputs
must be at most twice the error of torch's own computation in the same precision, plus a tiny floor.
Triton runs on CPU tensors through TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
"""
import pytest
import torch

from sipo_fast.ops.logprobs import default_chunk_size, token_logprobs, token_logprobs_ref

BACKENDS = ["cpu", "triton"]
SHAPES = [(1, 16, 17), (37, 48, 1003), (6, 32, 49152 + 3)]  # (M, H, V): tiny, odd, SmolLM2's vocabulary + 3


def _inputs(M, H, V, dtype, *, seed=0, ignore_every=0, bias=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(M, H, generator=g) * 2).to(dtype=dtype, device=device)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype=dtype, device=device)
    b = torch.randn(V, generator=g).to(dtype=dtype, device=device) if bias else None
    y = torch.randint(0, V, (M,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, b, y.to(device)


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,H,V", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_reference_within_tolerance_rule(backend, M, H, V, dtype):
    h, w, b, y = _inputs(M, H, V, dtype, ignore_every=5, bias=(V == 1003))
    exact = token_logprobs_ref(*_f64(h, w), y, bias=None if b is None else b.double())
    torch_err = _max_err(token_logprobs_ref(h, w, y, bias=b), exact)
    out = token_logprobs(h, w, y, bias=b, backend=backend)
    assert out.dtype == torch.float32 and out.shape == y.shape
    assert _max_err(out, exact) <= 2 * torch_err + 1e-6
    assert torch.all(out[y == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_give_float64_exact_results(backend):
    h, w, b, y = _inputs(9, 24, 301, torch.float64, bias=True, ignore_every=4)
    out = token_logprobs(h, w, y, bias=b, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, token_logprobs_ref(h, w, y, bias=b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,V", [(False, 1003), (True, 1003), (False, 49152 + 3)])
def test_gradients_match_reference_with_non_unit_upstream_grad(backend, bias, V):
    h, w, b, y = _inputs(23, 40, V, torch.float32, bias=bias, ignore_every=3)
    leaves = [t.requires_grad_() for t in (h, w, b) if t is not None]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    fast = torch.autograd.grad((token_logprobs(h, w, y, bias=b, backend=backend, chunk_size=6) * g).sum(), leaves)
    ref = torch.autograd.grad((token_logprobs_ref(h, w, y, bias=b) * g).sum(), leaves)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    assert torch.all(fast[0][y == -100] == 0)  # ignored rows get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_gradients_within_tolerance_rule(backend):
    h, w, _, y = _inputs(16, 32, 2053, torch.bfloat16, ignore_every=7)
    h64, w64 = (t.double().requires_grad_() for t in (h, w))
    exact = torch.autograd.grad(token_logprobs_ref(h64, w64, y).sum(), [h64, w64])
    hb, wb = (t.clone().requires_grad_() for t in (h, w))
    torch_g = torch.autograd.grad(token_logprobs_ref(hb, wb, y).sum(), [hb, wb])
    hf, wf = (t.clone().requires_grad_() for t in (h, w))
    fast_g = torch.autograd.grad(token_logprobs(hf, wf, y, backend=backend).sum(), [hf, wf])
    for fg, tg, eg in zip(fast_g, torch_g, exact):
        assert fg.dtype == torch.bfloat16
        assert _max_err(fg, eg) <= 2 * _max_err(tg, eg) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    h, w, b, y = _inputs(4, 16, 19, torch.float64, bias=True, ignore_every=3)
    fn = lambda h_, w_, b_: token_logprobs(h_, w_, y, bias=b_, backend=backend, chunk_size=2)  # noqa: E731
    args = [t.requires_grad_() for t in (h, w, b)]
    # fast_mode checks a random projection of the Jacobian: the full check costs ~700 interpreted launches
    assert torch.autograd.gradcheck(fn, args, fast_mode=(backend == "triton"))


def test_gradcheck_float64_frozen_head():
    """The chunked path's eager d/dhidden (frozen weight and bias) under gradcheck."""
    h, w, b, y = _inputs(5, 16, 23, torch.float64, bias=True, ignore_every=2)
    fn = lambda h_: token_logprobs(h_, w, y, bias=b, backend="cpu", chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [h.requires_grad_()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_input_with_all_ignored_rows(backend):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 7, 32, generator=g, requires_grad=True)
    w = torch.randn(517, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 517, (3, 7), generator=g)
    y[1] = -100  # a whole sequence ignored (e.g. an all-padding row)
    y[2, :4] = -100
    out = token_logprobs(h, w, y, backend=backend)
    assert out.shape == (3, 7)
    assert torch.all(out[1] == 0) and torch.all(out[2, :4] == 0)
    torch.testing.assert_close(out, token_logprobs_ref(h, w, y), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.all(h.grad[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_ignored_is_a_differentiable_zero(backend):
    h = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(33, 16, requires_grad=True)
    y = torch.full((2, 5), -100)
    out = token_logprobs(h, w, y, backend=backend)
    assert torch.all(out == 0)
    out.sum().backward()  # must not raise: an all-masked micro-batch still backpropagates
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(48, 13, generator=g).t()  # (13, 48), column-major
    w_big = torch.randn(1003, 96, generator=g) / 7
    w = w_big[:, ::2]  # (1003, 48), stride 2 along H
    y = torch.randint(0, 1003, (13, 2), generator=g)[:, 0]  # stride 2
    assert not (h.is_contiguous() or w.is_contiguous() or y.is_contiguous())
    out = token_logprobs(h, w, y, backend=backend)
    torch.testing.assert_close(out, token_logprobs_ref(h.contiguous(), w.contiguous(), y.contiguous()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
def test_chunk_size_does_not_change_the_result(chunk):
    h, w, b, y = _inputs(37, 24, 1003, torch.float32, bias=True, ignore_every=6)
    torch.testing.assert_close(token_logprobs(h, w, y, bias=b, chunk_size=chunk, backend="cpu"),
                               token_logprobs_ref(h, w, y, bias=b), rtol=1e-5, atol=1e-5)


def test_chunked_path_never_builds_more_than_chunk_rows_of_logits(monkeypatch):
    """The memory claim itself: every logits block the chunked path builds has at most chunk_size rows, and all
    blocks live in one reused buffer of chunk_size rows."""
    import sipo_fast.ops.logprobs as mod

    seen = []
    real = mod._logits_into

    def spy(buf, h, w, b):
        seen.append((buf.shape[0], h.shape[0], buf.data_ptr()))
        return real(buf, h, w, b)

    monkeypatch.setattr(mod, "_logits_into", spy)
    h, w, _, y = _inputs(50, 16, 999, torch.float32)
    h.requires_grad_(), w.requires_grad_()
    token_logprobs(h, w, y, chunk_size=8, backend="cpu").sum().backward()
    assert len(seen) == 2 * 7  # 7 chunks of <= 8 rows, forward and backward (recomputed)
    assert all(buf_rows == 8 and rows <= 8 for buf_rows, rows, _ in seen)
    assert len({ptr for *_, ptr in seen[:7]}) == 1  # one buffer for the whole forward
    seen.clear()
    w.requires_grad_(False)  # frozen head: d/dh is formed in the forward, the backward recomputes nothing
    token_logprobs(h, w, y, chunk_size=8, backend="cpu").sum().backward()
    assert len(seen) == 7 and all(rows <= 8 for _, rows, _ in seen)


def test_default_chunk_size_bounds_the_logits_block():
    assert default_chunk_size(10_000, 49155) * 49155 <= (1 << 25)
    assert default_chunk_size(3, 49155) == 16  # never below 16 rows
    assert default_chunk_size(100, 50) == 100  # small vocabularies: one chunk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_gradient(backend, dtype):
    """LoRA trains the backbone under a frozen LM head: only d/dhidden is needed (the chunked path forms it in the
    forward). Checked against the reference with a non-unit upstream gradient, within the tolerance rule."""
    h, w, b, y = _inputs(29, 40, 1003, dtype, bias=True, ignore_every=4)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    h64 = h.double().requires_grad_()
    exact = torch.autograd.grad((token_logprobs_ref(h64, w.double(), y, bias=b.double()) * g).sum(), h64)[0]
    ht = h.clone().requires_grad_()
    torch_g = torch.autograd.grad((token_logprobs_ref(ht, w, y, bias=b) * g).sum(), ht)[0]
    hf = h.clone().requires_grad_()
    out = token_logprobs(hf, w, y, bias=b, backend=backend, chunk_size=8)
    fast_g = torch.autograd.grad((out * g).sum(), hf)[0]
    assert fast_g.dtype == dtype and torch.all(fast_g[y == -100] == 0)
    assert _max_err(fast_g, exact) <= 2 * _max_err(torch_g, exact) + 1e-6
    assert w.grad is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=torch.tensor([0, 500])), "labels must lie in"),
    (dict(labels=torch.tensor([0, -1])), "labels must lie in"),
    (dict(labels=torch.tensor([0, 1, 2])), "labels shape"),
    (dict(labels=torch.tensor([0.0, 1.0])), "int64"),
    (dict(weight=torch.randn(100, 9)), "hidden size mismatch"),
    (dict(weight=torch.randn(100, 8, dtype=torch.float64)), "share one floating dtype"),
    (dict(bias=torch.randn(99)), "bias must be"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(backend="cuda"), "backend="),
    (dict(hidden=torch.randn(8)), "hidden must be"),
])
def test_bad_input_raises_value_error(kwargs, match):
    args = dict(hidden=torch.randn(2, 8), weight=torch.randn(100, 8), labels=torch.tensor([0, 99]))
    args.update(kwargs)
    h, w, y = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        token_logprobs(h, w, y, **args)


# ---- on a GPU (benchmarks/gpu_check.sh) ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,H,V", [(37, 64, 49155), (512, 576, 49152)])
def test_gpu_triton_forward_and_backward(dtype, M, H, V):
    h, w, _, y = _inputs(M, H, V, dtype, ignore_every=5, device="cuda")
    exact = token_logprobs_ref(*_f64(h, w), y)
    assert _max_err(token_logprobs(h, w, y), exact) <= 2 * _max_err(token_logprobs_ref(h, w, y), exact) + 1e-6
    h64, w64 = (t.double().requires_grad_() for t in (h, w))
    ex_g = torch.autograd.grad(token_logprobs_ref(h64, w64, y).sum(), [h64, w64])
    ht, wt = (t.clone().requires_grad_() for t in (h, w))
    t_g = torch.autograd.grad(token_logprobs_ref(ht, wt, y).sum(), [ht, wt])
    hf, wf = (t.clone().requires_grad_() for t in (h, w))
    f_g = torch.autograd.grad(token_logprobs(hf, wf, y).sum(), [hf, wf])  # auto: Triton on CUDA
    for fg, tg, eg in zip(f_g, t_g, ex_g):
        assert _max_err(fg, eg) <= 2 * _max_err(tg, eg) + 1e-6
