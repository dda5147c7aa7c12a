"""The captured decode step (MODDecoder(kv_cache="static")): the lean forward and fixed-slot step against the
step-by-step full-recompute reference and the eager paths, its Triton ops under the interpreter, padded row
buckets, finished-row checks every k steps, path resolution, and on CUDA the graph replay itself."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import random_lora_b
from test_mod_decoder import W4, _batch, _policies, reference_generate

from sipo_fast import MODDecoder
from sipo_fast.decoding.capture import CapturedDecoding, bucket
from sipo_fast.decoding.paths import resolve_kv_cache
from sipo_fast.decoding.static import LeanPolicies, unsupported_reason
from sipo_fast.models import tiny


def _lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _policies("llama", tokenizer, n=1)[0]
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "down_proj"]), adapter_name="pol_a")
    pm.add_adapter("pol_b", LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["k_proj", "o_proj", "up_proj"]))
    return random_lora_b(pm)


def test_bucket_sizes():
    assert [bucket(r) for r in (1, 8, 9, 16, 17, 64, 65)] == [8, 8, 16, 16, 32, 64, 128]


def test_lora_adapters_equal_merged_models_on_the_static_path(tokenizer):
    """N adapters over one base (one forward over N·R rows) against each adapter merged into its own model,
    decoded step by step with full recompute."""
    pm = _lora_model(tokenizer)
    merged = []
    for name in ["pol_b", "pol_a"]:
        pm.set_adapter(name)
        merged.append(copy.deepcopy(pm).merge_and_unload())
    ids, mask = _batch(tokenizer)
    out = MODDecoder(pm, tokenizer, adapter_names=["pol_b", "pol_a"], kv_cache="static").generate(
        ids, mask, weights=W4, max_new_tokens=10)
    seq, lps = reference_generate(merged, ids, mask, W4, 10, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(out.logprobs, lps, atol=1e-4, rtol=1e-5)


def test_sliding_window_matches_transformers(tokenizer):
    """Mistral with a window shorter than the prompts: prefill and decode attention must drop the same keys
    as transformers' own sliding-window attention (full recompute reference)."""
    models = []
    for seed in range(2):
        m, _ = tiny("mistral", tokenizer=tokenizer, seed=seed, tie_word_embeddings=False)
        m.config.sliding_window = 3
        m = type(m)(m.config)  # rebuild so every layer takes the window
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.2)
        models.append(m.eval())
    ids, mask = _batch(tokenizer)
    out = MODDecoder(models, tokenizer, kv_cache="static").generate(ids, mask, weights=W4, max_new_tokens=8)
    seq, lps = reference_generate(models, ids, mask, W4, 8, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(out.logprobs, lps, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_triton_ops_under_the_interpreter_give_the_same_tokens(lora, tokenizer):
    """The ops the CUDA step runs (Triton norm, rope + cache write, attention, sampler), here through the
    Triton interpreter, against the torch step."""
    pol = _lora_model(tokenizer) if lora else _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer)
    dec = MODDecoder(pol, tokenizer, kv_cache="static")
    want = dec.generate(ids, mask, weights=W4, max_new_tokens=5)
    lean = LeanPolicies(peft_model=dec.models[0], adapter_names=dec.adapter_names, backend="triton") if lora \
        else LeanPolicies(models=dec.models, backend="triton")
    dec.runner = CapturedDecoding(lean, capture=False, sample_backend="triton")
    got = dec.generate(ids, mask, weights=W4, max_new_tokens=5)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-4, rtol=1e-5)


def test_padded_bucket_and_sparse_finish_checks_change_nothing(tokenizer):
    """Rows padded up to a bucket (as on CUDA) and all-finished checks every 4 steps instead of every step:
    padding rows start finished and finished rows emit padding, so the result is the same."""
    models = _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer)
    dec = MODDecoder(models, tokenizer, kv_cache="static")
    free = dec.generate(ids, mask, weights=W4, max_new_tokens=9, eos_token_id=[])
    eos = [int(free.generated[0, 1]), int(free.generated[2, 4])]  # rows 0 and 2 stop early
    want = dec.generate(ids, mask, weights=W4, max_new_tokens=9, eos_token_id=eos, pad_token_id=5)
    dec.runner = CapturedDecoding(dec.runner.policies, capture=False, check_every=4, pad_rows=True)
    got = dec.generate(ids, mask, weights=W4, max_new_tokens=9, eos_token_id=eos, pad_token_id=5)
    assert dec.runner.policies.rows == 8  # 4 rows -> bucket of 8
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.num_generated, want.num_generated)
    assert torch.equal(got.finished, want.finished) and got.finished[0]
    torch.testing.assert_close(got.logprobs, want.logprobs)
    seq, lps = reference_generate(models, ids, mask, W4, 9, eos, 5)
    assert torch.equal(got.sequences, seq[:, : got.sequences.shape[1]])


def test_sampling_on_the_static_path_is_seeded_and_matches_the_dynamic_path(tokenizer):
    """On CPU the static step draws its noise from the generator exactly like the other paths, so while no
    row finishes the sampled tokens are the same."""
    models = _policies("qwen2", tokenizer)
    ids, mask = _batch(tokenizer)
    kw = dict(weights=W4, max_new_tokens=8, do_sample=True, temperature=1.3, top_k=50, top_p=0.9, eos_token_id=[])
    a = MODDecoder(models, tokenizer, kv_cache="static").generate(ids, mask, seed=3, **kw)
    b = MODDecoder(models, tokenizer, kv_cache="dynamic", dedupe=False).generate(ids, mask, seed=3, **kw)
    c = MODDecoder(models, tokenizer, kv_cache="static").generate(ids, mask, seed=4, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-5)
    assert not torch.equal(a.sequences, c.sequences)


def test_buffers_are_reused_across_calls_and_grow_when_needed(tokenizer):
    models = _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer)
    dec = MODDecoder(models, tokenizer, kv_cache="static")
    a = dec.generate(ids, mask, weights=W4, max_new_tokens=4)
    caches = dec.runner.policies.caches[0]
    b = dec.generate(ids, mask, weights=W4, max_new_tokens=4)
    assert dec.runner.policies.caches[0] is caches and torch.equal(a.sequences, b.sequences)
    long = dec.generate(ids, mask, weights=W4, max_new_tokens=80)  # needs wider caches
    assert dec.runner.policies.width >= ids.shape[1] + 80
    assert torch.equal(long.sequences[:, : a.sequences.shape[1]], a.sequences)


def test_path_resolution_warns_once_and_falls_back(tokenizer):
    gpt2, _ = tiny("gpt2", tokenizer=tokenizer)
    llama, _ = tiny("llama", tokenizer=tokenizer)
    assert "gpt2" in unsupported_reason(gpt2) and unsupported_reason(llama) is None
    assert resolve_kv_cache("auto", llama, torch.device("cuda")) == "static"
    with pytest.warns(RuntimeWarning, match="not using the 'static' path"):
        assert resolve_kv_cache("auto", gpt2, torch.device("cuda")) == "dynamic"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason is not repeated
        resolve_kv_cache("auto", gpt2, torch.device("cuda"))
    with pytest.raises(ValueError, match="kv_cache='static' cannot be used: model type 'gpt2'"):
        MODDecoder([gpt2, gpt2], tokenizer, kv_cache="static")
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        resolve_kv_cache("graph", llama, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.gpu


@cuda
@pytest.mark.parametrize("lora", [False, True])
def test_cuda_graph_replay_equals_eager_and_reference_in_float32(lora, tokenizer):
    pol = _lora_model(tokenizer) if lora else _policies("llama", tokenizer)
    pol = pol.cuda() if lora else [m.cuda() for m in pol]
    ids, mask = (x.cuda() for x in _batch(tokenizer))
    w = W4.cuda()
    graph = MODDecoder(pol, tokenizer)
    assert graph.kv_cache == "static" and graph.runner.capture
    eager = MODDecoder(pol, tokenizer, kv_cache="static", cuda_graph=False)
    dyn = MODDecoder(pol, tokenizer, kv_cache="dynamic")
    a = graph.generate(ids, mask, weights=w, max_new_tokens=12)
    b = eager.generate(ids, mask, weights=w, max_new_tokens=12)
    c = dyn.generate(ids, mask, weights=w, max_new_tokens=12)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, c.sequences)
    torch.testing.assert_close(a.logprobs, c.logprobs, atol=1e-4, rtol=1e-5)
    assert graph.runner.stats["captures"] == 1 and graph.runner.stats["replays"] > 0
    graph.generate(ids, mask, weights=w, max_new_tokens=12)
    assert graph.runner.stats["captures"] == 1  # same bucket: the graph is reused


@cuda
def test_cuda_graph_sampling_is_seeded_and_bf16_runs(tokenizer):
    models = [m.cuda() for m in _policies("qwen2", tokenizer)]
    ids, mask = (x.cuda() for x in _batch(tokenizer))
    dec = MODDecoder(models, tokenizer, compute_dtype=torch.bfloat16)
    kw = dict(weights=W4.cuda(), max_new_tokens=16, do_sample=True, temperature=1.2, top_p=0.9, eos_token_id=[])
    a, b = dec.generate(ids, mask, seed=1, **kw), dec.generate(ids, mask, seed=1, **kw)
    c = dec.generate(ids, mask, seed=2, **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert torch.isfinite(a.logprobs).all() and (a.num_generated == 16).all()


def test_auto_falls_back_when_the_captured_step_fails_on_first_use(tokenizer, monkeypatch):
    """kv_cache="auto" never ends in a failure the next path would not have: a captured step that raises on its
    first call (say a GPU library it was never run against) warns once and the call is served by the next
    path; an explicit kv_cache="static" raises instead."""
    models = _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer)
    want = MODDecoder(models, tokenizer, kv_cache="dynamic").generate(ids, mask, weights=W4, max_new_tokens=6)
    for requested in ("auto", "static"):
        dec = MODDecoder(models, tokenizer, kv_cache="static")
        dec._requested_kv = requested

        def broken(*args, **kwargs):
            raise RuntimeError("no kernel image is available for execution on the device")

        monkeypatch.setattr(dec.runner, "run", broken)
        if requested == "static":
            with pytest.raises(RuntimeError, match="no kernel image"):
                dec.generate(ids, mask, weights=W4, max_new_tokens=6)
            continue
        with pytest.warns(RuntimeWarning, match="captured decode step failed on its first call"):
            got = dec.generate(ids, mask, weights=W4, max_new_tokens=6)
        assert dec.kv_cache in ("paged", "dynamic") and torch.equal(got.sequences, want.sequences)
