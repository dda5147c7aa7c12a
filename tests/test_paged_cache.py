"""Paged KV pools + the transformers integration against stock HF (DynamicCache + SDPA).

Every test runs the same token streams twice: through stock transformers with a left-padded 2-D mask and a
DynamicCache, and through SharedPagedKV + PagedCache + the "sipo_paged" attention function, and compares the
logits of every step. Rows that fork a prompt, copy-on-write, prefix caching and several policies sharing
one block table are all covered.
"""
import pytest
import torch
from transformers import DynamicCache

from sipo_fast.kv import (OutOfBlocksError, PagedKVPool, SharedPagedKV, forward_paged, paged_attention_enabled)
from sipo_fast.kv.hf import cache_kwarg
from sipo_fast.models import tiny

PAD = 2
ATOL = 2e-5


def hf_stream(model, rows, steps):
    """Stock HF: prefill left-padded ``rows`` (token lists), then feed ``steps[s]`` ([B] tokens) one step at a
    time. Returns the last-position logits after the prefill and after every step: list of [B, V]."""
    batch, width = len(rows), max(map(len, rows))
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cache = {cache_kwarg(model): DynamicCache(config=model.config)}  # `cache` (transformers >= 5.2x) or older name
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache)
        logits = [out.logits[:, -1]]
        for tokens in steps:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos, use_cache=True, **cache)
            logits.append(out.logits[:, -1])
    return logits


def paged_step(models, kv, seq_ids, input_ids, new_mask):
    kv.begin_forward(seq_ids, new_mask)
    with torch.no_grad():
        return [forward_paged(m, kv, i, input_ids)[:, -1] for i, m in enumerate(models)]


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def models(tokenizer):
    return {arch: tiny(arch, tokenizer=tokenizer)[0] for arch in ("llama", "qwen2", "mistral")}


@pytest.mark.parametrize("arch,block_size", [("llama", 1), ("llama", 16), ("qwen2", 4), ("mistral", 4),
                                             ("mistral", 16)])
def test_ragged_prefill_and_decode_match_stock_hf(models, arch, block_size):
    model = models[arch]
    prompts = random_prompts([7, 3, 18, 4], seed=block_size)
    steps = [torch.randint(3, 40000, (len(prompts),), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    expected = hf_stream(model, prompts, steps)
    kv = SharedPagedKV.for_models([model], num_blocks=64, block_size=block_size)
    seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
    with paged_attention_enabled(model):
        got = [paged_step([model], kv, seq_ids, ids, mask)[0]]
        for tokens in steps:
            ones = torch.ones(len(prompts), 1, dtype=torch.bool)
            got.append(paged_step([model], kv, seq_ids, tokens[:, None], ones)[0])
    for s, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4, msg=f"step {s}")
    assert model.config._attn_implementation != "sipo_paged", "the context manager must restore the model"
    assert [kv.manager.num_tokens(s) for s in seq_ids] == [len(p) + len(steps) for p in prompts]


def test_forked_rows_copy_on_write_match_independent_rows(models):
    """Two prompts (6 and 3 tokens, block 4: both end mid-block) forked into 3 rows each; every row then
    decodes its own tokens. Each fork's first append copies the shared partial block; logits must equal
    running every row as its own sequence, and the prompts' full blocks stay shared."""
    model = models["llama"]
    prompts = random_prompts([6, 3], seed=1)
    k = 3
    rows = [p for p in prompts for _ in range(k)]
    steps = [torch.randint(3, 40000, (len(rows),), generator=torch.Generator().manual_seed(10 + s)) for s in range(5)]
    expected = hf_stream(model, rows, steps)
    kv = SharedPagedKV.for_models([model], num_blocks=32, block_size=4)
    seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
    with paged_attention_enabled(model):
        prefill = paged_step([model], kv, seq_ids, ids, mask)[0]
        torch.testing.assert_close(prefill.repeat_interleave(k, 0), expected[0], atol=ATOL, rtol=1e-4)
        forks = [kv.fork(s) for s in seq_ids for _ in range(k)]
        first_block = kv.manager.block_table(seq_ids[0])[0]
        assert kv.manager.refcount(first_block) == 1 + k
        free_before = kv.manager.num_free_blocks()
        for s, tokens in enumerate(steps):
            got = paged_step([model], kv, forks, tokens[:, None], torch.ones(len(rows), 1, dtype=torch.bool))[0]
            torch.testing.assert_close(got, expected[s + 1], atol=ATOL, rtol=1e-4, msg=f"step {s}")
            if s == 0:  # every fork copied its prompt's partial block once: 2 prompts x 3 forks
                assert kv.manager.num_free_blocks() == free_before - 2 * k
    assert kv.manager.refcount(first_block) == 1 + k, "the full prompt block must still be shared"


def test_finished_rows_store_nothing(models):
    """A row whose input is masked out (a finished sample) writes no KV and keeps its length."""
    model = models["qwen2"]
    prompts = random_prompts([5, 9], seed=2)
    kv = SharedPagedKV.for_models([model], num_blocks=16, block_size=4)
    seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
    with paged_attention_enabled(model):
        paged_step([model], kv, seq_ids, ids, mask)
        before = kv.pools[0].kv.clone()
        paged_step([model], kv, seq_ids, torch.tensor([[7], [PAD]]), torch.tensor([[True], [False]]))
    assert [kv.manager.num_tokens(s) for s in seq_ids] == [6, 9]
    changed = (kv.pools[0].kv != before).flatten(4).any(-1).nonzero()  # (layer, k/v, block, slot) that changed
    block = kv.manager.block_table(seq_ids[0])[5 // 4]
    assert changed.shape[0] == 2 * 2, "exactly one slot per layer, keys and values"
    assert (changed[:, 2] == block).all() and (changed[:, 3] == 5 % 4).all()


def test_prefix_caching_skips_shared_prefix_and_keeps_logits(models):
    """Prompts sharing a 9-token prefix, block 4: the second and third prompt reuse two full blocks (8 tokens)
    and compute only their suffixes; logits equal stock HF on the full prompts."""
    model = models["mistral"]
    prefix = random_prompts([9], seed=3)[0]
    prompts = [prefix + [11, 12], prefix + [13], prefix + [14, 15, 16]]
    steps = [torch.tensor([20, 21, 22]), torch.tensor([23, 24, 25])]
    expected = hf_stream(model, prompts, steps)
    kv = SharedPagedKV.for_models([model], num_blocks=32, block_size=4, enable_prefix_caching=True)
    seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
    assert mask.sum(1).tolist() == [11, 10 - 8, 12 - 8], "cached prefixes are not recomputed"
    assert kv.manager.block_table(seq_ids[1])[:2] == kv.manager.block_table(seq_ids[0])[:2]
    with paged_attention_enabled(model):
        got = [paged_step([model], kv, seq_ids, ids, mask)[0]]
        for tokens in steps:
            got.append(paged_step([model], kv, seq_ids, tokens[:, None], torch.ones(3, 1, dtype=torch.bool))[0])
    for s, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4, msg=f"step {s}")


def test_two_policies_share_one_block_table(models, tokenizer):
    """Two different models (seeds 0 and 1) on one SharedPagedKV: one allocation serves both pools, and each
    policy's logits equal its own stock HF run."""
    m0, m1 = models["llama"], tiny("llama", tokenizer=tokenizer, seed=1)[0]
    prompts = random_prompts([5, 10], seed=4)
    steps = [torch.tensor([100, 200]), torch.tensor([300, 400]), torch.tensor([500, 600])]
    expected = [hf_stream(m, prompts, steps) for m in (m0, m1)]
    kv = SharedPagedKV.for_models([m0, m1], num_blocks=16, block_size=4)
    seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
    with paged_attention_enabled(m0, m1):
        got = [paged_step([m0, m1], kv, seq_ids, ids, mask)]
        for tokens in steps:
            got.append(paged_step([m0, m1], kv, seq_ids, tokens[:, None], torch.ones(2, 1, dtype=torch.bool)))
    for s in range(len(got)):
        for p in range(2):
            torch.testing.assert_close(got[s][p], expected[p][s], atol=ATOL, rtol=1e-4, msg=f"step {s} policy {p}")
    assert kv.manager.num_free_blocks() == 16 - (2 + 4), "8 and 13 tokens in blocks of 4: 2 + 4 blocks in total"
    assert not torch.equal(kv.pools[0].kv, kv.pools[1].kv), "each policy writes its own pool"


@pytest.fixture
def mistral_window5(models):
    """The tiny Mistral with a 5-token sliding window (config read at forward time), restored afterwards."""
    model = models["mistral"]
    saved = model.config.sliding_window
    model.config.sliding_window = 5
    yield model
    model.config.sliding_window = saved


def test_sliding_window_matches_stock_hf(mistral_window5):
    """Mistral with a 5-token window, prompts longer than it: prefill and decode masks must match HF's."""
    model = mistral_window5
    prompts = random_prompts([8, 3, 12], seed=5)
    steps = [torch.tensor([30, 31, 32]), torch.tensor([33, 34, 35]), torch.tensor([36, 37, 38])]
    expected = hf_stream(model, prompts, steps)
    kv = SharedPagedKV.for_models([model], num_blocks=32, block_size=4)
    seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
    with paged_attention_enabled(model):
        got = [paged_step([model], kv, seq_ids, ids, mask)[0]]
        for tokens in steps:
            got.append(paged_step([model], kv, seq_ids, tokens[:, None], torch.ones(3, 1, dtype=torch.bool))[0])
    for s, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4, msg=f"step {s}")


def test_pool_write_gather_and_copy_blocks():
    pool = PagedKVPool(2, 6, 3, 2, 4)
    keys, values = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
    slots = torch.tensor([0, 4, 5, 9, 17])  # block 0 slot 0, block 1 slots 1-2, block 3 slot 0, block 5 slot 2
    pool.write(1, slots, keys, values)
    k, v = pool.gather(1, slots[None])
    torch.testing.assert_close(k[0], keys)
    torch.testing.assert_close(v[0], values)
    assert pool.keys(1)[1, 2].equal(keys[2]) and pool.values(1)[5, 2].equal(values[4])
    assert pool.kv[0].abs().sum() == 0, "layer 0 untouched"
    pool.copy_blocks(torch.tensor([[1, 2], [5, 4]]))
    assert pool.kv[:, :, 2].equal(pool.kv[:, :, 1]) and pool.kv[:, :, 4].equal(pool.kv[:, :, 5])
    assert pool.nbytes == 2 * 2 * 6 * 3 * 2 * 4 * 4


def test_bad_setup_and_out_of_blocks_raise_before_changing_anything(models):
    model = models["llama"]
    with pytest.raises(ValueError):
        PagedKVPool(2, 0, 4, 2, 8)
    with pytest.raises(ValueError):
        PagedKVPool(2, 4, 4, 2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="geometry"):
        SharedPagedKV([PagedKVPool(2, 4, 4, 2, 8), PagedKVPool(2, 4, 4, 1, 8)], 4)
    with pytest.raises(ValueError, match="block_size"):
        SharedPagedKV([PagedKVPool(2, 4, 4, 2, 8)], 8)
    kv = SharedPagedKV.for_models([model], num_blocks=3, block_size=4)
    with pytest.raises(ValueError):
        kv.add_prompts([[1, 2], []])
    with pytest.raises(OutOfBlocksError):
        kv.add_prompts([[5] * 8, [6] * 8])  # needs 4 blocks
    assert kv.manager.num_free_blocks() == 3 and kv.manager.seq_ids() == [], "all-or-nothing"
    seq_ids, ids, mask = kv.add_prompts([[5] * 7], pad_token_id=PAD)
    with pytest.raises(ValueError, match="new_mask"):
        kv.begin_forward(seq_ids, mask.long())
    with pytest.raises(ValueError, match="registered"):
        kv.begin_forward(seq_ids, mask[:, 1:])
    with paged_attention_enabled(model):
        paged_step([model], kv, seq_ids, ids, mask)
        kv.begin_forward(seq_ids, torch.ones(1, 1, dtype=torch.bool))  # 8 tokens: 2 blocks
        with pytest.raises(OutOfBlocksError):
            kv.begin_forward(seq_ids, torch.ones(1, 5, dtype=torch.bool))  # 13 tokens would need 4 blocks
        assert kv.manager.num_tokens(seq_ids[0]) == 8
        with pytest.raises(ValueError, match="begin_forward"):
            forward_paged(model, kv, 0, torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="paged_attention_enabled"):
        forward_paged(model, kv, 0, torch.ones(1, 1, dtype=torch.long))
    with paged_attention_enabled(model), pytest.raises(ValueError, match="PagedCache"):
        model(input_ids=torch.ones(1, 2, dtype=torch.long))  # no paged cache: a clear error, not wrong output


@pytest.mark.gpu
def test_paged_cache_on_gpu_matches_stock_hf(tokenizer):
    model = tiny("llama", tokenizer=tokenizer)[0].cuda()
    prompts = random_prompts([7, 30, 2], seed=6)
    steps = [torch.randint(3, 40000, (3,), generator=torch.Generator().manual_seed(s)).cuda() for s in range(4)]
    expected = hf_stream(model, prompts, steps)
    kv = SharedPagedKV.for_models([model], num_blocks=32, block_size=16)
    seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
    with paged_attention_enabled(model):
        got = [paged_step([model], kv, seq_ids, ids, mask)[0]]
        for tokens in steps:
            got.append(paged_step([model], kv, seq_ids, tokens[:, None],
                                  torch.ones(3, 1, dtype=torch.bool, device="cuda"))[0])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- MOD decoder on the paged cache
W4 = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]])  # SIPO's W as [w, 1 - w]


@pytest.fixture(scope="module")
def two_policies(tokenizer):
    """Two tiny Llamas (seeds 0, 1) with scaled-up output layers: spread-out logits, so no near-ties."""
    models = []
    for seed in (0, 1):
        m, _ = tiny("llama", tokenizer=tokenizer, seed=seed, tie_word_embeddings=False)
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(4.0)
        models.append(m)
    return models


@pytest.fixture(scope="module")
def prompt_batch(tokenizer):
    from sipo_fast.data.formatting import encode_prompts, left_pad

    texts = ["Hi", "Write a short poem about the sea, please.", "Why is the sky blue?"]
    return left_pad(encode_prompts(tokenizer, texts, "chat"), tokenizer.pad_token_id)


def _decoders(policies, tokenizer, **kw):
    from sipo_fast import MODDecoder

    return (MODDecoder(policies, tokenizer, kv_cache="paged", kv_block_size=8, **kw),
            MODDecoder(policies, tokenizer, kv_cache="dynamic", **kw))


@pytest.mark.parametrize("dedupe", [True, False])
def test_decoder_greedy_paged_equals_dynamic(two_policies, tokenizer, prompt_batch, dedupe):
    """P prompts x |W| = 4 rows, greedy, with an EOS that some rows hit mid-way (taken from an unpaged run):
    the paged path must produce the same tokens and log-probs as the DynamicCache path."""
    ids, mask = prompt_batch
    paged, dynamic = _decoders(two_policies, tokenizer, dedupe=dedupe)
    assert paged.kv_cache == "paged" and dynamic.kv_cache == "dynamic"
    rows_ids, rows_mask, w = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), W4.repeat(3, 1)
    probe = dynamic.generate(rows_ids, rows_mask, weights=w, max_new_tokens=12, eos_token_id=[])
    eos = int(probe.generated[1, 4])  # a token row 1 emits at step 5: rows stop at different steps
    kw = dict(weights=w, max_new_tokens=12, eos_token_id=eos)
    a, b = paged.generate(rows_ids, rows_mask, **kw), dynamic.generate(rows_ids, rows_mask, **kw)
    assert a.finished.any() and not a.finished.all()
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-5)
    assert not torch.equal(a.generated[0], a.generated[3]), "the weights must change the outputs"


def test_decoder_prefills_each_distinct_prompt_once(two_policies, tokenizer, prompt_batch):
    """[B, S, N] weights (S = 4 per prompt) and the same rows given as repeated [B·S, N] rows: both prefill
    each prompt once per policy (P prompts' tokens, not 4P), give the same output, and keep the prompt's
    full KV blocks shared by its 4 rows (refcount 4) until the end."""
    ids, mask = prompt_batch
    paged, _ = _decoders(two_policies, tokenizer)
    sets = W4[None].expand(3, 4, 2)  # (B, S, N)
    a = paged.generate(ids, mask, weights=sets, max_new_tokens=6, eos_token_id=[])
    stats = dict(paged.runner.stats)
    prompt_blocks = [paged.runner.kv.manager.block_table(s)[0] for s in paged.runner.seqs]
    b = paged.generate(ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), weights=W4.repeat(3, 1),
                       max_new_tokens=6, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape[0] == 12
    assert stats["prefill_tokens"] == paged.runner.stats["prefill_tokens"] == int(mask.sum())
    unshared, _ = _decoders(two_policies, tokenizer, dedupe=False)
    c = unshared.generate(ids, mask, weights=sets, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(c.sequences, a.sequences)
    assert unshared.runner.stats["prefill_tokens"] == 4 * int(mask.sum())
    assert stats["peak_blocks_used"] < unshared.runner.stats["peak_blocks_used"]
    counts = torch.tensor([prompt_blocks.count(x) for x in prompt_blocks])
    assert (counts == 4).all(), "each prompt's first block is held by its 4 rows"


@pytest.mark.parametrize("impl", ["bmm", "peft"])
def test_decoder_lora_adapters_paged_equals_dynamic(tokenizer, prompt_batch, impl):
    """One PEFT model with two LoRA adapters decoded in one forward over N·U rows (stacked pools)."""
    from peft import LoraConfig, get_peft_model

    base, _ = tiny("llama", tokenizer=tokenizer, seed=3, tie_word_embeddings=False)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(4.0)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(**cfg), adapter_name="helpful")
    model.add_adapter("harmless", LoraConfig(**cfg))
    ids, mask = prompt_batch
    paged, dynamic = _decoders(model, tokenizer, adapter_names=["helpful", "harmless"], lora_impl=impl)
    kw = dict(weights=W4[None].expand(3, 4, 2), max_new_tokens=8, eos_token_id=[])
    a, b = paged.generate(ids, mask, **kw), dynamic.generate(ids, mask, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-5)


def test_decoder_kv_cache_argument_errors(two_policies, tokenizer, prompt_batch):
    from sipo_fast import MODDecoder

    with pytest.raises(ValueError, match="kv_cache"):
        MODDecoder(two_policies, tokenizer, kv_cache="blocks")
    gpt2 = tiny("gpt2", tokenizer=tokenizer)[0]
    with pytest.raises(ValueError, match="gpt2"):
        MODDecoder([gpt2], tokenizer, kv_cache="paged")
    assert MODDecoder([gpt2], tokenizer).kv_cache == "dynamic", "auto falls back where paging does not apply"
    ids, mask = prompt_batch
    with pytest.raises(ValueError, match=r"\[B, S, N\]"):
        MODDecoder(two_policies, tokenizer).generate(ids, mask, weights=W4[None].expand(2, 4, 2), max_new_tokens=2)


def test_both_cache_keyword_names_reach_the_cache(tokenizer):
    """transformers renamed the forward's ``past_key_values`` to ``cache`` within 5.x (5.17 on the GPU image takes
    the old name); a cache passed under the other name is silently ignored. A model whose forward accepts only
    ``past_key_values`` must decode through the paged cache, the dynamic runner and the MOD decoder exactly
    like the stock one."""
    from transformers import LlamaForCausalLM

    from sipo_fast import MODDecoder

    class OldKeywordLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, logits_to_keep=0, **kwargs):
            assert "cache" not in kwargs, "the old-style forward must get its cache as past_key_values"
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep,
                                   **{stock_kw: past_key_values}, **kwargs)

    new, _ = tiny("llama", tokenizer=tokenizer)
    stock_kw = cache_kwarg(new)  # what the installed transformers' forward takes
    old = OldKeywordLlama(new.config).eval()
    old.load_state_dict(new.state_dict())
    assert cache_kwarg(old) == "past_key_values"
    prompts = random_prompts([5, 9, 2], seed=3)
    steps = [torch.randint(3, 40000, (3,), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    expected = hf_stream(new, prompts, steps)
    for model in (new, old):
        assert all(torch.equal(a, b) for a, b in zip(hf_stream(model, prompts, steps), expected))
        kv = SharedPagedKV.for_models([model], num_blocks=32, block_size=4)
        seq_ids, ids, mask = kv.add_prompts(prompts, pad_token_id=PAD)
        with paged_attention_enabled(model):
            got = [paged_step([model], kv, seq_ids, ids, mask)[0]]
            got += [paged_step([model], kv, seq_ids, t[:, None], torch.ones(3, 1, dtype=torch.bool))[0] for t in steps]
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=1e-4)
    ids = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11]])
    mask = (ids != PAD).long()
    outs = [MODDecoder([m, m], tokenizer, kv_cache=kv).generate(ids, mask, weights=[0.5, 0.5], max_new_tokens=6)
            for m in (new, old) for kv in ("paged", "dynamic")]
    assert all(torch.equal(o.sequences, outs[0].sequences) for o in outs)
