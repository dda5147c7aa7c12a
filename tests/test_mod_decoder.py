"""MODDecoder against a plain step-by-step reference (full recompute, no cache, batch as given), on tiny
random models of four architectures, with ragged left padding, EOS, seeds, LoRA adapters and errors."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from sipo_fast import MODDecoder
from sipo_fast.data.formatting import encode_prompts, left_pad
from sipo_fast.models import tiny
from sipo_fast.ops import mod_sample_ref

PROMPTS = ["Hello there", "Write a short poem about the sea, please.", "Hi", "Why is the sky blue?"]


def _policies(arch, tokenizer, n=2, scale=4.0):
    """N tiny models of one architecture with different seeds. Their output layer is scaled up so the
    logits spread out (a fresh tiny model's logits are nearly flat, and near-ties make tests fragile)."""
    models = []
    for i in range(n):
        m, _ = tiny(arch, tokenizer=tokenizer, seed=i, tie_word_embeddings=False)
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(scale)
        models.append(m)
    return models


def _batch(tokenizer, prompts=PROMPTS, template="none"):
    """Left-padded prompts; raw text by default (the chat template's system prompt would triple every
    prompt's length and the reference's cost, and is covered by the text-prompt tests)."""
    return left_pad(encode_prompts(tokenizer, prompts, template), tokenizer.pad_token_id)


def reference_generate(models, ids, mask, weights, max_new_tokens, eos, pad, **sampling):
    """Step by step, full forward of every model on the whole sequence each step, mixing with
    mod_sample_ref; a finished row keeps being fed padding and its outputs are ignored."""
    b = ids.shape[0]
    seq, m = ids.clone(), mask.clone()
    done = torch.zeros(b, dtype=torch.bool)
    lps = torch.zeros(b, len(models))
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            logits = torch.stack([mod(input_ids=seq, attention_mask=m, position_ids=pos, logits_to_keep=1).logits[:, -1]
                                  for mod in models])
            tok, lp = mod_sample_ref(logits, weights, do_sample=False, **sampling)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            lps += torch.where(done[:, None], torch.zeros_like(lp), lp)
            new.append(tok)
            done |= torch.isin(tok, torch.tensor(eos))
            seq = torch.cat([seq, tok[:, None]], 1)
            m = torch.cat([m, torch.ones(b, 1, dtype=m.dtype)], 1)
            if done.all():
                break
    return seq, lps


W4 = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [1.0, 0.0]])


# kv_cache="auto" is the paged cache (sipo_fast.kv) for llama/qwen2/mistral when the extension is built, and
# transformers' DynamicCache with preallocated layers (sipo_fast.decoding.runners) otherwise; test both.
@pytest.mark.parametrize("arch,kv", [("llama", "auto"), ("llama", "dynamic"), ("qwen2", "auto"), ("mistral", "auto"),
                                     ("gpt2", "auto"), ("llama", "static"), ("qwen2", "static"),
                                     ("mistral", "static")])
def test_greedy_equals_step_by_step_reference(arch, kv, tokenizer):
    models = _policies(arch, tokenizer)
    ids, mask = _batch(tokenizer)
    assert (mask == 0).any()  # ragged left padding
    dec = MODDecoder(models, tokenizer, kv_cache=kv)
    out = dec.generate(ids, mask, weights=W4, max_new_tokens=10)
    seq, lps = reference_generate(models, ids, mask, W4, 10, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(out.logprobs, lps, atol=1e-4, rtol=1e-5)


def test_sweep_over_weights_of_one_prompt_shares_states(tokenizer):
    """One prompt at every weight of W (the SIPO sampling workload): rows share a state until their
    greedy choices part. Deduplicated and independent decoding must agree exactly."""
    models = _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer, ["Tell me something", "Tell me something", "Hi", "Tell me something"])
    w = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.3, 0.7], [1.0, 0.0]])
    a = MODDecoder(models, tokenizer, dedupe=True, kv_cache="dynamic").generate(ids, mask, weights=w, max_new_tokens=10)
    b = MODDecoder(models, tokenizer, dedupe=False, kv_cache="dynamic").generate(ids, mask, weights=w, max_new_tokens=10)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs)
    assert not torch.equal(a.generated[0], a.generated[3])  # the weights did change the outputs


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_eos_stops_row_and_pads(kv, tokenizer):
    """Take the 3rd token row 0 generates as the EOS id: row 0 must stop there, be padded after it, and
    its log-probs must be the sum over its first 3 tokens (prefix property of greedy decoding)."""
    models = _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer)
    dec = MODDecoder(models, tokenizer, kv_cache=kv)  # dynamic: rows leave the batch; static: keep their slot
    free = dec.generate(ids, mask, weights=W4, max_new_tokens=8, eos_token_id=[])
    eos = int(free.generated[0, 2])
    if (free.generated[0, :2] == eos).any():
        pytest.skip("row 0 repeats its 3rd token earlier; pick another prompt")
    pad = 7
    out = dec.generate(ids, mask, weights=W4, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    assert out.num_generated[0] == 3 and bool(out.finished[0])
    assert torch.equal(out.generated[0, :3], free.generated[0, :3])
    assert (out.generated[0, 3:] == pad).all()
    seq, lps = reference_generate(models, ids, mask, W4, 8, [eos], pad)
    assert torch.equal(out.sequences, seq[:, : out.sequences.shape[1]])
    torch.testing.assert_close(out.logprobs, lps, atol=1e-4, rtol=1e-5)
    assert out.generated_ids(0) == free.generated[0, :2].tolist()
    assert out.generated_ids(0, include_eos=True) == free.generated[0, :3].tolist()


def test_all_rows_finish_early_shortens_output(tokenizer):
    models = _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer)
    dec = MODDecoder(models, tokenizer)
    free = dec.generate(ids, mask, weights=W4, max_new_tokens=6, eos_token_id=[])
    firsts = free.generated[:, 0].tolist()
    out = dec.generate(ids, mask, weights=W4, max_new_tokens=6, eos_token_id=firsts)
    assert out.sequences.shape[1] == ids.shape[1] + 1
    assert out.finished.all() and (out.num_generated == 1).all()


@pytest.mark.parametrize("impl,kv", [("bmm", "dynamic"), ("peft", "dynamic"), ("bmm", "auto"), ("bmm", "static")])
def test_lora_adapters_equal_merged_separate_models(impl, kv, tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _policies("llama", tokenizer, n=1)[0]
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), adapter_name="helpful")
    pm.add_adapter("harmless", LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("unused", LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["q_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pm.eval()
    merged = []
    for name in ["harmless", "helpful"]:  # objective order differs from insertion order
        pm.set_adapter(name)
        merged.append(copy.deepcopy(pm).merge_and_unload())
    ids, mask = _batch(tokenizer)
    ref = MODDecoder(merged, tokenizer, kv_cache="dynamic").generate(ids, mask, weights=W4, max_new_tokens=10)
    dec = MODDecoder(pm, tokenizer, adapter_names=["harmless", "helpful"], lora_impl=impl, kv_cache=kv)
    out = dec.generate(ids, mask, weights=W4, max_new_tokens=10)
    assert dec.num_policies == 2
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-4, rtol=1e-5)


def test_sampling_seeded_and_backends_agree(tokenizer):
    models = _policies("qwen2", tokenizer)
    ids, mask = _batch(tokenizer, ["Same prompt"] * 3)
    kw = dict(weights=[0.5, 0.5], max_new_tokens=8, do_sample=True, temperature=1.5, top_k=100, top_p=0.95)
    dec = MODDecoder(models, tokenizer)
    a = dec.generate(ids, mask, seed=3, **kw)
    assert torch.equal(a.sequences, dec.generate(ids, mask, seed=3, **kw).sequences)
    assert not torch.equal(a.sequences, dec.generate(ids, mask, seed=4, **kw).sequences)
    # identical rows share a state but draw independently
    assert not (torch.equal(a.generated[0], a.generated[1]) and torch.equal(a.generated[1], a.generated[2]))
    ref = MODDecoder(models, tokenizer, sample_backend="ref", dedupe=False).generate(ids, mask, seed=3, **kw)
    assert torch.equal(a.sequences, ref.sequences)


def test_generate_text_batch_seeds_do_not_collide_across_calls(tokenizer):
    """Callers seed one call per weight with seed, seed + 1, ...; batch 1 of the call seeded s must not replay
    batch 0 of the call seeded s + 1 (it did when batch k was seeded with s + k)."""
    from sipo_fast.decoding.decoder import batch_seed

    assert batch_seed(None, 3) is None and batch_seed(7, 0) == 7
    assert len({batch_seed(s, k) for s in range(4) for k in range(4)}) == 16
    dec = MODDecoder(_policies("qwen2", tokenizer), tokenizer)
    kw = dict(weights=[0.5, 0.5], max_new_tokens=8, do_sample=True, temperature=1.5, batch_size=1, progress=False,
              template="none")
    first = dec.generate_text(["Same prompt"] * 2, seed=0, **kw)
    second = dec.generate_text(["Same prompt"] * 2, seed=1, **kw)
    assert first[1].token_ids != second[0].token_ids
    assert first[0].token_ids == dec.generate_text(["Same prompt"], seed=0, **kw)[0].token_ids


def test_bfloat16_path_logprobs_match_float32_scoring(tokenizer):
    """The bf16 decoder's reported log-probs must match float32 scoring of its own outputs within bf16
    tolerance, and the caller's float32 models must be left untouched."""
    models = _policies("llama", tokenizer)
    ids, mask = _batch(tokenizer)
    dec = MODDecoder(models, tokenizer, compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for m in models for p in m.parameters())
    out = dec.generate(ids, mask, weights=W4, max_new_tokens=8, eos_token_id=[])
    full = out.sequences
    fmask = torch.cat([mask, torch.ones(full.shape[0], full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    pos = (fmask.cumsum(-1) - 1).clamp(min=0)
    t = ids.shape[1]
    with torch.no_grad():
        scores = []
        for m in models:
            lp = torch.log_softmax(m(input_ids=full, attention_mask=fmask, position_ids=pos).logits[:, t - 1:-1], -1)
            scores.append(lp.gather(-1, full[:, t:, None]).squeeze(-1).sum(-1))
    torch.testing.assert_close(out.logprobs, torch.stack(scores, 1), atol=0.5, rtol=0.02)


def test_generate_text_order_batches_and_text(tokenizer):
    models = _policies("llama", tokenizer)
    dec = MODDecoder(models, tokenizer)
    w = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]])
    res = dec.generate_text(PROMPTS, weights=w, max_new_tokens=6, batch_size=3, progress=False, template="none")
    assert [r.prompt for r in res] == PROMPTS
    for i, r in enumerate(res):
        one = dec.generate_text([PROMPTS[i]], weights=w[i], max_new_tokens=6, progress=False, template="none")[0]
        assert r.token_ids == one.token_ids and r.text == one.text
        assert r.text == tokenizer.decode(r.token_ids)
        assert r.weights == pytest.approx(w[i].tolist())
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(one.logprobs), atol=1e-4, rtol=1e-5)


def test_generate_accepts_prompt_strings(tokenizer):
    models = _policies("gpt2", tokenizer)
    dec = MODDecoder(models, tokenizer)
    ids, mask = _batch(tokenizer, template="chat")
    a = dec.generate(PROMPTS, weights=W4, max_new_tokens=4, template="chat")
    b = dec.generate(ids, mask, weights=W4, max_new_tokens=4)
    assert torch.equal(a.sequences, b.sequences)


def test_preallocated_layer_matches_dynamic_layer_and_grows():
    """Writes in place within capacity, grows past it, selects rows: always what concatenation gives."""
    from transformers.cache_utils import DynamicLayer

    from sipo_fast.decoding.runners import PreallocatedLayer

    g = torch.Generator().manual_seed(0)
    ours, ref = PreallocatedLayer(capacity=6), DynamicLayer()
    for t in (4, 1, 1, 3, 1):  # 10 positions > capacity 6
        k, v = torch.randn(3, 2, t, 8, generator=g), torch.randn(3, 2, t, 8, generator=g)
        a, b = ours.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    idx = torch.tensor([2, 2, 0])  # fork row 2, drop row 1
    ours.batch_select_indices(idx)
    ref.batch_select_indices(idx)
    k, v = torch.randn(3, 2, 1, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g)
    a, b = ours.update(k, v), ref.update(k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and ours.get_seq_length() == 11


# ------------------------------------------------------------------------------------ vocabulary checks
def _swapped_tokenizer(tokenizer, a: int, b: int):
    """Same size, ids of two tokens swapped."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    inv = {i: t for t, i in vocab.items()}
    vocab[inv[a]], vocab[inv[b]] = b, a
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)


def test_vocab_mapping_mismatch_names_first_differing_token(tokenizer):
    models = _policies("llama", tokenizer)
    other = _swapped_tokenizer(tokenizer, 1000, 2000)
    assert len(other) == len(tokenizer)
    name = tokenizer.convert_ids_to_tokens(1000)
    with pytest.raises(ValueError, match=rf"token id 1000: .* but {re.escape(repr(name))} in policy 0"):
        MODDecoder(models, [tokenizer, other])
    MODDecoder(models, [tokenizer, copy.deepcopy(tokenizer)])  # identical mappings pass


def test_vocab_mismatch_from_saved_model_directory(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    models = _policies("llama", tokenizer)
    models[1].save_pretrained(tmp_path)
    _swapped_tokenizer(tokenizer, 5, 9).save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="token id 5"):
        MODDecoder([models[0], reloaded], tokenizer)


def test_vocab_size_mismatch(tokenizer):
    models = _policies("llama", tokenizer)
    models[1].resize_token_embeddings(len(tokenizer) + 8)
    with pytest.raises(ValueError, match="vocabulary sizes"):
        MODDecoder(models, tokenizer)


# ------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def decoder(tokenizer):
    return MODDecoder(_policies("llama", tokenizer), tokenizer)


@pytest.mark.parametrize("kw,match", [
    (dict(weights=[0.5, 0.6]), "sum to 1"),
    (dict(weights=[1.2, -0.2]), "non-negative"),
    (dict(weights=[[0.5, 0.5]] * 3), "rows"),
    (dict(weights=[1.0]), "N=2"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(seed=1.5), "seed"),
    (dict(eos_token_id=10**9), "eos_token_id"),
])
def test_generate_errors(decoder, tokenizer, kw, match):
    ids, mask = _batch(tokenizer)
    kw = {"weights": [0.5, 0.5], "max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
        decoder.generate(ids, mask, **kw)


def test_batch_errors(decoder, tokenizer):
    ids, mask = _batch(tokenizer)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        decoder.generate(ids, right, weights=[0.5, 0.5], max_new_tokens=2)
    zero = mask.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match="all zeros"):
        decoder.generate(ids, zero, weights=[0.5, 0.5], max_new_tokens=2)
    with pytest.raises(ValueError, match="lie in"):
        decoder.generate(ids + 10**6, mask, weights=[0.5, 0.5], max_new_tokens=2)
    with pytest.raises(ValueError, match="shape"):
        decoder.generate(ids, mask[:, 1:], weights=[0.5, 0.5], max_new_tokens=2)
    with pytest.raises(ValueError, match="text prompts"):
        decoder.generate(["hi", "there"], mask[:2], weights=[0.5, 0.5], max_new_tokens=2)


def test_constructor_errors(tokenizer):
    models = _policies("llama", tokenizer)
    with pytest.raises(ValueError, match="non-empty list"):
        MODDecoder([], tokenizer)
    with pytest.raises(ValueError, match="adapter_names"):
        MODDecoder(models, tokenizer, adapter_names=["a"])
    with pytest.raises(ValueError, match="compute_dtype"):
        MODDecoder(models, tokenizer, compute_dtype="bf16")
    with pytest.raises(ValueError, match="not a Hugging Face causal LM"):
        MODDecoder([models[0], torch.nn.Linear(2, 2)], tokenizer)
    no_tok = MODDecoder(models)
    with pytest.raises(ValueError, match="tokenizer"):
        no_tok.generate_text(["hi"], weights=[0.5, 0.5], max_new_tokens=2)


def test_peft_adapter_errors(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _policies("llama", tokenizer, n=1)[0]
    pm = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    with pytest.raises(ValueError, match="not in the PEFT model"):
        MODDecoder(pm, tokenizer, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="duplicates"):
        MODDecoder(pm, tokenizer, adapter_names=["a", "a"])
