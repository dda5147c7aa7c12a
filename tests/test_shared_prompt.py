"""Prompt-shared scoring (sipo_fast.training.shared_prompt) against the full-logits reference, plus the checks
that it really runs a shared prompt once and steps aside where it cannot serve a batch."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import random_lora_b
from sipo_fast.data.formatting import encode_pairs
from sipo_fast.models import tiny
from sipo_fast.training import implicit_rewards
from sipo_fast.training.backbone import BASE, use_adapter
from sipo_fast.training.logprobs import policy_logprobs, sequence_logprobs_ref
from sipo_fast.training.shared_prompt import prompt_spans, shared_prompt_logprobs

PROMPTS = ["hello there", "hello there", "what is the capital of France?", "hello there", "x",
           "what is the capital of France?", "a prompt seen once"]
RESPONSES = ["fine thanks", "go away now please, I am busy", "", "ok", "y z", "Paris, of course. It has been for ages.",
             "alone"]


def _peft(arch="llama", seed=0):
    model, tok = tiny(arch, seed=seed)
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="pa")
    pm.add_adapter("pb", LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return random_lora_b(pm), tok


def _reference(pm, names, batch):
    cols = []
    for n in names:
        with use_adapter(pm, n):
            cols.append(sequence_logprobs_ref(pm, batch["input_ids"], batch["attention_mask"], batch["response_mask"]))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_matches_full_logits_reference(arch, batch_size):
    pm, tok = _peft(arch)
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=40)
    names = ["pa", "pb", BASE]
    got = policy_logprobs([(pm, n) for n in names], batch, batch_size=batch_size, progress=False)
    torch.testing.assert_close(got, _reference(pm, names, batch), atol=2e-5, rtol=1e-5)


def test_truncated_rows_and_a_row_without_response_tokens():
    pm, tok = _peft()
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=38)  # responses cut to 1-6 tokens
    batch["response_mask"][1] = 0  # a row scoring nothing: log-prob 0 under every model
    got = shared_prompt_logprobs(pm, ["pa", BASE], batch)
    assert got is not None
    assert torch.equal(got[1], torch.zeros(2))
    torch.testing.assert_close(got, _reference(pm, ["pa", BASE], batch), atol=2e-5, rtol=1e-5)


def test_plain_model_and_separate_reference_through_implicit_rewards():
    policy, tok = tiny(seed=1)
    ref, _ = tiny(seed=2)
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=40)
    got = implicit_rewards([policy], ref, batch, beta=0.1, progress=False)
    want = implicit_rewards([policy], ref, batch, beta=0.1, progress=False, share_prompts=False)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    lp = lambda m: sequence_logprobs_ref(m, batch["input_ids"], batch["attention_mask"], batch["response_mask"])  # noqa: E731
    torch.testing.assert_close(got[:, 0], 0.1 * (lp(policy) - lp(ref)), atol=2e-6, rtol=1e-5)


def test_a_shared_prompt_runs_once():
    """Count the tokens the embedding layer sees: the shared path must feed each distinct prompt once per
    adapter and then only responses."""
    pm, tok = _peft()
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=40)
    seen = []
    emb = pm.get_base_model().get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        assert shared_prompt_logprobs(pm, ["pa", "pb"], batch) is not None
        shared = sum(seen)
        seen.clear()
        policy_logprobs([(pm, "pa"), (pm, "pb")], batch, progress=False, share_prompts=False)
        plain = sum(seen)
    finally:
        handle.remove()
    spans = prompt_spans(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    prompts = {tuple(batch["input_ids"][i, :a].tolist()) for i, (a, _) in enumerate(spans)}
    assert len(prompts) == 4
    # 2 adapters × (the 4 distinct prompts, left-padded to the longest, in one forward + every row's response,
    # right-padded to the longest, in a second)
    longest_prompt = max(len(p) for p in prompts)
    longest_response = max(e - a for a, e in spans)
    assert shared == 2 * (len(prompts) * longest_prompt + len(spans) * longest_response)
    assert plain == 2 * batch["input_ids"].numel()
    assert shared < plain


def test_steps_aside_where_it_cannot_serve():
    pm, tok = _peft()
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=40)
    distinct = encode_pairs(tok, ["one", "two"], ["pa", "pb"], max_length=40)
    assert shared_prompt_logprobs(pm, ["pa"], distinct) is None  # nothing shared
    left = {k: v.flip(1) for k, v in batch.items()}  # left padding: not encode_pairs' layout
    assert prompt_spans(left["input_ids"], left["attention_mask"], left["response_mask"]) is None
    assert shared_prompt_logprobs(pm, ["pa"], left) is None
    no_prompt = {k: v.clone() for k, v in batch.items()}
    no_prompt["response_mask"][0, 0] = 1  # a response token at position 0 has no context
    assert shared_prompt_logprobs(pm, ["pa"], no_prompt) is None
    holes = {k: v.clone() for k, v in batch.items()}
    a = int(holes["response_mask"][1].nonzero()[0])
    holes["response_mask"][1, a + 1] = 0  # a non-contiguous response
    assert shared_prompt_logprobs(pm, ["pa"], holes) is None
    # and the caller's plain path still gives the reference on every one of them
    for b in (left, holes):
        torch.testing.assert_close(policy_logprobs([(pm, "pa")], b, progress=False), _reference(pm, ["pa"], b),
                                   atol=2e-5, rtol=1e-5)


def test_soft_capped_head_falls_back():
    pm, tok = _peft()
    pm.get_base_model().config.final_logit_softcapping = 30.0  # lm_head_plan refuses: not a linear map of h
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=40)
    assert shared_prompt_logprobs(pm, ["pa"], batch) is None


def test_bfloat16_model_close_to_plain_path():
    pm, tok = _peft()
    pm = pm.to(torch.bfloat16)
    batch = encode_pairs(tok, PROMPTS, RESPONSES, max_length=40)
    got = policy_logprobs([(pm, "pa"), (pm, BASE)], batch, progress=False)
    want = policy_logprobs([(pm, "pa"), (pm, BASE)], batch, progress=False, share_prompts=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.25, rtol=0.02)  # bf16 rounding of two different orders
