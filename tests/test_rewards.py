"""sequence_logprobs (fused path) against a direct forward, and implicit_rewards over models, adapters and soups."""
import copy
import warnings

import pytest
import torch
import transformers as tf

from sipo_fast.data.formatting import encode_pairs
from sipo_fast.models import tiny
from sipo_fast.training import backbone, implicit_rewards, reference_logprobs, sequence_logprobs
from sipo_fast.training import sequence_logprobs_ref

PROMPTS = ["Say hi.", "Tell me something rude about my neighbour.", "What is two plus two?"]
RESPONSES = ["Hi!", "I would rather not say anything rude.", "Four."]


@pytest.fixture(scope="module")
def batch(tokenizer):
    return encode_pairs(tokenizer, PROMPTS, RESPONSES)


def _direct(model, batch):
    """Independent oracle: full logits, then an explicit loop over response tokens t adding log p(x_t | x_<t)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits.log_softmax(-1)  # (B, T, V)
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            if batch["response_mask"][b, t]:
                total += logp[b, t - 1, batch["input_ids"][b, t]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sequence_logprobs_matches_direct_forward(arch, tokenizer, batch):
    model, _ = tiny(arch, tokenizer=tokenizer, tie_word_embeddings=(arch != "qwen2"))
    with torch.no_grad():
        got = sequence_logprobs(model, **batch)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _direct(model, batch), rtol=1e-5, atol=1e-4)


def test_sequence_logprobs_ignores_prompt_and_padding(tokenizer, tiny_llama):
    """Changing a prompt-only label position's mask or the padding must not change the response log-prob; a
    shorter response mask must give the sum over the kept tokens only."""
    b = encode_pairs(tokenizer, PROMPTS[:2], RESPONSES[:2])
    with torch.no_grad():
        full = sequence_logprobs(tiny_llama, **b)
        padded = {k: torch.cat([v, v[:, -1:].clone().fill_(0 if k != "input_ids" else 2)], 1) for k, v in b.items()}
        torch.testing.assert_close(sequence_logprobs(tiny_llama, **padded), full)
        cut = {k: v.clone() for k, v in b.items()}
        last = int(cut["response_mask"][0].nonzero().max())
        cut["response_mask"][0, last] = 0  # drop the EOS of row 0 from the sum
        logits = tiny_llama(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        eos_lp = logits[0, last - 1].log_softmax(-1)[b["input_ids"][0, last]]
        torch.testing.assert_close(sequence_logprobs(tiny_llama, **cut)[0], full[0] - eos_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_sequence_logprobs_gradients_match_reference(tokenizer, batch, tied):
    """Tied embeddings: the LM head weight is the embedding, so its gradient must carry both uses."""
    m1, _ = tiny("llama", tokenizer=tokenizer, tie_word_embeddings=tied)
    m2 = copy.deepcopy(m1)
    g = torch.tensor([1.0, -0.5, 2.0])
    (sequence_logprobs(m1, **batch) * g).sum().backward()
    (sequence_logprobs_ref(m2, **batch) * g).sum().backward()
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert (m1.get_input_embeddings().weight is m1.get_output_embeddings().weight) == tied


def test_cohere_logit_scale_is_supported(tokenizer, batch):
    """Cohere multiplies logits by logit_scale; the fused path folds it into the hidden states (no fallback)."""
    cfg = tf.CohereConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, logit_scale=0.37,
                          pad_token_id=tokenizer.pad_token_id)
    model = tf.CohereForCausalLM(cfg).eval()
    assert backbone.lm_head_plan(model)[2] == pytest.approx(0.37)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path, not the fallback
        got = sequence_logprobs(model, **batch)
    torch.testing.assert_close(got.detach().double(), _direct(model, batch), rtol=1e-5, atol=1e-4)


def test_softcapped_model_falls_back_with_one_warning(tokenizer, batch):
    cfg = tf.Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0,
                          pad_token_id=tokenizer.pad_token_id)
    model = tf.Gemma2ForCausalLM(cfg).eval()
    assert backbone.lm_head_plan(model) is None
    backbone._warned.clear()
    with pytest.warns(UserWarning, match="full-logits"):
        got = sequence_logprobs(model, **batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        sequence_logprobs(model, **batch)
    torch.testing.assert_close(got.detach().double(), _direct(model, batch), rtol=1e-5, atol=1e-4)


def test_bad_batches_raise(tiny_llama, batch):
    bad = dict(batch, response_mask=batch["response_mask"].clone())
    bad["attention_mask"] = bad["attention_mask"].clone()
    bad["attention_mask"][0, -1] = 0
    bad["response_mask"][0, -1] = 1
    with pytest.raises(ValueError, match="padding"):
        sequence_logprobs(tiny_llama, **bad)
    with pytest.raises(ValueError, match="shaped like input_ids"):
        sequence_logprobs(tiny_llama, batch["input_ids"], batch["attention_mask"], batch["response_mask"][:, :-1])


# ---- implicit rewards ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_models(tokenizer):
    return [tiny("llama", tokenizer=tokenizer, seed=s)[0] for s in (1, 2, 3)]  # two policies + a reference


def test_implicit_rewards_of_model_list(three_models, batch):
    """r_k = β (log π_k - log π_ref), checked against the direct forward of each model."""
    p1, p2, ref = three_models
    r = implicit_rewards([p1, p2], ref, batch, beta=0.1, progress=False)
    expected = 0.1 * (torch.stack([_direct(p1, batch), _direct(p2, batch)], 1) - _direct(ref, batch)[:, None])
    assert r.shape == (3, 2)
    torch.testing.assert_close(r.double(), expected, rtol=1e-4, atol=1e-5)
    # precomputed reference log-probs and small batches give the same numbers
    ref_lp = reference_logprobs(ref, batch, progress=False)
    r2 = implicit_rewards([p1, p2], None, batch, beta=0.1, ref_logprobs=ref_lp, batch_size=2, progress=False)
    torch.testing.assert_close(r2, r, rtol=1e-5, atol=1e-6)
    # a merged soup is just another model
    soup = copy.deepcopy(p1)
    with torch.no_grad():
        for ps, pa, pb in zip(soup.parameters(), p1.parameters(), p2.parameters()):
            ps.copy_(0.4 * pa + 0.6 * pb)
    r3 = implicit_rewards([p1, soup], ref, batch, beta=0.1, progress=False)
    torch.testing.assert_close(r3[:, 1].double(), 0.1 * (_direct(soup, batch) - _direct(ref, batch)), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def peft_policies(tokenizer):
    from peft import LoraConfig, get_peft_model

    base, _ = tiny("llama", tokenizer=tokenizer, seed=5)
    cfg = lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],  # noqa: E731
                             init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(base, cfg(), adapter_name="helpful")
    model.add_adapter("harmless", cfg())
    return model


def _per_adapter_direct(model, names, batch):
    cols = []
    for n in names:
        model.set_adapter(n)
        cols.append(_direct(model, batch))
    model.set_adapter(names[0])
    with model.disable_adapter():
        ref = _direct(model, batch)
    return torch.stack(cols, 1), ref


def test_implicit_rewards_of_adapters_with_base_reference(peft_policies, batch):
    """(peft_model, names) with reference=None: one mixed-adapter forward; equals scoring adapter by adapter."""
    names = ["helpful", "harmless"]
    lps, ref = _per_adapter_direct(peft_policies, names, batch)
    r = implicit_rewards((peft_policies, names), None, batch, beta=0.25, progress=False)
    torch.testing.assert_close(r.double(), 0.25 * (lps - ref[:, None]), rtol=1e-4, atol=1e-5)
    assert peft_policies.active_adapter == "helpful"  # state restored
    # the same adapters given as (peft_model, name) pairs, in the other order
    r2 = implicit_rewards([(peft_policies, "harmless"), (peft_policies, "helpful")], None, batch, beta=0.25,
                          progress=False)
    torch.testing.assert_close(r2, r.flip(1), rtol=1e-5, atol=1e-6)


def test_implicit_rewards_mixed_list_with_reference_model(peft_policies, three_models, batch):
    p1, _, ref = three_models
    lps, _ = _per_adapter_direct(peft_policies, ["helpful", "harmless"], batch)
    r = implicit_rewards([p1, (peft_policies, "harmless")], ref, batch, beta=0.1, batch_size=2, progress=False)
    expected = 0.1 * (torch.stack([_direct(p1, batch), lps[:, 1]], 1) - _direct(ref, batch)[:, None])
    torch.testing.assert_close(r.double(), expected, rtol=1e-4, atol=1e-5)


def test_implicit_rewards_bad_arguments(three_models, peft_policies, batch):
    p1, p2, ref = three_models
    with pytest.raises(ValueError, match="reference=None"):
        implicit_rewards([p1, p2], None, batch)
    with pytest.raises(ValueError, match="ref_logprobs"):
        implicit_rewards([p1], None, batch, ref_logprobs=torch.zeros(5))
    with pytest.raises(ValueError, match="beta"):
        implicit_rewards([p1], ref, batch, beta=0)
    with pytest.raises(ValueError, match="empty"):
        implicit_rewards([], ref, batch)
    with pytest.raises(ValueError, match="PeftModel"):
        implicit_rewards((p1, ["a"]), ref, batch)
    with pytest.raises(ValueError, match="batch_size"):
        implicit_rewards([p1], ref, batch, batch_size=0)
    with pytest.raises(ValueError, match="not in this PeftModel"):
        implicit_rewards((peft_policies, ["helpful", "typo"]), None, batch)


@pytest.mark.slow
def test_default_model_fused_equals_naive(tokenizer):
    """The embedded SmolLM2-135M: fused sequence log-probs equal the naive full-logits path."""
    from sipo_fast.models import load_default

    model, tok = load_default()
    b = encode_pairs(tok, PROMPTS, RESPONSES)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, **b), sequence_logprobs_ref(model, **b), rtol=1e-5, atol=1e-3)
