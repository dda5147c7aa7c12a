"""MOD mix / sample ops: every backend against the plain-torch reference, the reference against the
definition (SIPO.md §2), and the sampling law against the exact distribution.

Triton runs here on CPU tensors through the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
interpreter cases keep B·V small except one at the real vocabulary size (49152 + 3)."""
from __future__ import annotations

import math

import pytest
import torch

from sipo_fast.ops import mod_filter_threshold, mod_mix, mod_mix_ref, mod_sample, mod_sample_ref

BACKENDS = ["cpu", "triton"]
V_ODD = 49152 + 3


def _inputs(n, b, v, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, b, v, generator=g) * scale).to(dtype)
    w = torch.softmax(torch.randn(b, n, generator=g), dim=-1)
    return logits, w


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------- reference = definition
def test_mix_ref_matches_definition_with_policy_logprobs():
    """SIPO.md §2 mixes log π_i = log_softmax(l_i); the reference mixes raw logits. Both must give the
    same normalised distribution, since the per-policy constants cancel after renormalising."""
    logits, w = _inputs(3, 4, 50, dtype=torch.float64)
    definition = torch.log_softmax(sum(w[:, i:i + 1] * torch.log_softmax(logits[i], -1) for i in range(3)), -1)
    torch.testing.assert_close(mod_mix_ref(logits, w).double(), definition, atol=1e-5, rtol=1e-5)


def test_sample_ref_logprobs_are_each_policys_own():
    """token_logprobs[b, i] = log_softmax(l_i)[b, tok_b], whatever the weights."""
    logits, w = _inputs(2, 5, 40)
    tok, lp = mod_sample_ref(logits, w, do_sample=False)
    for i in range(2):
        expect = torch.log_softmax(logits[i], -1)[torch.arange(5), tok]
        torch.testing.assert_close(lp[:, i], expect)


def test_greedy_one_hot_weight_is_that_policys_argmax():
    logits, _ = _inputs(3, 6, 31)
    w = torch.tensor([0.0, 1.0, 0.0])
    tok, _ = mod_sample_ref(logits, w, do_sample=False)
    assert torch.equal(tok, logits[1].argmax(-1))


# -------------------------------------------------------------------------------------- mix: backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,b,v", [(1, 1, 7), (2, 3, 1000), (4, 5, 2500), (3, 64, 131)])
def test_mix_matches_ref(backend, dtype, n, b, v):
    logits, w = _inputs(n, b, v, dtype)
    out = mod_mix(logits, w, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (b, v)
    torch.testing.assert_close(out, mod_mix_ref(logits, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mix_torch_path_is_bit_identical_to_ref(dtype):
    """The CPU fast path promises the reference's exact arithmetic (so float32 decoding matches a float32
    reference exactly), zero weights included."""
    logits, w = _inputs(3, 9, 777, dtype)
    w[2] = torch.tensor([0.0, 0.25, 0.75])
    logits[0, 2, :10] = float("-inf")
    assert torch.equal(mod_mix(logits, w, backend="cpu"), mod_mix_ref(logits, w))


def test_mix_triton_multi_block_merge():
    """Small blocks force the cross-block log-sum-exp merge on a small vocabulary."""
    from sipo_fast.kernels.mod_sample import mod_mix_triton

    logits, w = _inputs(3, 4, 301)
    torch.testing.assert_close(mod_mix_triton(logits, w, block_v=64), mod_mix_ref(logits, w), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- greedy: backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,b,v", [(1, 1, 5), (2, 7, 1000), (4, 3, 2500), (2, 64, 257)])
def test_greedy_matches_ref(backend, dtype, n, b, v):
    logits, w = _inputs(n, b, v, dtype)
    tok, lp = mod_sample(logits, w, do_sample=False, backend=backend)
    rtok, rlp = mod_sample_ref(logits, w, do_sample=False)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and lp.shape == (b, n)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp, **_tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_real_vocabulary_odd_size(backend):
    logits, w = _inputs(2, 2, V_ODD, torch.bfloat16)
    logits[0, 1, V_ODD - 1] = 40.0  # winner in the ragged last block
    logits[1, 1, V_ODD - 1] = 40.0
    tok, lp = mod_sample(logits, w, do_sample=False, backend=backend)
    rtok, rlp = mod_sample_ref(logits, w, do_sample=False)
    assert tok[1] == V_ODD - 1
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_pick_first_index_across_blocks(backend):
    from sipo_fast.kernels.mod_sample import mod_sample_triton

    logits = torch.zeros(2, 2, 300)
    logits[:, 0, [70, 250]] = 5.0  # tie in two different blocks of 64
    logits[:, 1, [3, 4]] = 5.0  # tie inside one block
    w = torch.tensor([0.5, 0.5])
    if backend == "triton":
        tok, _ = mod_sample_triton(logits, w.expand(2, 2), do_sample=False, block_v=64)
    else:
        tok, _ = mod_sample(logits, w, do_sample=False, backend=backend)
    assert tok.tolist() == [70, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_per_row_and_broadcast_agree(backend):
    logits, _ = _inputs(2, 4, 200)
    w = torch.tensor([0.3, 0.7])
    a = mod_sample(logits, w, do_sample=False, backend=backend)
    b = mod_sample(logits, w.expand(4, 2).clone(), do_sample=False, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS + ["ref"])
def test_zero_weight_ignores_masked_policy(backend):
    """A policy at weight 0 that masks tokens with −inf must not poison the mix (0·(−inf) = NaN)."""
    logits, _ = _inputs(2, 3, 100)
    logits[1, :, :50] = float("-inf")
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    mix = mod_mix(logits, w, backend=backend)
    assert torch.isfinite(mix[:2]).all()
    torch.testing.assert_close(mix[:2], torch.log_softmax(logits[0, :2], -1))
    assert torch.isinf(mix[2, :50]).all() and torch.isfinite(mix[2, 50:]).all()
    tok, lp = mod_sample(logits, w, do_sample=False, backend=backend)
    assert torch.equal(tok[:2], logits[0, :2].argmax(-1)) and tok[2] >= 50
    assert not torch.isnan(lp).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    base = torch.randn(5, 3, 2 * 300, generator=torch.Generator().manual_seed(1)) * 3  # [B, N, 2V]
    logits = base.transpose(0, 1)[..., ::2]  # [N, B, V], strided in every dim
    assert not logits.is_contiguous()
    w = torch.softmax(torch.randn(5, 3), -1)
    tok, lp = mod_sample(logits, w, do_sample=False, backend=backend)
    rtok, rlp = mod_sample_ref(logits.contiguous(), w, do_sample=False)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp)
    torch.testing.assert_close(mod_mix(logits, w, backend=backend), mod_mix_ref(logits.contiguous(), w))


# ------------------------------------------------------------------ sampling with explicit noise: exact
FILTERS = [dict(), dict(temperature=0.5), dict(temperature=2.0, top_k=5), dict(top_p=0.9),
           dict(temperature=0.7, top_k=50, top_p=0.8), dict(top_k=1), dict(top_p=1e-6), dict(top_k=10_000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", FILTERS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_same_noise_same_tokens(backend, kw, dtype):
    logits, w = _inputs(3, 6, 1500, dtype)
    u = torch.rand(6, 1500, generator=torch.Generator().manual_seed(7))
    tok, lp = mod_sample(logits, w, uniform=u, backend=backend, **kw)
    rtok, rlp = mod_sample_ref(logits, w, uniform=u, **kw)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp)


def test_sampling_real_vocabulary_triton_with_filters():
    logits, w = _inputs(2, 2, V_ODD)
    u = torch.rand(2, V_ODD, generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.8, top_k=40, top_p=0.9)
    tok, lp = mod_sample(logits, w, uniform=u, backend="triton", **kw)
    rtok, rlp = mod_sample_ref(logits, w, uniform=u, **kw)
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(lp, rlp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_one_and_tiny_top_p_are_greedy(backend):
    logits, w = _inputs(2, 8, 300)
    greedy = mod_sample_ref(logits, w, do_sample=False)[0]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(mod_sample(logits, w, top_k=1, temperature=5.0, generator=g, backend=backend)[0], greedy)
    assert torch.equal(mod_sample(logits, w, top_p=1e-6, temperature=5.0, generator=g, backend=backend)[0], greedy)


def _exact_law(z: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(z/τ) restricted by top-k then top-p, computed by sorting (independently of the op)."""
    p = torch.softmax(z.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    k = top_k if top_k > 0 else len(p)
    kept = order[:k]
    q = p[kept] / p[kept].sum()
    mass = 0.0
    for idx, prob in zip(kept.tolist(), q.tolist()):
        keep[idx] = True
        mass += prob
        if mass >= top_p:
            break
    out = torch.where(keep, p, torch.zeros_like(p))
    return out / out.sum()


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    nz = probs > 0
    assert counts[~nz].sum() == 0, "sampled a token outside the allowed set"
    expected = probs[nz] * counts.sum()
    return float(chisquare(counts[nz].double().numpy(), expected.numpy()).pvalue)


LAWS = [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 4, 1.0), (1.0, 0, 0.75), (0.8, 6, 0.9)]


# The interpreter runs one Triton program per row, about 50 ms each: one law with fewer draws there.
LAW_CASES = [(b, *law) for b in ("cpu", "ref") for law in LAWS] + [("triton", *LAWS[3])]


@pytest.mark.parametrize("backend,temperature,top_k,top_p", LAW_CASES)
def test_sampling_law_chi_square(backend, temperature, top_k, top_p):
    """Sample one row many times (the row repeated B times in one call) and compare the frequencies with
    the exact law. The same counts must reject a wrong law (the temperature 1.5× too high), so the test
    has the power to fail."""
    from scipy.stats import chisquare

    n, v, b = 2, 12, 4000 if backend != "triton" else 200
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(n, 1, v, generator=g) * 1.5).expand(n, b, v)
    w = torch.tensor([0.3, 0.7])
    tok, _ = mod_sample(logits, w, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(123), backend=backend)
    counts = torch.bincount(tok, minlength=v)
    law = _exact_law(0.3 * logits[0, 0] + 0.7 * logits[1, 0], temperature, top_k, top_p)
    assert _chi2_pvalue(counts, law) > 1e-3
    wrong = _exact_law(0.3 * logits[0, 0] + 0.7 * logits[1, 0], temperature * 1.5, top_k, top_p)
    support = (law > 0) | (wrong > 0)
    expected = (wrong[support] * b).clamp(min=1e-3)  # a token the wrong law forbids but we drew rejects it
    assert chisquare(counts[support].double().numpy(), expected.numpy(), sum_check=False).pvalue < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_sampling_is_reproducible(backend):
    logits, w = _inputs(2, 4, 3000)
    draw = lambda s: mod_sample(logits, w, temperature=1.0, generator=torch.Generator().manual_seed(s),  # noqa: E731
                                backend=backend)[0]
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_filter_threshold_keeps_top_k_ties():
    scaled = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert mod_filter_threshold(scaled, top_k=2).item() == 2.0  # ties with the 2nd are kept, as in transformers
    assert mod_filter_threshold(scaled, top_k=0, top_p=1.0) is None
    assert mod_filter_threshold(scaled, top_k=5) is None


def test_filter_threshold_top_p_arithmetic():
    """probs = softmax(log [0.5, 0.3, 0.15, 0.05]); mass strictly above each token: 0, 0.5, 0.8, 0.95.
    top_p=0.8 keeps mass-above < 0.8 → the first two (0.5 + 0.3 = 0.8 reaches top_p); top_p=0.81 → three."""
    scaled = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert mod_filter_threshold(scaled, top_p=0.8).item() == pytest.approx(math.log(0.3), rel=1e-5)
    assert mod_filter_threshold(scaled, top_p=0.81).item() == pytest.approx(math.log(0.15), rel=1e-5)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,match", [
    (dict(weights=torch.tensor([0.5, 0.6])), "sum to 1"),
    (dict(weights=torch.tensor([1.5, -0.5])), "non-negative"),
    (dict(weights=torch.tensor([0.2, 0.3, 0.5])), "N=2"),
    (dict(weights=torch.full((3, 2), 0.5)), "rows"),
    (dict(weights=torch.tensor([float("nan"), 1.0])), "NaN"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(backend="cuda"), "backend"),
    (dict(uniform=torch.rand(4, 9)), "uniform"),
])
def test_errors(kw, match):
    logits = torch.randn(2, 4, 10)
    kw = {"weights": torch.tensor([0.5, 0.5]), **kw}
    with pytest.raises(ValueError, match=match):
        mod_sample(logits, **kw)


def test_error_bad_logits_shape():
    with pytest.raises(ValueError, match=r"\[N, B, V\]"):
        mod_mix(torch.randn(4, 10), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="floating"):
        mod_mix(torch.ones(1, 4, 10, dtype=torch.long), torch.tensor([1.0]))


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 64])
def test_cuda_kernels_match_ref(dtype, b):
    logits, w = _inputs(4, b, V_ODD, dtype)
    u = torch.rand(b, V_ODD, generator=torch.Generator().manual_seed(0))
    cl, cw, cu = logits.cuda(), w.cuda(), u.cuda()
    torch.testing.assert_close(mod_mix(cl, cw).cpu(), mod_mix_ref(logits, w), atol=1e-4, rtol=1e-5)
    for kw in (dict(do_sample=False), dict(uniform=u), dict(uniform=u, temperature=0.7, top_k=50, top_p=0.9)):
        tok, lp = mod_sample(cl, cw, **{k: (cu if k == "uniform" else v) for k, v in kw.items()})
        rtok, rlp = mod_sample_ref(logits, w, **kw)
        assert torch.equal(tok.cpu(), rtok)
        torch.testing.assert_close(lp.cpu(), rlp, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_sampling_law():
    from scipy.stats import chisquare  # noqa: F401

    g = torch.Generator().manual_seed(11)
    b, v = 20000, 12
    logits = (torch.randn(2, 1, v, generator=g) * 1.5).expand(2, b, v).contiguous().cuda()
    w = torch.tensor([0.3, 0.7], device="cuda")
    tok, _ = mod_sample(logits, w, temperature=0.8, top_k=6, top_p=0.9, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(tok.cpu(), minlength=v)
    z = (0.3 * logits[0, 0] + 0.7 * logits[1, 0]).cpu()
    assert _chi2_pvalue(counts, _exact_law(z, 0.8, 6, 0.9)) > 1e-3
